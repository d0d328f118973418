"""Package attributes imported on first access (PEP 562), so light entry points stay free of heavy libraries."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_exports(package: str, where: dict[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``package``: exported name → the submodule (relative to ``package``) that
    defines it, imported when the name is first read; other names raise :class:`AttributeError` as usual."""

    def __getattr__(name: str) -> Any:
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{where[name]}"), name)

    return __getattr__
