"""Registered methods, by name."""

from __future__ import annotations

from hiresdiff.errors import HiresError
from hiresdiff.methods import accdiffusion, apldm, apt, demofusion, direct, multidiffusion, resize, scalediff
from hiresdiff.methods.base import Method, MethodOutput, Params

_MODULES = (direct, resize, multidiffusion, demofusion, accdiffusion, apt, apldm, scalediff)
METHODS: dict[str, Method] = {module.METHOD.name: module.METHOD for module in _MODULES}


def get_method(name: str) -> Method:
    """The method called ``name``, or a one-line error listing the available ones."""
    try:
        return METHODS[name]
    except KeyError:
        raise HiresError(f"unknown method {name!r}; choose one of: {', '.join(METHODS)}") from None


__all__ = ["METHODS", "Method", "MethodOutput", "Params", "get_method"]
