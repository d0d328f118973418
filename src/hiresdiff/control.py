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
one call), so no method runs a second loop. A condition holds one image for every canvas sample, or one per sample
(AccDiffusion v2's edge maps of each sample's previous phase): a request's rows then get their own sample's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from hiresdiff.ops.geometry import View


def resize_control(image: torch.Tensor, size: tuple[int, int], *, clamp: bool = True) -> torch.Tensor:
    """Bicubic resize of a control image in [0, 1] to ``size`` (antialiased when shrinking), clamped to [0, 1].

    ``clamp=False`` is the plain bicubic of the official AccDiffusion v2 (``F.interpolate``, no antialiasing, no
    clamp): an upsampled binary edge map then rings outside [0, 1] (≈ [−0.32, 1.32]), as its ControlNet saw it."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    shrink = clamp and (size[0] < image.shape[-2] or size[1] < image.shape[-1])
    out = F.interpolate(image, size=size, mode="bicubic", align_corners=False, antialias=shrink)
    return out.clamp(0.0, 1.0) if clamp else out


@dataclass
class ControlCondition:
    """Control images (1 or B, 3, H, W) in [0, 1] — one for every canvas sample, or one per sample — resized per
    canvas size on demand (cached; ``clamp`` as :func:`resize_control`)."""

    image: torch.Tensor
    vae_scale_factor: int = 8
    clamp: bool = True
    _sizes: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict, repr=False)

    def at(self, height: int, width: int) -> torch.Tensor:
        """The whole control image(s) at ``height × width`` pixels."""
        key = (height, width)
        if key not in self._sizes:
            self._sizes[key] = resize_control(self.image, key, clamp=self.clamp)
        return self._sizes[key]

    @staticmethod
    def _rows(images: torch.Tensor, samples: list[int] | None, count: int) -> list[int]:
        """The image row of each of ``count`` request rows: the one image, or each row's canvas sample's."""
        if images.shape[0] == 1:
            return [0] * count
        if samples is None or len(samples) != count:
            raise RuntimeError("a condition of one image per canvas sample needs the sample of every request row")
        return list(samples)

    def full(self, latent_hw: tuple[int, int], count: int, samples: list[int] | None = None) -> torch.Tensor:
        """``count`` rows (of canvas samples ``samples``) of the whole image at the pixel size of a ``latent_hw``
        latent (canvas or dilated sample)."""
        f = self.vae_scale_factor
        images = self.at(latent_hw[0] * f, latent_hw[1] * f)
        if images.shape[0] == 1:
            return images.expand(count, -1, -1, -1)
        return images[torch.tensor(self._rows(images, samples, count), device=images.device)]

    def crops(
        self, latent_hw: tuple[int, int], views: list[View], pad: int, samples: list[int] | None = None
    ) -> torch.Tensor:
        """The crop under each view (latent cells, on a canvas zero-padded by ``pad`` cells) of the image (of the
        view's canvas sample in ``samples``) at the canvas's pixel size."""
        f = self.vae_scale_factor
        canvas = self.at(latent_hw[0] * f, latent_hw[1] * f)
        if pad:
            canvas = F.pad(canvas, (pad * f,) * 4)
        j = pad * f

        def cut(r: int, v: View) -> torch.Tensor:
            top, left = v.top * f + j, v.left * f + j
            return canvas[r : r + 1, :, top : top + v.height * f, left : left + v.width * f]

        return torch.cat([cut(r, v) for r, v in zip(self._rows(canvas, samples, len(views)), views, strict=True)])
