"""The attention seam of the adapters: where a UNet attention layer sits (its level, its query grid), how a
self-attention patch is installed on diffusers modules, and how cross-attention is observed there.

A self-attention patch is made per layer by ``wrap(module, inner, level)`` (:data:`WrapSelfAttention`): ``module``
the model the layer belongs to, ``inner`` what the layer ran before (the backend's fallback: a diffusers processor
here), ``level`` its number of stride-2 downsamplings. The adapter decides how the patch reaches the layers
(:meth:`hiresdiff.models.adapter.ModelAdapter.self_attention_patched`: diffusers processors, through
:func:`diffusers_self_attention`; the ComfyUI backend: ComfyUI's ``attn1`` replacement). This module sits below the
adapters and the patches (it imports neither), so both can use it without an import circle.

Cross-attention is observed (AccDiffusion's capture), never changed: the adapter
(:meth:`hiresdiff.models.adapter.ModelAdapter.cross_attention_observed`) gives ``choose`` (:data:`ChooseObserver`)
the levels of the UNet's down- and up-block cross-attention layers (:data:`OBSERVED_BLOCKS`: not the mid block) and
hands the chosen level's calls to the observer (:class:`CrossAttentionObserver`), after the layer has run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Protocol

import torch

#: ``wrap(module, inner, level)`` → the patch installed in place of a self-attention layer's ``inner``
WrapSelfAttention = Callable[[Any, Any, int], Any]
#: the UNet parts whose cross-attention is observed: ``from_where=["up", "down"]`` in lzhxmu/AccDiffusion
#: ``accdiffusion_sdxl.py`` (its ``get_multidiffusion_prompts`` call), so the mid block is left out
OBSERVED_BLOCKS = ("down_blocks", "up_blocks")
#: no UNet has more downsamplings (a bound for :func:`level_of_tokens`)
MAX_LEVELS = 16


def attention_level(name: str, num_levels: int) -> int:
    """Resolution level (number of downsamplings) of the UNet attention processor called ``name``."""
    block, index = name.split(".")[:2]
    if block == "down_blocks":
        return int(index)
    if block == "up_blocks":
        return num_levels - 1 - int(index)
    return num_levels - 1  # mid_block


def grid_at_level(height: int, width: int, level: int) -> tuple[int, int]:
    """Query grid of a ``height × width`` latent after ``level`` stride-2 downsamplings (ceil, as the convs do)."""
    for _ in range(level):
        height, width = -(-height // 2), -(-width // 2)
    return height, width


def level_of_tokens(tokens: int, height: int, width: int) -> int | None:
    """The level whose query grid of a ``height × width`` latent has ``tokens`` cells (the shallowest one when
    several do: only 1 × 1 grids repeat), ``None`` when no level has (a layer of another shape)."""
    for level in range(MAX_LEVELS):
        gh, gw = grid_at_level(height, width, level)
        if gh * gw == tokens:
            return level
        if gh * gw == 1:
            break
    return None


@contextmanager
def diffusers_self_attention(modules: Sequence[Any], wrap: WrapSelfAttention) -> Iterator[None]:
    """Every self-attention processor (``attn1``) of the diffusers ``modules`` replaced by ``wrap(module, processor,
    level)`` while the block runs, ``level`` from the processor's name; all restored on exit, exceptions included."""
    originals = [dict(m.attn_processors) for m in modules]
    try:
        for module, original in zip(modules, originals, strict=True):
            levels = len(module.config.down_block_types)
            module.set_attn_processor(
                {
                    name: wrap(module, proc, attention_level(name, levels))
                    if name.endswith("attn1.processor")
                    else proc
                    for name, proc in original.items()
                }
            )
        yield
    finally:
        for module, original in zip(modules, originals, strict=True):
            module.set_attn_processor(original)


class CrossAttentionObserver(Protocol):
    """What sees the cross-attention calls of the observed layers: a diffusers ``Attention`` with its inputs
    (:meth:`record`), or projected queries and keys (:meth:`record_qk`, the ComfyUI backend's ``attn2`` replacement)."""

    def record(self, attn: Any, hidden_states: torch.Tensor, context: torch.Tensor) -> None: ...

    def record_qk(self, q: torch.Tensor, k: torch.Tensor, heads: int) -> None: ...


#: ``choose(levels)`` → (the level to observe, its observer), given the levels of the observed cross-attention layers
ChooseObserver = Callable[[set[int]], tuple[int, CrossAttentionObserver]]


class CaptureProcessor:
    """Runs the wrapped diffusers processor unchanged and hands its cross-attention inputs to the observer."""

    #: every call records maps: the cost model (:mod:`hiresdiff.cost`) must not replay a cached count
    cost_cacheable = False

    def __init__(self, inner: Any, observer: CrossAttentionObserver) -> None:
        self.inner, self.observer = inner, observer

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        out = self.inner(attn, hidden_states, encoder_hidden_states, *args, **kwargs)
        if encoder_hidden_states is not None:
            self.observer.record(attn, hidden_states, encoder_hidden_states)
        return out


@contextmanager
def diffusers_cross_attention(module: Any, choose: ChooseObserver) -> Iterator[CrossAttentionObserver]:
    """The diffusers UNet ``module``'s cross-attention processors (``attn2``) of :data:`OBSERVED_BLOCKS` at the level
    ``choose`` picks wrapped in :class:`CaptureProcessor` while the block runs; all restored on exit."""
    original = dict(module.attn_processors)
    num_levels = len(module.config.down_block_types)
    levels = {
        n: attention_level(n, num_levels)
        for n in original
        if n.endswith("attn2.processor") and n.startswith(OBSERVED_BLOCKS)
    }
    target, observer = choose(set(levels.values()))
    module.set_attn_processor(
        {n: CaptureProcessor(p, observer) if levels.get(n) == target else p for n, p in original.items()}
    )
    try:
        yield observer
    finally:
        module.set_attn_processor(original)
