"""The built-in model names and what is known about each without building it (torch-free: model references are
resolved and checked before diffusers is imported). The models themselves are built by :mod:`hiresdiff.models.tiny`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class BuiltinInfo:
    """What is known about a built-in model without building it.

    Attributes:
        family: ``"sd"`` (SD 1.x-like, one text encoder), ``"sdxl"`` (two text encoders, ``text_time``) or
            ``"flux"`` (FLUX.1 transformer, CLIP + T5, flow matching).
        native_size: Training resolution in pixels (UNet ``sample_size`` × ``vae_scale_factor``; FLUX:
            the pipeline's ``default_sample_size`` × ``vae_scale_factor``).
        vae_scale_factor: Pixels per latent cell along each side.
        description: One line for listings.
    """

    family: Literal["sd", "sdxl", "flux"]
    native_size: int
    vae_scale_factor: int
    description: str


BUILTIN_MODELS: dict[str, BuiltinInfo] = {
    "tiny-sd": BuiltinInfo("sd", 128, 8, "tiny random SD 1.x-like pipeline for tests (native 128 px)"),
    "tiny-sdxl": BuiltinInfo("sdxl", 256, 8, "tiny random SDXL-like pipeline for tests (native 256 px)"),
    "random-sd15": BuiltinInfo("sd", 512, 8, "full-size SD 1.5 architecture with random weights (0.86 B UNet)"),
    "random-sdxl": BuiltinInfo("sdxl", 1024, 8, "full-size SDXL architecture with random weights (2.57 B UNet)"),
    "tiny-flux": BuiltinInfo("flux", 256, 8, "tiny random FLUX.1-dev-like pipeline for tests (native 256 px)"),
    "random-flux": BuiltinInfo(
        "flux", 1024, 8, "full-size FLUX.1-dev architecture with random weights (11.9 B transformer)"
    ),
}
