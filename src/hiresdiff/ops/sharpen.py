"""Gaussian unsharp masking of pixel images: DiffuseHigh's sharpening of each stage's guidance image
(SPEC-baselines-progressive §1.2, the official ``gaussian_blur_image_sharpening``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from hiresdiff.cost.shapes import value_free
from hiresdiff.ops.blur import gaussian_blur

#: the official blur: torchvision ``GaussianBlur(kernel_size=3)`` (reflect padding)
SHARPEN_KERNEL = 3


def draw_sigma(generator: torch.Generator, low: float, high: float) -> float:
    """σ ~ U[low, high) drawn from ``generator`` (the official draws it from torchvision's global RNG)."""
    u = torch.rand((), generator=generator, device=generator.device, dtype=torch.float64)
    return low + (high - low) * float(u)


@value_free
def sharpen(images: torch.Tensor, sigmas: Sequence[float], alpha: float) -> torch.Tensor:
    """``(1 + α)·x − α·G_σ * x`` per image (B, C, H, W), image ``b`` blurred with σ = ``sigmas[b]`` by a 3 × 3
    Gaussian with reflect padding. α = 0 returns the images; a constant image is a fixed point (the kernel sums
    to 1 and reflection keeps the border constant)."""
    if len(sigmas) != images.shape[0]:
        raise ValueError(f"got {len(sigmas)} sigmas for {images.shape[0]} images")
    if alpha == 0.0:
        return images
    blurred = torch.cat(
        [gaussian_blur(img[None], SHARPEN_KERNEL, s, padding="reflect") for img, s in zip(images, sigmas, strict=True)]
    )
    return (1.0 + alpha) * images - alpha * blurred
