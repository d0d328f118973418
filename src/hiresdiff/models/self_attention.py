"""The self-attention seam of the adapters: where a UNet self-attention layer sits (its level, its query grid) and
how a self-attention patch is installed on diffusers modules.

A self-attention patch is made per layer by ``wrap(module, inner, level)`` (:data:`WrapSelfAttention`): ``module``
the model the layer belongs to, ``inner`` what the layer ran before (the backend's fallback: a diffusers processor
here), ``level`` its number of stride-2 downsamplings. The adapter decides how the patch reaches the layers
(:meth:`hiresdiff.models.adapter.ModelAdapter.self_attention_patched`: diffusers processors, through
:func:`diffusers_self_attention`; the ComfyUI backend: ComfyUI's ``attn1`` replacement). This module sits below the
adapters and the patches (it imports neither), so both can use it without an import circle.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

#: ``wrap(module, inner, level)`` → the patch installed in place of a self-attention layer's ``inner``
WrapSelfAttention = Callable[[Any, Any, int], Any]
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
