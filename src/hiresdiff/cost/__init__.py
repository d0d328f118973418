"""Cost model: model FLOPs of whole generations counted on the ``meta`` device (``hiresdiff cost``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from hiresdiff.lazy import lazy_exports

if TYPE_CHECKING:
    from hiresdiff.cost.model import CostReport, architecture_of, model_cost

#: exported name → defining submodule, imported on first access (PEP 562) so that ``hiresdiff cost --help`` and
#: the other subcommands' parsers (which import :mod:`hiresdiff.cost.cli`) do not import torch
_WHERE = {"CostReport": "model", "architecture_of": "model", "model_cost": "model"}


__getattr__ = lazy_exports(__name__, _WHERE)


__all__ = ["CostReport", "architecture_of", "model_cost"]
