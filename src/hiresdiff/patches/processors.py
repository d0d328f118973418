"""What every attention processor of :mod:`hiresdiff.patches` shares: the per-call state of processors that draw
random shifts, the two forms of a self-attention patch and diffusers' self-attention projections.

A self-attention patch that is a kernel on multi-head q, k, v (:class:`SelfAttentionKernel`: NPA, MSW-MSA,
FouriScale's shared Q/K) can run in both backends: as a diffusers processor (project → kernel → output projection)
and through ComfyUI's ``attn1`` replacement (:mod:`hiresdiff.comfy.attention`), whichever the adapter installs
(:meth:`~hiresdiff.models.adapter.ModelAdapter.self_attention_patched`; NPA goes through it, MSW-MSA and the shared
Q/K are still installed with their conv patches on diffusers UNets only). One that works on the processor's input
and output (:class:`SelfAttentionPatch`: FreeScale's scale fusion) runs on diffusers models only.

The base of the processor modules (:mod:`~hiresdiff.patches.attention`, :mod:`~hiresdiff.patches.attention_flux`,
:mod:`~hiresdiff.patches.hidiffusion`): they import from here and never from each other's installers, so the processor
modules form no import circle.
"""

from __future__ import annotations

import abc
from typing import Any

import torch

from hiresdiff.models.adapter import ModelAdapter
from hiresdiff.models.guidance import COND
from hiresdiff.models.self_attention import attention_level as attention_level
from hiresdiff.models.self_attention import grid_at_level as grid_at_level


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

    def takes(self, tokens: torch.Tensor) -> bool:
        """Whether this maskless self-attention call on ``tokens`` (B, N, ·: the layer's input, or its queries in
        ComfyUI) is one the patch changes (default: all); only the shape counts."""
        return True

    @abc.abstractmethod
    def attend_self(self, attn: Any, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The patched self-attention of ``hidden_states`` (``args``/``kwargs``: the call's other arguments, for
        the wrapped processor where the patch calls it)."""


class SelfAttentionKernel(SelfAttentionPatch):
    """A self-attention patch whose work is a kernel on multi-head q, k, v, independent of the backend: :meth:`takes`
    says from the tokens (B, N, ·) of a maskless self-attention call whether the patch changes it, :meth:`attend`
    maps q, k, v (B, heads, N, d) to the attention output (B, heads, N, d) before the output projection; the layer's
    level is the patch's own (given when the adapter installs it).

    As a diffusers processor it projects with the module's weights (:func:`self_attention_qkv`), runs the kernel and
    projects the output back (:func:`attention_output`); declined calls go to :attr:`inner`. The ComfyUI backend
    calls :meth:`takes` and :meth:`attend` on the q, k, v ComfyUI has projected (``inner`` is then ``None``)."""

    def attend_self(self, attn: Any, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        q, k, v = self_attention_qkv(attn, hidden_states)
        return attention_output(attn, self.attend(q, k, v), hidden_states, q.dtype)

    @abc.abstractmethod
    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The patched attention of multi-head ``q, k, v`` (B, heads, N, d): (B, heads, N, d)."""


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
