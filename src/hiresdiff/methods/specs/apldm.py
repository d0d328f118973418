"""AP-LDM (Cao et al., 2024) — SPEC §5 progressive scheduler and attentive-guidance default; recipe:
:mod:`hiresdiff.methods.apldm`."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from hiresdiff.config import GenerationSettings
from hiresdiff.errors import require
from hiresdiff.methods.base import Method, Params
from hiresdiff.ops.schedule import start_index

#: SPEC §5 progressive schedulers: fractions of the N steps denoised per sub-stage
DEFAULT_PROGRESSIVE = (0.2,)
LARGE_PROGRESSIVE = (0.1, 0.2)
#: targets of at least this many pixels use :data:`LARGE_PROGRESSIVE`
LARGE_AREA = 4096 * 4096
#: attentive-guidance strength λ of the paper (a :class:`GenerationSettings` default for this method)
PAPER_AG_LAMBDA = 0.004


@dataclass
class APLDMParams(Params):
    """``progressive``: fractions of the N steps each sub-stage denoises, e.g. ``0.1,0.2``; by default ``0.2`` below
    4096² pixels and ``0.1,0.2`` from 4096² on. Attentive guidance is set with the ``ag_*`` settings
    (λ = ``ag_lambda`` 0.004, ``ag_delay`` 3, ``ag_exponent`` 3, ``ag_decay`` cosine)."""

    progressive: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.progressive is None:
            return
        self.progressive = tuple(float(p) for p in self.progressive)
        require(len(self.progressive) > 0, "progressive needs at least one fraction, e.g. 0.2")
        for p in self.progressive:
            require(math.isfinite(p) and 0.0 < p <= 1.0, f"progressive fractions must be in (0, 1], got {p}")

    def fractions(self, height: int, width: int) -> tuple[float, ...]:
        if self.progressive is not None:
            return self.progressive
        return LARGE_PROGRESSIVE if height * width >= LARGE_AREA else DEFAULT_PROGRESSIVE

    def check(self, settings: GenerationSettings, native: int, grid: int) -> None:
        for p in self.fractions(settings.height, settings.width):
            require(
                start_index(settings.steps, p) < settings.steps,
                f"progressive fraction {p} leaves no step to denoise at {settings.steps} steps",
            )


def progressive_of(strength: float, settings: GenerationSettings) -> dict[str, Any]:
    """``strength`` s → every sub-stage denoises the last fraction s (starts at step ``⌊N·(1 − s)⌋``); as many
    sub-stages as the default schedule has at this size."""
    count = len(APLDMParams().fractions(settings.height, settings.width))
    return {"progressive": (strength,) * count}


METHOD = Method(
    "apldm",
    "AP-LDM: attentive guidance at native area, then progressive pixel-space refinement",
    "https://github.com/kmittle/AP-LDM",
    APLDMParams,
    "hiresdiff.methods.apldm:run_apldm",
    setting_defaults={"ag_lambda": PAPER_AG_LAMBDA},
    strength_params=progressive_of,
    pixel_upsampling=True,  # --upscaler enlarges its decoded images
)
