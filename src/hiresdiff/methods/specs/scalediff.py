"""ScaleDiff (SPEC §6) parameters; recipe: :mod:`hiresdiff.methods.scalediff`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hiresdiff.config import GenerationSettings, check_finite
from hiresdiff.errors import require
from hiresdiff.methods.base import Method, Params
from hiresdiff.ops.schedule import start_index


@dataclass
class ScaleDiffParams(Params):
    """``restart_ratio`` ρ (fraction of the steps denoised per stage) and ``lfm_factor`` f default per family
    (SDXL/SD 0.4 and 1/8, FLUX-dev 0.6 and 1/4, FLUX-schnell 0.5); ``lfm``, ``structure_guidance`` and ``npa``
    switch the three components; ``query_shift`` turns on NPA's random query shift."""

    restart_ratio: float | None = None
    lfm_factor: float | None = None
    lfm: bool = True
    structure_guidance: bool = True
    npa: bool = True
    query_shift: bool = False

    def __post_init__(self) -> None:
        if self.restart_ratio is not None:
            check_finite("restart_ratio", self.restart_ratio, low=0.0, strict=True)
            require(self.restart_ratio <= 1.0, f"restart_ratio must be in (0, 1], got {self.restart_ratio}")
        if self.lfm_factor is not None:
            check_finite("lfm_factor", self.lfm_factor, low=0.0, strict=True)
            require(self.lfm_factor <= 1.0, f"lfm_factor must be in (0, 1], got {self.lfm_factor}")

    def check(self, settings: GenerationSettings, native: int, grid: int) -> None:
        if self.restart_ratio is not None:
            require(
                start_index(settings.steps, self.restart_ratio) < settings.steps,
                f"restart_ratio {self.restart_ratio} leaves no step to denoise at {settings.steps} steps",
            )


def restart_of(strength: float, settings: GenerationSettings) -> dict[str, Any]:
    """``strength`` s → ``restart_ratio = s`` (each stage restarts at step ``⌊N·(1 − s)⌋``)."""
    return {"restart_ratio": strength}


METHOD = Method(
    "scalediff",
    "ScaleDiff: neighborhood patch attention, latent frequency mixing, structure guidance",
    "https://github.com/KSH00906/ScaleDiff",
    ScaleDiffParams,
    "hiresdiff.methods.scalediff:run_scalediff",
    strength_params=restart_of,
    pixel_upsampling=True,  # --upscaler enlarges its decoded images
)
