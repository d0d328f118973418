"""resize — sample at native size, decode, upscale in pixel space (SPEC §1; APT's "SDXL+Bicubic/LANCZOS")."""

from __future__ import annotations

from hiresdiff.methods.base import MethodOutput
from hiresdiff.methods.specs.resize import ResizeParams
from hiresdiff.ops.resample import resize_images
from hiresdiff.sampler import Run
from hiresdiff.stages import canvas_at


def run_resize(run: Run, params: ResizeParams) -> MethodOutput:
    s, ad = run.settings, run.adapter
    if run.source is not None:  # upscaling: the plain pixel resample of the input picture
        return MethodOutput(
            images=resize_images(run.source.expand(run.batch, -1, -1, -1), (s.height, s.width), params.filter)
        )
    h, w = canvas_at(s.height, s.width, ad.native_size, ad.pixel_grid)
    z = run.sample_canvas(h, w, name=f"native {h}×{w}")
    image = run.decode(z)
    run.keep_preview(image)
    return MethodOutput(images=resize_images(image, (s.height, s.width), params.filter))
