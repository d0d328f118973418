"""Will a request fit in memory? The peak estimated from the cost model's shape-only run, checked against the
device's free memory before any weights load, with what would fit when it does not (issue: reliability).

The cost model (:mod:`hiresdiff.cost.memory`) measures, in float32, each component's weights and its largest
call: the canvas bytes alive when it starts plus the call's own activations. The estimate at the run's dtype is

    peak = max( max over components c of  resident(c) + canvas(c) + activations(c) · bytes(dtype_c) / 4,
                max_c resident(c) + canvas peak between calls )

where ``resident(c)`` is every weight on the device (``low_vram``: only ``c``'s own, the denoiser's together with
the ControlNet's — the denoiser steps off the device while the text encoders or the VAE run; on an accelerator
otherwise every weight but the text encoders', which come to the device only for the prompt, :func:`parks_text`) and
``dtype_c`` is the run dtype (the VAE: float32 when its config forces an upcast of float16). It leaves out the
framework's own workspace and allocator fragmentation, so it is a lower bound that real runs exceed by some
hundreds of MiB.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hiresdiff.cost.meta import CallPeak
from hiresdiff.cost.model import CostReport
from hiresdiff.placement import parks_text

GIB = 2**30
#: what the CUDA context takes of a card before a run (its free memory is the rest), for estimates of a card not
#: at hand (the README's memory table, ``gpu_bench --card``)
CARD_CONTEXT = GIB // 2
#: on the device together while the denoiser runs; in low-VRAM mode every other component runs alone
_DENOISING = ("denoiser", "controlnet")
_TEXT = "text_encoder"


def gib(n: float) -> str:
    """Bytes for people: ``12.3 GiB``, ``48 MiB``."""
    return f"{n / GIB:.1f} GiB" if n >= GIB else f"{n / 2**20:.0f} MiB"


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes of one generation at its dtype: ``weights`` and the largest call ``peaks`` per component, and the
    ``canvas`` peak of the orchestration itself (e.g. blending decoded tiles); ``text_parked``: outside low-VRAM
    mode the text encoders are on the device only while they run (:func:`parks_text`)."""

    weights: dict[str, int]
    peaks: dict[str, CallPeak]
    low_vram: bool
    canvas: int = 0
    text_parked: bool = False

    @classmethod
    def of(cls, report: CostReport, dtype: torch.dtype, low_vram: bool, device: str = "cpu") -> MemoryEstimate:
        """The report's float32 measurements at ``dtype``, for a run on ``device``."""
        parts = (report.weights_bytes, report.peaks, report.canvas_bytes, report.vae_upcast)
        return cls.of_parts(*parts, dtype, low_vram, device)

    @classmethod
    def of_parts(
        cls,
        weights_bytes: dict[str, int],
        peaks: dict[str, CallPeak],
        canvas: int,
        vae_upcast: bool,
        dtype: torch.dtype,
        low_vram: bool,
        device: str = "cpu",
    ) -> MemoryEstimate:
        """Float32 weights, call peaks and canvas bytes (a whole report's, or those of a run so far) at ``dtype``
        for a run on ``device``; ``vae_upcast``: the VAE stays float32 under float16."""
        size = torch.empty((), dtype=dtype).element_size() / 4
        vae = 1.0 if vae_upcast and dtype == torch.float16 else size
        scale = {name: vae if name == "vae" else size for name in {*weights_bytes, *peaks}}
        weights = {name: int(n * scale[name]) for name, n in weights_bytes.items() if n}
        scaled = {n: dataclasses.replace(p, activations=int(p.activations * scale[n])) for n, p in peaks.items()}
        return cls(weights, scaled, low_vram, canvas, not low_vram and parks_text(device))

    def resident(self, component: str) -> int:
        """Weight bytes on the device while ``component`` runs (low-VRAM mode: its own, or the denoiser's and the
        ControlNet's, as :meth:`~hiresdiff.models.adapter.ModelAdapter.borrowed` places them; with
        :attr:`text_parked` every weight but the text encoders' unless they run)."""
        if not self.low_vram:
            parked = self.text_parked and component != _TEXT
            return sum(n for name, n in self.weights.items() if not (parked and name == _TEXT))
        group = _DENOISING if component in _DENOISING else (component,)
        return sum(n for name, n in self.weights.items() if name in group)

    def at(self, component: str) -> int:
        """Bytes while ``component``'s largest call runs (``canvas``: between calls, under the largest set of
        weights that is ever on the device but the parked text encoders', which run before the canvas grows)."""
        if component == "canvas":
            held = [self.resident(c) for c in self.peaks if not (self.text_parked and c == _TEXT)]
            everything = sum(n for name, n in self.weights.items() if not (self.text_parked and name == _TEXT))
            return max(held, default=everything) + self.canvas
        return self.resident(component) + self.peaks[component].total

    @property
    def apart_from_denoising(self) -> int:
        """Bytes at the largest call of a component other than the denoiser and its ControlNet (VAE, text
        encoders): a floor that no ``max_batch`` lowers (the rows per denoiser call change none of those calls)."""
        return max((self.at(c) for c in self.peaks if c not in _DENOISING), default=0)

    @property
    def largest(self) -> str:
        """The component whose call sets the peak (``canvas`` when it is the work between calls)."""
        return max([*self.peaks, "canvas"], key=self.at)

    @property
    def peak(self) -> int:
        return self.at(self.largest)

    def describe(self) -> str:
        """``weights + largest call + canvas`` in words."""
        name = self.largest
        if name == "canvas":
            return f"weights {gib(self.at(name) - self.canvas)} + canvas between calls {gib(self.canvas)}"
        p = self.peaks[name]
        call = f"{name} call of {p.rows} × {p.cells:,} cells"
        return f"weights {gib(self.resident(name))} + {call} {gib(p.activations)} + canvas {gib(p.canvas)}"


def free_memory(device: str) -> int | None:
    """Bytes free on ``device``: CUDA's free memory, the CPU's available RAM; ``None`` when unknown."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return int(torch.cuda.mem_get_info(dev)[0])
    if dev.type == "cpu":
        try:
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None


def loaded_bytes(pipe: Any, device: torch.device | str) -> int:
    """Bytes of a loaded pipeline's weights on ``device``'s type: the free memory already lacks them, and an
    estimate that counts them too (a plan made after loading) adds them back."""
    kind = torch.device(device).type
    modules = [m for m in getattr(pipe, "components", {}).values() if isinstance(m, torch.nn.Module)]
    tensors = [t for m in modules for t in (*m.parameters(), *m.buffers()) if t.device.type == kind]
    return sum(t.numel() * t.element_size() for t in tensors)


def rows_that_fit(est: MemoryEstimate, free: int, cfg: bool) -> int | None:
    """Denoiser rows per call (``--max-batch``) that would fit when a denoiser call sets the peak (activations ∝
    rows); ``None`` when fewer rows would not help."""
    p = est.peaks.get("denoiser")
    if p is None or est.largest != "denoiser" or p.rows <= 1:
        return None
    rows = int((free - est.resident("denoiser") - p.canvas) // (p.activations / p.rows))
    rows -= rows % 2 if cfg else 0
    return rows if (2 if cfg else 1) <= rows < p.rows else None


def side_scale_that_fits(est: MemoryEstimate, free: int, full_cells: int) -> float | None:
    """Factor on both sides that would fit when the peak is a denoiser call over the whole canvas (activations ∝
    area; ``full_cells`` = latent cells or tokens of the target canvas); ``None`` otherwise."""
    p = est.peaks.get("denoiser")
    room = free - est.resident("denoiser") - (p.canvas if p else 0)
    if p is None or est.largest != "denoiser" or p.cells < full_cells or room <= 0:
        return None
    return min(1.0, math.sqrt(room / p.activations))
