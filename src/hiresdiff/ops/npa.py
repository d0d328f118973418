"""Neighborhood patch attention (ScaleDiff NPA, SPEC §6): each query patch attends to a window around it."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def npa_supported(grid: tuple[int, int], native: int) -> bool:
    """NPA applies when both sides are multiples of ``native/2`` and at least ``native``; else full attention."""
    p = native // 2
    return p > 0 and all(side % p == 0 and side >= native for side in grid)


def window_starts(side: int, native: int, shift: int = 0) -> tuple[torch.Tensor, int, int]:
    """Key/value window start of every query patch along one axis, the patch count and the window length.

    Patches are ``native/2`` long and start at ``i·native/2 − shift``; the window of patch ``i`` is ``native`` long
    (the whole side if shorter) and starts at ``patch start − native/4``, clamped inside ``[0, side)``.
    """
    p = native // 2
    length = min(native, side)
    count = -(-(side + shift) // p)
    starts = torch.arange(count) * p - shift - native // 4
    return starts.clamp(0, side - length), count, length


def npa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grid: tuple[int, int],
    native: int,
    shift: tuple[int, int] = (0, 0),
) -> torch.Tensor:
    """Attention of ``q`` over ``k, v`` (B, heads, gh·gw, d) restricted to neighborhood windows.

    The query grid is cut into non-overlapping ``(native/2)²`` patches (offset by ``shift``, the random query
    shift; padded queries are discarded); each attends to the ``native²`` key/value window centred on it, clamped
    inside the map. Outputs are tiled back without averaging. With ``native ≥`` both sides this is full attention.
    """
    b, h, _, d = q.shape
    gh, gw = grid
    p = native // 2
    rows, nr, lr = window_starts(gh, native, shift[0])
    cols, nc, lc = window_starts(gw, native, shift[1])
    pad = (0, 0, shift[1], nc * p - gw - shift[1], shift[0], nr * p - gh - shift[0])
    qg = F.pad(q.reshape(b, h, gh, gw, d), pad)
    qp = qg.reshape(b, h, nr, p, nc, p, d).permute(0, 2, 4, 1, 3, 5, 6).reshape(b * nr * nc, h, p * p, d)
    row_idx = (rows[:, None] + torch.arange(lr)).reshape(-1).to(q.device)
    col_idx = (cols[:, None] + torch.arange(lc)).reshape(-1).to(q.device)

    def windows(x: torch.Tensor) -> torch.Tensor:
        g = x.reshape(b, h, gh, gw, d).index_select(2, row_idx).index_select(3, col_idx)
        g = g.reshape(b, h, nr, lr, nc, lc, d).permute(0, 2, 4, 1, 3, 5, 6)
        return g.reshape(b * nr * nc, h, lr * lc, d)

    out = F.scaled_dot_product_attention(qp, windows(k), windows(v))
    out = out.reshape(b, nr, nc, h, p, p, d).permute(0, 3, 1, 4, 2, 5, 6).reshape(b, h, nr * p, nc * p, d)
    out = out[:, :, shift[0] : shift[0] + gh, shift[1] : shift[1] + gw]
    return out.reshape(b, h, gh * gw, d)
