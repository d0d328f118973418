"""direct — the base model sampled at the target size (SPEC §1)."""

from __future__ import annotations

from dataclasses import dataclass

from hiresdiff.methods.base import Method, MethodOutput, Params
from hiresdiff.sampler import Run
from hiresdiff.strategies.full import FullCanvas


@dataclass
class DirectParams(Params):
    """No parameters: the whole canvas is denoised at once."""


def run_direct(run: Run, params: DirectParams) -> MethodOutput:
    s = run.settings
    if run.source is not None:  # upscaling: SDEdit of the input picture at the target size
        return MethodOutput(latents=run.sdedit(FullCanvas(), "direct (SDEdit)"))
    return MethodOutput(latents=run.sample_canvas(s.height, s.width, name="direct"))


METHOD = Method("direct", "base model sampled directly at the target size", "", DirectParams, run_direct)
