"""Step hooks: edits of ``x_t`` or the prediction around a step; AP-LDM's attentive guidance (SPEC §5)."""

from __future__ import annotations

from collections.abc import Hashable

import torch

from hiresdiff.config import GenerationSettings
from hiresdiff.ops.pfsa import pfsa
from hiresdiff.ops.schedule import attentive_lambdas


class StepHook:
    """Edits around one denoising step; the defaults change nothing.

    :meth:`at_step` tells the hook the step index before anything of the step runs (the model-patch clock,
    :class:`~hiresdiff.patches.clock.PatchClock`); :meth:`signature_at` says what the hook makes the model compute at
    a step, so the cost model replays a step only where that is unchanged (:mod:`hiresdiff.cost.replay`).
    """

    def at_step(self, index: int, t: torch.Tensor) -> None:
        """Step ``index`` (position of ``t`` in the stage's N-step list, 0 = noisiest) is about to run."""

    def signature_at(self, index: int) -> Hashable:
        """What this hook makes the model compute at step ``index`` (equal values: equal cost); ``()`` for hooks
        that leave the model alone."""
        return ()

    def before_step(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x

    def on_prediction(self, t: torch.Tensor, x_in: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        return pred

    def after_step(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x


class AttentiveGuidance(StepHook):
    """``z ← z + λ_k·(PFSA(z) − z)`` right after ``scheduler.step`` on steps ``delay … N−1`` (SPEC §5).

    ``lambdas[k]`` is the strength of the k-th guided step; steps are counted per call of the hook.
    """

    def __init__(self, lambdas: list[float], delay: int) -> None:
        self.lambdas, self.delay, self.calls = lambdas, delay, 0

    def after_step(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        k = self.calls - self.delay
        self.calls += 1
        if 0 <= k < len(self.lambdas) and self.lambdas[k] != 0.0:
            x = x + self.lambdas[k] * (pfsa(x) - x)
        return x


def attentive_guidance(settings: GenerationSettings) -> AttentiveGuidance | None:
    """The hook the settings ask for (``ag_lambda > 0``), over the stage's N steps; ``None`` when off."""
    if settings.ag_lambda <= 0.0:
        return None
    count = max(0, settings.steps - settings.ag_delay)
    lambdas = attentive_lambdas(settings.ag_lambda, count, settings.ag_exponent, settings.ag_decay)
    return AttentiveGuidance(lambdas, settings.ag_delay)
