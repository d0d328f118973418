"""AccDiffusion v2 (Lin et al., TPAMI 2025) — SPEC-baselines-progressive §4: AccDiffusion with a canny ControlNet on
the local views; the official ``accdiffusion_plus.py`` differs from v1 only in this branch.

Algorithm, on top of AccDiffusion (SPEC §3), which runs unchanged otherwise:
  1. phase 1 (or the input picture standing for a phase) runs without the ControlNet;
  2. after each phase k but the last: the (renormalised) result, decoded to 8-bit RGB, gives ``E_k`` = auto-Canny
     of every canvas sample (:func:`~hiresdiff.ops.edges.edge_maps`: thresholds from the median of all RGB values);
  3. phase k + 1: the condition is ``bicubic(E_k)`` at its pixel size (unclamped, as the official, unless
     ``clamp_condition``); each local view gets the crop under it on the canvas zero-padded like the latent, both
     CFG branches the same, with scale κ = ``control_weight`` on every step; the dilated samples get no ControlNet.

Deliberate differences from the official code: each canvas sample gets its own edges (the official crops row 0 of
the batch), the Euler index and randomness as SPEC §0.1, and the last phase's edges are not computed.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch

from hiresdiff.control import ControlCondition
from hiresdiff.images import to_uint8
from hiresdiff.methods.accdiffusion import AccDiffusion
from hiresdiff.methods.base import MethodOutput, weakly
from hiresdiff.methods.demofusion import PhaseSetup
from hiresdiff.methods.specs.accdiffusion_v2 import AccDiffusionV2Params
from hiresdiff.models.adapter import Request
from hiresdiff.ops.edges import edge_maps
from hiresdiff.sampler import Run
from hiresdiff.stages import Phase
from hiresdiff.strategies.base import Assembler, Denoiser, Strategy
from hiresdiff.strategies.views import Blend


@dataclass
class ControlWeighted:
    """``inner``'s requests with ControlNet weight ``weight`` (:attr:`~hiresdiff.models.adapter.Request.control_weight`;
    0: they see no ControlNet and no condition is cut for them)."""

    inner: Strategy
    weight: float

    def gather(self, x_in: torch.Tensor, t: torch.Tensor, den: Denoiser) -> tuple[list[Request], Assembler]:
        return self.inner.gather(x_in, t, replace(den, control_weight=self.weight))


class AccDiffusionV2(AccDiffusion):
    """AccDiffusion whose later phases steer their local views with the previous phase's edges."""

    params: AccDiffusionV2Params

    def __init__(self, run: Run, params: AccDiffusionV2Params) -> None:
        super().__init__(run, params)
        self.controlnet = run.adapter.controlnet  # the run's; on only while a later phase's edges condition it
        self.edges: torch.Tensor | None = None  # E of the previous phase (B, 3, H, W) in {0, 1}
        self.conditions: list[ControlCondition] = []  # each later phase's, in order
        if params.controlled and self.controlnet is not None:
            self.transforms.append(weakly(self.edges_of_previous))  # a bound method of itself: a cycle otherwise

    @contextmanager
    def control(self, condition: ControlCondition | None) -> Iterator[None]:
        """Inside the block the run's ControlNet condition is ``condition``; ``None``: no ControlNet at all."""
        run, ad = self.run, self.run.adapter
        saved, run.control = run.control, condition
        try:
            with ad.use_controlnet(None if condition is None else self.controlnet, ad.control_scale):
                yield
        finally:
            run.control = saved

    def __call__(self) -> torch.Tensor:
        with self.control(None):
            return super().__call__()

    def edges_of_previous(self, z_up: torch.Tensor, z: torch.Tensor, phase: Phase) -> torch.Tensor:
        """A latent transform that leaves ``z_up`` as it is: it is where the loop shows the previous phase's result
        ``z``, whose edges condition the next phase. With previews on, the loop has just decoded ``z`` as its
        preview (the same clamped decode): that one is used rather than decoding twice."""
        run = self.run
        images = run.previews[-1] if run.settings.previews and run.previews else run.decode_inner(z)
        self.edges = edge_maps(to_uint8(images), self.params.canny_sigma)
        return z_up

    def upscale(self, z_up: torch.Tensor, setup: PhaseSetup, name: str) -> torch.Tensor:
        if self.edges is None:
            return super().upscale(z_up, setup, name)
        f = self.run.adapter.vae_scale_factor
        condition = ControlCondition(self.edges.to(self.run.adapter.device), f, clamp=self.params.clamp_condition)
        self.conditions.append(condition)
        with self.control(condition):
            return super().upscale(z_up, setup, name)

    def strategy(self, phase: Phase) -> Strategy:
        blend = super().strategy(phase)
        if self.edges is None:
            return blend
        assert isinstance(blend, Blend)
        local = ControlWeighted(blend.local, self.params.control_weight)
        return replace(blend, local=local, global_=ControlWeighted(blend.global_, 0.0))


def run_accdiffusion_v2(run: Run, params: AccDiffusionV2Params) -> MethodOutput:
    return MethodOutput(latents=AccDiffusionV2(run, params)())
