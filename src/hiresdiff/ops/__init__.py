"""Pure tensor functions: no model, no scheduler, no randomness except an explicit generator."""

from hiresdiff.ops.blur import gaussian_blur, gaussian_kernel1d
from hiresdiff.ops.dilation import dilated_merge, dilated_pad, dilated_split
from hiresdiff.ops.geometry import View, jitter_views, view_starts, views_for
from hiresdiff.ops.interaction import permute_lattices
from hiresdiff.ops.matching import statistical_matching
from hiresdiff.ops.pfsa import pfsa
from hiresdiff.ops.sas import eta_for_scale, relabel_timesteps, sas_betas
from hiresdiff.ops.schedule import attentive_lambdas, cosine_factor
from hiresdiff.ops.stats import renormalise, scalar_stats
from hiresdiff.ops.tiling import tiled_apply

__all__ = [
    "View",
    "attentive_lambdas",
    "cosine_factor",
    "dilated_merge",
    "dilated_pad",
    "dilated_split",
    "eta_for_scale",
    "gaussian_blur",
    "gaussian_kernel1d",
    "jitter_views",
    "permute_lattices",
    "pfsa",
    "relabel_timesteps",
    "renormalise",
    "sas_betas",
    "scalar_stats",
    "statistical_matching",
    "tiled_apply",
    "view_starts",
    "views_for",
]
