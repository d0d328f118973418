"""DemoFusion (Du et al., CVPR 2024) — SPEC §2 parameters; recipe: :mod:`hiresdiff.methods.demofusion`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hiresdiff.config import PAPER_NEGATIVE_PROMPT, GenerationSettings, check_finite
from hiresdiff.errors import require
from hiresdiff.methods.base import Method, ViewParams
from hiresdiff.ops.schedule import start_index


@dataclass
class DemoFusionParams(ViewParams):
    """SPEC §2 parameters.

    ``alpha1``/``alpha2``/``alpha3``: cosine exponents of the skip residual (c1), the local/global blend (c2) and
    the blur strength (c3); ``sigma``: Gaussian σ of dilated sampling (0.8 in all published examples);
    ``start_step``: step index at which later phases start (0 = all N steps; APT's shortcut uses N − T0).
    """

    alpha1: float = 3.0
    alpha2: float = 1.0
    alpha3: float = 1.0
    sigma: float = 0.8
    start_step: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("alpha1", "alpha2", "alpha3"):
            check_finite(name, getattr(self, name), low=0.0)
        check_finite("sigma", self.sigma, low=0.0, strict=True)
        require(
            isinstance(self.start_step, int) and self.start_step >= 0, f"start_step must be ≥ 0, got {self.start_step}"
        )

    def check(self, settings: GenerationSettings, native: int, grid: int) -> None:
        super().check(settings, native, grid)
        require(self.start_step < settings.steps, f"start_step {self.start_step} must be below steps {settings.steps}")


def start_step_of(strength: float, settings: GenerationSettings) -> dict[str, Any]:
    """``strength`` s → ``start_step = ⌊N·(1 − s)⌋`` (later phases start there; s = 1: all N steps)."""
    return {"start_step": start_index(settings.steps, strength)}


METHOD = Method(
    "demofusion",
    "DemoFusion: progressive upscaling, skip residual, dilated sampling",
    "https://arxiv.org/abs/2311.16973",
    DemoFusionParams,
    "hiresdiff.methods.demofusion:run_demofusion",
    default_negative=PAPER_NEGATIVE_PROMPT,
    strength_params=start_step_of,
)
