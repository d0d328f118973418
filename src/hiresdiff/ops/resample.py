"""Resampling of latents and pixel images."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

PIXEL_FILTERS = ("bicubic", "lanczos")


def upsample_latent(z: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bicubic latent upsampling to ``size`` (h, w) — DemoFusion's "upsample" of the previous phase (SPEC §2.1)."""
    return F.interpolate(z, size=size, mode="bicubic", align_corners=False)


def resize_images(images: torch.Tensor, size: tuple[int, int], filter: str) -> torch.Tensor:
    """Resize images in [−1, 1] (B, C, H, W) to ``size`` with a bicubic (torch) or Lanczos (PIL) filter."""
    if filter == "bicubic":
        return F.interpolate(images, size=size, mode="bicubic", align_corners=False, antialias=True).clamp(-1, 1)
    if filter == "lanczos":
        out = []
        for img in images:
            arr = img.permute(1, 2, 0).float().numpy()
            channels = [
                np.asarray(Image.fromarray(arr[..., c], mode="F").resize(size[::-1], Image.Resampling.LANCZOS))
                for c in range(arr.shape[-1])
            ]
            out.append(torch.from_numpy(np.stack(channels)))
        return torch.stack(out).clamp(-1, 1)
    raise ValueError(f"unknown pixel filter {filter!r}; choose one of {', '.join(PIXEL_FILTERS)}")
