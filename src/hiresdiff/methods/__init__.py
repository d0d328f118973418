"""Registered methods, by name.

The registry is built from the torch-free spec modules (:mod:`hiresdiff.methods.specs`); each method's recipe
module (``hiresdiff.methods.<name>``) is imported only when the method runs (:meth:`Method.run`).
"""

from __future__ import annotations

from hiresdiff.errors import HiresError
from hiresdiff.methods.base import Method, MethodOutput, Params
from hiresdiff.methods.specs import (
    accdiffusion,
    accdiffusion_v2,
    apldm,
    apt,
    demofusion,
    diffusehigh,
    direct,
    fouriscale,
    freescale,
    hidiffusion,
    multidiffusion,
    resize,
    scalecrafter,
    scalediff,
    upsample_guidance,
)

_SPECS = (
    direct,
    resize,
    multidiffusion,
    demofusion,
    accdiffusion,
    accdiffusion_v2,
    apt,
    apldm,
    scalediff,
    diffusehigh,
    hidiffusion,
    scalecrafter,
    fouriscale,
    upsample_guidance,
    freescale,
)
METHODS: dict[str, Method] = {spec.METHOD.name: spec.METHOD for spec in _SPECS}


def get_method(name: str) -> Method:
    """The method called ``name``, or a one-line error listing the available ones."""
    try:
        return METHODS[name]
    except KeyError:
        raise HiresError(f"unknown method {name!r}; choose one of: {', '.join(METHODS)}") from None


__all__ = ["METHODS", "Method", "MethodOutput", "Params", "get_method"]
