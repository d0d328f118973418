"""Upsample Guidance (SPEC-baselines-progressive §3.3): the whole canvas plus, on guided steps, the canvas pooled m×
down and predicted at the adjusted timestep τ in the same step, its band put back into the canvas's prediction.

The strategy is also the step hook that says which steps are guided (:meth:`UpsampleGuidance.signature_at`): the
low-resolution request exists only there, and the cost model replays a step only where that is unchanged.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable
from dataclasses import dataclass, field

import torch

from hiresdiff.hooks import StepHook
from hiresdiff.models.adapter import ModelAdapter, Request
from hiresdiff.models.parametrization import alpha_bar
from hiresdiff.ops.upsample_guidance import (
    epsilon_from,
    flow_low,
    guide_epsilon,
    guide_velocity,
    low_sample,
    pool,
    prediction_from_epsilon,
    tau_for,
)
from hiresdiff.strategies.base import Assembler, Denoiser
from hiresdiff.strategies.full import FullCanvas


@dataclass
class UpsampleGuidance(StepHook):
    """:class:`~hiresdiff.strategies.full.FullCanvas` with Upsample Guidance of factor ``factor`` (m) and weight
    ``weight`` (w) on the steps whose timestep exceeds ``(1 − eta)·T``; ``tau`` how τ is found
    (:data:`~hiresdiff.ops.upsample_guidance.TAU_MODES`; flow-matching models have a closed form);
    ``low_size`` the SDXL size conditioning of the low-resolution request (pixels, h × w).

    A step's gate is read at its step index, from the stage's timestep list (a second-order solver's corrector is
    guided with its predictor). With w = 0, η = 0 or m = 1 no step is guided: the requests and the prediction are
    :class:`FullCanvas`'s.
    """

    adapter: ModelAdapter
    factor: int
    weight: float
    eta: float
    low_size: tuple[int, int]
    tau: str = "nearest"
    #: whether the step in progress is guided (:meth:`at_step`)
    active: bool = field(default=False, init=False)

    def signature_at(self, index: int) -> Hashable:
        """Whether step ``index`` is guided (it then runs one more, low-resolution, request)."""
        if self.weight == 0.0 or self.factor == 1:
            return False
        sched = self.adapter.scheduler
        timesteps = sched.timesteps
        at = min(index * int(getattr(sched, "order", 1)), len(timesteps) - 1)
        return float(timesteps[at]) > (1.0 - self.eta) * self.adapter.num_train_timesteps

    def at_step(self, index: int, t: torch.Tensor) -> None:
        self.active = bool(self.signature_at(index))

    def gather(self, x_in: torch.Tensor, t: torch.Tensor, den: Denoiser) -> tuple[list[Request], Assembler]:
        requests, assemble = FullCanvas().gather(x_in, t, den)
        if not self.active:
            return requests, assemble
        m, ad = self.factor, self.adapter
        if ad.prediction_type == "flow_prediction":
            sigma = float(t) / ad.num_train_timesteps  # flow-matching timesteps are σ·T
            c, sigma_low = flow_low(sigma, m)
            y, tau = pool(x_in, m) / c, torch.tensor(sigma_low * ad.num_train_timesteps, dtype=torch.float32)

            def combine(preds: list[torch.Tensor]) -> torch.Tensor:
                return guide_velocity(preds[0], preds[1], x_in, sigma, m, self.weight)
        else:
            abar = alpha_bar(ad.scheduler, t)
            tau_value, abar_low = tau_for(ad.scheduler.alphas_cumprod, abar, m, self.tau, float(t))
            y = low_sample(x_in, abar, m)
            tau = torch.tensor(tau_value, dtype=t.dtype if self.tau == "nearest" else torch.float32)

            def combine(preds: list[torch.Tensor]) -> torch.Tensor:
                kind = ad.prediction_type
                eps = epsilon_from(preds[0], x_in, abar, kind)
                eps_low = epsilon_from(preds[1], y, abar_low, kind)
                return prediction_from_epsilon(guide_epsilon(eps, eps_low, m, self.weight), x_in, abar, kind)

        low = den.request(y, list(range(y.shape[0])))
        low = dataclasses.replace(low, size=self.low_size, timestep=tau.to(t.device), rule=requests[0].rule)
        return [*requests, low], combine
