"""HiDiffusion's MSW-MSA: self-attention within 2 × 2 shifted windows of a token grid (SPEC-baselines-unet §3.2).

The token grid (H, W) of a UNet layer is recovered from its token count N and the UNet input size (H₀, W₀):
r = round(√(H₀W₀/N)), H = ⌈H₀/r⌉, W = ⌈W₀/r⌉. Windows are (⌈H/2⌉, ⌈W/2⌉); shift k ∈ {0, 1, 2, 3} rolls the grid by
−k·(⌊ws_h/4⌋, ⌊ws_w/4⌋) before the 2 × 2 partition and back after the merge, so each window is a *cyclic* block of
the grid (wrap-around windows allowed, no mask). A grid with an odd side is resized (bicubic) to twice the window
size first and back afterwards, as the official code does (with its quality warning).

Deliberate difference: the official code skips the roll entirely when the row shift is 0 even if the column shift
is not (windows narrower than 4 rows); here both components always apply, so every shift is a cyclic window.
Partition and merge commute with token-wise affine maps (Q/K/V/out projections), and bicubic weights sum to one,
so windowing q/k/v inside an attention processor equals the official windowing of the normed block input.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from hiresdiff.errors import require

#: the number of distinct window shifts k
NUM_SHIFTS = 4


def token_grid(num_tokens: int, input_size: tuple[int, int]) -> tuple[int, int]:
    """Grid (H, W) of a layer with ``num_tokens`` tokens in a UNet whose input latent is ``input_size``."""
    h0, w0 = input_size
    r = round(math.sqrt(h0 * w0 / num_tokens))
    grid = (math.ceil(h0 / r), math.ceil(w0 / r))
    require(grid[0] * grid[1] == num_tokens, f"{num_tokens} tokens do not form a grid of a {h0}×{w0} input")
    return grid


def window_size(grid: tuple[int, int]) -> tuple[int, int]:
    """Window (⌈H/2⌉, ⌈W/2⌉) of a 2 × 2 partition of ``grid``."""
    return math.ceil(grid[0] / 2), math.ceil(grid[1] / 2)


def window_shift(window: tuple[int, int], k: int) -> tuple[int, int]:
    """Cyclic shift k·(⌊ws_h/4⌋, ⌊ws_w/4⌋) of shift index ``k`` ∈ {0, 1, 2, 3}."""
    require(0 <= k < NUM_SHIFTS, f"window shift index must be in 0…{NUM_SHIFTS - 1}, got {k}")
    return k * (window[0] // 4), k * (window[1] // 4)


def window_partition(x: torch.Tensor, grid: tuple[int, int], shift: tuple[int, int]) -> torch.Tensor:
    """Tokens ``x`` (B, H·W, C) of an even ``grid`` → (4B, H·W/4, C): rolled by −``shift``, cut into 2 × 2 windows.

    Row ``4b + 2i + j`` holds window (i, j) of sample b, its tokens in row-major order.
    """
    b, n, c = x.shape
    h, w = grid
    require(h % 2 == 0 and w % 2 == 0 and n == h * w, f"cannot partition {n} tokens as an even {h}×{w} grid")
    g = x.reshape(b, h, w, c)
    if shift != (0, 0):
        g = torch.roll(g, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    g = g.reshape(b, 2, h // 2, 2, w // 2, c).permute(0, 1, 3, 2, 4, 5)
    return g.reshape(4 * b, (h // 2) * (w // 2), c)


def window_merge(windows: torch.Tensor, grid: tuple[int, int], shift: tuple[int, int]) -> torch.Tensor:
    """Inverse of :func:`window_partition`: (4B, H·W/4, C) → (B, H·W, C)."""
    b4, _, c = windows.shape
    h, w = grid
    g = windows.reshape(b4 // 4, 2, 2, h // 2, w // 2, c).permute(0, 1, 3, 2, 4, 5).reshape(b4 // 4, h, w, c)
    if shift != (0, 0):
        g = torch.roll(g, shifts=shift, dims=(1, 2))
    return g.reshape(b4 // 4, h * w, c)


def _resize_tokens(x: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """Bicubic resize (align_corners False) of tokens (B, H·W, C) on ``grid`` to ``size``."""
    b, _, c = x.shape
    img = x.reshape(b, grid[0], grid[1], c).permute(0, 3, 1, 2)
    img = F.interpolate(img, size=size, mode="bicubic", align_corners=False)
    return img.permute(0, 2, 3, 1).reshape(b, size[0] * size[1], c)


def windowed(
    fn: Callable[..., torch.Tensor], tensors: tuple[torch.Tensor, ...], grid: tuple[int, int], k: int
) -> torch.Tensor:
    """Apply ``fn`` to every shifted window of the token tensors (each (B, H·W, C)) and merge its output back.

    ``fn`` receives the partitioned tensors (4B, n, C) and returns (4B, n, C'). Odd grids run on the bicubic
    resize to twice the window size and are resized back (SPEC §3.2).
    """
    window = window_size(grid)
    even = (2 * window[0], 2 * window[1])
    if even != grid:
        tensors = tuple(_resize_tokens(t, grid, even) for t in tensors)
    shift = window_shift(window, k)
    out = window_merge(fn(*(window_partition(t, even, shift) for t in tensors)), even, shift)
    return _resize_tokens(out, even, grid) if even != grid else out


def windowed_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: tuple[int, int], shift_index: int
) -> torch.Tensor:
    """MSW-MSA of multi-head q, k, v (B, heads, H·W, d): scaled dot-product attention within each shifted window.

    Equals full attention masked to "same cyclic window" on even grids (tested to 1e-5).
    """
    b, heads, n, _ = q.shape

    def flat(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(b * heads, n, t.shape[-1])

    def attend(qw: torch.Tensor, kw: torch.Tensor, vw: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(qw, kw, vw)

    out = windowed(attend, (flat(q), flat(k), flat(v)), grid, shift_index)
    return out.reshape(b, heads, n, v.shape[-1])
