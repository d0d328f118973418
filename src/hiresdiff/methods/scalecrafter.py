"""ScaleCrafter (SPEC-baselines-unet §1): the base model at the target size with re-dilated convolutions and
noise-damped classifier-free guidance.

Per step i of the one full-canvas loop (the step clock sets i; nothing counts model calls):
  1. re-dilation: the strong table D (factor p per UNet level, ramped down to 2 when progressive) on the convs of
     the ``uncond`` and ``cond`` rows while i < τ_dil, the light table D_nd on the ``uncond_light`` row while
     i < τ_nd (:mod:`hiresdiff.patches.scalecrafter`);
  2. one prediction: noise-damped CFG ``ε = ε_u^light + w·(ε_c − ε_u)`` (three rows in one call) while i < τ_nd
     and CFG is on, ordinary CFG after;
  3. one scheduler step (DDIM with η = 1 and FreeU in the ``official`` presets).
Tables and τ's come from the official configuration of the model and size — for other sizes the nearest one in
log scale, named in one notice line — or from the user (``table=``, ``light_table=``, the fractions). An input
image is SDEdited at the target size as in ``direct``.

Deliberate differences from the official code: τ's are fractions of N (official: absolute steps, so at N ≠ 50 its
switches move); unknown table names are refused (official: silently skipped, its SDXL bug B1); patched convs keep
their LoRA and the plain conv's output size on odd sides; three rows per step instead of two passes of two.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

from hiresdiff.errors import HiresWarning
from hiresdiff.methods.base import MethodOutput
from hiresdiff.methods.specs.scalecrafter import ScaleCrafterParams, plan
from hiresdiff.models.adapter import ModelAdapter
from hiresdiff.models.guidance import NDCFG
from hiresdiff.patches.clock import PatchClock
from hiresdiff.patches.freeu import freeu_installed
from hiresdiff.patches.levels import adapt, unet_levels
from hiresdiff.patches.scalecrafter import Redilation, scalecrafter_patches
from hiresdiff.patches.tables import model_kind
from hiresdiff.sampler import Run
from hiresdiff.strategies.ruled import RuledCanvas


def on_unet(ad: ModelAdapter, table: Mapping[str, float], levels: int | None, dropped: list[str]) -> dict[str, float]:
    """An official table (written for ``levels`` levels) aligned onto the UNet, adding the addresses it lacks to
    ``dropped``; a user's table (``levels`` None) as given — :func:`~hiresdiff.patches.context.patched` refuses
    unknown names."""
    if levels is None:
        return dict(table)
    kept, lacking = adapt(table, levels, ad.unet)
    dropped.extend(a for a in lacking if a not in dropped)
    return kept


def run_scalecrafter(run: Run, params: ScaleCrafterParams) -> MethodOutput:
    s, ad = run.settings, run.adapter
    kind = model_kind(ad.family, ad.text_width)
    p = plan(params, kind, ad.native_size, s.height, s.width, s.steps)
    dropped: list[str] = []
    strong = Redilation(on_unet(ad, p.strong, p.strong_levels, dropped), p.dilate_steps, p.progressive)
    light = Redilation(on_unet(ad, p.light, p.light_levels, dropped), p.ndcfg_steps, p.progressive)
    notes = [p.notice] if p.notice else []
    if dropped:
        notes.append(f"this UNet has {unet_levels(ad.unet)} levels; {', '.join(dropped)} of the table stay plain")
    if notes:
        warnings.warn(f"scalecrafter: {'; '.join(notes)}", HiresWarning, stacklevel=2)
    clock = PatchClock()
    damped = p.ndcfg_steps if s.cfg else 0  # noise-damped CFG needs the unconditional rows

    def is_damped(index: int | None) -> bool:
        return index is not None and index < damped

    clock.sign(is_damped)  # the rule switch is part of the step's state for the cost model's replay
    strategy = RuledCanvas(lambda: NDCFG if is_damped(clock.index) else None)
    with scalecrafter_patches(ad, clock, strong, light), freeu_installed(ad, clock, params.freeu, params.freeu_rule):
        if run.source is not None:  # upscaling: SDEdit of the input picture at the target size
            return MethodOutput(latents=run.sdedit(strategy, "scalecrafter (SDEdit)", [clock]))
        latents = run.sample_canvas(s.height, s.width, name="scalecrafter", hooks=[clock], strategy=strategy)
        return MethodOutput(latents=latents)
