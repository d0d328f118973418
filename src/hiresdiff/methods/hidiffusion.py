"""HiDiffusion (SPEC-baselines-unet §3): the base model at the target size with RAU-Net and MSW-MSA.

Per step i of the one full-canvas loop (the step clock sets i; nothing counts model calls):
  1. MSW-MSA: every self-attention of the table's layers attends within 2 × 2 shifted windows, the shift index
     drawn per (step, layer) from each image's generator;
  2. RAU-Net: the resolution-aware downsampler (stride 4, dilation 2) on its steps, the in-block pooling/restore on
     its steps (:func:`hiresdiff.methods.specs.hidiffusion.schedule`), the upsamplers sized to the next skip;
  3. one prediction (CFG), one scheduler step (DDIM η = 1 in the ``official`` preset).
An input image is SDEdited at the target size as in ``direct``. ``freeu=true`` adds FreeU on the same clock (off in
the official code). ``hidiffusion=true`` on other methods installs this context in their first phase
(:meth:`~hiresdiff.sampler.Run.switched_patches`).

Deliberate differences from the official code: state is per run and per step index (it counts calls per module,
wraps at the step count and leaks the aggressive flag into later runs); shifts come from the caller's generators
per (step, layer) instead of the global RNG per call, so chunking and batch size do not change an image.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from hiresdiff.errors import require
from hiresdiff.methods.base import MethodOutput
from hiresdiff.methods.specs.hidiffusion import HiDiffusionParams, schedule
from hiresdiff.patches.clock import PatchClock
from hiresdiff.patches.freeu import freeu_installed
from hiresdiff.patches.hidiffusion import MSWState, RAUNet, hidiffusion_patches
from hiresdiff.patches.tables import model_kind
from hiresdiff.strategies.full import FullCanvas

if TYPE_CHECKING:  # the sampler installs this method's patches for ``hidiffusion=true`` (Run.switched_patches)
    from hiresdiff.sampler import Run


@contextmanager
def hidiffusion(run: Run, params: HiDiffusionParams, height: int, width: int) -> Iterator[PatchClock]:
    """RAU-Net and MSW-MSA installed for sampling a ``height × width`` canvas; yields the clock to hook in."""
    s, ad = run.settings, run.adapter
    require(run.control is None, "hidiffusion cannot run with ControlNet yet; drop --control or choose `direct`")
    config = ad.unet.config
    row, rad_steps, pool_steps = schedule(
        params, model_kind(ad.family, config.cross_attention_dim), min(height, width) / ad.native_size, s.steps
    )
    lpb = config.layers_per_block
    lpb = lpb[row.pool_level] if isinstance(lpb, (list, tuple)) else lpb
    raunet = RAUNet(row.rad, rad_steps, row.pool_level, pool_steps, lpb) if params.raunet else None
    state = MSWState(run.latent_size(height, width), run.generators, params.shift)  # type: ignore[arg-type]
    clock = PatchClock()
    with (
        hidiffusion_patches(ad, clock, raunet, row.msw_msa if params.msw_msa else (), state),
        freeu_installed(ad, clock, params.freeu, params.freeu_rule),
    ):
        yield clock


def run_hidiffusion(run: Run, params: HiDiffusionParams) -> MethodOutput:
    s = run.settings
    with hidiffusion(run, params, s.height, s.width) as clock:
        if run.source is not None:  # upscaling: SDEdit of the input picture at the target size
            return MethodOutput(latents=run.sdedit(FullCanvas(), "hidiffusion (SDEdit)", [clock]))
        return MethodOutput(latents=run.sample_canvas(s.height, s.width, name="hidiffusion", hooks=[clock]))
