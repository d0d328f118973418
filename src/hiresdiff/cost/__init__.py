"""Cost model: model FLOPs of whole generations counted on the ``meta`` device (``hiresdiff cost``)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hiresdiff.cost.model import CostReport, architecture_of, model_cost

#: exported name → defining submodule, imported on first access (PEP 562) so that ``hiresdiff cost --help`` and
#: the other subcommands' parsers (which import :mod:`hiresdiff.cost.cli`) do not import torch
_WHERE = {"CostReport": "model", "architecture_of": "model", "model_cost": "model"}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)


__all__ = ["CostReport", "architecture_of", "model_cost"]
