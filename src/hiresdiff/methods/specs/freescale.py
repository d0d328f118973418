"""FreeScale (Qiu et al., ICCV 2025) — SPEC-baselines-progressive §2 parameters, presets and stage plan; recipe:
:mod:`hiresdiff.methods.freescale`.

Torch-free: the stage plan is arithmetic over :mod:`hiresdiff.stages`. Defaults are the official run script's
(``ali-vilab/FreeScale`` ``run_freescale.py`` with ``pipeline_freescale.py``, SPEC §2.3) at N = 50: stages of long
side n, 2n, 4n, … up to the target, each restarting at step 15 (t = 681) with the skip residual γ = 2 and the
restrained convs dilated for steps 15–34, scale fusion with the full global branch and the 3-D Gaussian.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from hiresdiff.config import PAPER_NEGATIVE_PROMPT, GenerationSettings, check_finite
from hiresdiff.errors import require
from hiresdiff.methods.base import FreeUParams, Method
from hiresdiff.methods.specs.cascade import cascade_canvases, check_stages, checked_stages
from hiresdiff.ops.schedule import exact_fraction
from hiresdiff.stages import doubling_phases

#: the official run script's CFG scale (the pipeline's signature says 5.0; every script passes 7.5)
OFFICIAL_GUIDANCE = 7.5
#: ``int(0.3·N)``: the step every stage restarts at; ``dilate_tau`` 35 of N = 50
OFFICIAL_RESTART = 0.3
OFFICIAL_DILATE_UNTIL = 0.7
GLOBAL_MODES = ("full", "dilated")
BLUR_AXES = ("hwc", "hw")


def steps_before(steps: int, fraction: float) -> int:
    """``⌊N·f⌋`` in exact decimal arithmetic: the step index a fraction of N names (0.3 of 50 → 15)."""
    return math.floor(steps * exact_fraction(fraction))


@dataclass
class FreeScaleParams(FreeUParams):
    """``restart_fraction``: every stage after the base starts at step index ⌊N·f⌋ (0.3: the official step 15 of
    50, t = 681); ``cosine_scale``: γ of the skip residual ``x ← (1 − c)·x + c·z'_t``, c = cf(t)^γ; ``dilation``:
    dilate the restrained convs by d = W//n (d = padding, the stage's width in native sizes) for step indices
    below ⌊N·``dilate_until``⌋ (the official 35 of 50); ``scale_fusion``: fuse windowed and global
    self-attention; ``global_mode``: the global branch attends over ``full`` (every token, the run script) or the
    ``dilated`` sub-lattices (the gradio demo's ``fast_mode``); ``blur_axes``: the fusion's Gaussian over ``hwc``
    (rows, columns, features: the official code since March 2025) or ``hw`` (rows, columns: the paper);
    ``blur_sigma``: its σ; ``freeu``/``freeu_rule``: FreeU in every stage (off by default as AP-LDM's comparisons
    ran it; the ``official`` preset turns it on with the official factors); ``stages``: the stages' long sides in
    pixels, ascending, the last the target's (default n·2^k below the target, then the target: the run script's
    1024, 2048, 4096)."""

    restart_fraction: float = OFFICIAL_RESTART
    cosine_scale: float = 2.0
    dilation: bool = True
    dilate_until: float = OFFICIAL_DILATE_UNTIL
    scale_fusion: bool = True
    global_mode: str = "full"
    blur_axes: str = "hwc"
    blur_sigma: float = 1.0
    stages: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_finite("restart_fraction", self.restart_fraction, low=0.0)
        require(
            self.restart_fraction < 1.0,
            f"restart_fraction is a fraction of the steps in [0, 1), got {self.restart_fraction}",
        )
        self.check_fractions("dilate_until")
        check_finite("cosine_scale", self.cosine_scale, low=0.0)
        check_finite("blur_sigma", self.blur_sigma, low=0.0, strict=True)
        for name, value, choices in (
            ("global_mode", self.global_mode, GLOBAL_MODES),
            ("blur_axes", self.blur_axes, BLUR_AXES),
        ):
            require(value in choices, f"unknown {name} {value!r}; choose one of: {', '.join(choices)}")
        self.stages = checked_stages(self.stages)

    def restart_index(self, steps: int) -> int:
        """The step index every stage after the base starts at."""
        return steps_before(steps, self.restart_fraction)

    def dilated_steps(self, steps: int) -> int:
        """Step indices below this one run the restrained convs dilated (0 with ``dilation`` off)."""
        return steps_before(steps, self.dilate_until) if self.dilation else 0

    def check(self, settings: GenerationSettings, native: int, grid: int) -> None:
        require(
            self.restart_index(settings.steps) < settings.steps,
            f"restart_fraction {self.restart_fraction} leaves no step to denoise at {settings.steps} steps",
        )
        check_stages(self.stages, settings, native, grid)

    def canvases(self, height: int, width: int, native: int, grid: int) -> list[tuple[int, int]]:
        """The canvases in sampling order: the base (long side n at the target's aspect), then one per stage, the
        last exactly the target; only the base when the target is no larger."""
        phases = [(p.height, p.width) for p in doubling_phases(height, width, native, grid)]
        return cascade_canvases(phases, self.stages, height, width, grid)


def restart_of(strength: float, settings: GenerationSettings) -> dict[str, Any]:
    """``strength`` s → the stages after the input picture denoise the last fraction s of the steps
    (``restart_fraction = 1 − s``, exact)."""
    return {"restart_fraction": float(1 - exact_fraction(strength))}


#: ``official`` = the run script (FreeU on with the official factors, CFG 7.5, DemoFusion's negative prompt);
#: ``paper`` = the blur the paper describes (rows and columns only); ``fast`` = the gradio demo's dilated global
PRESETS: dict[str, dict[str, Any]] = {
    "official": {"guidance": OFFICIAL_GUIDANCE, "negative_prompt": PAPER_NEGATIVE_PROMPT, "freeu": True},
    "paper": {"blur_axes": "hw"},
    "fast": {"global_mode": "dilated", "freeu": True},
}

METHOD = Method(
    "freescale",
    "FreeScale: progressive pixel-space SDEdit, skip residual, restrained dilated convs, local/global scale fusion",
    "https://github.com/ali-vilab/FreeScale",
    FreeScaleParams,
    "hiresdiff.methods.freescale:run_freescale",
    default_negative=PAPER_NEGATIVE_PROMPT,
    presets=PRESETS,
    setting_defaults={"guidance": OFFICIAL_GUIDANCE},
    strength_params=restart_of,
    families=("sd", "sdxl"),  # FLUX has no convs or skips to dilate; its attention part is not built
    pixel_upsampling=True,  # --upscaler enlarges its decoded images
)
