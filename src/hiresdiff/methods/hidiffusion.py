"""HiDiffusion (SPEC-baselines-unet §3): the base model at the target size with RAU-Net and MSW-MSA.

Per step i of the one full-canvas loop (the step clock sets i; nothing counts model calls):
  1. MSW-MSA: every self-attention of the table's layers attends within 2 × 2 shifted windows, the shift index
     drawn per (step, layer) from each image's generator;
  2. RAU-Net: the resolution-aware downsampler (stride 4, dilation 2) on its steps, the in-block pooling/restore on
     its steps (:func:`hiresdiff.methods.specs.hidiffusion.schedule`), the upsamplers sized to the next skip;
  3. one prediction (CFG), one scheduler step (DDIM η = 1 in the ``official`` preset).
An input image is SDEdited at the target size as in ``direct``. ``freeu=true`` adds FreeU on the same clock (off in
the official code). The patches are installed by :func:`~hiresdiff.patches.hidiffusion.hidiffusion_installed`, which
``hidiffusion=true`` also installs, with the default parameters, in other methods' first phase
(:meth:`~hiresdiff.sampler.Run.switched_patches`).

Deliberate differences from the official code: state is per run and per step index (it counts calls per module,
wraps at the step count and leaks the aggressive flag into later runs); shifts come from the caller's generators
per (step, layer) instead of the global RNG per call, so chunking and batch size do not change an image.
"""

from __future__ import annotations

from hiresdiff.methods.base import MethodOutput
from hiresdiff.methods.specs.hidiffusion import HiDiffusionParams
from hiresdiff.patches.hidiffusion import hidiffusion_installed
from hiresdiff.sampler import Run
from hiresdiff.strategies.full import FullCanvas


def run_hidiffusion(run: Run, params: HiDiffusionParams) -> MethodOutput:
    s = run.settings
    with hidiffusion_installed(run, s.height, s.width, params) as clock:
        if run.source is not None:  # upscaling: SDEdit of the input picture at the target size
            return MethodOutput(latents=run.sdedit(FullCanvas(), "hidiffusion (SDEdit)", [clock]))
        return MethodOutput(latents=run.sample_canvas(s.height, s.width, name="hidiffusion", hooks=[clock]))
