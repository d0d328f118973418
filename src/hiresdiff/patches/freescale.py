"""FreeScale's model patches (SPEC-baselines-progressive §2.2, §2.5): scale fusion of self-attention and the
restrained dilated convs.

* **Scale fusion** (:class:`ScaleFusionProcessor`, every ``attn1`` of the UNet and the active ControlNet): the
  wrapped processor runs once on all local windows of the call's rows stacked into one batch and once globally
  (all tokens, or the dilated sub-lattices stacked); the outputs are fused as ``G(L) + (Gl − G(Gl))``
  (:mod:`hiresdiff.ops.scale_fusion`). Exact against the official per-window calls because it fuses the
  processor's outputs, after ``to_out``, as the official fuses ``attn1``'s. The windows' jitter is drawn at every
  call, once per canvas sample of the call's rows from that sample's generator (the official: Python's global
  ``random``, one draw for the whole batch). At s = 1 the processor is the plain one.
* **Restrained dilation** (:func:`restrained_dilation`): dilation = padding = d on the 3 × 3 convs of the
  deepest down block's resnets, the downsampler into it and the mid block's resnets — on SDXL exactly the official
  nine (``ds1``, ``down2.res``, ``mid``); on SD 1.x/2.x (``ds2``, ``down3.res``, ``mid``) an extrapolation of the
  SDXL list (the official code is SDXL-only). Up blocks are left plain on purpose. Addresses a UNet lacks are
  skipped, as the official skips absent names.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch

from hiresdiff.models.adapter import ModelAdapter
from hiresdiff.models.self_attention import grid_at_level
from hiresdiff.ops.geometry import View, jitter_views
from hiresdiff.ops.scale_fusion import (
    average_windows,
    fuse,
    fusion_kernel,
    fusion_windows,
    lattices,
    stack_windows,
)
from hiresdiff.patches.context import ConvPatch, ConvSetting, in_steps
from hiresdiff.patches.levels import address_index, unet_levels
from hiresdiff.patches.processors import SelfAttentionPatch, row_samples


class ScaleFusionState:
    """What every scale-fusion processor of one stage shares: the canvas latent size, the scale (s_h, s_w), the
    fusion settings and the generators the windows' jitter comes from (``None``: no jitter)."""

    def __init__(
        self,
        adapter: ModelAdapter,
        latent_hw: tuple[int, int],
        scale: tuple[int, int],
        generators: list[torch.Generator] | None,
        global_mode: str = "full",
        blur_axes: str = "hwc",
        sigma: float = 1.0,
    ) -> None:
        self.adapter, self.latent_hw, self.scale, self.generators = adapter, latent_hw, scale, generators
        self.global_mode, self.blur_axes, self.sigma = global_mode, blur_axes, sigma

    def forked(self) -> ScaleFusionState:
        """The same state with jitter generators of its own (:func:`forked_generators`): the ControlNet's
        processors draw from them, so a ControlNet (at scale 0 too) leaves the UNet's jitter unchanged."""
        generators = None if self.generators is None else forked_generators(self.generators)
        scale, mode, axes = self.scale, self.global_mode, self.blur_axes
        return ScaleFusionState(self.adapter, self.latent_hw, scale, generators, mode, axes, self.sigma)

    def views(self, rows: int, grid: tuple[int, int]) -> tuple[list[list[View]], tuple[int, int]]:
        """Each row's jittered windows on ``grid`` (rows of one canvas sample share one draw) and the padding."""
        base, pad = fusion_windows(grid, self.scale)
        if self.generators is None:
            return [base] * rows, pad
        drawn: dict[int, list[View]] = {}
        for sample in row_samples(self.adapter, rows):
            if sample not in drawn:
                drawn[sample] = jitter_views(base, *grid, pad, self.generators[sample % len(self.generators)])
        return [drawn[sample] for sample in row_samples(self.adapter, rows)], pad


class ScaleFusionProcessor(SelfAttentionPatch):
    """Self-attention with FreeScale's scale fusion on a layer ``level`` downsamplings deep. Cross-attention, masked
    calls, 4-D inputs, calls whose tokens are not the canvas's grid at this level and s = 1 run the wrapped
    processor unchanged.

    Not a q, k, v kernel (:class:`~hiresdiff.patches.processors.SelfAttentionKernel`): it runs the wrapped
    processor on other token sets (windows, sub-lattices) and fuses its outputs after the output projection with a
    blur that also mixes channels, as the official fuses ``attn1``'s outputs — so it is a diffusers processor only."""

    def __init__(self, inner: Any, state: ScaleFusionState, level: int) -> None:
        self.inner, self.state, self.level = inner, state, level

    @property
    def cost_key(self) -> tuple[Any, ...]:
        """What changes this processor's work at equal shapes (the cost model's trace key): scale, global branch
        and blur."""
        return self.state.scale, self.state.global_mode, self.state.blur_axes, self.state.sigma

    def takes(self, hidden_states: torch.Tensor) -> bool:
        grid = grid_at_level(*self.state.latent_hw, self.level)
        return hidden_states.shape[1] == grid[0] * grid[1] and max(self.state.scale) > 1

    def attend_self(self, attn: Any, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        state = self.state
        grid = grid_at_level(*state.latent_hw, self.level)

        def attend(tokens: torch.Tensor) -> torch.Tensor:
            return self.inner(attn, tokens, None, None, *args, **kwargs)

        b, n, d = hidden_states.shape
        x = hidden_states.reshape(b, *grid, d)
        views, pad = state.views(b, grid)
        local = average_windows(attend(stack_windows(x, views, pad)), views, grid, pad)
        glob = self.global_output(attend, x, grid)
        out = fuse(local, glob, fusion_kernel(state.scale), state.sigma, state.blur_axes)
        return out.reshape(b, n, d)

    def global_output(self, attend: Any, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Gl (B, g_h, g_w, D): attention over every token, or over each dilated sub-lattice (one call per
        sub-lattice shape, the sub-lattices stacked), scattered back."""
        b, d = x.shape[0], x.shape[-1]
        if self.state.global_mode == "full":
            return attend(x.reshape(b, -1, d)).reshape(x.shape)
        sh, sw = self.state.scale
        out = torch.empty_like(x)
        for (h, w), starts in lattices(grid, (sh, sw)).items():
            stacked = torch.cat([x[:, a::sh, c::sw].reshape(b, h * w, d) for a, c in starts])
            parts = attend(stacked).reshape(len(starts), b, h, w, d)
            for k, (a, c) in enumerate(starts):
                out[:, a::sh, c::sw] = parts[k]
        return out


@contextmanager
def scale_fusion_installed(adapter: ModelAdapter, state: ScaleFusionState) -> Iterator[ScaleFusionState]:
    """:class:`ScaleFusionProcessor` on every ``attn1`` of the UNet and the active ControlNet while the block runs
    (restored after). The jitter is drawn inside the calls: in view-parallel runs every rank runs them all."""
    replicate = adapter.parallel.replicated() if state.generators is not None else nullcontext()
    control = state.forked()

    def wrap(module: Any, proc: Any, level: int) -> ScaleFusionProcessor:
        return ScaleFusionProcessor(proc, control if module is adapter.controlnet else state, level)

    with replicate, adapter.self_attention_patched(wrap):
        yield state


def forked_generators(generators: list[torch.Generator]) -> list[torch.Generator]:
    """One new generator per generator, seeded by one draw from it: the jitter drawn at every attention call then
    never moves the run's own stream (the next stage's noise does not depend on how many calls a step made)."""
    seeds = [int(torch.randint(0, 2**62, (1,), generator=g, device=g.device)) for g in generators]
    return [torch.Generator(device=g.device).manual_seed(seed) for g, seed in zip(generators, seeds, strict=True)]


def restrained_addresses(unet: Any) -> tuple[str, ...]:
    """The level addresses FreeScale dilates on ``unet`` of L levels: ``ds(L−2)``, ``down(L−1).res``, ``mid``
    (those it has)."""
    levels = unet_levels(unet)
    present = address_index(unet)
    return tuple(a for a in (f"ds{levels - 2}", f"down{levels - 1}.res", "mid") if a in present)


def restrained_dilation(unet: Any, d: int, steps: int) -> ConvPatch | None:
    """Dilation = padding = ``d`` on :func:`restrained_addresses` for step indices ``i < steps`` (every branch),
    ``None`` when it changes nothing (d = 1 or no step)."""
    if d <= 1 or steps <= 0:
        return None
    return ConvPatch(restrained_addresses(unet), in_steps(range(steps), ConvSetting(padding=d, dilation=d)))
