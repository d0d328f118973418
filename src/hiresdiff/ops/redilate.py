"""ScaleCrafter re-dilation of one convolution and its progressive schedule (SPEC-baselines-unet §1.1).

A re-dilated 3×3 conv with (possibly fractional) factor p runs the layer's own weights with dilation d = ⌈p⌉ on the
input resized by f = d/p, then resizes the result back to the plain conv's output size:

    y = bilinear( conv(bilinear(x, round(f·h), round(f·w)); dilation d, padding d·(k−1)/2), plain output size )

For integer p (f = 1) both resizes are the identity and this is a plain dilated conv with "same" padding. The
official code resizes the output to ⌊h/σ⌋ × ⌊w/σ⌋; hiresdiff keeps the plain conv's size instead (⌈h/2⌉ for a
stride-2 3×3 conv on an odd side), so a patched downsampler never changes the UNet's shapes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def redilation(factor: float) -> tuple[int, float]:
    """``(d, f)`` for re-dilation factor ``p``: the integer conv dilation d = ⌈p⌉ and the input scale f = d/p ≥ 1."""
    if not factor >= 1:
        raise ValueError(f"re-dilation factor must be ≥ 1, got {factor}")
    d = math.ceil(factor)
    return d, d / factor


def conv_output_size(conv: nn.Conv2d, height: int, width: int) -> tuple[int, int]:
    """Spatial output size of ``conv`` as it is configured, for an input of ``height`` × ``width``."""

    def side(n: int, axis: int) -> int:
        pad, dil, k, s = conv.padding[axis], conv.dilation[axis], conv.kernel_size[axis], conv.stride[axis]
        return (n + 2 * int(pad) - dil * (k - 1) - 1) // s + 1

    if isinstance(conv.padding, str):
        raise ValueError(f"string padding {conv.padding!r} is not supported for re-dilation")
    return side(height, 0), side(width, 1)


def redilated_padding(conv: nn.Conv2d, dilation: int) -> tuple[int, int]:
    """The "same" padding d·(k−1)/2 per axis for ``conv``'s (odd) kernel at dilation d."""
    return dilation * (conv.kernel_size[0] - 1) // 2, dilation * (conv.kernel_size[1] - 1) // 2


def redilated_conv(conv: nn.Conv2d, x: torch.Tensor, factor: float) -> torch.Tensor:
    """Run ``conv``'s weights on ``x`` (B, C, H, W) re-dilated by ``factor`` (SPEC §1.1), keeping the output size.

    ``factor = 1`` is the original layer bit for bit. Only zero padding is supported (every diffusers UNet conv).
    """
    if conv.padding_mode != "zeros":
        raise ValueError(f"re-dilation needs a zero-padded conv, got padding_mode={conv.padding_mode!r}")
    d, f = redilation(factor)
    h, w = x.shape[-2:]
    out_size = conv_output_size(conv, h, w)
    if f != 1:
        x = F.interpolate(x, size=(round(f * h), round(f * w)), mode="bilinear", align_corners=False)
    y = F.conv2d(x, conv.weight, conv.bias, conv.stride, redilated_padding(conv, d), (d, d), conv.groups)
    if tuple(y.shape[-2:]) != out_size:
        y = F.interpolate(y, size=out_size, mode="bilinear", align_corners=False)
    return y


def progressive_dilation(factor: float, step: int, tau: int) -> int:
    """ScaleCrafter's progressive factor p_i = max(⌈p·(τ − i)/τ⌉, 2) at step index ``step`` < ``tau``.

    Computed in floating point in the official order (``p * ((tau - i) / tau)``), so boundaries match the released
    code: τ = 35, p = 4 gives 4 for i 0–8, 3 for 9–17 and 2 for 18–34.
    """
    if not 0 <= step < tau:
        raise ValueError(f"progressive dilation is defined for 0 ≤ step < tau, got step {step}, tau {tau}")
    return max(math.ceil(factor * ((tau - step) / tau)), 2)
