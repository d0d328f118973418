"""FreeU (Si et al., 2023) on the patch seam: an input patch on the decoder resnets it touches (SPEC-baselines-unet §0).

A decoder resnet's input is ``cat([h, s], dim=1)``: the backbone features ``h`` (the previous up layer's output)
and the skip features ``s`` of the matching down layer. FreeU scales the first half of ``h``'s channels by ``b``
and the lowest frequencies of ``s`` by ``s`` (:mod:`hiresdiff.ops.freeu`) with the stage's factors; the patch
splits the input at ``h``'s channel count, which the UNet config fixes per resnet
(:func:`~hiresdiff.ops.freeu.up_resnet_channels`). Which resnets are stage 1 or 2 is the matching rule
(:func:`~hiresdiff.ops.freeu.freeu_stages`): ``"channels"`` (the ScaleCrafter/FouriScale/FreeU scripts,
generalised by level) or ``"diffusers"`` (``enable_freeu``, by up-block index). Factors per model:
:data:`~hiresdiff.patches.tables.FREEU_OFFICIAL`.

The patch is on at every step of a loop whose clock the sampler drives and plain outside one, like every patch.
"""

from __future__ import annotations

import typing
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from hiresdiff.errors import require
from hiresdiff.ops.freeu import FreeURule, freeu_backbone, freeu_skip, freeu_stages, up_resnet_channels
from hiresdiff.patches.clock import PatchClock
from hiresdiff.patches.context import InputPatch, Patch, patched, resolve_targets
from hiresdiff.patches.tables import FREEU_OFFICIAL, FREEU_RULES, FreeUFactors, model_kind


@dataclass(frozen=True)
class FreeUSite:
    """One decoder resnet FreeU edits: its backbone's channel count (where the input splits) and (b, s)."""

    backbone: int
    b: float
    s: float

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """The resnet input ``cat([h, s])`` with FreeU's backbone scaling and skip filter."""
        hidden, skip = x[:, : self.backbone], x[:, self.backbone :]
        return torch.cat([freeu_backbone(hidden, self.b), freeu_skip(skip, self.s)], dim=1)


def freeu_sites(unet: Any, rule: str, factors: FreeUFactors) -> dict[str, FreeUSite]:
    """Target (``upℓ:resnets.j``) → :class:`FreeUSite` of every decoder resnet ``rule`` touches on ``unet``."""
    require(rule in FREEU_RULES, f"unknown FreeU rule {rule!r}; choose one of: {', '.join(FREEU_RULES)}")
    config = unet.config
    layout = up_resnet_channels(config.block_out_channels, config.layers_per_block)
    top = len(layout) - 1
    sites: dict[str, FreeUSite] = {}
    for (block, j), stage in sorted(freeu_stages(layout, typing.cast(FreeURule, rule)).items()):
        b, s = factors.stage(stage)
        sites[f"up{top - block}:resnets.{j}"] = FreeUSite(layout[block][j][0], b, s)
    return sites


def freeu_patch(
    adapter_or_unet: Any, family: str, rule: str = "channels", factors: FreeUFactors | None = None
) -> Patch:
    """FreeU on a ``family`` (``sd``/``sdxl``) UNet as a patch for :func:`~hiresdiff.patches.context.patched`,
    active at every step of the loop its clock follows. ``factors`` default to the official ones of the model
    (:data:`~hiresdiff.patches.tables.FREEU_OFFICIAL`, by :func:`~hiresdiff.patches.tables.model_kind`)."""
    unet = getattr(adapter_or_unet, "unet", adapter_or_unet)
    factors = factors or FREEU_OFFICIAL[model_kind(family, unet.config.cross_attention_dim)]
    sites = freeu_sites(unet, rule, factors)
    names = resolve_targets(unet, list(sites))
    by_module: dict[nn.Module, FreeUSite] = {
        unet.get_submodule(name): site for target, site in sites.items() for name in names[target]
    }
    setting = ("freeu", rule, factors)  # constant: the state the cost model keys on

    def transform(module: nn.Module, x: torch.Tensor, _: Any) -> torch.Tensor:
        return by_module[module].apply(x)

    return InputPatch(tuple(sites), lambda index, branch: setting, transform=transform)


@contextmanager
def freeu_installed(adapter: Any, clock: PatchClock, enabled: bool, rule: str = "channels") -> Iterator[None]:
    """FreeU (when ``enabled``) installed on ``adapter``'s UNet while the block runs, following ``clock`` (a clock
    the caller's loop already drives, e.g. another method's patch clock)."""
    if not enabled:
        yield
        return
    with patched(adapter.unet, clock, lambda: adapter.call_info, [freeu_patch(adapter, adapter.family, rule)]):
        yield


@contextmanager
def freeu_hooks(adapter: Any, enabled: bool, rule: str = "channels") -> Iterator[list[PatchClock]]:
    """:func:`freeu_installed` on a clock of its own; yields the step hooks the sampling loop must get so that
    FreeU is on (that clock; ``[]`` when off)."""
    clock = PatchClock()
    with freeu_installed(adapter, clock, enabled, rule):
        yield [clock] if enabled else []
