"""direct — the base model sampled at the target size (SPEC §1)."""

from __future__ import annotations

from dataclasses import dataclass

from hiresdiff.methods.base import Method, MethodOutput, Params
from hiresdiff.sampler import Run


@dataclass
class DirectParams(Params):
    """No parameters: the whole canvas is denoised at once."""


def run_direct(run: Run, params: DirectParams) -> MethodOutput:
    s = run.settings
    return MethodOutput(latents=run.sample_canvas(s.height, s.width, name="direct"))


METHOD = Method("direct", "base model sampled directly at the target size", "", DirectParams, run_direct)
