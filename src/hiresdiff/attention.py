"""Attention processors: cross-attention capture for AccDiffusion (SPEC §3).

The capture wraps the UNet's own processors at the chosen layers, so the model's output is unchanged; it
additionally computes the conditional branch's cross-attention probabilities (averaged over heads) and sums them
per canvas sample. Processors are restored when the context ends.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from hiresdiff.models.adapter import ModelAdapter

#: AccDiffusion records the layers whose query grid is w/4 × w/4, i.e. two downsamplings deep
CAPTURE_LEVEL = 2


def attention_level(name: str, num_levels: int) -> int:
    """Resolution level (number of downsamplings) of the UNet attention processor called ``name``."""
    block, index = name.split(".")[:2]
    if block == "down_blocks":
        return int(index)
    if block == "up_blocks":
        return num_levels - 1 - int(index)
    return num_levels - 1  # mid_block


def grid_at_level(height: int, width: int, level: int) -> tuple[int, int]:
    """Query grid of a ``height × width`` latent after ``level`` stride-2 downsamplings (ceil, as the convs do)."""
    for _ in range(level):
        height, width = -(-height // 2), -(-width // 2)
    return height, width


class AttentionRecorder:
    """Sums of conditional cross-attention maps per canvas sample, and how many were added."""

    def __init__(self, adapter: ModelAdapter, batch: int, grid: tuple[int, int]) -> None:
        self.adapter, self.grid = adapter, grid
        self.sums: torch.Tensor | None = None
        self.counts = torch.zeros(batch)

    @torch.no_grad()
    def record(self, attn: Any, hidden_states: torch.Tensor, context: torch.Tensor) -> None:
        gh, gw = self.grid
        if hidden_states.dim() != 3 or hidden_states.shape[1] != gh * gw:
            return
        info = self.adapter.call_info
        rows = [i for i, (_, cond) in enumerate(info) if cond]
        if not rows:
            return
        index = torch.tensor(rows, device=hidden_states.device)
        context = context.index_select(0, index)
        if getattr(attn, "norm_cross", None):
            context = attn.norm_encoder_hidden_states(context)
        query = attn.head_to_batch_dim(attn.to_q(hidden_states.index_select(0, index)))
        key = attn.head_to_batch_dim(attn.to_k(context))
        probs = attn.get_attention_scores(query, key, None).float()  # (n·heads, N, L)
        probs = probs.view(len(rows), -1, *probs.shape[1:]).mean(1)  # (n, N, L)
        maps = probs.permute(0, 2, 1).reshape(len(rows), -1, gh, gw).cpu()
        if self.sums is None:
            self.sums = torch.zeros(len(self.counts), maps.shape[1], gh, gw)
        for k, row in enumerate(rows):
            sample = info[row][0]
            self.sums[sample] += maps[k]
            self.counts[sample] += 1

    def maps(self) -> torch.Tensor:
        """Average maps (B, tokens, gh, gw) over heads, layers and steps."""
        if self.sums is None:
            raise RuntimeError("no cross-attention was recorded")
        return self.sums / self.counts.clamp_min(1).view(-1, 1, 1, 1)


class CaptureProcessor:
    """Runs the wrapped processor unchanged and hands cross-attention inputs to the recorder."""

    def __init__(self, inner: Any, recorder: AttentionRecorder) -> None:
        self.inner, self.recorder = inner, recorder

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        out = self.inner(attn, hidden_states, encoder_hidden_states, *args, **kwargs)
        if encoder_hidden_states is not None:
            self.recorder.record(attn, hidden_states, encoder_hidden_states)
        return out


@contextmanager
def capture_cross_attention(
    adapter: ModelAdapter, batch: int, latent_hw: tuple[int, int]
) -> Iterator[AttentionRecorder]:
    """Record cross-attention at level :data:`CAPTURE_LEVEL` (or the deepest level with cross-attention).

    ``latent_hw`` is the latent size of the canvas being sampled; ``batch`` its number of samples.
    """
    unet = adapter.unet
    original = dict(unet.attn_processors)
    num_levels = len(unet.config.down_block_types)
    levels = {n: attention_level(n, num_levels) for n in original if n.endswith("attn2.processor")}
    target = CAPTURE_LEVEL if CAPTURE_LEVEL in levels.values() else max(levels.values())
    recorder = AttentionRecorder(adapter, batch, grid_at_level(*latent_hw, target))
    wrapped = {n: CaptureProcessor(p, recorder) if levels.get(n) == target else p for n, p in original.items()}
    unet.set_attn_processor(wrapped)
    try:
        yield recorder
    finally:
        unet.set_attn_processor(original)
