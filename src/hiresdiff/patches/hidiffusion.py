"""HiDiffusion's model patches (SPEC-baselines-unet §3.1–3.2): RAU-Net and MSW-MSA on the patch seam.

* **RAD**: the downsampler conv ``dsℓ`` runs with stride 4, padding 2, dilation 2 (output ⌈h/4⌉) on its steps.
* **In-block pooling / restore**: ``avg_pool2d(2, 2, ceil_mode=True)`` after the first (resnet, transformer) pair
  of the down block at the pool level, which is what that pair hands to the skip list; bicubic resize back to the
  recorded size after up pair ``layers_per_block − 1`` of the up block at that level.
* **Upsampler sizing**: ``num_upsamplers`` raised so diffusers always passes the next skip's size to the
  upsamplers (nearest ×4 after RAD; exactly ×2 when nothing is active).
* **MSW-MSA**: self-attention within 2 × 2 shifted cyclic windows (:mod:`hiresdiff.ops.windows`) at every step;
  the shift index k is drawn per (step, layer) and per canvas sample from that sample's generator when the clock
  starts a step (the official code draws per block call from the global RNG), or cycles k = i mod 4.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F

from hiresdiff.errors import require
from hiresdiff.methods.specs.hidiffusion import HiDiffusionParams, schedule
from hiresdiff.models.adapter import ModelAdapter
from hiresdiff.ops.windows import NUM_SHIFTS, token_grid, windowed_attention
from hiresdiff.patches.clock import PatchClock
from hiresdiff.patches.context import ConvPatch, ConvSetting, OutputPatch, Patch, in_steps, patched
from hiresdiff.patches.freeu import freeu_installed
from hiresdiff.patches.processors import SelfAttentionKernel, row_samples
from hiresdiff.patches.tables import model_kind

if TYPE_CHECKING:  # the sampler installs these patches for ``hidiffusion=true`` (Run.switched_patches)
    from hiresdiff.sampler import Run

#: the resolution-aware downsampler's conv setting
RAD = ConvSetting(stride=4, padding=2, dilation=2)
#: raised ``num_upsamplers``: every upsampler gets the next skip's size (the official code adds 12)
UPSAMPLER_BOOST = 12

ShiftMode = Literal["random", "cycle"]


@dataclass
class RAUNet:
    """RAU-Net's placement and step ranges: ``rad`` (a ``dsℓ`` address or None) on ``rad_steps``, pooling/restore
    at ``pool_level`` on ``pool_steps``; ``layers_per_block`` places the restore."""

    rad: str | None
    rad_steps: range
    pool_level: int
    pool_steps: range
    layers_per_block: int
    _sizes: list[tuple[int, int]] = field(default_factory=list)

    def _pool(self, x: torch.Tensor, setting: Any) -> torch.Tensor:
        self._sizes.append((x.shape[-2], x.shape[-1]))
        return F.avg_pool2d(x, kernel_size=2, stride=2, ceil_mode=True)

    def _restore(self, x: torch.Tensor, setting: Any) -> torch.Tensor:
        return F.interpolate(x, size=self._sizes.pop(0), mode="bicubic", align_corners=False)

    def patches(self) -> list[Patch]:
        """The scheduled patches (empty ranges install nothing)."""
        out: list[Patch] = []
        if self.rad is not None and len(self.rad_steps):
            out.append(ConvPatch((self.rad,), in_steps(self.rad_steps, RAD)))
        if len(self.pool_steps):
            level, restore = self.pool_level, self.layers_per_block - 1
            pool = in_steps(self.pool_steps, "pool")
            out.append(OutputPatch((f"down{level}:attentions.0",), pool, transform=self._pool))
            out.append(OutputPatch((f"up{level}:attentions.{restore}",), pool, transform=self._restore))
        return out


class MSWState:
    """Window shift index per (canvas sample, layer) of the current step, drawn when the clock starts a step."""

    def __init__(self, latent_hw: tuple[int, int], generators: list[torch.Generator], mode: ShiftMode) -> None:
        self.latent_hw, self.generators, self.mode = latent_hw, generators, mode
        self.layers = 0
        self.shifts: list[list[int]] = []

    def new_layer(self) -> int:
        self.layers += 1
        return self.layers - 1

    def draw(self, index: int) -> None:
        """The shifts of step ``index``: ``k = i mod 4`` (cycle) or one uniform draw per layer and sample."""
        if self.mode == "cycle":
            self.shifts = [[index % NUM_SHIFTS] * self.layers for _ in self.generators]
            return
        self.shifts = [
            torch.randint(0, NUM_SHIFTS, (self.layers,), generator=g, device=g.device).tolist() for g in self.generators
        ]

    def shift(self, sample: int, layer: int) -> int:
        return self.shifts[sample % len(self.shifts)][layer] if self.shifts else 0


class MSWMSAProcessor(SelfAttentionKernel):
    """Self-attention as MSW-MSA (SPEC §3.2), a kernel on q, k, v; other calls (cross-attention, masks) run the
    wrapped attention."""

    def __init__(self, inner: Any, adapter: ModelAdapter, state: MSWState) -> None:
        self.inner, self.adapter, self.state = inner, adapter, state
        self.layer = state.new_layer()

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        b, _, n, _ = q.shape
        grid = token_grid(n, self.state.latent_hw)
        ks = [self.state.shift(sample, self.layer) for sample in row_samples(self.adapter, b)]
        out = torch.empty_like(v)
        for shift in dict.fromkeys(ks):
            rows = torch.tensor([r for r, s in enumerate(ks) if s == shift], device=q.device)
            sel = (t.index_select(0, rows) for t in (q, k, v))
            out[rows] = windowed_attention(*sel, grid, shift).to(out.dtype)
        return out


@contextmanager
def hidiffusion_patches(
    adapter: ModelAdapter,
    clock: PatchClock,
    raunet: RAUNet | None,
    msw_layers: tuple[str, ...],
    state: MSWState,
) -> Iterator[None]:
    """RAU-Net (``raunet``, None: off) and MSW-MSA on the self-attentions ``msw_layers`` installed on the UNet."""
    processors = {address: (lambda inner: MSWMSAProcessor(inner, adapter, state)) for address in msw_layers}
    if msw_layers:
        clock.listen(state.draw)
    with patched(
        adapter.unet,
        clock,
        lambda: adapter.call_info,
        raunet.patches() if raunet is not None else (),
        processors,
        {"num_upsamplers": lambda n: n + UPSAMPLER_BOOST} if raunet is not None else None,
    ):
        yield


@contextmanager
def hidiffusion_installed(
    run: Run, height: int, width: int, params: HiDiffusionParams | None = None
) -> Iterator[PatchClock]:
    """RAU-Net and MSW-MSA of ``params`` (``None``: the defaults, as ``hidiffusion=true`` applies them) installed
    for sampling a ``height × width`` canvas of ``run``, with FreeU when asked; yields the clock to hook in."""
    params = params or HiDiffusionParams()
    s, ad = run.settings, run.adapter
    require(run.control is None, "hidiffusion cannot run with ControlNet yet; drop --control or choose `direct`")
    config = ad.unet.config
    row, rad_steps, pool_steps = schedule(
        params, model_kind(ad.family, config.cross_attention_dim), min(height, width) / ad.native_size, s.steps
    )
    lpb = config.layers_per_block
    lpb = lpb[row.pool_level] if isinstance(lpb, (list, tuple)) else lpb
    raunet = RAUNet(row.rad, rad_steps, row.pool_level, pool_steps, lpb) if params.raunet else None
    state = MSWState(run.latent_size(height, width), run.generators, params.shift)  # type: ignore[arg-type]
    clock = PatchClock()
    with (
        hidiffusion_patches(ad, clock, raunet, row.msw_msa if params.msw_msa else (), state),
        freeu_installed(ad, clock, params.freeu, params.freeu_rule),
    ):
        yield clock
