"""Neighborhood patch attention (ScaleDiff NPA, SPEC §6) on FLUX transformers.

Every FLUX attention call (double-stream blocks: image tokens in ``hidden_states``, text tokens in
``encoder_hidden_states``; single-stream blocks: one sequence with the text tokens first) is cut into windows:
the image query grid ``gh × gw`` is split into non-overlapping ``(g/2)²`` patches (``g`` = native token grid), each
attending to its ``g × g`` key/value window centred on it and clamped inside the map (geometry of
:func:`hiresdiff.ops.npa.window_starts`). The text tokens are duplicated into every window: their queries, keys and
values join the window, and their RoPE is that of the window's top-left image token; image tokens keep the RoPE of
their absolute canvas positions. Image outputs are tiled back (each query belongs to exactly one patch), text
outputs are averaged over the windows. Windows are batched batch-major (row ``b · n_windows + w``).

Calls whose grid NPA does not support (see :func:`~hiresdiff.ops.npa.npa_supported`), that carry an attention mask
or extra arguments, or that have no rotary embedding, run the original processor unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F

from hiresdiff.models.adapter import ModelAdapter
from hiresdiff.ops.npa import npa_supported, window_starts
from hiresdiff.patches.processors import NPAState

#: FLUX packs 2×2 latent cells into one token (``hiresdiff.models.flux.PATCH``)
TOKEN_PATCH = 2


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """FLUX RoPE (diffusers' ``apply_rotary_emb`` with interleaved real/imaginary pairs); ``cos``/``sin``
    broadcast against ``x`` (last axis = head dim)."""
    real, imag = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
    rotated = torch.stack([-imag, real], dim=-1).flatten(-2)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


def flux_npa(
    text: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    image: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    rope: tuple[torch.Tensor, torch.Tensor],
    grid: tuple[int, int],
    native: int,
    shift: tuple[int, int] = (0, 0),
    image_rotated: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Windowed joint attention. ``text`` q/k/v ``(B, T, H, D)`` and ``image`` q/k/v ``(B, gh·gw, H, D)`` before
    RoPE (``image_rotated``: the image q/k already carry it, as ComfyUI's attention function gets them; text
    positions are 0, where RoPE is the identity); ``rope`` = (cos, sin) ``(gh·gw, D)`` of the image tokens'
    absolute positions. Returns the text output ``(B, T, H, D)`` (mean over windows) and the image output
    ``(B, gh·gw, H, D)`` (tiled back)."""
    (tq, tk, tv), (iq, ik, iv) = text, image
    cos, sin = (r.to(iq.device) for r in rope)
    b, t, h, d = tq.shape
    gh, gw = grid
    p = native // 2
    rows, nr, lr = window_starts(gh, native, shift[0])
    cols, nc, lc = window_starts(gw, native, shift[1])
    nw = nr * nc
    if not image_rotated:  # image tokens: RoPE of their absolute positions
        iq, ik = rotate(iq, cos[:, None], sin[:, None]), rotate(ik, cos[:, None], sin[:, None])
    # query patches (padded by the shift; padded queries are discarded)
    pad = (0, 0, 0, 0, shift[1], nc * p - gw - shift[1], shift[0], nr * p - gh - shift[0])
    qg = F.pad(iq.reshape(b, gh, gw, h, d), pad)
    qp = qg.reshape(b, nr, p, nc, p, h, d).permute(0, 1, 3, 2, 4, 5, 6).reshape(b, nw, p * p, h, d)
    row_idx = (rows[:, None] + torch.arange(lr)).reshape(-1).to(iq.device)
    col_idx = (cols[:, None] + torch.arange(lc)).reshape(-1).to(iq.device)

    def windows(x: torch.Tensor) -> torch.Tensor:
        g = x.reshape(b, gh, gw, h, d).index_select(1, row_idx).index_select(2, col_idx)
        g = g.reshape(b, nr, lr, nc, lc, h, d).permute(0, 1, 3, 2, 4, 5, 6)
        return g.reshape(b, nw, lr * lc, h, d)

    # duplicated text tokens: RoPE of each window's top-left image token
    corner = (rows[:, None] * gw + cols[None, :]).reshape(-1).to(iq.device)
    wcos, wsin = cos.index_select(0, corner)[:, None, None], sin.index_select(0, corner)[:, None, None]
    tqw = rotate(tq[:, None].expand(b, nw, t, h, d), wcos, wsin)
    tkw = rotate(tk[:, None].expand(b, nw, t, h, d), wcos, wsin)
    tvw = tv[:, None].expand(b, nw, t, h, d)

    def batch(x: torch.Tensor) -> torch.Tensor:  # (b, nw, S, h, d) → (b·nw, h, S, d), batch-major
        return x.reshape(b * nw, x.shape[2], h, d).transpose(1, 2)

    query = batch(torch.cat([tqw, qp], dim=2))
    key = batch(torch.cat([tkw, windows(ik)], dim=2))
    value = batch(torch.cat([tvw, windows(iv)], dim=2))
    out = F.scaled_dot_product_attention(query, key, value).transpose(1, 2).reshape(b, nw, t + p * p, h, d)
    text_out = out[:, :, :t].mean(1)
    img = out[:, :, t:].reshape(b, nr, nc, p, p, h, d).permute(0, 1, 3, 2, 4, 5, 6).reshape(b, nr * p, nc * p, h, d)
    img = img[:, shift[0] : shift[0] + gh, shift[1] : shift[1] + gw]
    return text_out, img.reshape(b, gh * gw, h, d)


Triple = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def shifted_npa(
    state: NPAState,
    text: Triple,
    image: Triple,
    rope: tuple[torch.Tensor, torch.Tensor],
    grid: tuple[int, int],
    native: int,
    image_rotated: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`flux_npa` of a call's rows with each row's query shift (``state``: one draw per canvas sample); rows
    of one shift share a kernel call."""
    b = text[0].shape[0]
    shifts = state.shifts(b, native // 2)
    if all(s == shifts[0] for s in shifts):
        return flux_npa(text, image, rope, grid, native, shifts[0], image_rotated)
    parts = [
        flux_npa(
            tuple(x[i : i + 1] for x in text),  # type: ignore[arg-type]
            tuple(x[i : i + 1] for x in image),  # type: ignore[arg-type]
            rope,
            grid,
            native,
            shifts[i],
            image_rotated,
        )
        for i in range(b)
    ]
    return torch.cat([part[0] for part in parts]), torch.cat([part[1] for part in parts])


def _projections(attn: Any, hidden_states: torch.Tensor, context: torch.Tensor | None) -> list[torch.Tensor | None]:
    """q, k, v of ``hidden_states`` and (when given) of the context, as diffusers' FluxAttnProcessor computes them."""
    if getattr(attn, "fused_projections", False):
        qkv = list(attn.to_qkv(hidden_states).chunk(3, dim=-1))
        extra = list(attn.to_added_qkv(context).chunk(3, dim=-1)) if context is not None else [None] * 3
    else:
        qkv = [attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)]
        extra = [None] * 3
        if context is not None:
            extra = [attn.add_q_proj(context), attn.add_k_proj(context), attn.add_v_proj(context)]
    return qkv + extra


class FluxNPAProcessor:
    """FLUX attention with neighborhood patch attention (SPEC §6) while sampling the canvas of ``state``.

    ``native`` is the native image token grid side (native latent side / 2). Unsupported calls run ``inner``.
    """

    def __init__(self, inner: Any, state: NPAState, native: int) -> None:
        self.inner, self.state, self.native = inner, state, native

    @property
    def grid(self) -> tuple[int, int]:
        h, w = self.state.latent_hw
        return h // TOKEN_PATCH, w // TOKEN_PATCH

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs: Any,
    ) -> Any:
        grid = self.grid
        n_img = grid[0] * grid[1]
        double = encoder_hidden_states is not None
        usable = (
            attention_mask is None
            and not kwargs
            and image_rotary_emb is not None
            and hidden_states.dim() == 3
            and npa_supported(grid, self.native)
            and (hidden_states.shape[1] == n_img if double else hidden_states.shape[1] >= n_img)
            and (not double or getattr(attn, "added_kv_proj_dim", None) is not None)
        )
        if usable:
            n_txt = encoder_hidden_states.shape[1] if double else hidden_states.shape[1] - n_img
            usable = image_rotary_emb[0].shape[0] == n_txt + n_img
        if not usable:
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb, **kwargs)

        q, k, v, eq, ek, ev = _projections(attn, hidden_states, encoder_hidden_states)
        q, k, v = (x.unflatten(-1, (-1, attn.head_dim)) for x in (q, k, v))
        q, k = attn.norm_q(q), attn.norm_k(k)
        if double:
            eq, ek, ev = (x.unflatten(-1, (-1, attn.head_dim)) for x in (eq, ek, ev))
            text = (attn.norm_added_q(eq), attn.norm_added_k(ek), ev)
            image = (q, k, v)
        else:
            text = (q[:, :n_txt], k[:, :n_txt], v[:, :n_txt])
            image = (q[:, n_txt:], k[:, n_txt:], v[:, n_txt:])
        rope = (image_rotary_emb[0][n_txt:], image_rotary_emb[1][n_txt:])

        text_out, img_out = shifted_npa(self.state, text, image, rope, grid, self.native)
        text_out, img_out = text_out.flatten(2, 3).to(q.dtype), img_out.flatten(2, 3).to(q.dtype)
        if double:
            img_out = attn.to_out[1](attn.to_out[0](img_out.contiguous()))
            return img_out, attn.to_add_out(text_out.contiguous())
        return torch.cat([text_out, img_out], dim=1)


@contextmanager
def flux_neighborhood_attention(
    adapter: ModelAdapter, latent_hw: tuple[int, int], generators: list[torch.Generator] | None = None
) -> Iterator[NPAState]:
    """Install :class:`FluxNPAProcessor` on every attention module of the FLUX transformer while sampling a
    ``latent_hw`` (unpacked latent cells) canvas; ``generators`` turn on the random query shift. The original
    processors are restored afterwards."""
    transformer = adapter.transformer  # type: ignore[attr-defined]
    original = dict(transformer.attn_processors)
    state = NPAState(adapter, latent_hw, generators)
    native = adapter.native_latent // TOKEN_PATCH
    transformer.set_attn_processor({n: FluxNPAProcessor(p, state, native) for n, p in original.items()})
    try:
        yield state
    finally:
        transformer.set_attn_processor(original)
