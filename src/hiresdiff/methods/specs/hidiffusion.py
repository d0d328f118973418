"""HiDiffusion (SPEC-baselines-unet §3) parameters and step schedule; recipe: :mod:`hiresdiff.methods.hidiffusion`.

Torch-free: the schedule (which RAU-Net mechanism runs on which step indices) is table arithmetic over
:mod:`hiresdiff.patches.tables`, so plans and listings use it without loading a model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hiresdiff.config import check_finite
from hiresdiff.errors import require
from hiresdiff.methods.base import FreeUParams, Method
from hiresdiff.patches.tables import AGGRESSIVE_FRACTION, HiDiffusionRow, hidiffusion_row, step_range

#: the negative prompt of HiDiffusion's README examples (SDXL; used for SD too)
OFFICIAL_NEGATIVE = "blurry, ugly, duplicate, poorly drawn face, deformed, mosaic, artifacts, bad limbs"
SHIFT_MODES = ("random", "cycle")


@dataclass
class HiDiffusionParams(FreeUParams):
    """``raunet`` / ``msw_msa`` switch the two components. ``t1_ratio`` / ``t2_ratio`` override the official
    switch fractions T1 / T2 of the table row (``None``: the row's): on SD, T1 ends RAD and T2 the in-block
    pooling; on SDXL, T1 ends the pooling and T2 ends RAD (non-aggressive rows; the aggressive schedule runs RAD
    for i < ⌊N·aggressive_fraction⌋, then pooling until ⌊N·T1⌋). ``aggressive`` (SDXL below 4× scale, default
    on) picks that schedule; ``shift`` is how MSW-MSA's window shift is chosen per step and layer (``random``
    from each image's generator, ``cycle``: k = i mod 4); ``freeu``/``freeu_rule``: FreeU (off in the official
    code)."""

    raunet: bool = True
    msw_msa: bool = True
    t1_ratio: float | None = None
    t2_ratio: float | None = None
    aggressive: bool | None = None
    aggressive_fraction: float = AGGRESSIVE_FRACTION
    shift: str = "random"

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("t1_ratio", "t2_ratio", "aggressive_fraction"):
            value = getattr(self, name)
            if value is not None:
                check_finite(name, value)
                require(0.0 <= value <= 1.0, f"{name} is a fraction of the steps in [0, 1], got {value}")
        require(self.shift in SHIFT_MODES, f"unknown shift {self.shift!r}; choose one of: {', '.join(SHIFT_MODES)}")


def schedule(
    params: HiDiffusionParams, model: str, min_side_scale: float, steps: int
) -> tuple[HiDiffusionRow, range, range]:
    """The table row and the (RAD, pooling) step-index ranges of a run of ``steps`` steps."""
    aggressive = True if params.aggressive is None else params.aggressive
    row = hidiffusion_row(model, min_side_scale, aggressive)
    rad, pool = row.rad_window, row.pool_window
    if row.name == "sdxl":  # the aggressive schedule: RAD first, pooling after
        rad, pool = (0, params.aggressive_fraction), (params.aggressive_fraction, pool[1] if pool else 0)
    t1_is_rad = row.models[0] in ("sd15", "sd21")
    if params.t1_ratio is not None:
        if t1_is_rad:
            rad = (0, params.t1_ratio)
        else:
            pool = (pool[0] if pool else 0, params.t1_ratio)
    if params.t2_ratio is not None:
        window = (0, params.t2_ratio) if params.t2_ratio > 0 else None
        if t1_is_rad:
            pool = window
        elif row.name != "sdxl":
            rad = window
    return row, step_range(steps, rad), step_range(steps, pool)


PRESETS: dict[str, dict[str, Any]] = {
    # the official README examples: DDIM with η = 1, guidance 7.5, the examples' negative prompt
    "official": {"scheduler": "ddim", "eta": 1.0, "guidance": 7.5, "negative_prompt": OFFICIAL_NEGATIVE},
    "raunet-only": {"msw_msa": False},
    "msw-msa-only": {"raunet": False},
}

METHOD = Method(
    "hidiffusion",
    "HiDiffusion: resolution-aware U-Net (RAU-Net) and shifted-window self-attention (MSW-MSA)",
    "https://arxiv.org/abs/2311.17528",
    HiDiffusionParams,
    "hiresdiff.methods.hidiffusion:run_hidiffusion",
    presets=PRESETS,
    families=("sd", "sdxl"),
    takes_controlnet=False,
    hidiffusion_switch="never",  # it is HiDiffusion already
)
