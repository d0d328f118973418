"""DiffuseHigh (Kim et al., AAAI 2025) — SPEC-baselines-progressive §1: a base canvas, then progressive pixel-space
SDEdit stages whose first steps keep the low wavelet band of the upsampled previous image.

Algorithm (the official ``pipeline_diffusehigh_sdxl.py``, SPEC §1.2):
  1. base: sample a canvas of long side n at the target's aspect (all N steps, CFG ``guidance``);
     ``I ← clamp(D(z))``;
  2. for each stage size (long sides k·n, the last the target):
     a. guidance image ``G = upsample(I)`` (bicubic, no antialias, no clamp), sharpened
        ``G ← (1 + α)·G − α·blur_σ(G)`` (3 × 3 Gaussian, reflect padding, σ ~ U[0.1, 2] per stage and image);
     b. ``z_ref = E(G)`` (posterior mean), noised to step index ``⌊N·(1 − restart)⌋`` (t = 281 of 50 steps);
     c. denoise the remaining steps on the whole canvas with CFG ``stage_guidance``; on the first K_g steps
        the prediction's x̂0 is decoded, its low band replaced: ``x̂0 ← E(IDWT(LL(G), H(clamp(D(x̂0)))))``,
        and the step taken from it (:class:`WaveletGuidance`); ``I ← clamp(D(z))`` for the next stage.
The ``paper`` preset (the research code): bilinear upsampling, no sharpening, CFG 7.5, DDIM, guided steps re-noise
the edited x̂0 with fresh noise to the next timestep.

Deliberate differences from the official code: the base canvas keeps the target's aspect (the official always
samples 1024², its ``height``/``width`` are swallowed by ``**kwargs``); an input picture keeps its aspect (the
official squeezes it to 1024²); σ comes from each image's generator (official: torchvision's global RNG); the VAE
tiles with hiresdiff's rule above the tile area (the official switches diffusers' tiling on for every call); the
research code's posterior *sample* is the posterior mean here.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from hiresdiff.errors import HiresWarning
from hiresdiff.hooks import StepHook
from hiresdiff.methods.base import MethodOutput
from hiresdiff.methods.specs.diffusehigh import DiffuseHighParams, stage_guidance, stage_sizes
from hiresdiff.ops.schedule import start_index
from hiresdiff.ops.sharpen import draw_sigma, sharpen
from hiresdiff.ops.wavelet import dwt2, swap_low
from hiresdiff.sampler import Run
from hiresdiff.stages import Phase, source_phase_index
from hiresdiff.strategies.full import FullCanvas

#: said once per FLUX run: no official FLUX settings exist
FLUX_NOTICE = (
    "diffusehigh on FLUX is experimental and untuned: the SDXL fractions (restart 0.3, 10 % guided steps) and "
    "the run's guidance for the stages"
)


class WaveletGuidance(StepHook):
    """DiffuseHigh's structure guidance on the step indices ``guided``: x̂0 of the prediction is decoded (clamped),
    its low wavelet band replaced by ``ref_low`` (the guidance image's), encoded again, and the prediction rebuilt
    from it (``from_x0``), so the scheduler steps from the edited x̂0 — for Euler exactly the official
    ``x + (x − x̂0')/σ·(σ' − σ)``. With ``renoise`` (research code) the step's result is replaced by the edited x̂0
    noised with fresh noise to the next timestep (x̂0' itself after the last one)."""

    def __init__(self, run: Run, ref_low: torch.Tensor, guided: range, wavelet: str, renoise: bool) -> None:
        self.run, self.ref_low, self.guided, self.wavelet, self.renoise = run, ref_low, guided, wavelet, renoise
        self.index: int | None = None
        self.x0: torch.Tensor | None = None

    def at_step(self, index: int, t: torch.Tensor) -> None:
        self.index, self.x0 = index, None

    def signature_at(self, index: int) -> bool:
        return index in self.guided  # guided steps run the VAE twice

    def on_prediction(self, t: torch.Tensor, x_in: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        if self.index not in self.guided:
            return pred
        run, ad = self.run, self.run.adapter
        x0 = ad.to_x0(pred, x_in, t)
        with ad.borrowed(ad.vae):  # low-VRAM: one round trip for the decode and the encode
            image = run.decode_inner(x0)
            edited = ad.encode(swap_low(image, self.ref_low, self.wavelet), run.inner_tile_area)
        self.x0 = edited.to(x0.dtype)
        return ad.from_x0(self.x0, x_in, t).to(pred.dtype)

    def after_step(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if not self.renoise or self.x0 is None or self.index is None:
            return x
        sched, run = self.run.scheduler, self.run
        following = (self.index + 1) * int(getattr(sched, "order", 1))
        if following >= len(sched.timesteps):
            return self.x0.to(x.dtype)
        noise = run.standard_normal(tuple(x.shape[1:])).to(x.dtype)
        return run.add_noise(self.x0.to(x.dtype), noise, sched.timesteps[following])


def guidance_image(run: Run, params: DiffuseHighParams, image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """G: the previous stage's image (clamped, [−1, 1]) upsampled to ``size`` without clamping (or by the run's SR
    model, ``--upscaler``), then sharpened with σ drawn from each image's generator (a constant shift and scale
    commute with both, so [−1, 1] is as good as the official [0, 1])."""

    def interpolate(x: torch.Tensor, to: tuple[int, int]) -> torch.Tensor:
        return F.interpolate(x, size=to, mode=params.upsample, align_corners=False)

    g = run.upsample_image(image, size, resample=interpolate)
    if not params.sharpen:
        return g
    low, high = params.sharpen_sigma
    return sharpen(g, [draw_sigma(gen, low, high) for gen in run.generators], params.sharpen_alpha)


def stage(
    run: Run, params: DiffuseHighParams, g: torch.Tensor, size: tuple[int, int], cond: tuple[int, int], name: str
) -> torch.Tensor:
    """One SDEdit stage from the guidance image ``g`` (``size`` pixels): encode, noise to ``⌊N·(1 − restart)⌋``,
    denoise the rest with the first K_g steps wavelet-guided; SDXL size conditioning ``cond``. Returns latents."""
    s, ad = run.settings, run.adapter
    first = start_index(s.steps, params.restart)
    timesteps = run.begin(first)
    x = run.add_noise(ad.encode(g, run.inner_tile_area), run.noise(*size), timesteps[0])
    guided = range(first, first + params.guided_steps(s.steps))
    hooks = [WaveletGuidance(run, dwt2(g, params.wavelet)[0], guided, params.wavelet, params.renoise)] if guided else []
    den = run.denoiser(cond, guidance=stage_guidance(params, ad.family, s.guidance))
    return run.denoise(x, timesteps, FullCanvas(), den, hooks, name=name)


def run_diffusehigh(run: Run, params: DiffuseHighParams) -> MethodOutput:
    s, ad = run.settings, run.adapter
    if ad.family == "flux":
        warnings.warn(FLUX_NOTICE, HiresWarning, stacklevel=2)
    sizes = stage_sizes(params, s.height, s.width, ad.native_size, ad.pixel_grid)
    first, z, image = 0, None, None
    if run.source is None:
        z = run.sample_canvas(*sizes[0], name=f"base {sizes[0][0]}×{sizes[0][1]}")
        if len(sizes) == 1:
            return MethodOutput(latents=z)  # the target is the base canvas: nothing to refine
    else:  # upscaling: the input picture is the image of the largest canvas it covers (official guidance_image)
        first = source_phase_index([Phase(*size, ad.native_size) for size in sizes], max(run.source.shape[-2:]))
        image = run.source_at(*sizes[first])
    for k, size in enumerate(sizes[first + 1 :], start=first + 1):
        if image is None:
            image = run.decode_inner(z)
        run.keep_preview(image)
        cond = sizes[0] if params.size_conditioning == "base" else size
        g = guidance_image(run, params, image, size)
        z = stage(run, params, g, size, cond, f"stage {k}/{len(sizes) - 1} {size[0]}×{size[1]}")
        image = None
    return MethodOutput(latents=z)
