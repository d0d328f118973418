"""AP-LDM (Cao et al., 2024) — SPEC §5: attentive guidance at native area, then progressive pixel-space refinement.

Algorithm:
  1. stage 1: sample a canvas of about n² pixels at the target aspect, SDXL size conditioning on its unrounded
     sides (:func:`stage_one_conditioning`); after each scheduler step from ``delay`` on,
     ``z ← z + λ_k·(PFSA(z) − z)`` (attentive guidance, a hook — see :mod:`hiresdiff.hooks`);
  2. stage 2 (skipped when the target is the base canvas), for each fraction p_i of the progressive scheduler
     (sizes linear in area, the last the target): decode → plain bicubic upsample in pixel space (a = −0.75, no
     antialias) → clamp → encode → noise to step index ⌊N·(1 − p_i)⌋ (exact arithmetic) → denoise the remaining
     steps on the whole canvas with size conditioning of the current size.

These follow the official ``text_to_image/pipeline_apldm_sdxl.py`` (kmittle/AP-LDM). Deliberate difference: the
sub-stage sizes are rounded to the latent grid (the official floors them).
"""

from __future__ import annotations

import torch

from hiresdiff.methods.base import MethodOutput
from hiresdiff.methods.specs.apldm import APLDMParams
from hiresdiff.ops.schedule import start_index
from hiresdiff.sampler import Run
from hiresdiff.stages import area_steps, native_area_canvas
from hiresdiff.strategies.full import FullCanvas


def refine(
    run: Run, z: torch.Tensor | None, size: tuple[int, int], fraction: float, name: str, pixels: torch.Tensor | None
) -> torch.Tensor:
    """One sub-stage: decode → plain bicubic pixel upsample → clamp → encode → re-noise to ``⌊N·(1 − p)⌋`` (exact)
    → denoise the last ``fraction`` of the steps (kmittle/AP-LDM ``pipeline_apldm_sdxl.py``, its stage 2).
    ``pixels`` (an input picture) replace the decoded image."""
    z_up = run.pixel_upsample(z, size, pixels)
    timesteps = run.begin(start_index(run.settings.steps, fraction))
    x = run.add_noise(z_up, run.noise(*size), timesteps[0])
    return run.denoise(x, timesteps, FullCanvas(), run.denoiser(size), name=name)


def stage_one_conditioning(height: int, width: int, native: int) -> tuple[int, int]:
    """SDXL original/target size of stage 1 (h × w): the base canvas's sides *before* any rounding to the latent
    grid, truncated to integers — ``(⌊n·√(H/W)⌋, ⌊n/√(H/W)⌋)`` as the official pipeline computes them (its stage-1
    latents are those sides floored to the grid; a 512×768 target at n = 256 is conditioned on 209×313 for a
    208×312 canvas)."""
    root = (height / width) ** 0.5
    return int(native * root), int(native / root)


def run_apldm(run: Run, params: APLDMParams) -> MethodOutput:
    s, ad = run.settings, run.adapter
    base = native_area_canvas(s.height, s.width, ad.native_size, ad.pixel_grid)
    # upscaling: the input picture replaces stage 1 (no attentive guidance); the sub-stages start from its pixels
    pixels = None if run.source is None else run.source.expand(run.batch, -1, -1, -1)
    size = stage_one_conditioning(s.height, s.width, ad.native_size)
    z = run.sample_canvas(*base, size, name=f"stage 1 {base[0]}×{base[1]}") if pixels is None else None
    if base == (s.height, s.width) and z is not None:
        return MethodOutput(latents=z)  # the target is the base canvas: no refinement (the official skips stage 2)
    fractions = params.fractions(s.height, s.width)
    sizes = area_steps(s.height, s.width, base, len(fractions), ad.pixel_grid)
    for i, (fraction, size) in enumerate(zip(fractions, sizes, strict=True), start=1):
        z = refine(run, z, size, fraction, f"stage 2.{i} {size[0]}×{size[1]}", pixels)
        pixels = None
    return MethodOutput(latents=z)
