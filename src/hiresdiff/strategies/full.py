"""The whole canvas in one prediction (direct sampling, DemoFusion phase 1)."""

from __future__ import annotations

import torch

from hiresdiff.models.adapter import Request
from hiresdiff.strategies.base import Assembler, Denoiser


class FullCanvas:
    """Predict the canvas as it is, crop coordinates (0, 0)."""

    def gather(self, x_in: torch.Tensor, t: torch.Tensor, den: Denoiser) -> tuple[list[Request], Assembler]:
        req = den.request(x_in, list(range(x_in.shape[0])))
        return [req], lambda preds: preds[0]
