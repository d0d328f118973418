"""Pure tensor functions: no model, no scheduler, no randomness except an explicit generator.

The names below are imported from their submodules on first access (PEP 562), so that the torch-free submodule
:mod:`hiresdiff.ops.schedule` (step arithmetic the settings and method parameters validate with) can be imported
without torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hiresdiff.lazy import lazy_exports

if TYPE_CHECKING:
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

#: exported name → the submodule that defines it
_WHERE = {
    "gaussian_blur": "blur",
    "gaussian_kernel1d": "blur",
    "dilated_merge": "dilation",
    "dilated_pad": "dilation",
    "dilated_split": "dilation",
    "View": "geometry",
    "jitter_views": "geometry",
    "view_starts": "geometry",
    "views_for": "geometry",
    "permute_lattices": "interaction",
    "statistical_matching": "matching",
    "pfsa": "pfsa",
    "eta_for_scale": "sas",
    "relabel_timesteps": "sas",
    "sas_betas": "sas",
    "attentive_lambdas": "schedule",
    "cosine_factor": "schedule",
    "renormalise": "stats",
    "scalar_stats": "stats",
    "tiled_apply": "tiling",
}


__getattr__ = lazy_exports(__name__, _WHERE)


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
