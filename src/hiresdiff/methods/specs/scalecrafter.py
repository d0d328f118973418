"""ScaleCrafter (SPEC-baselines-unet §1) parameters and table resolution; recipe: :mod:`hiresdiff.methods.scalecrafter`.

Torch-free: which re-dilation table, switch steps and noise-damped CFG a run uses is arithmetic over the official
configurations of :mod:`hiresdiff.patches.tables`, so plans, listings and ``--set`` checks need no model.

A user table (``table="mid=2,up2.res=2,us2=2"``) addresses the levels of the UNet it runs on
(:mod:`hiresdiff.patches.levels`); the official tables are written for their architecture (SD 1.5/2.1: 4 levels,
SDXL: 3) and are aligned at the deepest level onto UNets with fewer levels.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from hiresdiff.config import GenerationSettings, check_finite
from hiresdiff.errors import require
from hiresdiff.methods.base import FreeUParams, Method
from hiresdiff.patches.tables import (
    LEVELS,
    OFFICIAL_STEPS,
    SCALECRAFTER,
    SCRIPT_PRESETS,
    ScaleCrafterConfig,
    model_kind,
    nearest_config,
    steps_at,
)

if TYPE_CHECKING:
    from hiresdiff.pipeline import ModelFacts

#: the level addresses a re-dilation table may name (convs only: resnets, down/upsamplers, the mid block)
_CONV_ADDRESS = re.compile(r"^(down\d+\.res|ds\d+|mid|up\d+\.res|us\d+)$")
#: an official configuration named as ``model:HxW`` (``sdxl:2048x4096``)
_CONFIG_NAME = re.compile(r"^(sd15|sd21|sdxl):(\d+)x(\d+)$")


def config_name(config: ScaleCrafterConfig) -> str:
    """``model:HxW``, how ``table=`` names an official configuration."""
    return f"{config.model}:{config.height}x{config.width}"


def parse_table(name: str, text: str) -> dict[str, float]:
    """A re-dilation table ``"address=p,address=p"`` → {address: p}; one error line for bad syntax, an address
    that is not a conv level address, a repeated address or a factor below 1."""
    table: dict[str, float] = {}
    for entry in (e.strip() for e in text.split(",")):
        address, sep, value = (part.strip() for part in entry.partition("="))
        require(
            bool(sep) and bool(address),
            f"{name}: entries are address=factor separated by commas (e.g. mid=2,up2.res=2,us2=2), got {entry!r}",
        )
        require(
            _CONV_ADDRESS.match(address) is not None,
            f"{name}: {address!r} is not a conv level address (downℓ.res, dsℓ, mid, upℓ.res, usℓ)",
        )
        require(address not in table, f"{name}: {address!r} is given twice")
        try:
            factor = float(value)
        except ValueError:
            factor = float("nan")
        check_finite(f"{name} factor of {address}", factor, low=1.0)
        table[address] = factor
    return table


def _official(name: str) -> ScaleCrafterConfig | None:
    """The official configuration named ``model:HxW`` (None when ``name`` is not of that form)."""
    match = _CONFIG_NAME.match(name)
    if match is None:
        return None
    model, height, width = match.group(1), int(match.group(2)), int(match.group(3))
    found = [c for c in SCALECRAFTER if (c.model, c.height, c.width) == (model, height, width)]
    names = ", ".join(config_name(c) for c in SCALECRAFTER)
    require(bool(found), f"table {name!r} is not an official ScaleCrafter configuration; official ones: {names}")
    return found[0]


@dataclass
class ScaleCrafterParams(FreeUParams):
    """``table``: the strong re-dilation table D — ``None`` (the official configuration nearest to the size), an
    official configuration ``model:HxW`` (``sdxl:4096x4096``), or the user's own ``"address=p,…"`` on the UNet's
    levels (unknown addresses are refused); ``light_table``: D_nd of noise-damped CFG's unconditional row, same
    forms except a configuration name (``None``: the configuration's). ``dilate_fraction`` / ``ndcfg_fraction``:
    re-dilation and noise-damped CFG run for step index i < int(N·f) (``None``: the configuration's τ / 50);
    ``progressive`` ramps p down to 2 over those steps (``None``: the configuration's); ``ndcfg`` turns
    noise-damped CFG off; ``freeu``/``freeu_rule``: FreeU (the scripts': channel rule, official factors). The
    paper's dispersed convolution is not offered: every released configuration leaves it off (SPEC §1.1)."""

    table: str | None = None
    light_table: str | None = None
    dilate_fraction: float | None = None
    ndcfg_fraction: float | None = None
    progressive: bool | None = None
    ndcfg: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_fractions("dilate_fraction", "ndcfg_fraction")
        self.user_tables()  # refuses bad tables now, before any model work

    def user_tables(self) -> tuple[dict[str, float] | None, dict[str, float] | None]:
        """The user's own (strong, light) tables, ``None`` where the official configuration's apply."""
        strong = None
        if self.table is not None and _official(self.table) is None:
            strong = parse_table("table", self.table)
        light = parse_table("light_table", self.light_table) if self.light_table is not None else None
        return strong, light

    def check_model(self, settings: GenerationSettings, model: ModelFacts) -> None:
        """The run's plan resolved from the model's facts (no weights): an official table of another architecture
        is one line before any model work. SD 1.x and 2.x tell apart by text width; where that is not known
        before loading, the recipe checks."""
        if model.family == "sd" and model.text_width is None:
            return
        kind = model_kind(model.family, model.text_width)
        plan(self, kind, model.native, settings.height, settings.width, settings.steps)


@dataclass(frozen=True)
class ScaleCrafterPlan:
    """What a run does: the strong and light tables with their step counts at N steps.

    ``strong_levels`` / ``light_levels`` are the level counts the tables are written for (``None``: the UNet's
    own levels, a user table); ``notice`` is the one line saying which configuration stands in for a size outside
    the official ones (None when exact or not used).
    """

    config: ScaleCrafterConfig
    strong: dict[str, float]
    strong_levels: int | None
    dilate_steps: int
    light: dict[str, float]
    light_levels: int | None
    ndcfg_steps: int
    progressive: bool
    notice: str | None


def plan(params: ScaleCrafterParams, model: str, native: int, height: int, width: int, steps: int) -> ScaleCrafterPlan:
    """Resolve ``params`` for a ``model`` (``sd15``/``sd21``/``sdxl``) UNet of ``native`` px at ``height`` ×
    ``width`` and ``steps`` steps: the official configuration (named, or nearest in log scale with a notice),
    its tables unless the user gave some, and τ = int(N·f) with f the given fraction or the configuration's τ/50."""
    named = _official(params.table) if params.table is not None else None
    if named is not None:
        require(named.model == model, f"table {params.table!r} is for {named.model} models, this is a {model} model")
        config, notice = named, None
    else:
        config, notice = nearest_config(SCALECRAFTER, model, native, height, width, "scalecrafter")
    levels = LEVELS[config.model]
    user_strong, user_light = params.user_tables()
    dilate = params.dilate_fraction if params.dilate_fraction is not None else config.dilate_tau / OFFICIAL_STEPS
    ndcfg = params.ndcfg_fraction if params.ndcfg_fraction is not None else config.ndcfg_tau / OFFICIAL_STEPS
    return ScaleCrafterPlan(
        config=config,
        strong=dict(config.dilate) if user_strong is None else user_strong,
        strong_levels=levels if user_strong is None else None,
        dilate_steps=steps_at(steps, dilate),
        light=dict(config.ndcfg) if user_light is None else user_light,
        light_levels=levels if user_light is None else None,
        ndcfg_steps=steps_at(steps, ndcfg) if params.ndcfg else 0,
        progressive=config.progressive if params.progressive is None else params.progressive,
        notice=notice,
    )


METHOD = Method(
    "scalecrafter",
    "ScaleCrafter: re-dilated convolutions and noise-damped guidance at the target size",
    "https://arxiv.org/abs/2310.07702",
    ScaleCrafterParams,
    "hiresdiff.methods.scalecrafter:run_scalecrafter",
    presets=SCRIPT_PRESETS,  # official: the SDXL script, official-sd: the SD one (DDIM η = 1, FreeU)
    families=("sd", "sdxl"),
    hidiffusion_switch="never",  # it patches the same UNet convs itself
)
