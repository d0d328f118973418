"""resize — native-size sample upscaled in pixel space (SPEC §1); recipe: :mod:`hiresdiff.methods.resize`."""

from __future__ import annotations

from dataclasses import dataclass

from hiresdiff.config import PIXEL_FILTERS
from hiresdiff.errors import require
from hiresdiff.methods.base import Method, Params


@dataclass
class ResizeParams(Params):
    """``filter``: pixel-space upscaler, ``bicubic`` or ``lanczos``."""

    filter: str = "bicubic"

    def __post_init__(self) -> None:
        require(self.filter in PIXEL_FILTERS, f"unknown filter {self.filter!r}; choose {' or '.join(PIXEL_FILTERS)}")


METHOD = Method(
    "resize",
    "native-size sample upscaled in pixel space (bicubic or Lanczos)",
    "",
    ResizeParams,
    "hiresdiff.methods.resize:run_resize",
    strength_params=None,
    pixel_upsampling=True,  # --upscaler enlarges its decoded images
)
