"""ScaleDiff (SPEC §6): native canvas, then doubling stages with LFM reference, restart, NPA and structure guidance.

Algorithm, per stage after the native one:
  1. ``Z_LU`` = bicubic latent upsample of the previous latent; ``Z_RU`` = encoding of the plain bicubic pixel
     upsample (a = −0.75, no antialias, clamped after the upsample) of the previous image; reference
     ``Z_ref = Z_RU − low(Z_RU) + low(Z_LU)`` (latent frequency mixing, low-pass side ``int(side·f)``);
  2. noise ``Z_ref`` to step index ``⌊N·(1 − ρ)⌋`` (exact arithmetic) and denoise the remaining steps on the
     whole canvas with neighborhood patch attention replacing self-attention;
  3. structure guidance at every step: ``x̂0 ← x̂0 + γ_t·(low(Z_ref) − low(x̂0))`` before the scheduler step.

``Z_RU`` is the VAE posterior **mean** (deterministic); the official code (KSH00906/ScaleDiff) samples the
posterior, which adds VAE noise drawn outside the caller's generator.

Restart ratio ρ for SDXL/SD: 0.4, the default of the official README's parameter table (``restart_ratio`` 0.4
SDXL, 0.6 FLUX), consistent with the paper's noise-timestep ablation (Table 4: τ = 400 has SDXL's best FID; ρ = 0.4
of 50 leading-spaced steps restarts at t = 381). The official SDXL example script's ``restart_ratio = 0.6`` is
a demonstration value, not the evaluated setting.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from hiresdiff.hooks import StepHook
from hiresdiff.methods.base import MethodOutput
from hiresdiff.methods.specs.scalediff import ScaleDiffParams
from hiresdiff.ops.frequency import frequency_mix, low_pass
from hiresdiff.ops.resample import upsample_latent
from hiresdiff.ops.schedule import start_index
from hiresdiff.patches.attention import neighborhood_attention
from hiresdiff.sampler import Run
from hiresdiff.stages import Phase, doubling_phases, source_phase_index
from hiresdiff.strategies.full import FullCanvas

#: SPEC §6 defaults per model family: (restart ratio ρ, low-pass factor f)
FAMILY_DEFAULTS: dict[str, tuple[float, float]] = {"sd": (0.4, 1 / 8), "sdxl": (0.4, 1 / 8), "flux": (0.6, 1 / 4)}
#: FLUX-schnell (no guidance embedding) restarts at half its steps
SCHNELL_RESTART = 0.5


class StructureGuidance(StepHook):
    """``x̂0 ← x̂0 + γ_t·(low(Z_ref) − low(x̂0))`` on the prediction, before the scheduler step (SPEC §6)."""

    def __init__(self, run: Run, reference: torch.Tensor, factor: float, first: torch.Tensor) -> None:
        self.run, self.factor, self.first = run, factor, first
        self.low_reference = low_pass(reference, factor)

    def on_prediction(self, t: torch.Tensor, x_in: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        ad = self.run.adapter
        x0 = ad.to_x0(pred, x_in, t)
        gamma = ad.structure_gamma(t, self.first)
        return ad.from_x0(x0 + gamma * (self.low_reference - low_pass(x0, self.factor)), x_in, t)


def defaults(run: Run, params: ScaleDiffParams) -> tuple[float, float]:
    """(ρ, f) for this run's model family unless set."""
    ad = run.adapter
    rho, factor = FAMILY_DEFAULTS[ad.family]
    if ad.family == "flux" and not getattr(ad, "guidance_distilled", True):
        rho = SCHNELL_RESTART
    return params.restart_ratio or rho, params.lfm_factor or factor


def upscale_stage(
    run: Run, params: ScaleDiffParams, z: torch.Tensor, phase: Phase, name: str, pixels: torch.Tensor | None = None
) -> torch.Tensor:
    """One doubling stage: LFM reference → restart at ``⌊N(1 − ρ)⌋`` → NPA + SG denoising. ``pixels``: the input
    picture that ``z`` encodes (``Z_RU`` then comes from it instead of a decode)."""
    ad, s = run.adapter, run.settings
    rho, factor = defaults(run, params)
    size = (phase.height, phase.width)
    latent_hw = run.latent_size(*size)
    z_ru = run.pixel_upsample(z, size, pixels)
    reference = frequency_mix(z_ru, upsample_latent(z, latent_hw), factor) if params.lfm else z_ru
    timesteps = run.begin(start_index(s.steps, rho))
    x = run.add_noise(reference, run.noise(*size), timesteps[0])
    hooks = [StructureGuidance(run, reference, factor, timesteps[0])] if params.structure_guidance else []
    shift_generators = run.generators if params.query_shift else None
    attention = neighborhood_attention(ad, latent_hw, shift_generators) if params.npa else nullcontext()
    with attention:
        return run.denoise(x, timesteps, FullCanvas(), run.denoiser(size), hooks, name=name)


def run_scalediff(run: Run, params: ScaleDiffParams) -> MethodOutput:
    s, ad = run.settings, run.adapter
    phases = doubling_phases(s.height, s.width, ad.native_size, ad.pixel_grid)
    first, pixels = 0, None
    if run.source is None:
        z = run.sample_canvas(phases[0].height, phases[0].width, name=f"stage 1/{len(phases)}")
    else:  # upscaling: the input is the result of the largest stage it covers (Z_RU from its pixels)
        first = source_phase_index(phases, max(run.source.shape[-2:]))
        pixels = run.source_at(phases[first].height, phases[first].width)
        z = run.adapter.encode(pixels, s.decode_tile_area)
    for k, phase in enumerate(phases[first + 1 :], start=first + 2):
        z = upscale_stage(run, params, z, phase, f"stage {k}/{len(phases)} {phase.height}×{phase.width}", pixels)
        pixels = None
    return MethodOutput(latents=z)
