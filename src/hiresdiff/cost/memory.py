"""Peak memory of a generation measured on shape-only (``meta``) modules (DESIGN "Measuring").

:class:`LiveBytes` is a dispatch mode that keeps the bytes of every tensor storage created under it that is still
referenced, and the largest total seen (the peak). The cost model runs one over the whole orchestration (the
canvas state on the CPU stands for the device's latents, accumulators and images) and one inside each shape-only
module call (its activations); a call's peak adds to the canvas bytes alive when it starts.

On ``meta`` PyTorch's scaled dot-product attention falls back to its math path, which materialises the
``queries × keys`` score matrix; real runs on CUDA and CPU use fused kernels (flash / memory-efficient) that never
build it. :func:`fused_attention` routes those calls to the memory-efficient kernel's meta implementation: the
same FLOPs for :class:`~torch.utils.flop_counter.FlopCounterMode`, the memory of a fused kernel. Attention that a
processor computes explicitly (AccDiffusion's capture, NPA) keeps its real footprint.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


def _tensors(obj: Any) -> list[torch.Tensor]:
    """The tensors in an operation's arguments or outputs: tensors, and those inside tuples, lists and dicts
    (walked directly: nearly every aten operation takes and returns only these), anything else by
    :func:`tree_leaves`."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (tuple, list)):
        if type(obj) not in (tuple, list):  # named tuples and other registered structures
            return [t for t in tree_leaves(obj) if isinstance(t, torch.Tensor)]
        return [t for v in obj for t in _tensors(v)]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensors(v)]
    return []


class LiveBytes(TorchDispatchMode):
    """Bytes of the live storages created under this mode on ``device_type`` tensors: ``current`` and ``peak``;
    ``window_peak`` is the peak since the last :meth:`mark` (one denoising step, :mod:`hiresdiff.cost.replay`).
    ``trail``: also keep the bytes alive after every operation (the timeline :mod:`hiresdiff.cost.trace` derives
    calls of more rows from)."""

    def __init__(self, device_type: str, trail: bool = False) -> None:
        super().__init__()
        self.device_type = device_type
        self.live: set[int] = set()
        self.current = 0
        self.peak = 0
        self.window_peak = 0
        self.trail: list[int] | None = [] if trail else None

    def mark(self) -> int:
        """Start a new window (its peak starts at the bytes alive now) and return those bytes."""
        self.window_peak = self.current
        return self.current

    @contextlib.contextmanager
    def rise(self) -> Iterator[list[int]]:
        """Measure how far the live bytes rise, while the block runs, above the level they end at (a one-item
        list, filled on exit): the transient footprint of a call, whatever it keeps (a recorder's first sums)
        aside. The enclosing window keeps its own peak."""
        outer = self.window_peak
        self.mark()
        rise = [0]
        try:
            yield rise
        finally:
            rise[0] = self.window_peak - self.current
            self.window_peak = max(outer, self.window_peak)

    def bump(self, rise: int) -> None:
        """Count a transient rise of ``rise`` bytes above the live bytes now (a call measured once, not rerun)."""
        self.peak = max(self.peak, self.current + rise)
        self.window_peak = max(self.window_peak, self.current + rise)

    def _free(self, key: int, nbytes: int) -> None:
        self.live.discard(key)
        self.current -= nbytes

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        self.account(out, args, kwargs)
        return out

    def account(self, out: Any, args: Any, kwargs: Any) -> None:
        """Count the new storages among an operation's outputs ``out`` (views of its inputs allocate nothing) and
        extend the trail."""
        made = [t for t in _tensors(out) if t.device.type == self.device_type]
        fresh = [s for s in (t.untyped_storage() for t in made) if s._cdata not in self.live]
        if fresh:
            given = {t.untyped_storage()._cdata for t in _tensors((args, kwargs))}
            for storage in fresh:
                key, nbytes = storage._cdata, storage.nbytes()
                if key in given or key in self.live:  # a view of an input (a weight) allocates nothing
                    continue
                self.live.add(key)
                self.current += nbytes
                # storages keep their Python object while alive: the finaliser runs when the memory is released
                weakref.finalize(storage, self._free, key, nbytes).atexit = False
            self.peak = max(self.peak, self.current)
            self.window_peak = max(self.window_peak, self.current)
        if self.trail is not None:
            self.trail.append(self.current)

    def now(self) -> int:
        """Bytes alive at this moment."""
        return self.current


def _fused_sdpa(original: Any) -> Any:
    def sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: Any = None, *args: Any,
             **kwargs: Any) -> torch.Tensor:  # fmt: skip
        dropout = args[0] if args else kwargs.get("dropout_p", 0.0)
        causal = args[1] if len(args) > 1 else kwargs.get("is_causal", False)
        scale = args[2] if len(args) > 2 else kwargs.get("scale")
        gqa = args[3] if len(args) > 3 else kwargs.get("enable_gqa", False)
        if query.device.type != "meta" or gqa or query.dim() not in (3, 4):
            return original(query, key, value, attn_mask, *args, **kwargs)
        flat = query.dim() == 3  # (B, L, E): one head
        q, k, v = (t.unsqueeze(1) if flat else t for t in (query, key, value))
        bias = attn_mask
        if bias is not None:
            if bias.dtype == torch.bool:
                bias = torch.zeros(bias.shape, dtype=q.dtype, device=q.device).masked_fill(~bias, float("-inf"))
            bias = bias.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        out = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, bias, False, dropout, causal, scale=scale)
        return out[0].squeeze(1) if flat else out[0]

    sdpa.hiresdiff_fused = True  # type: ignore[attr-defined]
    return sdpa


@contextlib.contextmanager
def fused_attention() -> Iterator[None]:
    """While active, :func:`torch.nn.functional.scaled_dot_product_attention` on ``meta`` tensors has the memory of
    a fused kernel (module docstring); other devices go to the original function. Nested use patches once."""
    original = F.scaled_dot_product_attention
    if getattr(original, "hiresdiff_fused", False):
        yield
        return
    F.scaled_dot_product_attention = _fused_sdpa(original)
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def module_bytes(module: Any) -> int:
    """Bytes of a module's parameters and buffers (shape-only modules included)."""
    tensors = [*module.parameters(), *module.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)
