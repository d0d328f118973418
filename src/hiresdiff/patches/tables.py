"""Official settings of ScaleCrafter, FouriScale, HiDiffusion and FreeU, stored by UNet level
(SPEC-baselines-unet §1.2, §2.1–2.2, §3.1, §0 "FreeU").

Plain data and arithmetic, no torch, so listings and plans can use them without heavy imports. Addresses are the
level addresses of :mod:`hiresdiff.patches.levels` (``down2.res``, ``ds2``, ``mid``, ``up1.res``, ``us1`` …),
written for the architecture the table belongs to: ``sd15`` / ``sd21`` (SD 1.5 and SD 2.1-base, 4 levels, 512 px
native) and ``sdxl`` (3 levels, 1024 px). The ScaleCrafter tables are the *effective* ones: names SDXL lacks, which
the official code silently skipped (its bug B1), are gone. Step counts (τ, start, stop) are at the official 50
steps; at N steps hiresdiff uses ``int(N * τ / 50)`` (:func:`steps_at`), the float rule of HiDiffusion.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, TypeVar

from hiresdiff.errors import require

ModelKind = Literal["sd15", "sd21", "sdxl"]

#: step count the official τ / start / stop values are given for
OFFICIAL_STEPS = 50

#: native resolution (px) and level count of each table architecture
NATIVE_SIZE: dict[str, int] = {"sd15": 512, "sd21": 512, "sdxl": 1024}
LEVELS: dict[str, int] = {"sd15": 4, "sd21": 4, "sdxl": 3}


def model_kind(family: str, cross_attention_dim: int | None = None) -> ModelKind:
    """The table architecture of a UNet: ``sdxl`` for the SDXL family, ``sd21`` for SD with 1024-wide text
    conditioning (OpenCLIP-H), otherwise ``sd15`` (tiny SD-like test models included)."""
    require(family in ("sd", "sdxl"), f"{family!r} models have no UNet tables (SD 1.x/2.x and SDXL only)")
    if family == "sdxl":
        return "sdxl"
    return "sd21" if cross_attention_dim == 1024 else "sd15"


def steps_at(num_steps: int, fraction: float) -> int:
    """``int(N * f)`` in floating point, exactly as HiDiffusion computes its switch steps (SPEC §0).

    For f = 0.7 this is one less than ⌊0.7·N⌋ at N = 90, 170, 180, 330, … (0.7·90 = 62.999…).
    """
    return int(num_steps * fraction)


def _uniform(addresses: Sequence[str], factor: float) -> dict[str, float]:
    return dict.fromkeys(addresses, factor)


# --------------------------------------------------------------------------------------------- ScaleCrafter


@dataclass(frozen=True)
class ScaleCrafterConfig:
    """One official ScaleCrafter configuration (SPEC §1.2).

    Attributes:
        model: Table architecture (``sd15``, ``sd21``, ``sdxl``).
        height, width: Image size (px) the configuration was released for.
        dilate: Strong table D: level address → re-dilation factor p.
        dilate_tau: Re-dilation is active for step index i < τ_dil (at 50 steps).
        ndcfg: Light table D_nd of noise-damped CFG's unconditional pass (empty: none).
        ndcfg_tau: Noise-damped CFG is active for i < τ_nd (0: off).
        progressive: p_i = max(⌈p·(τ − i)/τ⌉, 2) instead of p (see :func:`hiresdiff.ops.redilate`).
    """

    model: ModelKind
    height: int
    width: int
    dilate: Mapping[str, float]
    dilate_tau: int
    ndcfg: Mapping[str, float] = field(default_factory=dict)
    ndcfg_tau: int = 0
    progressive: bool = False


_SD_CONVS = ("down1.res", "ds1", "down2.res", "ds2", "down3.res", "mid", "up3.res", "us3", "up2.res", "us2")
_SD_ALL = (*_SD_CONVS, "up1.res", "us1")
_SD_STRONG = {
    **_uniform(("down1.res", "ds1", "up1.res", "us1"), 2),
    **_uniform(("down2.res", "ds2", "up2.res", "us2"), 3),
    **_uniform(("down3.res", "mid", "up3.res", "us3"), 4),
}
_SD_LIGHT = {k: v for k, v in _SD_STRONG.items() if k not in ("down1.res", "ds1", "up1.res", "us1")}
_SD21_LIGHT = {
    **_uniform(("down2.res", "up1.res", "us1"), 3),
    **_uniform(("ds2", "down3.res", "mid", "up3.res", "us3", "up2.res", "us2"), 4),
}
_SD21_STRONG = {**_SD21_LIGHT, "up0.res": 2}
_XL_2X = ("mid", "up2.res", "us2")
_XL_LIGHT = _uniform(_XL_2X, 2)

SCALECRAFTER: tuple[ScaleCrafterConfig, ...] = (
    ScaleCrafterConfig("sd15", 1024, 1024, _uniform(_SD_ALL, 2), 30),
    ScaleCrafterConfig("sd15", 1280, 1280, _uniform(_SD_ALL, 2.5), 35),
    ScaleCrafterConfig("sd15", 1024, 2048, _SD_STRONG, 35, _SD_LIGHT, 35, True),
    ScaleCrafterConfig("sd15", 2048, 2048, _SD_STRONG, 35, _SD_LIGHT, 35, True),
    ScaleCrafterConfig("sd21", 1024, 1024, _uniform(_SD_ALL, 2), 20),
    ScaleCrafterConfig("sd21", 1280, 1280, _uniform(_SD_ALL, 2.5), 30),
    # the released light table exists but τ_nd = 0 leaves it off
    ScaleCrafterConfig("sd21", 1024, 2048, _SD_STRONG, 37, _SD21_LIGHT, 0, True),
    ScaleCrafterConfig("sd21", 2048, 2048, _SD21_STRONG, 37, _SD21_LIGHT, 37, True),
    ScaleCrafterConfig("sdxl", 2048, 2048, _uniform(_XL_2X, 2), 30),
    ScaleCrafterConfig("sdxl", 2560, 2560, _uniform(_XL_2X, 2.5), 30),
    ScaleCrafterConfig(
        "sdxl",
        2048,
        4096,
        {"down2.res": 3, "mid": 4, "up2.res": 4, "us2": 4, "up1.res": 3, "us1": 3, "up0.res": 2},
        35,
        _XL_LIGHT,
        35,
        True,
    ),
    ScaleCrafterConfig(
        "sdxl",
        4096,
        4096,
        {"down2.res": 4, "mid": 4, "up2.res": 4, "us2": 4, "up1.res": 3, "us1": 3, "up0.res": 2},
        35,
        _XL_LIGHT,
        35,
        True,
    ),
)


# ---------------------------------------------------------------------------------------------- FouriScale


@dataclass(frozen=True)
class FouriScaleModel:
    """FouriScale's per-architecture settings (SPEC §2.1–2.2).

    Attributes:
        filtered: Convs that get the low-pass filter and the dilation.
        dilate_only: Convs that get the dilation but no filter (the upsampler convs).
        mask_floor: Floor v of both masks.
        weak_dilation_divisor: The weak row's conv dilation is ⌈max(d / divisor, 1)⌉ (None: same ⌈d⌉).
        weak_scale_at_least_one: The weak mask's scale is max(d/σ, 1) (SD) rather than d/σ (SDXL).
        base: ``"native"``: each layer's base is the native latent size at its level (SD, 64/2^ℓ);
            ``"buckets"``: one base size per image from :data:`SDXL_BASE_BUCKETS`.
    """

    filtered: tuple[str, ...]
    dilate_only: tuple[str, ...]
    mask_floor: float
    weak_dilation_divisor: float | None
    weak_scale_at_least_one: bool
    base: Literal["native", "buckets"]


@dataclass(frozen=True)
class FouriScaleConfig:
    """One official FouriScale size: the dilation ramps down from ``start`` and the layers are plain from
    ``stop`` (step indices at 50 steps)."""

    model: ModelKind
    height: int
    width: int
    start: int
    stop: int


_FS_SD = FouriScaleModel(
    filtered=("down2.res", "ds2", "down3.res", "mid", "up3.res", "up2.res", "up1.res"),
    dilate_only=("us3", "us2", "us1"),
    mask_floor=0.0,
    weak_dilation_divisor=None,
    weak_scale_at_least_one=True,
    base="native",
)
FOURISCALE_MODELS: dict[str, FouriScaleModel] = {
    "sd15": _FS_SD,
    "sd21": _FS_SD,
    "sdxl": FouriScaleModel(
        filtered=("down2.res", "mid", "up2.res", "up1.res"),
        dilate_only=("us2",),
        mask_floor=0.6,
        weak_dilation_divisor=1.5,
        weak_scale_at_least_one=False,
        base="buckets",
    ),
}

FOURISCALE: tuple[FouriScaleConfig, ...] = (
    *(
        FouriScaleConfig(model, h, w, start, stop)
        for model in ("sd15", "sd21")
        for h, w, start, stop in (
            (1024, 1024, 10, 30),
            (1280, 1280, 10, 30),
            (1024, 2048, 20, 35),
            (2048, 2048, 20, 35),
        )
    ),
    *(FouriScaleConfig("sdxl", h, w, 20, 35) for h, w in ((2048, 2048), (2560, 2560), (2048, 4096), (4096, 4096))),
)

#: FouriScale's 40 SDXL aspect buckets (h, w) in px, in the released list order (ties go to the first)
SDXL_BASE_BUCKETS: tuple[tuple[int, int], ...] = (
    (512, 2048), (512, 1984), (512, 1920), (512, 1856), (576, 1792), (576, 1728), (576, 1664), (640, 1600),
    (640, 1536), (704, 1472), (704, 1408), (704, 1344), (768, 1344), (768, 1280), (832, 1216), (832, 1152),
    (896, 1152), (896, 1088), (960, 1088), (960, 1024), (1024, 1024), (1024, 960), (1088, 960), (1088, 896),
    (1152, 896), (1152, 832), (1216, 832), (1280, 768), (1344, 768), (1408, 704), (1472, 704), (1536, 640),
    (1600, 640), (1664, 576), (1728, 576), (1792, 576), (1856, 512), (1920, 512), (1984, 512), (2048, 512),
)  # fmt: skip


# --------------------------------------------------------------------------------------------- HiDiffusion

#: HiDiffusion's "aggressive" RAU-Net switch, step 8 of 50
AGGRESSIVE_FRACTION = 8 / 50


@dataclass(frozen=True)
class HiDiffusionRow:
    """One row of HiDiffusion's placement and schedule table (SPEC §3.1).

    Attributes:
        name: Row name.
        models: Table architectures the row is for (``sdxl-turbo`` is its own).
        below_4x: The row applies when the min-side scale is below 4 (True), at least 4 (False), or always (None).
        rad: Address of the resolution-aware downsampler conv (stride 4, padding 2, dilation 2), None if none.
        pool_level: Level of the in-block pooling (down block) and restore (up block).
        rad_window, pool_window: Active step range [start, stop) as fractions of N (``int(N * f)``), None: never.
        msw_msa: Addresses of the self-attentions that run MSW-MSA (at all steps).
    """

    name: str
    models: tuple[str, ...]
    below_4x: bool | None
    rad: str | None
    pool_level: int
    rad_window: tuple[float, float] | None
    pool_window: tuple[float, float] | None
    msw_msa: tuple[str, ...]


_SD_MSW = ("down0.attn1", "up0.attn1")
_XL_MSW = ("down1.attn1", "up1.attn1")
_AGG = AGGRESSIVE_FRACTION

HIDIFFUSION: tuple[HiDiffusionRow, ...] = (
    HiDiffusionRow("sd", ("sd15", "sd21"), True, "ds0", 1, (0, 0.4), None, _SD_MSW),
    HiDiffusionRow("sd-4x", ("sd15", "sd21"), False, "ds0", 1, (0, 0.7), (0, 0.3), _SD_MSW),
    HiDiffusionRow("sdxl", ("sdxl",), True, "ds1", 1, (0, _AGG), (_AGG, 0.4), _XL_MSW),
    HiDiffusionRow("sdxl-gentle", ("sdxl",), True, "ds1", 1, None, (0, 0.4), _XL_MSW),
    HiDiffusionRow("sdxl-controlnet", ("sdxl",), True, "ds1", 1, (0, _AGG), (_AGG, 0.5), _XL_MSW),
    HiDiffusionRow("sdxl-4x", ("sdxl",), False, "ds1", 1, (0, 0.3), (0, 0.7), _XL_MSW),
    HiDiffusionRow("sdxl-turbo", ("sdxl-turbo",), None, None, 1, None, (0, 0.5), _XL_MSW),
)


def hidiffusion_row(
    model: str, min_side_scale: float, aggressive: bool = True, controlnet: bool = False
) -> HiDiffusionRow:
    """The HiDiffusion row for ``model`` at a min-side scale (short side / native side).

    ``aggressive=False`` is the official inpainting / Playground schedule; ``controlnet`` the SDXL ControlNet one
    (both only below 4×, as in the released code).
    """
    below = min_side_scale < 4
    name = {"sd15": "sd", "sd21": "sd", "sdxl-turbo": "sdxl-turbo"}.get(model, "sdxl")
    if name == "sd" and not below:
        name = "sd-4x"
    elif name == "sdxl":
        require(model == "sdxl", f"HiDiffusion has no table for {model!r} (sd15, sd21, sdxl, sdxl-turbo)")
        name = "sdxl-4x" if not below else "sdxl-controlnet" if controlnet else "sdxl" if aggressive else "sdxl-gentle"
    return next(row for row in HIDIFFUSION if row.name == name)


def step_range(num_steps: int, window: tuple[float, float] | None) -> range:
    """Step indices ``range(int(N·start), int(N·stop))`` of a fractional window (empty for None)."""
    if window is None:
        return range(0)
    return range(steps_at(num_steps, window[0]), steps_at(num_steps, window[1]))


def hidiffusion_schedule(row: HiDiffusionRow, num_steps: int) -> tuple[range, range]:
    """(RAD steps, pooling steps) of ``row`` at ``num_steps`` steps, e.g. SDXL 2048² at 50: (0–7, 8–19)."""
    return step_range(num_steps, row.rad_window), step_range(num_steps, row.pool_window)


# ------------------------------------------------------------------------------------------------- FreeU


@dataclass(frozen=True)
class FreeUFactors:
    """FreeU backbone factors (b1, b2) and skip factors (s1, s2) of stages 1 and 2."""

    b1: float
    b2: float
    s1: float
    s2: float

    def stage(self, stage: int) -> tuple[float, float]:
        """(b, s) of stage 1 or 2."""
        return (self.b1, self.s1) if stage == 1 else (self.b2, self.s2)


#: which decoder resnets FreeU touches: by channel count, generalised by level (the official scripts), or by
#: up-block index (diffusers' ``enable_freeu``); :func:`hiresdiff.ops.freeu.freeu_stages`
FREEU_RULES = ("channels", "diffusers")

#: the factors the ScaleCrafter / FouriScale scripts use per model
FREEU_OFFICIAL: dict[str, FreeUFactors] = {
    "sdxl": FreeUFactors(1.1, 1.2, 0.6, 0.4),
    "sd15": FreeUFactors(1.2, 1.4, 0.9, 0.2),
    "sd21": FreeUFactors(1.1, 1.2, 0.9, 0.2),
}

#: the sampling settings of the ScaleCrafter and FouriScale scripts as method presets: ``official`` the SDXL script
#: (``text2image_xl.py``: DDIM with η = 1, guidance 5.0, FreeU on), ``official-sd`` the SD 1.5 / 2.1 one (7.5)
SCRIPT_PRESETS: dict[str, dict[str, object]] = {
    "official": {"scheduler": "ddim", "eta": 1.0, "guidance": 5.0, "freeu": True},
    "official-sd": {"scheduler": "ddim", "eta": 1.0, "guidance": 7.5, "freeu": True},
}


# ------------------------------------------------------------------------------------------ nearest config


class SizedConfig(Protocol):
    """A configuration released for one model and image size."""

    @property
    def model(self) -> str: ...

    @property
    def height(self) -> int: ...

    @property
    def width(self) -> int: ...


C = TypeVar("C", bound=SizedConfig)


def nearest_config(
    configs: Sequence[C], model: str, native: int, height: int, width: int, method: str
) -> tuple[C, str | None]:
    """The ``model`` configuration nearest to ``height`` × ``width`` and a notice line (None when exact).

    Sizes compare as (max-side scale, min-side scale) over the native side, in log scale (Euclidean), so the
    orientation does not matter and a tiny model at 2× native picks the 2× configuration; ties go to the first.
    """
    candidates = [c for c in configs if c.model == model]
    require(bool(candidates), f"{method} has no official configuration for {model!r} models")
    want = (max(height, width) / native, min(height, width) / native)

    def distance(c: C) -> float:
        base = NATIVE_SIZE[c.model]
        have = (max(c.height, c.width) / base, min(c.height, c.width) / base)
        return math.hypot(math.log(want[0] / have[0]), math.log(want[1] / have[1]))

    best = min(candidates, key=distance)
    if distance(best) < 1e-9:
        return best, None
    scale = NATIVE_SIZE[best.model]
    return best, (
        f"{method} has no official setting for {height}×{width} at native {native}; using its {model} "
        f"{best.height}×{best.width} configuration (scale {best.height / scale:g}×{best.width / scale:g}, "
        "the nearest in log scale)"
    )
