"""resize — sample at native size, decode, upscale in pixel space (SPEC §1; APT's "SDXL+Bicubic/LANCZOS")."""

from __future__ import annotations

from dataclasses import dataclass

from hiresdiff.errors import require
from hiresdiff.methods.base import Method, MethodOutput, Params
from hiresdiff.ops.resample import PIXEL_FILTERS, resize_images
from hiresdiff.sampler import Run
from hiresdiff.stages import canvas_at


@dataclass
class ResizeParams(Params):
    """``filter``: pixel-space upscaler, ``bicubic`` or ``lanczos``."""

    filter: str = "bicubic"

    def __post_init__(self) -> None:
        require(self.filter in PIXEL_FILTERS, f"unknown filter {self.filter!r}; choose {' or '.join(PIXEL_FILTERS)}")


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


METHOD = Method(
    "resize",
    "native-size sample upscaled in pixel space (bicubic or Lanczos)",
    "",
    ResizeParams,
    run_resize,
    strength_params=None,
)
