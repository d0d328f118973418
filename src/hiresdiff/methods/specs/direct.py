"""direct — the base model sampled at the target size (SPEC §1); recipe: :mod:`hiresdiff.methods.direct`."""

from __future__ import annotations

from dataclasses import dataclass

from hiresdiff.methods.base import FreeUParams, Method


@dataclass
class DirectParams(FreeUParams):
    """The whole canvas is denoised at once; optionally with FreeU (``freeu``, ``freeu_rule``)."""


PRESETS = {
    # FreeU with the official scripts' channel rule / with diffusers' enable_freeu rule
    "freeu": {"freeu": True},
    "freeu-diffusers": {"freeu": True, "freeu_rule": "diffusers"},
}

METHOD = Method(
    "direct",
    "base model sampled directly at the target size",
    "",
    DirectParams,
    "hiresdiff.methods.direct:run_direct",
    presets=PRESETS,
    hidiffusion_switch="image",  # SDEdit of an input picture is a whole-canvas phase too
)
