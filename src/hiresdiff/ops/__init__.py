"""Pure tensor functions: no model, no scheduler, no randomness except an explicit generator."""

from hiresdiff.ops.blur import gaussian_blur, gaussian_kernel1d
from hiresdiff.ops.dilation import dilated_merge, dilated_split
from hiresdiff.ops.geometry import View, jitter_views, view_starts, views_for
from hiresdiff.ops.schedule import cosine_factor
from hiresdiff.ops.stats import renormalise, scalar_stats
from hiresdiff.ops.tiling import tiled_apply

__all__ = [
    "View",
    "cosine_factor",
    "dilated_merge",
    "dilated_split",
    "gaussian_blur",
    "gaussian_kernel1d",
    "jitter_views",
    "renormalise",
    "scalar_stats",
    "tiled_apply",
    "view_starts",
    "views_for",
]
