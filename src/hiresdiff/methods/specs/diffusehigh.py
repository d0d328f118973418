"""DiffuseHigh (Kim et al., AAAI 2025) — SPEC-baselines-progressive §1 parameters, presets and stage plan; recipe:
:mod:`hiresdiff.methods.diffusehigh`.

Torch-free: the stage plan is arithmetic over :mod:`hiresdiff.stages`, so plans and listings use it without a model.
Defaults are the official diffusers pipeline's (``yhyun225/DiffuseHigh`` ``pipeline_diffusehigh_sdxl.py``, SPEC §1.3)
at N = 50: every stage denoises the last 15 steps (t = 281 … 1), the first 5 of them wavelet-guided.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hiresdiff.config import GenerationSettings, check_finite
from hiresdiff.errors import require
from hiresdiff.methods.base import Method, Params
from hiresdiff.methods.specs.cascade import cascade_canvases, check_stages, checked_stages
from hiresdiff.ops.schedule import start_index, steps_of_fraction
from hiresdiff.stages import progressive_phases

#: the negative prompt of the official README examples
OFFICIAL_NEGATIVE = "blurry, ugly, duplicate, poorly drawn, deformed, mosaic"
#: CFG of the base canvas (``guidance_scale``) and of the stages (``diffusehigh_guidance_scale``) in the official code
OFFICIAL_GUIDANCE = 5.0
OFFICIAL_STAGE_GUIDANCE = 10.0
#: the official ``noising_steps`` 15 and ``dwt_steps`` 5 of N = 50, as fractions of N
OFFICIAL_RESTART = 0.3
OFFICIAL_DWT_FRACTION = 0.1
#: CFG of the research code (base and stages)
PAPER_GUIDANCE = 7.5
WAVELETS = ("db4", "haar")
UPSAMPLES = ("bicubic", "bilinear")
SIZE_CONDITIONINGS = ("base", "stage")


@dataclass
class DiffuseHighParams(Params):
    """``restart``: fraction of the N steps each stage denoises (0.3: the official 15 of 50; an input picture's
    ``strength``); ``dwt_steps``: how many of a stage's first steps get the wavelet structure guidance
    (default ``round(0.1·N)``: the official 5 of 50); ``wavelet`` ``db4`` (official) or ``haar``; ``sharpen`` the
    guidance image by ``(1 + α)·G − α·blur_σ(G)`` with σ drawn per stage and image from ``sharpen_sigma`` = (low,
    high) and α = ``sharpen_alpha``; ``stage_guidance``: CFG of the stages (default ``None``: the official 10 on
    SD/SDXL, the run's guidance on FLUX); ``upsample``: ``bicubic`` (official) or ``bilinear`` (research code);
    ``renoise``: guided steps re-noise the edited x̂0 with fresh noise to the next timestep (the research code)
    instead of taking the ODE step from it; ``stages``: the stages' long sides in pixels, ascending, the last the
    target's (default ``k·n``, k = 2 … ⌈s⌉: the official 2048, 3072, 4096 at 4096²); ``size_conditioning``: SDXL
    size conditioning of the stages, ``base`` (the base canvas's, as the official) or ``stage`` (each stage's)."""

    restart: float = OFFICIAL_RESTART
    dwt_steps: int | None = None
    wavelet: str = "db4"
    sharpen: bool = True
    sharpen_sigma: tuple[float, ...] = (0.1, 2.0)
    sharpen_alpha: float = 1.0
    stage_guidance: float | None = None
    upsample: str = "bicubic"
    renoise: bool = False
    stages: tuple[float, ...] | None = None
    size_conditioning: str = "base"

    def __post_init__(self) -> None:
        check_finite("restart", self.restart, low=0.0, strict=True)
        require(self.restart <= 1.0, f"restart is a fraction of the steps in (0, 1], got {self.restart}")
        require(self.dwt_steps is None or self.dwt_steps >= 0, f"dwt_steps must be ≥ 0 steps, got {self.dwt_steps}")
        for name, value, choices in (
            ("wavelet", self.wavelet, WAVELETS),
            ("upsample", self.upsample, UPSAMPLES),
            ("size_conditioning", self.size_conditioning, SIZE_CONDITIONINGS),
        ):
            require(value in choices, f"unknown {name} {value!r}; choose one of: {', '.join(choices)}")
        self.sharpen_sigma = tuple(self.sharpen_sigma)
        require(
            len(self.sharpen_sigma) == 2,
            f"sharpen_sigma is a range low,high (e.g. 0.1,2.0), got {len(self.sharpen_sigma)} values",
        )
        low, high = self.sharpen_sigma
        for value in (low, high):
            check_finite("sharpen_sigma", value, low=0.0, strict=True)
        require(low <= high, f"sharpen_sigma low {low} must not exceed high {high}")
        check_finite("sharpen_alpha", self.sharpen_alpha, low=0.0)
        if self.stage_guidance is not None:
            check_finite("stage_guidance", self.stage_guidance, low=0.0)
        self.stages = checked_stages(self.stages)

    def guided_steps(self, steps: int) -> int:
        """K_g: the number of wavelet-guided steps at the start of each stage."""
        return steps_of_fraction(steps, OFFICIAL_DWT_FRACTION) if self.dwt_steps is None else self.dwt_steps

    def check(self, settings: GenerationSettings, native: int, grid: int) -> None:
        require(
            start_index(settings.steps, self.restart) < settings.steps,
            f"restart {self.restart} leaves no step to denoise at {settings.steps} steps",
        )
        check_stages(self.stages, settings, native, grid)

    def canvases(self, height: int, width: int, native: int, grid: int) -> list[tuple[int, int]]:
        """The canvases the run samples, for the plan (:func:`stage_sizes`)."""
        return stage_sizes(self, height, width, native, grid)


def stage_sizes(params: DiffuseHighParams, height: int, width: int, native: int, grid: int) -> list[tuple[int, int]]:
    """The canvases in sampling order: the base (long side n at the target's aspect), then one per stage (the
    last exactly the target); only the base when the target is no larger."""
    phases = [(p.height, p.width) for p in progressive_phases(height, width, native, grid)]
    return cascade_canvases(phases, params.stages, height, width, grid)


def stage_guidance(params: DiffuseHighParams, family: str, guidance: float) -> float:
    """The stages' CFG scale: ``stage_guidance``, else the official 10 (SD/SDXL) or the run's ``guidance`` (FLUX,
    untuned: its guidance is an embedded scale)."""
    if params.stage_guidance is not None:
        return params.stage_guidance
    return guidance if family == "flux" else OFFICIAL_STAGE_GUIDANCE


def restart_of(strength: float, settings: GenerationSettings) -> dict[str, Any]:
    """``strength`` s → every stage denoises the last fraction s of the steps (``restart = s``)."""
    return {"restart": strength}


#: ``official`` = the defaults (the official pipeline); ``paper`` = the research code behind the paper's numbers
#: (SPEC §1.4): DDIM, bilinear upsampling, no sharpening, CFG 7.5 everywhere, guided steps re-noised
PRESETS: dict[str, dict[str, Any]] = {
    "official": {"guidance": OFFICIAL_GUIDANCE, "negative_prompt": OFFICIAL_NEGATIVE},
    "paper": {
        "scheduler": "ddim",
        "guidance": PAPER_GUIDANCE,
        "stage_guidance": PAPER_GUIDANCE,
        "upsample": "bilinear",
        "sharpen": False,
        "renoise": True,
    },
}

METHOD = Method(
    "diffusehigh",
    "DiffuseHigh: progressive pixel-space SDEdit with wavelet (DWT) structure guidance and sharpening",
    "https://github.com/yhyun225/DiffuseHigh",
    DiffuseHighParams,
    "hiresdiff.methods.diffusehigh:run_diffusehigh",
    default_negative=OFFICIAL_NEGATIVE,
    presets=PRESETS,
    setting_defaults={"guidance": OFFICIAL_GUIDANCE},
    strength_params=restart_of,
    pixel_upsampling=True,  # --upscaler enlarges its decoded images
)
