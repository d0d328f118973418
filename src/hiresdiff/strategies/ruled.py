"""The whole canvas under a guidance rule chosen per step (ScaleCrafter: noise-damped CFG while i < τ_nd, CFG after).

The rule travels on the request (:attr:`~hiresdiff.models.adapter.Request.rule`), so the adapter batches its
branches into one call as for any rule; ``rule()`` is asked once per step, e.g. from a model-patch clock's index.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch

from hiresdiff.models.adapter import Request
from hiresdiff.models.guidance import GuidanceRule
from hiresdiff.strategies.base import Assembler, Denoiser
from hiresdiff.strategies.full import FullCanvas


@dataclass
class RuledCanvas:
    """:class:`~hiresdiff.strategies.full.FullCanvas` whose requests carry ``rule()`` (``None``: the default rule,
    CFG or none by the embeddings)."""

    rule: Callable[[], GuidanceRule | None]

    def gather(self, x_in: torch.Tensor, t: torch.Tensor, den: Denoiser) -> tuple[list[Request], Assembler]:
        requests, assemble = FullCanvas().gather(x_in, t, den)
        rule = self.rule()
        return [dataclasses.replace(r, rule=rule) for r in requests], assemble
