"""multidiffusion — overlapping local views at the target size, no progressive phases (SPEC §1, §2.2)."""

from __future__ import annotations

from hiresdiff.methods.base import MethodOutput, ViewParams
from hiresdiff.methods.specs.multidiffusion import MultiDiffusionParams
from hiresdiff.sampler import Run
from hiresdiff.strategies.views import LocalViews


def local_views(run: Run, params: ViewParams) -> LocalViews:
    """The local-view strategy of SPEC §2.2 for this run's model and generators."""
    ad = run.adapter
    window, stride = params.latent_window(ad.native_size, ad.vae_scale_factor)
    return LocalViews(window, stride, params.jitter, run.generators, ad.vae_scale_factor)


def run_multidiffusion(run: Run, params: MultiDiffusionParams) -> MethodOutput:
    s = run.settings
    if run.source is not None:  # upscaling: SDEdit of the input picture with local views
        return MethodOutput(latents=run.sdedit(local_views(run, params), "multidiffusion (SDEdit)"))
    timesteps = run.begin(0)
    x = run.initial_noise(s.height, s.width)
    den = run.denoiser((s.height, s.width))
    return MethodOutput(latents=run.denoise(x, timesteps, local_views(run, params), den, name="multidiffusion"))
