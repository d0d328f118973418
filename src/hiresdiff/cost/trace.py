"""What one shape-only call costs (:class:`Trace`), and the cost of a call of many rows from two traced calls.

A denoiser, VAE or text-encoder call is *row-affine*: every tensor it allocates holds either a fixed number of
elements or a fixed number per row (batch sample), every FLOP formula of PyTorch's flop counter is a sum of
products with one factor of rows, and the sequence of operations does not depend on the number of rows. For a call
of ``R`` rows, with ``X₂`` and ``X₃`` the same quantity traced at 2 and 3 rows:

* FLOPs (Eq. R1): ``F(R) = F₂ + (R − 2)(F₃ − F₂)``;
* live bytes after the ``t``-th operation (Eq. R2): ``L_t(R) = L_t(2) + (R − 2)(L_t(3) − L_t(2))``, so the
  activation peak is ``max(0, maxₜ L_t(R))`` — the maximum over the whole timeline (the :attr:`Trace.trail`), not
  an extrapolated peak, since where the peak lies may move with the rows;
* the output has the shapes of Eq. R1 applied to each dimension, and the host bytes the call raises likewise.

The bases are 2 and 3 rows, not 1 and 2: a dimension of size one has its own stride and broadcasting rules (a
reshape of one row may be a view where more rows need a copy), which would change the sequence of allocations.
Two traces then price every number of rows of a spatial size: the auto batch search and every remainder call of a
step cost nothing more. Derivation is refused (and the call traced) when the two traces do not line up (another
number of operations, another output structure); the cost model's exact mode (``exact=True``) traces every call,
and the tests compare the two on every method.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

#: the row counts of the two traces every larger call is derived from (Eqs. R1, R2)
BASES = (2, 3)


@dataclass(frozen=True)
class Trace:
    """One shape-only call: its FLOPs, its output (``meta`` tensors), the peak of its activations, the bytes it
    raised on the host while running, and the live activation bytes after each operation (``trail``; ``None`` for
    a derived trace)."""

    flops: float
    out: Any
    peak: int
    rise: int
    trail: torch.Tensor | None = None


def map_tensors(fn: Callable[..., Any], obj: Any, *others: Any) -> Any:
    """``obj`` with every tensor ``x`` inside replaced by ``fn(x, *same place in others)``.

    Structures: tuples and lists, dicts and ``ModelOutput``s, plain objects holding tensors (diffusers'
    ``DiagonalGaussianDistribution``); other values stay. ``others`` must have ``obj``'s structure.
    """
    if isinstance(obj, torch.Tensor):
        return fn(obj, *others)
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "keys"):
        return type(obj)(map_tensors(fn, v, *(o[i] for o in others)) for i, v in enumerate(obj))
    if hasattr(obj, "keys") and hasattr(obj, "items"):
        values = {k: map_tensors(fn, v, *(o[k] for o in others)) for k, v in obj.items()}
        return values if type(obj) is dict else type(obj)(**values)
    if hasattr(obj, "__dict__") and any(isinstance(v, torch.Tensor) for v in vars(obj).values()):
        out = copy.copy(obj)
        for k, v in vars(obj).items():
            setattr(out, k, map_tensors(fn, v, *(getattr(o, k) for o in others)))
        return out
    return obj


def take_rows(obj: Any, rows: int, k: int) -> Any:
    """The arguments of the same call with ``k`` of its ``rows`` rows: every tensor whose first dimension is
    ``rows`` is cut to its first ``k`` (other tensors — FLUX's position ids, a 0-d timestep — stay)."""
    return map_tensors(lambda t: t[:k] if t.dim() and t.shape[0] == rows else t, obj)


def _at(two: float, three: float, rows: int) -> Any:
    """Eq. R1: the value at ``rows`` of a quantity affine in the rows, from its values at 2 and 3 rows."""
    return two + (rows - 2) * (three - two)


def derive(two: Trace, three: Trace, rows: int) -> Trace | None:
    """The trace of the call at ``rows`` rows from its traces at 2 and 3 rows (Eqs. R1, R2), or ``None`` when they
    do not line up (no trails, another number of operations, another output structure or dtype)."""
    a, b = two.trail, three.trail
    if a is None or b is None or a.shape != b.shape:
        return None

    def shaped(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.dim() != y.dim() or x.dtype != y.dtype:
            raise ValueError("outputs differ in structure")
        shape = [_at(m, n, rows) for m, n in zip(x.shape, y.shape, strict=True)]
        return torch.empty(shape, dtype=x.dtype, device=x.device)

    try:
        out = map_tensors(shaped, two.out, three.out)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        return None
    peak = int(_at(a, b, rows).max()) if a.numel() else 0
    return Trace(_at(two.flops, three.flops, rows), out, max(0, peak), max(0, _at(two.rise, three.rise, rows)))
