"""Resampling of latents and pixel images."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from hiresdiff.config import PIXEL_FILTERS


def upsample_latent(z: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bicubic latent upsampling to ``size`` (h, w) — DemoFusion's "upsample" of the previous phase (SPEC §2.1)."""
    return F.interpolate(z, size=size, mode="bicubic", align_corners=False)


def resize_pixels(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bicubic resize of images in [−1, 1] to ``size`` — antialiased only when shrinking a side — clamped to
    [−1, 1] (an input picture brought to a stage's size)."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    shrink = size[0] < images.shape[-2] or size[1] < images.shape[-1]
    out = F.interpolate(images, size=size, mode="bicubic", align_corners=False, antialias=shrink)
    return out.clamp(-1, 1)


def upsample_pixels(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Plain bicubic resampling of decoded images to ``size``, then the clamp to [−1, 1] (SPEC §5, §6).

    Keys cubic with a = −0.75 and no antialiasing — ``F.interpolate(..., mode="bicubic")``, as AP-LDM
    (kmittle/AP-LDM ``text_to_image/pipeline_apldm_sdxl.py``) and ScaleDiff upsample; with ``antialias=True``
    PyTorch would switch to the a = −0.5 kernel when enlarging. The input is the *unclamped* VAE output; the clamp
    comes after the upsample, so overshoot of the kernel is clipped once.
    """
    return F.interpolate(images, size=size, mode="bicubic", align_corners=False).clamp(-1, 1)


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
