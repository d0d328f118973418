"""Attention processors: cross-attention capture (AccDiffusion, SPEC §3) and neighborhood patch attention
(ScaleDiff NPA on UNet self-attention, SPEC §6).

The capture observes the UNet's own attention at the chosen layers (through the adapter), so the model's output is
unchanged; it additionally computes the conditional branch's cross-attention probabilities (averaged over heads)
and sums them per canvas sample. The layers are restored when the context ends.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch

from hiresdiff.models.adapter import ModelAdapter
from hiresdiff.models.guidance import COND
from hiresdiff.models.self_attention import attention_level, grid_at_level  # noqa: F401 (attention_level: tests)
from hiresdiff.ops.npa import npa_attention, npa_supported
from hiresdiff.patches.processors import NPAState, SelfAttentionKernel

#: AccDiffusion records the layers whose query grid is w/4 × w/4, i.e. two downsamplings deep
CAPTURE_LEVEL = 2


class AttentionRecorder:
    """Sums of conditional cross-attention maps per canvas sample, and how many were added (a
    :class:`~hiresdiff.models.self_attention.CrossAttentionObserver`: diffusers layers call :meth:`record`, the
    ComfyUI backend's ``attn2`` replacement :meth:`record_qk`). The rows of a call are told by the adapter's
    :attr:`~hiresdiff.models.adapter.ModelAdapter.call_info`; only the conditional branch's are recorded."""

    def __init__(self, adapter: ModelAdapter, batch: int, grid: tuple[int, int]) -> None:
        self.adapter, self.grid = adapter, grid
        self.sums: torch.Tensor | None = None
        self.counts = torch.zeros(batch)

    def _cond_rows(self, queries: torch.Tensor) -> list[int]:
        """The conditional rows of a call whose queries are the recorded grid's tokens (none otherwise)."""
        gh, gw = self.grid
        if queries.dim() != 3 or queries.shape[1] != gh * gw:
            return []
        return [i for i, (_, branch) in enumerate(self.adapter.call_info) if branch == COND]

    @torch.no_grad()
    def record(self, attn: Any, hidden_states: torch.Tensor, context: torch.Tensor) -> None:
        """A diffusers ``Attention``'s call: its probabilities as its own processor computes them."""
        rows = self._cond_rows(hidden_states)
        if not rows:
            return
        index = torch.tensor(rows, device=hidden_states.device)
        context = context.index_select(0, index)
        if getattr(attn, "norm_cross", None):
            context = attn.norm_encoder_hidden_states(context)
        query = attn.head_to_batch_dim(attn.to_q(hidden_states.index_select(0, index)))
        key = attn.head_to_batch_dim(attn.to_k(context))
        probs = attn.get_attention_scores(query, key, None).float()  # (n·heads, N, L)
        self._add(rows, probs.view(len(rows), -1, *probs.shape[1:]).mean(1))

    @torch.no_grad()
    def record_qk(self, q: torch.Tensor, k: torch.Tensor, heads: int) -> None:
        """Projected queries (B, N, heads·d) and keys (B, L, heads·d) of a call: softmax(q·kᵀ/√d) in float32."""
        rows = self._cond_rows(q)
        if not rows:
            return
        index = torch.tensor(rows, device=q.device)
        q, k = q.index_select(0, index).float(), k.index_select(0, index).float()
        n, d = len(rows), q.shape[-1] // heads
        q4 = q.view(n, q.shape[1], heads, d).transpose(1, 2)
        k4 = k.view(n, k.shape[1], heads, d).transpose(1, 2)
        probs = torch.softmax(q4 @ k4.transpose(-1, -2) * d**-0.5, dim=-1)  # (n, heads, N, L)
        self._add(rows, probs.mean(1))

    def _add(self, rows: list[int], probs: torch.Tensor) -> None:
        """Add the head-averaged probabilities (n, N, L) of ``rows`` to their samples' sums."""
        gh, gw = self.grid
        info = self.adapter.call_info
        maps = probs.permute(0, 2, 1).reshape(len(rows), -1, gh, gw)
        maps = torch.zeros(maps.shape) if maps.is_meta else maps.cpu()  # meta: FLOP counting (hiresdiff.cost)
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


@contextmanager
def capture_cross_attention(
    adapter: ModelAdapter, batch: int, latent_hw: tuple[int, int]
) -> Iterator[AttentionRecorder]:
    """Record cross-attention of the down and up blocks (not the mid block) at level :data:`CAPTURE_LEVEL`, or the
    deepest level of those blocks with cross-attention, through the adapter
    (:meth:`~hiresdiff.models.adapter.ModelAdapter.cross_attention_observed`: diffusers processors, or ComfyUI's
    ``attn2`` replacement); the model's output is unchanged.

    As the official AccDiffusion (``aggregate_attention`` over ``("up", "down")`` at the ``h/32 × w/32`` maps in
    lzhxmu/AccDiffusion ``utils.py``): conditional branch only, averaged over heads, layers and steps.
    ``latent_hw`` is the latent size of the canvas being sampled; ``batch`` its number of samples.
    """

    def choose(levels: set[int]) -> tuple[int, AttentionRecorder]:
        target = CAPTURE_LEVEL if CAPTURE_LEVEL in levels else max(levels)
        return target, AttentionRecorder(adapter, batch, grid_at_level(*latent_hw, target))

    with adapter.cross_attention_observed(choose) as recorder:
        assert isinstance(recorder, AttentionRecorder)
        with adapter.parallel.replicated():  # every rank records the same maps (view-parallel runs)
            yield recorder


class NPAProcessor(SelfAttentionKernel):
    """Self-attention with neighborhood patch attention (SPEC §6) on a layer of native grid ``native × native``, as
    a kernel on q, k, v (both backends: :class:`~hiresdiff.patches.processors.SelfAttentionKernel`).

    Layers whose current grid is too small or not a multiple of ``native/2``, and any call with an attention mask
    or cross-attention, run the wrapped attention unchanged.
    """

    def __init__(self, inner: Any, state: NPAState, level: int, native: int) -> None:
        self.inner, self.state, self.level, self.native = inner, state, level, native

    @property
    def grid(self) -> tuple[int, int]:
        return grid_at_level(*self.state.latent_hw, self.level)

    def takes(self, tokens: torch.Tensor) -> bool:
        grid = self.grid
        return tokens.shape[1] == grid[0] * grid[1] and npa_supported(grid, self.native)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        grid, b = self.grid, q.shape[0]
        shifts = self.state.shifts(b, self.native // 2)
        if all(s == shifts[0] for s in shifts):
            return npa_attention(q, k, v, grid, self.native, shifts[0])
        return torch.cat(
            [npa_attention(q[i : i + 1], k[i : i + 1], v[i : i + 1], grid, self.native, shifts[i]) for i in range(b)]
        )


@contextmanager
def neighborhood_attention(
    adapter: ModelAdapter, latent_hw: tuple[int, int], generators: list[torch.Generator] | None = None
) -> Iterator[NPAState]:
    """Install NPA on every UNet self-attention layer (``attn1``) while sampling a ``latent_hw`` canvas — and on
    the active ControlNet's, whose encoder copy sees the same canvas — as the adapter installs self-attention
    patches (:meth:`~hiresdiff.models.adapter.ModelAdapter.self_attention_patched`: diffusers processors, or
    ComfyUI's ``attn1`` replacement).

    Each layer's native grid is the native latent side after its downsamplings. ``generators`` turn on the
    random query shift. The original attention is restored afterwards. FLUX transformers get their adapter's
    ``flux_neighborhood_attention`` instead (diffusers:
    :func:`hiresdiff.patches.attention_flux.flux_neighborhood_attention`; ComfyUI: an attention override).
    """
    # query shifts are drawn inside the calls: in view-parallel runs every rank must run them all
    replicate = adapter.parallel.replicated() if generators is not None else nullcontext()
    with replicate, _installed_npa(adapter, latent_hw, generators) as state:
        yield state


@contextmanager
def _installed_npa(
    adapter: ModelAdapter, latent_hw: tuple[int, int], generators: list[torch.Generator] | None
) -> Iterator[NPAState]:
    if getattr(adapter, "family", None) == "flux":  # the backend's own hook (diffusers processors, ComfyUI's …)
        with adapter.flux_neighborhood_attention(latent_hw, generators) as flux_state:  # type: ignore[attr-defined]
            yield flux_state
        return
    state = NPAState(adapter, latent_hw, generators)

    def wrap(module: Any, inner: Any, level: int) -> NPAProcessor:
        native = grid_at_level(adapter.native_latent, adapter.native_latent, level)[0]
        return NPAProcessor(inner, state, level, native)

    with adapter.self_attention_patched(wrap):
        yield state
