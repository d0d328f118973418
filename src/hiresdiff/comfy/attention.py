"""hiresdiff's self-attention patches on ComfyUI's UNet, through ComfyUI's ``attn1`` replacement.

ComfyUI's transformer block looks its self-attention up in ``transformer_options["patches_replace"]["attn1"]`` under
``(block name, block number, index in the transformer)`` (``"input"``/``"middle"``/``"output"``), then under
``(block name, block number)``; a replacement ``fn(q, k, v, extra_options)`` gets q, k, v already projected,
(B, N, heads·d), and returns the attention before the output projection, in the same layout. ``extra_options``
carries ``n_heads`` and the UNet input's ``original_shape`` (B, C, H, W), from which the layer's level — its number
of downsamplings, as diffusers' processor names give it — follows from the token count.

:class:`ComfySelfAttention` is the replacement of one transformer block: it makes the layer's patch with the
adapter's ``wrap(model, None, level)`` (:data:`~hiresdiff.models.self_attention.WrapSelfAttention`) when the level is
first seen, runs the patch's kernel (:class:`~hiresdiff.patches.processors.SelfAttentionKernel`) on the calls it
:meth:`~hiresdiff.patches.processors.SelfAttentionKernel.takes`, and hands every other call to its fallback: the
replacement another node (or an enclosing patch) installed for the block, else ComfyUI's own attention (the one
place this module imports ComfyUI, when a call falls back to it).

Cross-attention is observed through ComfyUI's ``attn2`` replacement (same keys, the keys projected from the text):
:class:`ComfyCrossObserver` hands each call's q, k and heads to an observer
(:class:`~hiresdiff.models.self_attention.CrossAttentionObserver`) and returns the attention its fallback computes,
so the model's output is unchanged. The level of a block is counted structurally (:func:`cross_attention_levels`:
the downsamplings before it), as diffusers' block names give it.
"""

from __future__ import annotations

from typing import Any

import torch

from hiresdiff.errors import require
from hiresdiff.models.self_attention import (
    ChooseObserver,
    CrossAttentionObserver,
    WrapSelfAttention,
    level_of_tokens,
)
from hiresdiff.patches.processors import SelfAttentionKernel

#: ComfyUI's key of one transformer block's replacement: (block name, block number, index in its transformer)
BlockKey = tuple[str, int, int]


def transformer_block_keys(unet: Any) -> list[BlockKey]:
    """The replacement key of every transformer block of a ComfyUI UNet (``input_blocks``, ``middle_block``,
    ``output_blocks``; the index counts the blocks of the transformer in that UNet block)."""
    middle = [unet.middle_block] if getattr(unet, "middle_block", None) is not None else []
    keys: list[BlockKey] = []
    for name, blocks in (("input", list(unet.input_blocks)), ("middle", middle), ("output", list(unet.output_blocks))):
        for number, block in enumerate(blocks):
            keys.extend((name, number, index) for index in range(_depth(block)))
    return keys


def _depth(block: Any) -> int:
    """How many transformer blocks the transformer inside a ComfyUI UNet block has (0: none)."""
    return max((len(m.transformer_blocks) for m in block.modules() if hasattr(m, "transformer_blocks")), default=0)


def _has(block: Any, kind: str) -> bool:
    """Whether a ComfyUI UNet block holds a module of class ``kind`` (``Downsample``, ``Upsample``)."""
    return any(type(m).__name__ == kind for m in block.modules())


def cross_attention_levels(unet: Any) -> dict[BlockKey, int]:
    """The level (downsamplings before it) of every transformer block of the input and output blocks of a ComfyUI
    UNet — the blocks diffusers calls ``down_blocks`` and ``up_blocks`` (the middle block is left out)."""
    levels: dict[BlockKey, int] = {}
    level = 0
    for number, block in enumerate(unet.input_blocks):
        levels.update({("input", number, i): level for i in range(_depth(block))})
        level += _has(block, "Downsample")
    for number, block in enumerate(unet.output_blocks):
        levels.update({("output", number, i): level for i in range(_depth(block))})
        level -= _has(block, "Upsample")
    return levels


def comfy_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict[str, Any]) -> torch.Tensor:
    """ComfyUI's own attention of projected q, k, v (B, N, heads·d), as its ``CrossAttention`` runs it (the attention
    function ComfyUI chose for this machine, and any ``optimized_attention_override`` of the options)."""
    from comfy.ldm.modules import attention

    heads = int(extra_options["n_heads"])
    precision = extra_options.get("attn_precision")
    return attention.optimized_attention(q, k, v, heads, attn_precision=precision, transformer_options=extra_options)


class ComfySelfAttention:
    """ComfyUI's ``attn1`` replacement of one transformer block running a hiresdiff self-attention patch (module
    docstring); ``fallback`` runs the calls the patch leaves (ComfyUI's replacement signature)."""

    def __init__(self, wrap: WrapSelfAttention, model: Any, fallback: Any) -> None:
        self.wrap, self.model, self.fallback = wrap, model, fallback
        self.patches: dict[int, SelfAttentionKernel] = {}

    def __call__(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict[str, Any]
    ) -> torch.Tensor:
        patch = self.patch_for(q, k, extra_options)
        if patch is None or not patch.takes(q):
            return self.fallback(q, k, v, extra_options)
        return run_kernel(patch, q, k, v, int(extra_options["n_heads"]))

    def patch_for(self, q: torch.Tensor, k: torch.Tensor, extra_options: dict[str, Any]) -> SelfAttentionKernel | None:
        """The patch of this call's level, made on first use; ``None`` for a call that is not token self-attention
        of the UNet input's grid (an ``attn1`` fed other keys by another node's patch, an unknown layer shape)."""
        shape = extra_options.get("original_shape")
        if k.shape[1] != q.shape[1] or shape is None:
            return None
        level = level_of_tokens(q.shape[1], int(shape[-2]), int(shape[-1]))
        if level is None:
            return None
        if level not in self.patches:
            patch = self.wrap(self.model, None, level)
            require(
                isinstance(patch, SelfAttentionKernel),
                f"{type(patch).__name__} works on diffusers' attention processors and cannot run in ComfyUI",
            )
            self.patches[level] = patch
        return self.patches[level]


def run_kernel(
    patch: SelfAttentionKernel, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int
) -> torch.Tensor:
    """``patch``'s attention of ComfyUI's projected q, k, v (B, N, heads·d), in that layout."""
    b, n, width = q.shape
    q4, k4, v4 = (t.view(b, t.shape[1], heads, width // heads).transpose(1, 2) for t in (q, k, v))
    return patch.attend(q4, k4, v4).transpose(1, 2).reshape(b, n, width).to(q.dtype)


class ComfyKernelAttention:
    """ComfyUI's ``attn1`` replacement of one transformer block running one given kernel on every maskless token
    self-attention call it :meth:`~hiresdiff.patches.processors.SelfAttentionKernel.takes` — what a diffusers
    processor of the kernel installed on that block does (:class:`~hiresdiff.comfy.unet_view.ComfyUNetView`);
    other calls go to ``fallback``."""

    def __init__(self, kernel: SelfAttentionKernel, fallback: Any) -> None:
        self.kernel, self.fallback = kernel, fallback

    def __call__(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict[str, Any]
    ) -> torch.Tensor:
        if k.shape[1] != q.shape[1] or not self.kernel.takes(q):
            return self.fallback(q, k, v, extra_options)
        return run_kernel(self.kernel, q, k, v, int(extra_options["n_heads"]))


class ComfyCrossObserver:
    """ComfyUI's ``attn2`` replacement of one transformer block that shows each call's projected q, k (and the
    heads) to ``observer`` and returns ``fallback``'s attention unchanged (module docstring)."""

    def __init__(self, observer: CrossAttentionObserver, fallback: Any) -> None:
        self.observer, self.fallback = observer, fallback

    def __call__(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict[str, Any]
    ) -> torch.Tensor:
        out = self.fallback(q, k, v, extra_options)
        self.observer.record_qk(q, k, int(extra_options["n_heads"]))
        return out


def cross_attention_observers(
    choose: ChooseObserver, unet: Any, installed: dict[Any, Any]
) -> tuple[CrossAttentionObserver, dict[Any, Any]]:
    """The observer ``choose`` makes for the input/output-block levels of ``unet`` and ``installed`` (the ``attn2``
    replacements in force) with the blocks of the chosen level replaced by a :class:`ComfyCrossObserver` of it."""
    levels = cross_attention_levels(unet)
    target, observer = choose(set(levels.values()))
    observed = {
        key: ComfyCrossObserver(observer, installed_replacement(installed, key))
        for key, level in levels.items()
        if level == target
    }
    return observer, {**installed, **observed}


def installed_replacement(replacements: dict[Any, Any], key: BlockKey) -> Any:
    """The ``attn1`` (or ``attn2``) replacement ComfyUI would run for ``key`` among ``replacements`` (the three-part
    key first, then the block's), else ComfyUI's own attention."""
    return replacements.get(key) or replacements.get(key[:2]) or comfy_attention


def self_attention_replacements(wrap: WrapSelfAttention, unet: Any, installed: dict[Any, Any]) -> dict[Any, Any]:
    """``installed`` (the ``attn1`` replacements in force) with every transformer block of ``unet`` replaced by a
    :class:`ComfySelfAttention` of ``wrap`` whose fallback is the block's replacement in force."""
    keys = transformer_block_keys(unet)
    return {**installed, **{key: ComfySelfAttention(wrap, unet, installed_replacement(installed, key)) for key in keys}}
