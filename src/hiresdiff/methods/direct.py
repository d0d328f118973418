"""direct — the base model sampled at the target size (SPEC §1), optionally with FreeU on the decoder."""

from __future__ import annotations

from hiresdiff.methods.base import MethodOutput
from hiresdiff.methods.specs.direct import DirectParams
from hiresdiff.patches.freeu import freeu_hooks
from hiresdiff.sampler import Run
from hiresdiff.strategies.full import FullCanvas


def run_direct(run: Run, params: DirectParams) -> MethodOutput:
    s = run.settings
    with freeu_hooks(run.adapter, params.freeu, params.freeu_rule) as hooks:
        if run.source is not None:  # upscaling: SDEdit of the input picture at the target size
            return MethodOutput(latents=run.sdedit(FullCanvas(), "direct (SDEdit)", hooks))
        return MethodOutput(latents=run.sample_canvas(s.height, s.width, name="direct", hooks=hooks))
