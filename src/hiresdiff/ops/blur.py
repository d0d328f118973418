"""Separable Gaussian blur of latents (DemoFusion dilated sampling, SPEC §2.3)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hiresdiff.cost.shapes import value_free


def gaussian_kernel1d(kernel_size: int, sigma: float, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Normalised 1-D Gaussian ``g[i] ∝ exp(−x_i²/(2σ²))`` on ``x_i = i − (k−1)/2``, ``i = 0 … k−1``."""
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"Gaussian kernel size must be a positive odd integer, got {kernel_size}")
    if not sigma > 0:
        raise ValueError(f"Gaussian sigma must be > 0, got {sigma}")
    x = torch.arange(kernel_size, dtype=torch.float64) - (kernel_size - 1) / 2
    g = torch.exp(-(x**2) / (2.0 * sigma**2))
    return (g / g.sum()).to(dtype)


@value_free
def gaussian_blur(x: torch.Tensor, kernel_size: int, sigma: float, padding: str = "zeros") -> torch.Tensor:
    """Blur each channel of ``x`` (B, C, H, W) with a ``k × k`` Gaussian (outer product of 1-D kernels).

    The border is zero: a plain convolution with zero padding ``k // 2``, as the official DemoFusion
    ``gaussian_filter`` (``F.conv2d(..., padding=kernel_size // 2, groups=channels)`` in PRIS-CV/DemoFusion
    ``pipeline_demofusion_sdxl.py``), so values near the border are pulled towards 0 (SPEC §2.3). The output
    keeps the size of ``x``; ``kernel_size = 1`` returns ``x`` unchanged. Computed separably (two 1-D passes),
    which equals the 2-D convolution with the outer-product kernel. ``padding="reflect"`` mirrors the border
    without repeating it (torchvision's ``GaussianBlur``, used by DiffuseHigh's sharpening) instead. Value-free in
    the cost model (:func:`~hiresdiff.cost.shapes.value_free`): blurred values steer no shape or call.
    """
    g = gaussian_kernel1d(kernel_size, sigma, dtype=x.dtype).to(x.device)
    if kernel_size == 1:
        return x
    pad = kernel_size // 2
    b, c, h, w = x.shape
    y = x.reshape(b * c, 1, h, w)
    if padding == "reflect":
        y, pad = F.pad(y, (pad, pad, pad, pad), mode="reflect"), 0
    elif padding != "zeros":
        raise ValueError(f"unknown padding {padding!r}; choose zeros or reflect")
    y = F.conv2d(y, g.view(1, 1, 1, -1), padding=(0, pad))
    y = F.conv2d(y, g.view(1, 1, -1, 1), padding=(pad, 0))
    return y.reshape(b, c, h, w)


def gaussian_blur_axes(x: torch.Tensor, dims: tuple[int, ...], kernel_size: int, sigma: float) -> torch.Tensor:
    """Blur ``x`` along each of ``dims`` with the normalised 1-D Gaussian (:func:`gaussian_kernel1d`), zero padding
    ``k // 2`` on every blurred axis: the separable form of one convolution with the outer-product kernel over those
    axes (FreeScale's 3-D Gaussian over rows, columns and feature channels, SPEC-baselines-progressive §2.2, is
    ``dims`` = the three of them). The output keeps the shape of ``x``; ``kernel_size = 1`` returns ``x``."""
    g = gaussian_kernel1d(kernel_size, sigma, dtype=x.dtype).to(x.device)
    if kernel_size == 1:
        return x
    for dim in dims:
        moved = x.movedim(dim, -1)
        shape = moved.shape
        y = F.conv1d(moved.reshape(-1, 1, shape[-1]), g.view(1, 1, -1), padding=kernel_size // 2)
        x = y.reshape(shape).movedim(-1, dim)
    return x
