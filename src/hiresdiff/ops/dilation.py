"""Dilated sub-lattices of a latent canvas (DemoFusion dilated sampling, SPEC §2.3)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _pads(h: int, w: int, step: int) -> tuple[int, int]:
    return (-h) % step, (-w) % step


def dilated_pad(x: torch.Tensor, d: int, multiple: int = 1) -> torch.Tensor:
    """``x`` (B, C, H, W) zero-padded at the top/left until both sides are multiples of ``d·multiple``.

    The official DemoFusion pads this way before it blurs and splits (``F.pad(latents, (w_pad, 0, h_pad, 0))`` in
    the dilated-sampling block of PRIS-CV/DemoFusion ``pipeline_demofusion_sdxl.py``); ``multiple`` keeps every
    sub-lattice side a multiple of the token packing (FLUX packs 2 × 2 latent cells: ``multiple=2``).
    """
    ph, pw = _pads(x.shape[-2], x.shape[-1], d * multiple)
    return F.pad(x, (pw, 0, ph, 0)) if ph or pw else x


def dilated_split(x: torch.Tensor, d: int, multiple: int = 1) -> torch.Tensor:
    """Split ``x`` (B, C, H, W) into its ``d²`` dilated sub-lattices.

    ``x`` is first padded by :func:`dilated_pad` (a no-op when it is already padded); the result has shape
    (d, d, B, C, H'/d, W'/d) with ``out[i, j] = x_pad[:, :, i::d, j::d]``.
    """
    xp = dilated_pad(x, d, multiple)
    b, c, hp, wp = xp.shape
    return xp.reshape(b, c, hp // d, d, wp // d, d).permute(3, 5, 0, 1, 2, 4)


def dilated_merge(samples: torch.Tensor, height: int, width: int, multiple: int = 1) -> torch.Tensor:
    """Inverse of :func:`dilated_split` (same ``multiple``): scatter (d, d, B, C, h, w) back and crop the top/left
    padding."""
    d, d2, b, c, hd, wd = samples.shape
    if d != d2:
        raise ValueError(f"dilated samples must form a d × d lattice, got {d} × {d2}")
    x = samples.permute(2, 3, 4, 0, 5, 1).reshape(b, c, hd * d, wd * d)
    ph, pw = _pads(height, width, d * multiple)
    return x[:, :, ph:, pw:]
