"""resize — sample at native size, decode, upscale in pixel space (SPEC §1; APT's "SDXL+Bicubic/LANCZOS"; with
``--upscaler`` an SR model: the papers' "SDXL + BSRGAN" row)."""

from __future__ import annotations

import torch

from hiresdiff.methods.base import MethodOutput
from hiresdiff.methods.specs.resize import ResizeParams
from hiresdiff.ops.resample import resize_images
from hiresdiff.sampler import Run
from hiresdiff.stages import canvas_at


def _enlarged(run: Run, images: torch.Tensor, size: tuple[int, int], filter: str) -> torch.Tensor:
    """The SR model of ``--upscaler`` when given (:meth:`Run.upsample_image`), else the method's pixel filter."""
    if run.upscaler is not None:
        return run.upsample_image(images, size, photo=True)
    return resize_images(images, size, filter)


def run_resize(run: Run, params: ResizeParams) -> MethodOutput:
    s, ad = run.settings, run.adapter
    if run.source is not None:  # upscaling: the plain pixel resample of the input picture
        enlarged = _enlarged(run, run.source, (s.height, s.width), params.filter)
        return MethodOutput(images=enlarged.expand(run.batch, -1, -1, -1))
    h, w = canvas_at(s.height, s.width, ad.native_size, ad.pixel_grid)
    z = run.sample_canvas(h, w, name=f"native {h}×{w}")
    image = run.decode(z)
    run.keep_preview(image)
    return MethodOutput(images=_enlarged(run, image, (s.height, s.width), params.filter))
