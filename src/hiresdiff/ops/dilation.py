"""Dilated sub-lattices of a latent canvas (DemoFusion dilated sampling, SPEC §2.3)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _pads(h: int, w: int, d: int) -> tuple[int, int]:
    return (-h) % d, (-w) % d


def dilated_split(x: torch.Tensor, d: int) -> torch.Tensor:
    """Split ``x`` (B, C, H, W) into its ``d²`` dilated sub-lattices.

    ``x`` is zero-padded at the top/left until both sides are multiples of ``d``; the result has shape
    (d, d, B, C, ⌈H/d⌉, ⌈W/d⌉) with ``out[i, j] = x_pad[:, :, i::d, j::d]``.
    """
    b, c, h, w = x.shape
    ph, pw = _pads(h, w, d)
    xp = F.pad(x, (pw, 0, ph, 0)) if ph or pw else x
    hd, wd = (h + ph) // d, (w + pw) // d
    return xp.reshape(b, c, hd, d, wd, d).permute(3, 5, 0, 1, 2, 4)


def dilated_merge(samples: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`dilated_split`: scatter (d, d, B, C, h, w) back and crop the top/left padding."""
    d, d2, b, c, hd, wd = samples.shape
    if d != d2:
        raise ValueError(f"dilated samples must form a d × d lattice, got {d} × {d2}")
    x = samples.permute(2, 3, 4, 0, 5, 1).reshape(b, c, hd * d, wd * d)
    ph, pw = _pads(height, width, d)
    return x[:, :, ph:, pw:]
