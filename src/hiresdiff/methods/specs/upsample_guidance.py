"""Upsample Guidance (Hwang, Park, Jo, arXiv 2404.01709) — SPEC-baselines-progressive §3 parameters, presets and
the scale-factor rule; recipe: :mod:`hiresdiff.methods.upsample_guidance`.

There is no official code; the defaults are the SPEC's plan for latent models (w = 1, η = 0.6) and the presets
those of the unofficial ports (SPEC §3.1–3.2).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hiresdiff.config import GenerationSettings, check_finite
from hiresdiff.errors import require
from hiresdiff.methods.base import Method, Params

#: kept in step with :data:`hiresdiff.ops.upsample_guidance.TAU_MODES` (this module stays torch-free)
TAU_MODES = ("nearest", "continuous")
#: SDXL size conditioning of the low-resolution branch: its own canvas (H/m × W/m) or the target's (the SDXL port)
LOW_SIZE_CONDS = ("native", "target")


@dataclass
class UpsampleGuidanceParams(Params):
    """``scale_factor`` m: the target is m× the canvas the guidance predicts at the model's size (``None``: the
    target's short side over the native size, which must be a whole number, so the low canvas has the native short
    side and no side below it; both target sides must be multiples of m·grid); ``weight`` w and ``ug_eta`` η (the
    paper's η; ``eta`` is DDIM's): steps with t > (1 − η)·T get ``ε̃ = ε̂ + w·U(ε̂_low/m − D ε̂)``; ``tau``: the low
    branch's timestep, ``nearest`` integer in log-SNR or ``continuous``; ``low_size_cond``: SDXL size conditioning
    of the low branch, ``native`` (its own canvas) or ``target`` (as the SDXL port)."""

    scale_factor: int | None = None
    weight: float = 1.0
    ug_eta: float = 0.6
    tau: str = "nearest"
    low_size_cond: str = "native"

    def __post_init__(self) -> None:
        if self.scale_factor is not None:
            require(
                isinstance(self.scale_factor, int) and not isinstance(self.scale_factor, bool),
                f"scale_factor is a whole number (the target is m× the low canvas), got {self.scale_factor!r}",
            )
            require(self.scale_factor >= 1, f"scale_factor must be ≥ 1, got {self.scale_factor}")
        check_finite("weight", self.weight, low=0.0)
        check_finite("ug_eta", self.ug_eta, low=0.0)
        require(
            self.ug_eta <= 1.0, f"ug_eta is the guided fraction of the timestep range, in [0, 1], got {self.ug_eta}"
        )
        for name, value, choices in (
            ("tau", self.tau, TAU_MODES),
            ("low_size_cond", self.low_size_cond, LOW_SIZE_CONDS),
        ):
            require(value in choices, f"unknown {name} {value!r}; choose one of: {', '.join(choices)}")

    def factor(self, height: int, width: int, native: int) -> int:
        """m: ``scale_factor``, else the target's short side over ``native`` (checked whole by :meth:`check`)."""
        return self.scale_factor if self.scale_factor is not None else min(height, width) // native

    def check(self, settings: GenerationSettings, native: int, grid: int) -> None:
        h, w = settings.height, settings.width
        if self.scale_factor is None:
            ratio = min(h, w) / native
            require(
                ratio.is_integer() and ratio >= 1,
                f"upsample-guidance needs a whole scale factor: {h}×{w} px has a short side {ratio:.3g}× the native "
                f"{native} px; use {suggest(h, w, native, grid, ratio)}, or --set scale_factor=M",
            )
        m = self.factor(h, w, native)
        require(
            h % (m * grid) == 0 and w % (m * grid) == 0,
            f"upsample-guidance at scale factor {m} needs both sides multiples of {m * grid} px (m × the {grid} px "
            f"grid), got {h}×{w}; use {suggest(h, w, native, grid, float(m))}",
        )


def ug_canvas(height: int, width: int, native: int, grid: int, m: int) -> tuple[int, int]:
    """The size nearest ``height × width``'s aspect whose short side is m·native and whose sides are multiples of
    m·grid (the low canvas then has the native short side and whole grid cells)."""
    unit = m * grid
    short = m * native
    long = max(short, round(max(height, width) * short / min(height, width) / unit) * unit)
    return (long, short) if height >= width else (short, long)


def suggest(height: int, width: int, native: int, grid: int, ratio: float) -> str:
    """Sizes that work near ``ratio`` (whole factors just below and above it, at least 1), as ``a×b or c×d``."""
    below = max(1, int(ratio))
    factors = sorted({below, below + 1} if not float(ratio).is_integer() else {int(ratio)})
    return " or ".join("{}×{}".format(*ug_canvas(height, width, native, grid, m)) for m in factors)


PRESETS: dict[str, dict[str, Any]] = {
    # viperyl/Upsample-Guidance (SD1.5, unofficial): time_factor 1.2, us_eta 0.6
    "ug-sd15": {"weight": 1.2, "ug_eta": 0.6},
    # the continuous-time DPM-Solver port (unofficial): θ = 1, η = 0.3, τ from the continuous SNR
    "dpm-port": {"weight": 1.0, "ug_eta": 0.3, "tau": "continuous"},
}

METHOD = Method(
    "upsample-guidance",
    "Upsample Guidance: direct sampling at m× size, the low band of each guided step from one native-size call",
    "https://arxiv.org/abs/2404.01709",
    UpsampleGuidanceParams,
    "hiresdiff.methods.upsample_guidance:run_upsample_guidance",
    presets=PRESETS,
    hidiffusion_switch="never",  # its model calls run at two sizes; HiDiffusion's patches are sized for one
)
