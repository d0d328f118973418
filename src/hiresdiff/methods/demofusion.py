"""DemoFusion (Du et al., CVPR 2024) — SPEC §2.

Algorithm (per later phase k = 2 … K):
  1. upsample the previous clean latent (bicubic), draw one noise ε, ``z'_t = add_noise(z_up, ε, t)``;
  2. start at ``x = z'_{t_0}``; every step: skip residual ``x ← (1 − c1)·x + c1·z'_t``, ``c1 = cf(t)^α1``;
  3. ``P = (1 − c2)·P_local + c2·P_global`` (local views §2.2 + dilated sampling §2.3), ``c2 = cf(t)^α2``;
  4. one ``scheduler.step`` with ``P``;
  5. renormalise the phase's result to the phase-1 anchor statistics (μ_a, σ_a).

Upscaling an input picture: its encoding (posterior mean) at the largest phase whose long side ``k·n`` it covers
stands for that phase's result and gives the anchor; the later phases run as above.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from hiresdiff.hooks import StepHook
from hiresdiff.methods.base import MethodOutput
from hiresdiff.methods.multidiffusion import local_views
from hiresdiff.methods.specs.demofusion import DemoFusionParams
from hiresdiff.ops.resample import upsample_latent
from hiresdiff.ops.schedule import cosine_factor
from hiresdiff.ops.stats import renormalise, scalar_stats
from hiresdiff.sampler import Run
from hiresdiff.stages import Phase, progressive_phases, source_phase_index
from hiresdiff.strategies.base import Strategy
from hiresdiff.strategies.views import Blend, DilatedSampling


class SkipResidual(StepHook):
    """``x ← (1 − c1)·x + c1·z'_t`` with ``c1 = cf(t)^α1`` and ``z'_t`` the noised upsampled latent (SPEC §2.3.1)."""

    def __init__(self, run: Run, reference: torch.Tensor, noise: torch.Tensor, alpha1: float) -> None:
        self.run, self.reference, self.noise, self.alpha1 = run, reference, noise, alpha1

    def before_step(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        c1 = cosine_factor(float(t), self.run.adapter.num_train_timesteps) ** self.alpha1
        return (1.0 - c1) * x + c1 * self.run.add_noise(self.reference, self.noise, t)


def fused_strategy(run: Run, params: DemoFusionParams, phase: Phase) -> Strategy:
    """Local views blended with dilated sampling by ``c2 = cf(t)^α2`` (SPEC §2.3 steps 2–4)."""
    big_t = run.adapter.num_train_timesteps
    dilated = DilatedSampling(phase.dilation, params.sigma, params.alpha3, big_t)
    return Blend(local_views(run, params), dilated, lambda t: cosine_factor(t, big_t) ** params.alpha2)


@dataclass
class PhaseSetup:
    """How one later phase is denoised; APT edits it (shortcut start, scale-aware scheduler, relabelling)."""

    phase: Phase
    start_step: int
    scheduler: Any | None = None
    timestep_map: Callable[[torch.Tensor], torch.Tensor] | None = None


#: edits the upsampled latent before noising: ``(z_up, z_previous, phase) → z_up`` (APT statistical matching)
LatentTransform = Callable[[torch.Tensor, torch.Tensor, Phase], torch.Tensor]


class Progressive:
    """DemoFusion's phase loop (SPEC §2.1) with the seams its hosts and APT use.

    ``first_phase`` and ``strategy`` are overridden by AccDiffusion; APT appends ``transforms`` (applied to the
    upsampled latent) and ``configure`` callbacks (applied to each later phase's :class:`PhaseSetup`).
    """

    def __init__(self, run: Run, params: DemoFusionParams) -> None:
        self.run, self.params = run, params
        self.transforms: list[LatentTransform] = []
        self.configure: list[Callable[[PhaseSetup], None]] = []

    def first_phase(self, phase: Phase, name: str) -> torch.Tensor:
        s = self.run.settings
        return self.run.sample_canvas(phase.height, phase.width, size=(s.height, s.width), name=name)

    def phase_from_source(self, phases: list[Phase], index: int) -> torch.Tensor:
        """An input picture stands for phase ``index``'s result: its encoding at that phase's size."""
        return self.run.encode_source(phases[index].height, phases[index].width)

    def strategy(self, phase: Phase) -> Strategy:
        return fused_strategy(self.run, self.params, phase)

    def upscale(self, z_up: torch.Tensor, setup: PhaseSetup, name: str) -> torch.Tensor:
        """Denoise one later phase from the upsampled clean latent ``z_up`` (SPEC §2.1, §2.3)."""
        run, s, phase = self.run, self.run.settings, setup.phase
        strategy = self.strategy(phase)
        with run.use_scheduler(setup.scheduler):
            timesteps = run.begin(setup.start_step)
            noise = run.noise(phase.height, phase.width)
            x = run.add_noise(z_up, noise, timesteps[0])
            den = run.denoiser((s.height, s.width), timestep_map=setup.timestep_map)
            hook = SkipResidual(run, z_up, noise, self.params.alpha1)
            return run.denoise(x, timesteps, strategy, den, [hook], name=name)

    def __call__(self) -> torch.Tensor:
        run, s, ad = self.run, self.run.settings, self.run.adapter
        phases = progressive_phases(s.height, s.width, ad.native_size, ad.pixel_grid)
        count = len(phases)
        if run.source is None:
            first = 0
            z = self.first_phase(phases[0], f"phase 1/{count}")
        else:  # upscaling: the input stands for the largest phase it covers; the anchor comes from it
            first = source_phase_index(phases, max(run.source.shape[-2:]))
            z = self.phase_from_source(phases, first)
        anchor = scalar_stats(z)
        for k, phase in enumerate(phases[first + 1 :], start=first + 2):
            run.add_preview(z)
            z_up = upsample_latent(z, run.latent_size(phase.height, phase.width))
            for transform in self.transforms:
                z_up = transform(z_up, z, phase)
            setup = PhaseSetup(phase, self.params.start_step)
            for edit in self.configure:
                edit(setup)
            z = self.upscale(z_up, setup, f"phase {k}/{count} {phase.height}×{phase.width}")
            z = renormalise(z, *anchor)
        return z


def run_demofusion(run: Run, params: DemoFusionParams) -> MethodOutput:
    return MethodOutput(latents=Progressive(run, params)())
