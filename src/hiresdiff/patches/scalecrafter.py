"""ScaleCrafter's re-dilation on the patch seam (SPEC-baselines-unet §1.1): per-branch, per-step conv dilation.

A :class:`RedilatePatch` runs the targets' convs re-dilated by a factor p (its setting): d = ⌈p⌉ and the input
resized by f = d/p around the call, the output resized back to the plain conv's size (:mod:`hiresdiff.ops.redilate`,
whose ``redilated_conv`` it equals on a plain conv). It sets dilation/padding through :class:`ConvPatch`, so PEFT
LoRA convs (``base_layer`` and ``lora_A``) are re-dilated too, where the official code drops them.

:func:`redilation_patches` builds one patch per table address whose schedule gives rows of the ``uncond`` and
``cond`` branches the strong table D (for i < τ_dil) and rows of ``uncond_light`` the light table D_nd (for
i < τ_nd), each optionally progressive: noise-damped CFG is then one batched call of three rows
(:data:`~hiresdiff.models.guidance.NDCFG`), the official code's two passes of two rows with the same output.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch.nn.functional as F
from torch import nn

from hiresdiff.models.adapter import ModelAdapter
from hiresdiff.models.guidance import COND, UNCOND_LIGHT
from hiresdiff.ops.redilate import conv_output_size, progressive_dilation, redilated_padding, redilation
from hiresdiff.patches.clock import PatchClock
from hiresdiff.patches.context import ConvPatch, ConvSetting, Patch, conv_leaves, patched


@dataclass
class RedilatePatch(ConvPatch):
    """Re-dilation of the targets' convs by the setting p ≥ 1 (a float) for the call, output size kept."""

    def apply(self, module: nn.Module, forward: Any, setting: Any, args: tuple, kwargs: dict) -> Any:
        d, f = redilation(float(setting))
        conv = conv_leaves(module)[0]
        x, rest = args[0], args[1:]
        h, w = x.shape[-2:]
        size = conv_output_size(conv, h, w)
        if f != 1:
            x = F.interpolate(x, size=(round(f * h), round(f * w)), mode="bilinear", align_corners=False)
        padding = redilated_padding(conv, d)[0]
        y = super().apply(module, forward, ConvSetting(padding=padding, dilation=d), (x, *rest), kwargs)
        if tuple(y.shape[-2:]) != size:
            y = F.interpolate(y, size=size, mode="bilinear", align_corners=False)
        return y


@dataclass(frozen=True)
class Redilation:
    """A re-dilation table (level address → p) active for step index i < ``steps``, optionally progressive
    (p_i = max(⌈p·(τ − i)/τ⌉, 2), :func:`~hiresdiff.ops.redilate.progressive_dilation`)."""

    table: Mapping[str, float]
    steps: int
    progressive: bool = False

    def factor(self, address: str, index: int) -> float | None:
        """p of ``address`` at step ``index`` (None: the plain conv)."""
        p = self.table.get(address)
        if p is None or p == 1 or index >= self.steps:
            return None
        return float(progressive_dilation(p, index, self.steps)) if self.progressive else float(p)


def redilation_patches(strong: Redilation, light: Redilation) -> list[Patch]:
    """One :class:`RedilatePatch` per address of either table: ``light`` on ``uncond_light`` rows, ``strong`` on
    every other row."""

    def schedule(address: str) -> Any:
        return lambda index, branch: (light if branch == UNCOND_LIGHT else strong).factor(address, index)

    addresses = dict.fromkeys([*strong.table, *light.table])
    return [RedilatePatch((address,), schedule(address), (COND, UNCOND_LIGHT)) for address in addresses]


@contextmanager
def scalecrafter_patches(
    adapter: ModelAdapter, clock: PatchClock, strong: Redilation, light: Redilation, extra: tuple[Patch, ...] = ()
) -> Iterator[None]:
    """The re-dilation of ``strong``/``light`` (and ``extra`` patches, e.g. FreeU) installed on the UNet."""
    with patched(adapter.unet, clock, lambda: adapter.call_info, [*redilation_patches(strong, light), *extra]):
        yield
