"""ScaleDiff's neighborhood attention (NPA, SPEC §6) on ComfyUI's FLUX, through its attention override.

ComfyUI's FLUX blocks compute the joint attention with one function, ``attention(q, k, v, pe)``: RoPE applied to q
and k (text positions are 0, where it is the identity), then ComfyUI's attention function — which hands the call to
``transformer_options["optimized_attention_override"]`` when one is set, as
``override(function, q, k, v, heads, skip_reshape=True, mask=…, …)`` with q, k, v ``(B, heads, T + N, d)``, the text
tokens first, in double- and single-stream blocks alike. :class:`FluxNPAOverride` is such an override: on a call of
the canvas being sampled (the adapter's call in progress, :attr:`ComfyFluxAdapter.flux_call
<hiresdiff.comfy.adapter.ComfyFluxAdapter.flux_call>`, has the canvas's token grid, no mask) it runs
:func:`~hiresdiff.patches.attention_flux.flux_npa` on the rotated image q, k (``image_rotated``) with the text rotated
per window by the RoPE of the window's top-left image token — RoPE tables of the call's positions made as the
diffusers backend makes them (diffusers' ``FluxPosEmbed`` of :func:`~hiresdiff.models.flux.image_ids`) — and returns
``(B, T + N, heads·d)`` as ComfyUI's attention function does. Every other call goes to the override in force before
(another node's) or to ComfyUI's function itself.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from hiresdiff.models.flux import image_ids
from hiresdiff.ops.npa import npa_supported
from hiresdiff.patches.attention_flux import TOKEN_PATCH, shifted_npa
from hiresdiff.patches.processors import NPAState


class FluxCallShape(NamedTuple):
    """What the attention override needs of the transformer call in progress: the unpacked latent ``height`` ×
    ``width`` of its rows, their canvas ``offset`` (packed units, the RoPE shift) and the ``text`` tokens."""

    height: int
    width: int
    offset: tuple[float, float]
    text: int


class FluxNPAOverride:
    """ComfyUI's ``optimized_attention_override`` running NPA on the FLUX calls of a canvas (module docstring).

    ``adapter``: the ComfyUI FLUX adapter (its ``flux_call`` and the transformer's RoPE settings); ``state``: the
    canvas and the query shifts; ``native``: the native image token grid side; ``fallback``: the override in force
    before (``None``: ComfyUI's attention function)."""

    def __init__(self, adapter: Any, state: NPAState, native: int, fallback: Any = None) -> None:
        self.adapter, self.state, self.native, self.fallback = adapter, state, native, fallback
        self._ropes: dict[FluxCallShape, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def grid(self) -> tuple[int, int]:
        h, w = self.state.latent_hw
        return h // TOKEN_PATCH, w // TOKEN_PATCH

    def __call__(self, function: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                 *args: Any, **kwargs: Any) -> torch.Tensor:  # fmt: skip
        call: FluxCallShape | None = getattr(self.adapter, "flux_call", None)
        grid = self.grid
        usable = (
            call is not None
            and not args
            and kwargs.get("skip_reshape", False)
            and kwargs.get("mask") is None
            and q.dim() == 4
            and k.shape == q.shape
            and (call.height // TOKEN_PATCH, call.width // TOKEN_PATCH) == grid
            and q.shape[2] == call.text + grid[0] * grid[1]
            and npa_supported(grid, self.native)
        )
        if not usable:
            if self.fallback is not None:
                return self.fallback(function, q, k, v, heads, *args, **kwargs)
            return function(q, k, v, heads, *args, **kwargs)
        assert call is not None
        t = call.text
        qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))  # (B, T + N, heads, d)
        text = (qt[:, :t], kt[:, :t], vt[:, :t])
        image = (qt[:, t:], kt[:, t:], vt[:, t:])
        text_out, img_out = shifted_npa(self.state, text, image, self.rope(call), grid, self.native, True)
        return torch.cat([text_out, img_out], dim=1).flatten(2).to(q.dtype)

    def rope(self, call: FluxCallShape) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) ``(N, d)`` of the call's image tokens, as diffusers' FLUX computes them (kept per call
        shape: the same views recur every step)."""
        if call not in self._ropes:
            from diffusers.models.embeddings import FluxPosEmbed

            params = self.adapter.transformer.params
            embed = FluxPosEmbed(theta=int(params.theta), axes_dim=list(params.axes_dim))
            ids = image_ids(call.height, call.width, call.offset, dtype=torch.float32)
            self._ropes[call] = embed(ids)
        return self._ropes[call]
