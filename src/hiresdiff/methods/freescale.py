"""FreeScale (Qiu et al., ICCV 2025) — SPEC-baselines-progressive §2: a base canvas, then a self-cascade of pixel
SDEdit stages with DemoFusion's skip residual, restrained dilated convs and scale fusion of self-attention.

Algorithm (the official ``pipeline_freescale.py``, SPEC §2.2):
  1. base: sample a canvas of long side n at the target's aspect (all N steps, plain attention);
  2. for each later stage R_k = (H, W) (long sides 2n, 4n, …, the last the target):
     a. ``Z = E(bicubic(D(z), (H, W)))`` (no clamp), one noise ε, ``z'_t = add_noise(Z, ε, t)``;
     b. start at step r = ⌊N·restart⌋ (15 of 50, t = 681) from ``x = z'_{t_r}``;
     c. every step i ≥ r: skip residual ``x ← (1 − c)·x + c·z'_t``, c = cf(t)^γ (DemoFusion's, γ = 2);
        the restrained convs dilated by d = W//n for i < ⌊N·dilate_until⌋ (35 of 50); every self-attention
        fuses windowed and global attention (:mod:`hiresdiff.patches.freescale`); one CFG step;
  FreeU (``official`` preset) runs in every stage, the base included. SDXL size conditioning is the base canvas's
  in every stage (the official conditions on 1024² throughout).
SD 1.x/2.x run with the restrained layer list extrapolated from SDXL's (deepest down block, the downsampler into
it, the mid block); the official code is SDXL-only. FLUX is refused: it has no convs or skips to patch, and its
attention part (the authors' CineScale does it on a DiT) is not built.

Deliberate differences from the official code: the base canvas keeps the target's aspect (official: always 1024²);
all randomness comes from the caller's generators (official: the jitter from Python's ``random``, the encode
sample and the re-noise noise from torch's global RNG); the re-encode takes the posterior mean (official: a sample);
the stages' windows jitter per canvas sample; windows under 8 tokens (j = 0) and non-square stages work
(official: an empty slice, SPEC §2.4); the VAE tiles with hiresdiff's rule (official: diffusers' tiling always on).
"""

from __future__ import annotations

from contextlib import ExitStack

import torch
import torch.nn.functional as F

from hiresdiff.methods.base import MethodOutput
from hiresdiff.methods.demofusion import SkipResidual
from hiresdiff.methods.specs.freescale import FreeScaleParams
from hiresdiff.ops.scale_fusion import fusion_scale
from hiresdiff.patches.clock import PatchClock
from hiresdiff.patches.context import patched
from hiresdiff.patches.freescale import (
    ScaleFusionState,
    forked_generators,
    restrained_dilation,
    scale_fusion_installed,
)
from hiresdiff.patches.freeu import freeu_installed
from hiresdiff.sampler import Run
from hiresdiff.stages import Phase, source_phase_index
from hiresdiff.strategies.full import FullCanvas


def bicubic(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Plain bicubic resize without clamping (the official ``F.interpolate(..., mode="bicubic")``)."""
    return F.interpolate(images, size=size, mode="bicubic", align_corners=False)


def stage(
    run: Run,
    params: FreeScaleParams,
    clock: PatchClock,
    z_up: torch.Tensor,
    size: tuple[int, int],
    cond: tuple[int, int],
    name: str,
) -> torch.Tensor:
    """One later stage from the upsampled clean latent ``z_up`` of a ``size`` canvas (steps b–c above), with SDXL
    size conditioning ``cond``; ``clock`` is the run's patch clock (FreeU follows it too). Returns latents."""
    s, ad = run.settings, run.adapter
    timesteps = run.begin(params.restart_index(s.steps))
    noise = run.noise(*size)
    x = run.add_noise(z_up, noise, timesteps[0])
    hooks = [clock, SkipResidual(run, z_up, noise, params.cosine_scale)]
    scale = fusion_scale(*size, ad.native_size)
    with ExitStack() as stack:
        dilation = restrained_dilation(ad.unet, size[1] // ad.native_size, params.dilated_steps(s.steps))
        if dilation is not None:
            stack.enter_context(patched(ad.unet, clock, lambda: ad.call_info, [dilation]))
        if params.scale_fusion:
            fusion = ScaleFusionState(
                ad,
                run.latent_size(*size),
                scale,
                forked_generators(run.generators),
                params.global_mode,
                params.blur_axes,
                params.blur_sigma,
            )
            stack.enter_context(scale_fusion_installed(ad, fusion))
        return run.denoise(x, timesteps, FullCanvas(), run.denoiser(cond), hooks, name=name)


def run_freescale(run: Run, params: FreeScaleParams) -> MethodOutput:
    s, ad = run.settings, run.adapter
    sizes = params.canvases(s.height, s.width, ad.native_size, ad.pixel_grid)
    clock = PatchClock()
    with freeu_installed(ad, clock, params.freeu, params.freeu_rule):
        first, z, pixels = 0, None, None
        if run.source is None:
            z = run.sample_canvas(*sizes[0], name=f"base {sizes[0][0]}×{sizes[0][1]}", hooks=[clock])
        else:  # upscaling: the input picture stands for the largest canvas it covers; its pixels feed the next
            first = source_phase_index([Phase(*size, ad.native_size) for size in sizes], max(run.source.shape[-2:]))
            pixels = run.source.expand(run.batch, -1, -1, -1)
        for k, size in enumerate(sizes[first + 1 :], start=first + 1):
            z_up = run.pixel_upsample(z, size, pixels, resample=bicubic)
            z = stage(run, params, clock, z_up, size, sizes[0], f"stage {k}/{len(sizes) - 1} {size[0]}×{size[1]}")
            pixels = None
        if z is None:  # the input picture covers the target: SDEdit it there
            z = stage(run, params, clock, run.encode_source(*sizes[-1]), sizes[-1], sizes[0], "stage (input)")
    return MethodOutput(latents=z)
