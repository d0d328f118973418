"""Low/high frequency split of latents (ScaleDiff latent frequency mixing, SPEC §6)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def low_pass(x: torch.Tensor, factor: float) -> torch.Tensor:
    """``low(x) = bilinear_up(bilinear_down_antialiased(x, factor))`` back to the size of ``x`` (B, C, H, W).

    The small size is ``int(side·f)`` per side (at least 1), as the official ScaleDiff code truncates it.
    """
    if not 0 < factor <= 1:
        raise ValueError(f"low-pass factor must be in (0, 1], got {factor}")
    h, w = x.shape[-2:]
    small = (max(1, int(h * factor)), max(1, int(w * factor)))
    down = F.interpolate(x, size=small, mode="bilinear", align_corners=False, antialias=True)
    return F.interpolate(down, size=(h, w), mode="bilinear", align_corners=False)


def high_pass(x: torch.Tensor, factor: float) -> torch.Tensor:
    """``x − low(x)``: the detail :func:`low_pass` removes."""
    return x - low_pass(x, factor)


def frequency_mix(detail_source: torch.Tensor, structure_source: torch.Tensor, factor: float) -> torch.Tensor:
    """``Z_ref = Z_RU − low(Z_RU) + low(Z_LU)``: high frequencies of one latent, low of the other (LFM)."""
    return high_pass(detail_source, factor) + low_pass(structure_source, factor)
