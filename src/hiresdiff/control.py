"""ControlNet conditions: which part of the control image each denoiser request sees.

The control image (one picture for the whole canvas, in [0, 1] as diffusers' ControlNet pipelines feed it) is
resized to the pixel size of the canvas being sampled. Strategies then cut each request's condition from it:

* a **full-canvas** request (direct, AP-LDM, ScaleDiff, every first phase) gets the whole image at the canvas's
  pixel size;
* a **local view** gets the crop of that canvas-size image under the view — on the canvas zero-padded like the
  latent when jittered views reach past the border (the part outside the canvas is black);
* a **dilated sample** (every d-th latent cell) sees the whole canvas at 1/d: it gets the whole control image
  resized to the sample's pixel size.

The ControlNet residuals are computed inside the adapter's batched denoiser call (views of different crops share
one call), so no method runs a second loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from hiresdiff.ops.geometry import View


def resize_control(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bicubic resize of a control image in [0, 1] to ``size`` (antialiased when shrinking), clamped to [0, 1]."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    shrink = size[0] < image.shape[-2] or size[1] < image.shape[-1]
    out = F.interpolate(image, size=size, mode="bicubic", align_corners=False, antialias=shrink)
    return out.clamp(0.0, 1.0)


@dataclass
class ControlCondition:
    """A control image (1, 3, H, W) in [0, 1], resized per canvas size on demand (cached)."""

    image: torch.Tensor
    vae_scale_factor: int = 8
    _sizes: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict, repr=False)

    def at(self, height: int, width: int) -> torch.Tensor:
        """The whole control image at ``height × width`` pixels."""
        key = (height, width)
        if key not in self._sizes:
            self._sizes[key] = resize_control(self.image, key)
        return self._sizes[key]

    def full(self, latent_hw: tuple[int, int], count: int) -> torch.Tensor:
        """``count`` copies of the whole image at the pixel size of a ``latent_hw`` latent (canvas or dilated
        sample)."""
        f = self.vae_scale_factor
        return self.at(latent_hw[0] * f, latent_hw[1] * f).expand(count, -1, -1, -1)

    def crops(self, latent_hw: tuple[int, int], views: list[View], pad: int) -> torch.Tensor:
        """The crop under each view (latent cells, on a canvas zero-padded by ``pad`` cells) of the image at the
        canvas's pixel size."""
        f = self.vae_scale_factor
        canvas = self.at(latent_hw[0] * f, latent_hw[1] * f)
        if pad:
            canvas = F.pad(canvas, (pad * f,) * 4)
        j = pad * f
        return torch.cat(
            [
                canvas[:, :, v.top * f + j : (v.top + v.height) * f + j, v.left * f + j : (v.left + v.width) * f + j]
                for v in views
            ]
        )
