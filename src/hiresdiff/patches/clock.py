"""The step clock of model patches: the sampler tells it the step index, patches read it (SPEC-baselines-unet §0.1).

Scheduled patches switch on the index i of the step being denoised (0 = noisiest, position of t in the stage's
N-step list), never on a count of model calls: chunked batches, ControlNet, Heun's two calls and interrupted runs
would move a call counter (HiDiffusion's official code has that bug, SPEC §3.3).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable

import torch

from hiresdiff.hooks import StepHook

#: what a patch schedule says about step i (equal values: the model computes the same thing at both steps)
Signer = Callable[[int], Hashable]


class PatchClock(StepHook):
    """A :class:`~hiresdiff.hooks.StepHook` holding the current step (``index``, ``t``), set in :meth:`at_step`.

    ``index`` is ``None`` outside a denoising loop (model calls then see every patch plain). Listeners run once per
    step (MSW-MSA draws its window shifts there); signers describe the installed patches' state at a step for the
    cost model (:meth:`signature_at`).
    """

    def __init__(self) -> None:
        self.index: int | None = None
        self.t: torch.Tensor | None = None
        self._listeners: list[Callable[[int], None]] = []
        self._signers: list[Signer] = []

    def at_step(self, index: int, t: torch.Tensor) -> None:
        self.index, self.t = index, t
        for listener in self._listeners:
            listener(index)

    def listen(self, listener: Callable[[int], None]) -> None:
        """Call ``listener(index)`` at the start of every step."""
        self._listeners.append(listener)

    def sign(self, signer: Signer) -> Callable[[], None]:
        """Add a patch schedule's state to :meth:`signature_at`; returns the function that removes it again."""
        self._signers.append(signer)
        return lambda: self._signers.remove(signer)

    def signature_at(self, index: int) -> Hashable:
        """The state of every patch on this clock at step ``index``."""
        return tuple(signer(index) for signer in self._signers)

    def signature(self) -> Hashable:
        """The state of every patch now (``None`` outside a loop: all plain)."""
        return None if self.index is None else self.signature_at(self.index)
