"""multidiffusion — overlapping local views at the target size (SPEC §1, §2.2); recipe:
:mod:`hiresdiff.methods.multidiffusion`."""

from __future__ import annotations

from dataclasses import dataclass

from hiresdiff.methods.base import Method, ViewParams


@dataclass
class MultiDiffusionParams(ViewParams):
    """Local views only: ``window``, ``stride`` (pixels) and ``jitter`` as in SPEC §2.2."""


METHOD = Method(
    "multidiffusion",
    "MultiDiffusion: averaged overlapping native-size views at the target size",
    "https://arxiv.org/abs/2302.08113",
    MultiDiffusionParams,
    "hiresdiff.methods.multidiffusion:run_multidiffusion",
    hidiffusion_switch="never",  # local views only, never the whole canvas in one call
)
