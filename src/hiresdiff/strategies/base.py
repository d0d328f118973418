"""What a spatial strategy is: ``(x_in, t) → requests`` plus an assembler of their predictions.

A strategy never calls the model itself. It cuts the (scaled) canvas into requests; the :class:`Denoiser` batches
the requests of every strategy of the step together (SPEC §0.1: one prediction for the whole canvas per step) and
the assembler fuses the predictions back into one canvas-sized prediction.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from hiresdiff.control import ControlCondition
from hiresdiff.models.adapter import ModelAdapter, PromptEmbeds, Request

Assembler = Callable[[list[torch.Tensor]], torch.Tensor]


@dataclass
class Denoiser:
    """The model as a strategy sees it: prompts, guidance, SDXL size conditioning and the batch budget.

    ``rows[b]`` is the prompt row of canvas sample ``b``; ``timestep_map`` (optional) changes the timestep the
    model is given (APT's ``relabel`` mode); ``control`` is the ControlNet condition of the run, which the
    strategies cut per request (:mod:`hiresdiff.control`), and ``control_weight`` the share of the run's ControlNet
    scale its requests get (:attr:`Request.control_weight`; 0: no ControlNet, no condition cut).
    """

    adapter: ModelAdapter
    embeds: PromptEmbeds
    rows: list[int]
    guidance: float
    size: tuple[int, int]
    max_batch: int
    timestep_map: Callable[[torch.Tensor], torch.Tensor] | None = None
    control: ControlCondition | None = None
    control_weight: float = 1.0

    def request(
        self,
        x: torch.Tensor,
        samples: list[int],
        crops: list[tuple[int, int]] | None = None,
        *,
        embeds: PromptEmbeds | None = None,
        rows: list[int] | None = None,
        guidance: float | None = None,
        control: Callable[[ControlCondition], torch.Tensor] | None = None,
    ) -> Request:
        """A request for views ``x`` belonging to canvas samples ``samples`` (crop corners in pixels).

        ``control`` cuts the views' ControlNet conditions from the run's control image (default: the whole image
        at the views' own pixel size, right for full canvases and dilated samples); unused without a ControlNet.
        """
        cond = None
        if self.control is not None and self.control_weight != 0.0:
            cond = self.control.full(x.shape[-2:], x.shape[0], samples) if control is None else control(self.control)
        return Request(
            x=x,
            rows=rows if rows is not None else [self.rows[b] for b in samples],
            crops=crops if crops is not None else [(0, 0)] * len(samples),
            embeds=embeds if embeds is not None else self.embeds,
            guidance=self.guidance if guidance is None else guidance,
            size=self.size,
            samples=list(samples),
            control=cond,
            control_weight=self.control_weight,
        )

    def predict(self, requests: list[Request], t: torch.Tensor) -> list[torch.Tensor]:
        """Predictions at timestep ``t`` (given to the model through ``timestep_map`` when set: APT relabel)."""
        t_model = self.timestep_map(t) if self.timestep_map is not None else t
        return self.adapter.predict(requests, t_model, self.max_batch)


class Strategy(Protocol):
    """Turns the scaled canvas ``x_in`` at timestep ``t`` into requests and an assembler."""

    def gather(self, x_in: torch.Tensor, t: torch.Tensor, den: Denoiser) -> tuple[list[Request], Assembler]: ...
