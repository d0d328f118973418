"""AP-LDM (Cao et al., 2024) — SPEC §5: attentive guidance at native area, then progressive pixel-space refinement.

Algorithm:
  1. stage 1: sample a canvas of about n² pixels at the target aspect; after each scheduler step from ``delay`` on,
     ``z ← z + λ_k·(PFSA(z) − z)`` (attentive guidance, a hook — see :mod:`hiresdiff.hooks`);
  2. stage 2 (skipped when the target is the base canvas), for each fraction p_i of the progressive scheduler
     (sizes linear in area, the last the target): decode → plain bicubic upsample in pixel space (a = −0.75, no
     antialias) → clamp → encode → noise to step index ⌊N·(1 − p_i)⌋ (exact arithmetic) → denoise the remaining
     steps on the whole canvas with size conditioning of the current size.

These follow the official ``text_to_image/pipeline_apldm_sdxl.py`` (kmittle/AP-LDM). Deliberate difference: the
sub-stage sizes are rounded to the latent grid (the official floors them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from hiresdiff.config import GenerationSettings
from hiresdiff.errors import require
from hiresdiff.methods.base import Method, MethodOutput, Params
from hiresdiff.ops.schedule import start_index
from hiresdiff.sampler import Run
from hiresdiff.stages import area_steps, native_area_canvas
from hiresdiff.strategies.full import FullCanvas

#: SPEC §5 progressive schedulers: fractions of the N steps denoised per sub-stage
DEFAULT_PROGRESSIVE = (0.2,)
LARGE_PROGRESSIVE = (0.1, 0.2)
#: targets of at least this many pixels use :data:`LARGE_PROGRESSIVE`
LARGE_AREA = 4096 * 4096
#: attentive-guidance strength λ of the paper (a :class:`GenerationSettings` default for this method)
PAPER_AG_LAMBDA = 0.004


@dataclass
class APLDMParams(Params):
    """``progressive``: fractions of the N steps each sub-stage denoises, e.g. ``0.1,0.2``; by default ``0.2`` below
    4096² pixels and ``0.1,0.2`` from 4096² on. Attentive guidance is set with the ``ag_*`` settings
    (λ = ``ag_lambda`` 0.004, ``ag_delay`` 3, ``ag_exponent`` 3, ``ag_decay`` cosine)."""

    progressive: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.progressive is None:
            return
        self.progressive = tuple(float(p) for p in self.progressive)
        require(len(self.progressive) > 0, "progressive needs at least one fraction, e.g. 0.2")
        for p in self.progressive:
            require(math.isfinite(p) and 0.0 < p <= 1.0, f"progressive fractions must be in (0, 1], got {p}")

    def fractions(self, height: int, width: int) -> tuple[float, ...]:
        if self.progressive is not None:
            return self.progressive
        return LARGE_PROGRESSIVE if height * width >= LARGE_AREA else DEFAULT_PROGRESSIVE

    def check(self, settings: GenerationSettings, native: int, grid: int) -> None:
        for p in self.fractions(settings.height, settings.width):
            require(
                start_index(settings.steps, p) < settings.steps,
                f"progressive fraction {p} leaves no step to denoise at {settings.steps} steps",
            )


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


def progressive_of(strength: float, settings: GenerationSettings) -> dict[str, Any]:
    """``strength`` s → every sub-stage denoises the last fraction s (starts at step ``⌊N·(1 − s)⌋``); as many
    sub-stages as the default schedule has at this size."""
    count = len(APLDMParams().fractions(settings.height, settings.width))
    return {"progressive": (strength,) * count}


def run_apldm(run: Run, params: APLDMParams) -> MethodOutput:
    s, ad = run.settings, run.adapter
    base = native_area_canvas(s.height, s.width, ad.native_size, ad.pixel_grid)
    # upscaling: the input picture replaces stage 1 (no attentive guidance); the sub-stages start from its pixels
    pixels = None if run.source is None else run.source.expand(run.batch, -1, -1, -1)
    z = run.sample_canvas(*base, name=f"stage 1 {base[0]}×{base[1]}") if pixels is None else None
    if base == (s.height, s.width) and z is not None:
        return MethodOutput(latents=z)  # the target is the base canvas: no refinement (the official skips stage 2)
    fractions = params.fractions(s.height, s.width)
    sizes = area_steps(s.height, s.width, base, len(fractions), ad.pixel_grid)
    for i, (fraction, size) in enumerate(zip(fractions, sizes, strict=True), start=1):
        z = refine(run, z, size, fraction, f"stage 2.{i} {size[0]}×{size[1]}", pixels)
        pixels = None
    return MethodOutput(latents=z)


METHOD = Method(
    "apldm",
    "AP-LDM: attentive guidance at native area, then progressive pixel-space refinement",
    "https://github.com/kmittle/AP-LDM",
    APLDMParams,
    run_apldm,
    setting_defaults={"ag_lambda": PAPER_AG_LAMBDA},
    strength_params=progressive_of,
)
