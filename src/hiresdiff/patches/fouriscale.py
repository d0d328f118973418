"""FouriScale's model patches (SPEC-baselines-unet §2.1–2.2): low-passed, dilated convs and Q/K-shared attention.

* **Conv patch** (:class:`FouriScaleLayers`): on step i < stop a patched conv low-passes its *input* in Fourier
  space (pad to a multiple of the layer's base size, mask, crop; :mod:`hiresdiff.ops.fouriscale`) and runs with
  dilation ⌈d⌉ (padding ⌈d⌉, 3 × 3 kernels), d = :func:`~hiresdiff.ops.fouriscale.dilation_at`. Rows of the
  ``uncond``/``cond`` branches get the strong mask (scale max(d/σ, 1), ramp ⌊n/8⌋); rows of ``weak`` the weak mask
  (scale d/σ, SD max(d/σ, 1), ramp ⌊(s − 1)·n/(2s)⌋ in floats) and, SDXL, dilation ⌈max(d/1.5, 1)⌉. Upsampler
  convs are dilated but not filtered. d = 1 is the plain conv.
* **Q/K sharing** (:class:`QKShareProcessor`, every ``attn1``): rows of the ``weak`` branch take the queries and
  keys of the ``cond`` row of the same view in the same call (rows are branch-major), keeping their own values —
  the weak branch uses the strong branch's attention map.
* **Per-layer bases** (:func:`layer_bases`) of the image's base size (torch-free, before any model work:
  :func:`~hiresdiff.methods.specs.fouriscale.base_and_dilation`): SD native/2^ℓ, SDXL base · h_feat / H.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from hiresdiff.errors import require
from hiresdiff.models.adapter import ModelAdapter
from hiresdiff.models.guidance import COND, UNCOND, WEAK
from hiresdiff.ops.fouriscale import (
    DEFAULT_FFT_ELEMENTS,
    dilation_at,
    feature_base_size,
    fourier_lowpass,
    lowpass_mask_1d,
    padded_size,
    strong_ramp,
    weak_ramp,
)
from hiresdiff.patches.clock import PatchClock
from hiresdiff.patches.context import ConvSetting, InputConvPatch, Patch, patched
from hiresdiff.patches.levels import adapt, address_index
from hiresdiff.patches.processors import SelfAttentionKernel, attention_output, self_attention_qkv
from hiresdiff.patches.tables import LEVELS, FouriScaleModel

#: ``base_of(h_feat, w_feat)`` → the layer's base size (b_h, b_w) in feature cells
BaseOf = Callable[[int, int], tuple[float, float]]


@dataclass(frozen=True)
class LowPass:
    """What the rows of one branch get at one step: conv ``dilation`` and the mask ``scale`` (``None``: no filter,
    the upsampler convs); ``weak`` picks the weak mask's ramp."""

    dilation: int
    scale: float | None
    weak: bool


@dataclass
class FouriScaleLayers:
    """The conv schedule of one run: d₀, the ramp from ``start`` to ``stop`` (step indices), mask floor, weak
    dilation divisor (``None``: same ⌈d⌉), whether the weak scale is clamped to ≥ 1 (SD), and the layers' bases."""

    d0: int
    start: int
    stop: int
    progressive: bool
    floor: float
    weak_divisor: float | None
    weak_scale_at_least_one: bool
    base_of: BaseOf
    max_elements: int = DEFAULT_FFT_ELEMENTS

    def setting(self, index: int, branch: str, stride: int, filtered: bool) -> LowPass | None:
        """The :class:`LowPass` of rows of ``branch`` at step ``index`` on a conv of ``stride`` (None: plain)."""
        d = dilation_at(index, self.d0, self.start, self.stop, self.progressive)
        if d is None or d == 1:
            return None
        weak = branch == WEAK
        dilation = math.ceil(max(d / self.weak_divisor, 1.0) if weak and self.weak_divisor else d)
        if not filtered:
            return LowPass(dilation, None, weak)
        scale = d / stride
        if not weak or self.weak_scale_at_least_one:
            scale = max(scale, 1.0)
        return LowPass(dilation, scale, weak)

    def lowpass(self, x: torch.Tensor, setting: LowPass) -> torch.Tensor:
        """``x`` (B, C, h, w) low-passed with the setting's mask, padded to a multiple of the layer's base."""
        if setting.scale is None:
            return x
        h, w = x.shape[-2:]
        nh, nw = padded_size(h, w, *self.base_of(h, w))
        return fourier_lowpass(x, self.mask(nh, setting), self.mask(nw, setting), max_elements=self.max_elements)

    def mask(self, n: int, setting: LowPass) -> torch.Tensor:
        """The 1-D mask of a padded side ``n``: strong ramp ⌊n/8⌋ or the weak ramp (≤ 0: all ones). Built per
        call (n floats): a cache would make a step's allocations, and so the cost model's replay, depend on the
        steps before it."""
        assert setting.scale is not None
        ramp = max(weak_ramp(n, setting.scale), 0) if setting.weak else strong_ramp(n)
        return lowpass_mask_1d(n, setting.scale, self.floor, ramp)

    def patches(self, filtered: Sequence[str], dilate_only: Sequence[str]) -> list[Patch]:
        """One :class:`InputConvPatch` per (stride, filtered) group of conv addresses (``dsℓ`` have stride 2)."""
        groups: dict[tuple[int, bool], list[str]] = {}
        for address in filtered:
            groups.setdefault((2 if address.startswith("ds") else 1, True), []).append(address)
        for address in dilate_only:
            groups.setdefault((2 if address.startswith("ds") else 1, False), []).append(address)

        def schedule(stride: int, filt: bool) -> Any:
            return lambda index, branch: self.setting(index, branch, stride, filt)

        return [
            InputConvPatch(
                tuple(targets),
                schedule(stride, filt),
                (UNCOND, COND, WEAK),
                transform=self.lowpass,
                conv=lambda s: ConvSetting(padding=s.dilation, dilation=s.dilation),
            )
            for (stride, filt), targets in groups.items()
        ]


def layer_bases(arch: FouriScaleModel, base: tuple[int, int], height: int, grid: int) -> BaseOf:
    """``base_of`` of the layers: SD ``native``: base latent / 2^ℓ at the conv input's level ℓ (the official
    64/2^ℓ); SDXL ``buckets``: base · h_feat / H (the official per-layer down ratio, height only)."""
    if arch.base == "buckets":
        return lambda h, w: feature_base_size((float(base[0]), float(base[1])), height, h)
    latent_h = height // grid

    def native_level(h: int, w: int) -> tuple[float, float]:
        level = 2 ** round(math.log2(latent_h / h))
        return base[0] / grid / level, base[1] / grid / level

    return native_level


def conv_layers(arch: FouriScaleModel, kind: str, unet: Any) -> tuple[list[str], list[str]]:
    """(filtered, dilate-only) conv addresses of ``arch`` aligned onto ``unet``'s levels (a UNet with fewer
    levels than the official architecture keeps the deepest ones; addresses it lacks are dropped)."""
    filtered, _ = adapt(dict.fromkeys(arch.filtered, True), LEVELS[kind], unet)
    dilate_only, _ = adapt(dict.fromkeys(arch.dilate_only, True), LEVELS[kind], unet)
    return list(filtered), list(dilate_only)


def weak_pairs(info: Sequence[tuple[int, str]], rows: int) -> list[tuple[int, int]]:
    """(weak row, cond row) of every view of a call whose ``rows`` carry ``info`` (branch-major: the j-th weak row
    and the j-th cond row are the same view); empty when the call has no weak rows."""
    if len(info) != rows:
        return []
    weak = [r for r, (_, branch) in enumerate(info) if branch == WEAK]
    if not weak:
        return []
    cond = [r for r, (_, branch) in enumerate(info) if branch == COND]
    require(len(weak) == len(cond), f"a call with {len(weak)} weak rows has {len(cond)} cond rows to share Q/K with")
    pairs = list(zip(weak, cond, strict=True))
    if any(info[w][0] != info[c][0] for w, c in pairs):
        raise RuntimeError("weak and cond rows of a call are not in the same view order")
    return pairs


class QKShareProcessor(SelfAttentionKernel):
    """Self-attention where ``weak`` rows take the queries and keys of their view's ``cond`` row (SPEC §2.1), a
    kernel on q, k, v (:meth:`attend`); calls without weak rows, cross-attention and masked calls run the wrapped
    attention."""

    def __init__(self, inner: Any, adapter: ModelAdapter) -> None:
        self.inner, self.adapter = inner, adapter

    def takes(self, tokens: torch.Tensor) -> bool:
        return bool(weak_pairs(self.adapter.call_info, tokens.shape[0]))

    def attend_self(self, attn: Any, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The diffusers processor's path: :meth:`projections` (the hook where the shared q, k are made) and
        attention of them."""
        pairs = weak_pairs(self.adapter.call_info, hidden_states.shape[0])
        q, k, v = self.projections(attn, hidden_states, pairs)
        return attention_output(attn, F.scaled_dot_product_attention(q, k, v), hidden_states, q.dtype)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q, k = shared_qk(q, k, weak_pairs(self.adapter.call_info, q.shape[0]))
        return F.scaled_dot_product_attention(q, k, v)

    @staticmethod
    def projections(
        attn: Any, hidden_states: torch.Tensor, pairs: Sequence[tuple[int, int]]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Multi-head q, k, v (B, heads, N, d) with the weak rows' q and k replaced by their cond rows'."""
        q, k, v = self_attention_qkv(attn, hidden_states)
        return (*shared_qk(q, k, pairs), v)


def shared_qk(q: torch.Tensor, k: torch.Tensor, pairs: Sequence[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """``q``, ``k`` (B, …) with the rows of each (weak, cond) pair's weak row replaced by its cond row's."""
    weak, cond = (torch.tensor(rows, device=q.device) for rows in zip(*pairs, strict=True))
    return q.index_copy(0, weak, q.index_select(0, cond)), k.index_copy(0, weak, k.index_select(0, cond))


@contextmanager
def fouriscale_patches(
    adapter: ModelAdapter,
    clock: PatchClock,
    layers: FouriScaleLayers,
    filtered: Sequence[str],
    dilate_only: Sequence[str],
    share_qk: bool = True,
) -> Iterator[None]:
    """The low-passed dilated convs and (``share_qk``) the Q/K-sharing processor on every ``attn1`` installed."""
    addresses = [a for a in address_index(adapter.unet) if a.endswith(".attn1")] if share_qk else []
    processors = {a: (lambda inner: QKShareProcessor(inner, adapter)) for a in addresses}
    with patched(adapter.unet, clock, lambda: adapter.call_info, layers.patches(filtered, dilate_only), processors):
        yield
