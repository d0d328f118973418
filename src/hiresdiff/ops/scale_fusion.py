"""FreeScale's scale fusion on the token grid of one self-attention layer (SPEC-baselines-progressive §2.2).

A target ``s_h = H//n``, ``s_w = W//n`` times the native size n, s = max(s_h, s_w), makes on a layer grid
(g_h, g_w):

* local windows of (g_h/s, g_w/s) tokens, stride ½ window, the MultiDiffusion count ``⌈(g − win)/stride⌉ + 1`` with
  the last window clamped to the border (:func:`~hiresdiff.ops.geometry.view_starts`), jittered by up to ⅛ window
  over a zero-padded grid (:func:`fusion_windows`); L = the average over the windows covering a token
  (:func:`stack_windows`, :func:`average_windows`);
* a global output Gl: attention over all tokens, or (``dilated``) over each of the s_h·s_w sub-lattices
  ``x[a::s_h, b::s_w]`` separately (:func:`lattices`);
* the fusion ``out = G(L) + (Gl − G(Gl))`` — the low band of the local output plus the high band of the global
  one — with G the normalised Gaussian of kernel k = 2s − 1 over (rows, columns, features) (``hwc``, the official
  code since March 2025) or (rows, columns) (``hw``, the paper), zero padding (:func:`fuse`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from hiresdiff.ops.blur import gaussian_blur_axes
from hiresdiff.ops.geometry import View, view_starts

#: the axes of a (B, rows, columns, features) grid each blur variant filters
BLUR_AXES: dict[str, tuple[int, ...]] = {"hwc": (1, 2, 3), "hw": (1, 2)}


def fusion_scale(height: int, width: int, native: int) -> tuple[int, int]:
    """(s_h, s_w) = (H//n, W//n) of a ``height × width`` pixel canvas, at least 1 (the official floors too, so
    sizes between multiples of n use the smaller integer scale)."""
    return max(1, height // native), max(1, width // native)


def fusion_kernel(scale: tuple[int, int]) -> int:
    """The Gaussian's kernel size 2s − 1, s = max(s_h, s_w): 1 (no blur) at s = 1, 3 at 2×, 7 at 4×."""
    return 2 * max(scale) - 1


def fusion_windows(grid: tuple[int, int], scale: tuple[int, int]) -> tuple[list[View], tuple[int, int]]:
    """The unjittered local windows of a (g_h, g_w) grid, row-major, and the jitter bound (j_h, j_w) = window//8.

    Window (g_h//s, g_w//s) with s = max(s_h, s_w) (the layer's native grid for square targets), stride half a
    window, the last window of each axis clamped to end at the border.
    """
    s = max(scale)
    wh, ww = max(1, grid[0] // s), max(1, grid[1] // s)
    tops, lefts = view_starts(grid[0], wh, max(1, wh // 2)), view_starts(grid[1], ww, max(1, ww // 2))
    return [View(top, left, wh, ww) for top in tops for left in lefts], (wh // 8, ww // 8)


def stack_windows(x: torch.Tensor, views: Sequence[Sequence[View]], pad: tuple[int, int]) -> torch.Tensor:
    """The windows of every row of ``x`` (B, g_h, g_w, D) as one batch (Σ_b n_b, h·w, D), row-major per row.

    ``views[b]`` are row b's windows in grid coordinates (jittered ones may start up to ``pad`` cells outside the
    grid); the grid is zero-padded by ``pad`` on each side, so outside tokens are zeros that still take part in
    the window's attention as keys and values, as in the official code.
    """
    ph, pw = pad
    padded = F.pad(x, (0, 0, pw, pw, ph, ph)) if ph or pw else x
    windows = [
        padded[b, v.top + ph : v.top + ph + v.height, v.left + pw : v.left + pw + v.width].reshape(-1, x.shape[-1])
        for b, row in enumerate(views)
        for v in row
    ]
    return torch.stack(windows)


def average_windows(
    out: torch.Tensor, views: Sequence[Sequence[View]], grid: tuple[int, int], pad: tuple[int, int]
) -> torch.Tensor:
    """L (B, g_h, g_w, D): the windows' outputs ``out`` (as stacked by :func:`stack_windows`) added into the
    padded grid, cropped to the grid and divided by how many windows cover each token (0 where none does)."""
    ph, pw = pad
    gh, gw = grid
    d = out.shape[-1]
    value = out.new_zeros((len(views), gh + 2 * ph, gw + 2 * pw, d))
    count = out.new_zeros((len(views), gh + 2 * ph, gw + 2 * pw, 1))
    k = 0
    for b, row in enumerate(views):
        for v in row:
            rows, cols = slice(v.top + ph, v.top + ph + v.height), slice(v.left + pw, v.left + pw + v.width)
            value[b, rows, cols].add_(out[k].view(v.height, v.width, d))  # in place on the slice
            count[b, rows, cols].add_(1)
            k += 1
    value, count = value[:, ph : ph + gh, pw : pw + gw], count[:, ph : ph + gh, pw : pw + gw]
    return value / count.clamp_min(1)


def lattices(grid: tuple[int, int], scale: tuple[int, int]) -> dict[tuple[int, int], list[tuple[int, int]]]:
    """The dilated sub-lattices ``x[a::s_h, b::s_w]`` of a grid, grouped by their shape (one group when s divides
    the grid): shape → [(a, b), …]. They partition the grid, so the official average over them is a scatter."""
    groups: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for a in range(scale[0]):
        for b in range(scale[1]):
            shape = (len(range(a, grid[0], scale[0])), len(range(b, grid[1], scale[1])))
            groups.setdefault(shape, []).append((a, b))
    return groups


def fuse(local: torch.Tensor, glob: torch.Tensor, kernel_size: int, sigma: float, axes: str) -> torch.Tensor:
    """``G(L) + (Gl − G(Gl))`` on (B, g_h, g_w, D) grids, computed as ``Gl + G(L − Gl)`` (G is linear: one blur
    instead of two). ``kernel_size = 1`` gives L itself."""
    if kernel_size == 1:
        return local
    return glob + gaussian_blur_axes(local - glob, BLUR_AXES[axes], kernel_size, sigma)
