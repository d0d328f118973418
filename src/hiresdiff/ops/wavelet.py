"""One-level 2-D discrete wavelet transform in torch, for DiffuseHigh's structure guidance (SPEC-progressive §1.6).

The transform is PyWavelets' ``dwt2``/``idwt2`` with ``mode="symmetric"`` written as two separable 1-D passes:

* analysis of a signal ``x`` of ``N`` samples with a filter ``h`` of ``L`` taps: extend ``x`` half-sample
  symmetrically (``… x1 x0 | x0 x1 … x_{N−1} | x_{N−1} x_{N−2} …``), then ``y[n] = Σ_j h[j]·x[2n + 1 − j]`` for
  ``n = 0 … ⌊(N + L − 1)/2⌋ − 1`` (a stride-2 correlation with the reversed filter);
* synthesis: ``x[m] = Σ_n a[n]·g_lo[m + L − 2 − 2n] + d[n]·g_hi[m + L − 2 − 2n]`` (a stride-2 transposed convolution
  with the reconstruction filters, cropped to ``[L − 2, L − 2 + N)``); synthesis ∘ analysis is the identity.

Bands follow PyWavelets' names: ``(ll, (lh, hl, hh))`` = ``cA, (cH, cV, cD)``, where ``lh`` is low-pass along the
width and high-pass along the height. DiffuseHigh only replaces ``ll`` (:func:`swap_low`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from hiresdiff.cost.shapes import value_free

#: Daubechies-4 (8 taps) decomposition low-pass filter, PyWavelets' ``Wavelet("db4").dec_lo`` (SPEC §1.6)
DB4_DEC_LO = (
    -0.010597401785069032,
    0.0328830116668852,
    0.030841381835560764,
    -0.18703481171909309,
    -0.027983769416859854,
    0.6308807679298589,
    0.7148465705529157,
    0.2303778133088965,
)
#: Haar decomposition low-pass filter (a 2-sample average scaled by √2)
HAAR_DEC_LO = (1 / math.sqrt(2), 1 / math.sqrt(2))
WAVELET_FILTERS = {"db4": DB4_DEC_LO, "haar": HAAR_DEC_LO}
WAVELETS = tuple(WAVELET_FILTERS)

Bands = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def wavelet_filters(
    wavelet: str, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dec_lo, dec_hi, rec_lo, rec_hi)`` of an orthogonal wavelet: ``dec_hi[k] = (−1)^(k+1)·dec_lo[L−1−k]`` (the
    quadrature mirror), the reconstruction filters are the decomposition filters reversed."""
    if wavelet not in WAVELET_FILTERS:
        raise ValueError(f"unknown wavelet {wavelet!r}; choose one of {', '.join(WAVELETS)}")
    lo = torch.tensor(WAVELET_FILTERS[wavelet], dtype=torch.float64)
    signs = torch.tensor([(-1.0) ** (k + 1) for k in range(len(lo))], dtype=torch.float64)
    hi = signs * lo.flip(0)
    return tuple(f.to(dtype=dtype, device=device) for f in (lo, hi, lo.flip(0), hi.flip(0)))  # type: ignore[return-value]


def low_band_size(n: int, wavelet: str = "db4") -> int:
    """Coefficients per axis of a signal of ``n`` samples: ``⌊(n + L − 1)/2⌋`` (db4: 512 → 259, Haar: 512 → 256)."""
    return (n + len(WAVELET_FILTERS[wavelet]) - 1) // 2


def _symmetric_indices(n: int, pad: int, device: torch.device) -> torch.Tensor:
    """Indices of the half-sample symmetric extension of ``n`` samples by ``pad`` on both sides (period ``2n``, so
    a padding longer than the signal repeats the mirror as PyWavelets does)."""
    i = torch.arange(-pad, n + pad, device=device).remainder(2 * n)
    return torch.where(i >= n, 2 * n - 1 - i, i)


def _analysis(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(approximation, detail) of ``x`` along its last axis."""
    *lead, n = x.shape
    taps = lo.numel()
    extended = x.index_select(-1, _symmetric_indices(n, taps - 1, x.device))[..., 1:]
    weight = torch.stack([lo.flip(0), hi.flip(0)]).unsqueeze(1)
    y = F.conv1d(extended.reshape(-1, 1, extended.shape[-1]), weight, stride=2)
    y = y.reshape(*lead, 2, y.shape[-1])
    return y[..., 0, :], y[..., 1, :]


def _synthesis(a: torch.Tensor, d: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, n: int) -> torch.Tensor:
    """The ``n`` samples whose last-axis analysis gave ``a`` and ``d``."""
    *lead, count = a.shape
    if 2 * count < n:
        raise ValueError(f"{count} coefficients cannot reconstruct {n} samples")
    weight = torch.stack([lo, hi]).unsqueeze(1)
    y = F.conv_transpose1d(torch.stack([a, d], dim=-2).reshape(-1, 2, count), weight, stride=2)
    start = lo.numel() - 2
    return y[..., start : start + n].reshape(*lead, n)


@value_free
def dwt2(x: torch.Tensor, wavelet: str = "db4") -> tuple[torch.Tensor, Bands]:
    """``(ll, (lh, hl, hh))`` of ``x`` (…, H, W): PyWavelets' ``dwt2(x, wavelet, mode="symmetric")``; each band is
    (…, ⌊(H + L − 1)/2⌋, ⌊(W + L − 1)/2⌋)."""
    lo, hi, _, _ = wavelet_filters(wavelet, x.dtype, x.device)
    a, d = _analysis(x, lo, hi)  # along the width
    ll, lh = (b.transpose(-1, -2) for b in _analysis(a.transpose(-1, -2), lo, hi))  # along the height
    hl, hh = (b.transpose(-1, -2) for b in _analysis(d.transpose(-1, -2), lo, hi))
    return ll, (lh, hl, hh)


def idwt2(ll: torch.Tensor, bands: Bands, size: tuple[int, int], wavelet: str = "db4") -> torch.Tensor:
    """The (…, H, W) image ``size`` whose :func:`dwt2` is ``ll, bands`` (PyWavelets' ``idwt2`` cropped to the
    original size; for odd sides it returns one sample more)."""
    lh, hl, hh = bands
    _, _, lo, hi = wavelet_filters(wavelet, ll.dtype, ll.device)
    a = _synthesis(ll.transpose(-1, -2), lh.transpose(-1, -2), lo, hi, size[0]).transpose(-1, -2)
    d = _synthesis(hl.transpose(-1, -2), hh.transpose(-1, -2), lo, hi, size[0]).transpose(-1, -2)
    return _synthesis(a, d, lo, hi, size[1])


@value_free
def swap_low(x: torch.Tensor, ref_low: torch.Tensor, wavelet: str = "db4") -> torch.Tensor:
    """``IDWT(ref_low, H(x))``: ``x`` with its low band replaced by ``ref_low`` (the ``ll`` band of a reference of
    the same size), its high bands kept — DiffuseHigh's structure guidance (SPEC-baselines-progressive §1.2).
    Linear in both arguments, so it commutes with the affine map [0, 1] → [−1, 1]: ``x + P_LL(ref − x)``."""
    _, bands = dwt2(x, wavelet)
    return idwt2(ref_low.to(x.dtype), bands, (x.shape[-2], x.shape[-1]), wavelet)
