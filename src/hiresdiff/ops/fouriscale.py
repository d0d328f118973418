"""FouriScale's Fourier low-pass of conv inputs, its masks, base sizes and dilation schedule
(SPEC-baselines-unet §2.1–2.2).

A patched conv low-passes its *input*: zero-pad bottom/right to a multiple of the layer's base size,
X = fftshift(FFT2(x_pad)) in float32, multiply by the outer product of two 1-D masks, take Re(IFFT2(ifftshift(·))),
crop back. Each 1-D mask of a side n and scale s is, with half = ⌊n/2⌋, ramp R and floor v,

    m[k] = clip((1 − v)/R · (half/s + 1 − k) + 1, v, 1),   k = 0 … half − 1,   mask = [reverse(m), m]

(zero frequency at index half of the fftshift layout; R = 0 means no filter). The layout is the official one and is
not exactly Hermitian (frequency −(k+1) gets m[k], +k gets m[k]); the imaginary part is dropped as there.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from hiresdiff.errors import HiresError, require

#: complex elements one FFT chunk may hold (2^26 complex64 = 512 MiB) unless the caller sets another budget
DEFAULT_FFT_ELEMENTS = 1 << 26


def strong_ramp(n: int) -> int:
    """Ramp width of the strong mask: R = max(⌊n/8⌋, 1) bins."""
    return max(n // 8, 1)


def weak_ramp(n: int, scale: float) -> float:
    """Ramp width of the weak mask, R_w = ⌊(s − 1)·n / (2s)⌋, in floats exactly as the official code computes it.

    Where the exact value is an integer the float expression can give one less (n = 64, s = 4/3: 7, not 8); the
    parity with the released code depends on keeping this expression.
    """
    return (scale - 1) * n // (scale * 2)


def lowpass_mask_1d(n: int, scale: float, floor: float, ramp: float) -> torch.Tensor:
    """The 1-D FouriScale mask (float32, length ``n``) for a side of ``n`` bins in fftshift layout.

    Pass band up to bin ≈ half/s + 1, then a linear ramp over ``ramp`` bins down to ``floor``; ``ramp == 0`` is an
    all-ones mask. The arithmetic follows the official float32 order. Odd ``n`` (a documented deviation: the
    official code builds a mask of length 2·⌊n/2⌋ and fails) gets the even layout plus one more positive bin.
    """
    require(n >= 1, f"mask length must be positive, got {n}")
    half = n // 2
    if ramp == 0:
        return torch.ones(n, dtype=torch.float32)
    k = torch.arange(half + n % 2, dtype=torch.float32)
    m = (1 - floor) / ramp * (half / scale + 1 - k) + 1
    m = torch.minimum(torch.maximum(m, torch.full_like(m, floor)), torch.ones_like(m))
    return torch.cat([m[:half].flip(0), m])


def padded_size(height: int, width: int, base_h: float, base_w: float) -> tuple[int, int]:
    """Padded size (⌊b_h·r⌋, ⌊b_w·r⌋) with r = max(⌈h/b_h⌉, ⌈w/b_w⌉): the smallest common multiple of the base."""
    r = max(math.ceil(height / base_h), math.ceil(width / base_w))
    return int(base_h * r), int(base_w * r)


def feature_base_size(base: tuple[float, float], height: int, feature_height: int) -> tuple[float, float]:
    """A layer's base size: the image base size divided by the layer's down ratio H / h_feat (height only)."""
    ratio = height / feature_height
    return base[0] / ratio, base[1] / ratio


def fourier_lowpass(
    x: torch.Tensor, mask_h: torch.Tensor, mask_w: torch.Tensor, max_elements: int = DEFAULT_FFT_ELEMENTS
) -> torch.Tensor:
    """Low-pass ``x`` (B, C, h, w) with the separable mask ``mask_h ⊗ mask_w`` (SPEC §2.1), pad-then-crop.

    ``x`` is zero-padded bottom/right to ``(len(mask_h), len(mask_w))`` (see :func:`padded_size`), filtered in
    float32 and cropped back to h × w in its own dtype. Channels are processed in chunks of at most
    ``max_elements`` complex values, so memory stays bounded at any resolution; the result does not depend on it.
    """
    b, c, h, w = x.shape
    nh, nw = len(mask_h), len(mask_w)
    require(nh >= h and nw >= w, f"mask size {nh}×{nw} is smaller than the input {h}×{w}")
    mask = torch.outer(mask_h.float(), mask_w.float()).to(x.device)
    per_channel = max(1, b * nh * nw)
    step = max(1, max_elements // per_channel)
    out = []
    for start in range(0, c, step):
        chunk = F.pad(x[:, start : start + step].float(), (0, nw - w, 0, nh - h))
        spectrum = torch.fft.fftshift(torch.fft.fft2(chunk), dim=(-2, -1)) * mask
        filtered = torch.fft.ifft2(torch.fft.ifftshift(spectrum, dim=(-2, -1))).real
        out.append(filtered[..., :h, :w].to(x.dtype))
    return torch.cat(out, dim=1)


def choose_base_size(height: int, width: int, buckets: Sequence[tuple[int, int]]) -> tuple[tuple[int, int], int]:
    """The SDXL base size and dilation d₀ for an image of ``height`` × ``width`` pixels (SPEC §2.2).

    Among the buckets (b_h, b_w) with ⌈H/b_h⌉ = ⌈W/b_w⌉, the one with the least padding
    (b_h⌈H/b_h⌉ − H) + (b_w⌈W/b_w⌉ − W) wins, the first in list order on ties; d₀ is that common ratio.
    """
    best: tuple[int, tuple[int, int], int] | None = None
    for bh, bw in buckets:
        rh, rw = math.ceil(height / bh), math.ceil(width / bw)
        if rh != rw:
            continue
        padding = (bh * rh - height) + (bw * rw - width)
        if best is None or padding < best[0]:
            best = (padding, (bh, bw), rh)
    if best is None:
        raise HiresError(f"no FouriScale base size fits {height}×{width}; pass base_size explicitly")
    return best[1], best[2]


def dilation_at(step: int, d0: float, start: int, stop: int, progressive: bool = True) -> float | None:
    """FouriScale's dilation factor at step index ``step`` (SPEC §2.1), or None once the layers are plain (≥ stop).

    d = d₀ for i < start (and throughout when not progressive); d₀ − (d₀ − 1)·(i − start)/(stop − start) for
    start ≤ i < stop, as the float ``max((d0 - 1) * ((stop - i) / (stop - start)) + 1, 1)``. Convs use ⌈d⌉,
    filters use d itself.
    """
    if step >= stop:
        return None
    if not progressive or step < start:
        return float(d0)
    return max((d0 - 1.0) * ((stop - step) / (stop - start)) + 1.0, 1.0)
