"""FouriScale (SPEC-baselines-unet §2) parameters and switch steps; recipe: :mod:`hiresdiff.methods.fouriscale`.

Torch-free: the start/stop steps of the dilation ramp are arithmetic over the official configurations of
:mod:`hiresdiff.patches.tables` (at 50 steps; hiresdiff takes fractions, τ = int(N·f)), so plans, listings and
``--set`` checks need no model; so are the base size and d₀ (:func:`base_and_dilation`), so that a size no SDXL
bucket fits is refused from the model's facts (:meth:`FouriScaleParams.check_model`) before its weights load.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hiresdiff.config import GenerationSettings, check_finite
from hiresdiff.errors import require
from hiresdiff.methods.base import FreeUParams, Method
from hiresdiff.patches.tables import (
    FOURISCALE,
    FOURISCALE_MODELS,
    NATIVE_SIZE,
    OFFICIAL_STEPS,
    SDXL_BASE_BUCKETS,
    FouriScaleModel,
    model_kind,
    nearest_config,
    steps_at,
)

if TYPE_CHECKING:
    from hiresdiff.pipeline import ModelFacts

#: how the prediction is guided: FouriScale's weak branch (3 rows per step) or plain CFG over the strong rows
GUIDANCE_VARIANTS = ("fouriscale", "cfg")
#: the official ``--amp_guidance`` factor (README tip for blurry SDXL results): w ← 2.4·w for i < start
OFFICIAL_AMP_GUIDANCE = 2.4


@dataclass
class FouriScaleParams(FreeUParams):
    """``start_fraction`` / ``stop_fraction``: the conv dilation is d₀ for step index i < int(N·start), ramps down
    (``progressive``) until int(N·stop), and the UNet is plain from there (``None``: the official configuration
    nearest to the size, e.g. 20/50 and 35/50). ``mask_floor``: floor v of the low-pass masks (``None``: 0.6 SDXL,
    0 SD); ``weak_dilation_divisor``: the weak row's conv dilation is ⌈max(d / divisor, 1)⌉ (``None``: 1.5 SDXL,
    none on SD; 1 = the strong rows' dilation). ``guidance_variant``: ``fouriscale`` guides towards the weak row,
    whose self-attention takes the strong cond row's queries and keys; ``cfg`` is plain CFG over the strong rows
    (2 rows). ``amp_guidance`` multiplies the guidance scale for i < start (the official option is 2.4).
    ``freeu``/``freeu_rule``: FreeU (the scripts': channel rule, official factors). ``base_size``: the
    native-resolution size ``h,w`` (px) the dilation and the per-layer filters refer to, one value for a square
    (``None``: SD the native size, SDXL the official aspect bucket); on SDXL it is also the size conditioning."""

    start_fraction: float | None = None
    stop_fraction: float | None = None
    progressive: bool = True
    mask_floor: float | None = None
    weak_dilation_divisor: float | None = None
    guidance_variant: str = "fouriscale"
    amp_guidance: float = 1.0
    base_size: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("start_fraction", "stop_fraction"):
            value = getattr(self, name)
            if value is not None:
                check_finite(name, value)
                require(0.0 <= value <= 1.0, f"{name} is a fraction of the steps in [0, 1], got {value}")
        if self.start_fraction is not None and self.stop_fraction is not None:
            require(
                self.start_fraction <= self.stop_fraction,
                f"start_fraction {self.start_fraction} must not exceed stop_fraction {self.stop_fraction}",
            )
        if self.mask_floor is not None:
            check_finite("mask_floor", self.mask_floor)
            require(0.0 <= self.mask_floor <= 1.0, f"mask_floor must be in [0, 1], got {self.mask_floor}")
        if self.weak_dilation_divisor is not None:
            check_finite("weak_dilation_divisor", self.weak_dilation_divisor, low=1.0)
        require(
            self.guidance_variant in GUIDANCE_VARIANTS,
            f"unknown guidance_variant {self.guidance_variant!r}; choose one of: {', '.join(GUIDANCE_VARIANTS)}",
        )
        check_finite("amp_guidance", self.amp_guidance, low=0.0, strict=True)
        if self.base_size is not None:
            size = tuple(float(v) for v in self.base_size)
            size = size * 2 if len(size) == 1 else size
            require(len(size) == 2, f"base_size is h,w in pixels (or one side for a square), got {self.base_size}")
            for side in size:
                require(math.isfinite(side) and side >= 1, f"base_size sides must be ≥ 1 px, got {self.base_size}")
            self.base_size = size

    def check(self, settings: GenerationSettings, native: int, grid: int) -> None:
        require(
            self.guidance_variant != "fouriscale" or settings.cfg,
            f"fouriscale guides with an unconditional row: guidance must be > 1 (got {settings.guidance}); "
            "raise --guidance or pass --set guidance_variant=cfg",
        )
        if self.base_size is not None:
            for side in self.base_size:
                require(
                    side >= grid and side % grid == 0,
                    f"base_size {side:g} px is not a positive multiple of the latent grid ({grid} px)",
                )

    def check_model(self, settings: GenerationSettings, model: ModelFacts) -> None:
        """The switch steps and the base size resolved as the run will (no weights): a start after the official
        stop, or an SDXL aspect no bucket fits, is one line before any model work."""
        kind = model_kind(model.family, model.text_width)
        switch_steps(self, kind, model.native, settings.height, settings.width, settings.steps)
        base_and_dilation(FOURISCALE_MODELS[kind], self.base_size, model.native, settings.height, settings.width)


def switch_steps(
    params: FouriScaleParams, model: str, native: int, height: int, width: int, steps: int
) -> tuple[int, int]:
    """(start, stop) step indices at ``steps`` steps: int(N·f) of the given fractions, else of the official
    configuration of ``model`` nearest to ``height`` × ``width`` (its start/stop over 50 steps)."""
    config, _ = nearest_config(FOURISCALE, model, native, height, width, "fouriscale")
    start = params.start_fraction if params.start_fraction is not None else config.start / OFFICIAL_STEPS
    stop = params.stop_fraction if params.stop_fraction is not None else config.stop / OFFICIAL_STEPS
    require(start <= stop, f"fouriscale: start_fraction {start:g} must not exceed stop_fraction {stop:g}")
    return steps_at(steps, start), steps_at(steps, stop)


def scaled_buckets(native: int) -> list[tuple[int, int]]:
    """FouriScale's SDXL aspect buckets scaled to a model of ``native`` px (the tiny SDXL: a quarter)."""
    f = native / NATIVE_SIZE["sdxl"]
    return [(round(bh * f), round(bw * f)) for bh, bw in SDXL_BASE_BUCKETS]


def base_and_dilation(
    arch: FouriScaleModel, base_size: Sequence[float] | None, native: int, height: int, width: int
) -> tuple[tuple[int, int], int]:
    """The base size (px, h × w) and d₀ of a ``height`` × ``width`` image: the given ``base_size`` or the
    architecture's (SD: native, d₀ = max(⌈H/n⌉, ⌈W/n⌉); SDXL: the bucket with the least padding and its common ratio,
    one error line when no bucket has ⌈H/b_h⌉ = ⌈W/b_w⌉)."""
    if base_size is not None:
        bh, bw = (int(v) for v in base_size)
    elif arch.base == "buckets":
        from hiresdiff.ops.fouriscale import choose_base_size  # its module imports torch: only when it is needed

        return choose_base_size(height, width, scaled_buckets(native))
    else:
        bh = bw = native
    return (bh, bw), max(math.ceil(height / bh), math.ceil(width / bw))


PRESETS: dict[str, dict[str, Any]] = {
    # the SDXL script (text2image_xl.py): DDIM with η = 1, guidance 5.0, FreeU on
    "official": {"scheduler": "ddim", "eta": 1.0, "guidance": 5.0, "freeu": True},
    # the SD 1.5 / 2.1 script (text2image.py): DDIM with η = 1, guidance 7.5, FreeU on
    "official-sd": {"scheduler": "ddim", "eta": 1.0, "guidance": 7.5, "freeu": True},
}

METHOD = Method(
    "fouriscale",
    "FouriScale: dilated convolutions with a Fourier low-pass and weak-branch guidance at the target size",
    "https://arxiv.org/abs/2403.12963",
    FouriScaleParams,
    "hiresdiff.methods.fouriscale:run_fouriscale",
    presets=PRESETS,
    families=("sd", "sdxl"),
    hidiffusion_switch="never",  # it patches the same UNet convs itself
)
