"""What every attention processor of :mod:`hiresdiff.patches` shares: UNet levels of processor names, query grids,
the per-call state of processors that draw random shifts, and diffusers' self-attention projections.

The base of the processor modules (:mod:`~hiresdiff.patches.attention`, :mod:`~hiresdiff.patches.attention_flux`,
:mod:`~hiresdiff.patches.msw_msa`): they import from here and never from each other's installers, so the processor
modules form no import circle.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from hiresdiff.models.adapter import ModelAdapter
from hiresdiff.models.guidance import COND


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


def row_samples(adapter: ModelAdapter, rows: int) -> list[int]:
    """Canvas sample of each of the ``rows`` rows of the current denoiser call (:attr:`ModelAdapter.call_info`);
    sample 0 for every row when the call is not the adapter's (a direct UNet call in a test)."""
    info = adapter.call_info
    if len(info) != rows:
        return [0] * rows
    return [max(sample, 0) for sample, _ in info]


class NPAState:
    """What every NPA processor needs per call: the canvas latent size and, for query shifts, the generators."""

    def __init__(self, adapter: ModelAdapter, latent_hw: tuple[int, int], generators: list[torch.Generator] | None):
        self.adapter, self.latent_hw, self.generators = adapter, latent_hw, generators

    def shifts(self, rows: int, patch: int) -> list[tuple[int, int]]:
        """One random (row, column) query shift in ``[0, patch)`` per canvas sample of this call's rows."""
        if self.generators is None or patch <= 1:
            return [(0, 0)] * rows
        info = self.adapter.call_info if len(self.adapter.call_info) == rows else [(0, COND)] * rows
        drawn: dict[int, tuple[int, int]] = {}
        out = []
        for sample, _ in info:
            if sample not in drawn:
                g = self.generators[max(sample, 0) % len(self.generators)]
                dy, dx = torch.randint(0, patch, (2,), generator=g, device=g.device).tolist()
                drawn[sample] = (dy, dx)
            out.append(drawn[sample])
        return out


def plain_self_attention(hidden_states: torch.Tensor, encoder_hidden_states: Any, attention_mask: Any) -> bool:
    """Whether a processor call is *not* a maskless token self-attention (cross-attention, a mask, 4-D input): such
    calls run the wrapped processor unchanged."""
    return encoder_hidden_states is not None or attention_mask is not None or hidden_states.dim() != 3


class SelfAttentionPatch(abc.ABC):
    """Base of the processors that change maskless token self-attention (NPA, MSW-MSA, FouriScale's shared maps,
    FreeScale's scale fusion): every other call (:func:`plain_self_attention`) and every self-attention call that
    :meth:`takes` declines go to the wrapped processor :attr:`inner` unchanged, with diffusers' processor arguments;
    the rest to :meth:`attend_self`."""

    inner: Any

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        if plain_self_attention(hidden_states, encoder_hidden_states, attention_mask) or not self.takes(hidden_states):
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        return self.attend_self(attn, hidden_states, *args, **kwargs)

    def takes(self, hidden_states: torch.Tensor) -> bool:
        """Whether this maskless self-attention call (B, tokens, D) is one the patch changes (default: all)."""
        return True

    @abc.abstractmethod
    def attend_self(self, attn: Any, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The patched self-attention of ``hidden_states`` (``args``/``kwargs``: the call's other arguments, for
        the wrapped processor where the patch calls it)."""


def self_attention_qkv(attn: Any, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Multi-head q, k, v (B, heads, N, d) of a diffusers ``Attention`` on tokens (B, N, C), q/k normed as its
    processor does."""
    b, n, _ = hidden_states.shape
    q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
    head_dim = q.shape[-1] // attn.heads
    q, k, v = (x.view(b, n, attn.heads, head_dim).transpose(1, 2) for x in (q, k, v))
    if getattr(attn, "norm_q", None) is not None:
        q, k = attn.norm_q(q), attn.norm_k(k)
    return q, k, v


def attention_output(attn: Any, out: torch.Tensor, residual: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The output projection of multi-head attention ``out`` (B, heads, N, d), with the module's residual and
    rescaling, as diffusers' processors end."""
    b, _, n, _ = out.shape
    out = attn.to_out[1](attn.to_out[0](out.transpose(1, 2).reshape(b, n, -1).to(dtype)))
    if getattr(attn, "residual_connection", False):
        out = out + residual
    return out / getattr(attn, "rescale_output_factor", 1.0)


@contextmanager
def self_attention_wrapped(adapter: ModelAdapter, wrap: Callable[[Any, Any, int], Any]) -> Iterator[None]:
    """Every self-attention processor (``attn1``) of the UNet and of the active ControlNet (its encoder copy sees
    the same canvas) replaced by ``wrap(module, processor, level)`` while the block runs, ``module`` the UNet or
    the ControlNet, ``level`` the layer's number of downsamplings; all restored on exit, exceptions included."""
    modules = [m for m in (adapter.unet, adapter.controlnet) if m is not None]
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
