"""Dilated sub-lattices of a latent canvas (DemoFusion dilated sampling, SPEC §2.3)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _pads(h: int, w: int, step: int) -> tuple[int, int]:
    return (-h) % step, (-w) % step


def dilated_split(x: torch.Tensor, d: int, multiple: int = 1) -> torch.Tensor:
    """Split ``x`` (B, C, H, W) into its ``d²`` dilated sub-lattices.

    ``x`` is zero-padded at the top/left until both sides are multiples of ``d·multiple``, so every sub-lattice
    side is a multiple of ``multiple`` (FLUX packs 2 × 2 latent cells into a token: ``multiple=2``); the result
    has shape (d, d, B, C, H'/d, W'/d) with ``out[i, j] = x_pad[:, :, i::d, j::d]``.
    """
    b, c, h, w = x.shape
    ph, pw = _pads(h, w, d * multiple)
    xp = F.pad(x, (pw, 0, ph, 0)) if ph or pw else x
    hd, wd = (h + ph) // d, (w + pw) // d
    return xp.reshape(b, c, hd, d, wd, d).permute(3, 5, 0, 1, 2, 4)


def dilated_merge(samples: torch.Tensor, height: int, width: int, multiple: int = 1) -> torch.Tensor:
    """Inverse of :func:`dilated_split` (same ``multiple``): scatter (d, d, B, C, h, w) back and crop the top/left
    padding."""
    d, d2, b, c, hd, wd = samples.shape
    if d != d2:
        raise ValueError(f"dilated samples must form a d × d lattice, got {d} × {d2}")
    x = samples.permute(2, 3, 4, 0, 5, 1).reshape(b, c, hd * d, wd * d)
    ph, pw = _pads(height, width, d * multiple)
    return x[:, :, ph:, pw:]
