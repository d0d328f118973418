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

A denoiser call is also *size-polynomial* (Eq. S1) in its spatial cells ``n`` (latent ``h·w`` of a UNet, image tokens
of a FLUX transformer): convolutions, norms, projections and upsampling allocate and compute ``∝ n`` per level,
attention ``∝ n²`` (its FLOPs; the fused kernel's memory ``∝ n``) and text-side work is constant, so FLOPs, every
live-bytes entry of the timeline and the host rise are polynomials of degree two in ``n`` with the same sequence of
operations — provided each UNet level has exactly ``1/4`` the cells of the one above (``h`` and ``w`` multiples of
``2^levels``; otherwise a level rounds up and the call is traced). Three traces at :func:`size_bases` then price
every other size (:func:`derive_size`, Newton's form through the three points, in integers: a value that does
not come out whole refuses the derivation), and with Eq. R1 every number of rows of every size: a request of a new
size traces nothing of its denoiser. A VAE decode is such a polynomial at any latent size (every level doubles both
sides); an encode is not (its downsampling pads one row and column: terms in ``h + w``), so encodes are traced.
Checked against traces of SD 1.5, SDXL and FLUX.1 at other sizes (equal to the byte) and by the full-trace tests of
every method.

The bases are 2 and 3 rows, not 1 and 2: a dimension of size one has its own stride and broadcasting rules (a
reshape of one row may be a view where more rows need a copy), which would change the sequence of allocations.
Two traces then price every number of rows of a spatial size: the auto batch search and every remainder call of a
step cost nothing more. Derivation is refused (and the call traced) when the two traces do not line up (another
number of operations, another output structure); the cost model's exact mode (``exact=True``) traces every call,
and the tests compare the two on every method.
"""

from __future__ import annotations

import copy
import math
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


#: the three sizes of a denoiser call that every other size is derived from (Eq. S1), in quarters of the native
#: latent side: ``½ × ¾``, ``¾ × 1``, ``1 × 1`` — distinct cell counts, sides that tell height from width
SIZE_QUARTERS = ((2, 3), (3, 4), (4, 4))


def size_bases(native: int) -> tuple[tuple[int, int], ...]:
    """The latent ``(h, w)`` of the three size bases (:data:`SIZE_QUARTERS`) of a model of ``native`` latent side."""
    return tuple((native * a // 4, native * b // 4) for a, b in SIZE_QUARTERS)


def _newton(ys: tuple[int, int, int], ns: tuple[int, int, int], n: int) -> int | None:
    """Eq. S1: the value at ``n`` of the quadratic through ``(ns[i], ys[i])`` — exactly, or ``None`` when it is not
    a whole number (the quantity is not such a polynomial)."""
    (y0, y1, y2), (n0, n1, n2) = ys, ns
    a, b, c = n1 - n0, n2 - n1, n2 - n0
    num = y0 * a * b * c + (n - n0) * (y1 - y0) * b * c + (n - n0) * (n - n1) * ((y2 - y1) * a - (y1 - y0) * b)
    whole, rest = divmod(num, a * b * c)
    return None if rest else whole


def derive_size(bases: list[Trace], sizes: list[tuple[int, ...]], size: tuple[int, ...]) -> Trace | None:
    """The trace of a call at spatial ``size`` from its traces at the three ``sizes`` (Eq. S1): FLOPs, each entry of
    the live-bytes timeline (the peak is their maximum, as Eq. R2), the host rise; each output dimension that is
    constant across the bases stays, one that is a side (or the cells) of the size times a whole factor follows it.
    ``None`` when the bases do not line up (trails of other lengths, an output dimension that follows nothing, a
    value that is not a whole number)."""
    trails = [b.trail for b in bases]
    if any(t is None for t in trails) or len({t.shape for t in trails if t is not None}) != 1:
        return None
    if len(bases) != 3 or len(sizes) != 3:
        return None
    ns = (math.prod(sizes[0]), math.prod(sizes[1]), math.prod(sizes[2]))
    n = math.prod(size)
    if len(set(ns)) != 3:
        return None

    def at(values: tuple[float, ...]) -> int | None:
        return _newton((int(values[0]), int(values[1]), int(values[2])), ns, n)

    columns = zip(*(t.tolist() for t in trails if t is not None), strict=True)
    trail = [at(col) for col in columns]
    flops, rise = at(tuple(b.flops for b in bases)), at(tuple(b.rise for b in bases))
    if flops is None or rise is None or any(v is None for v in trail):
        return None

    def dim(values: tuple[int, ...]) -> int:
        if len(set(values)) == 1:
            return values[0]
        for sides, target in [*((tuple(s[j] for s in sizes), size[j]) for j in range(len(size))), (ns, n)]:
            factor = values[0] // sides[0]  # a side, or a multiple of it (a VAE decode's pixels: 8 per cell)
            if factor and values == tuple(factor * side for side in sides):
                return factor * target
        raise ValueError("an output dimension follows no side")

    def shaped(*xs: torch.Tensor) -> torch.Tensor:
        if len({(x.dim(), x.dtype) for x in xs}) != 1:
            raise ValueError("outputs differ in structure")
        shape = [dim(values) for values in zip(*(x.shape for x in xs), strict=True)]
        return torch.empty(shape, dtype=xs[0].dtype, device=xs[0].device)

    try:
        out = map_tensors(shaped, bases[0].out, bases[1].out, bases[2].out)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        return None
    timeline = torch.tensor(trail, dtype=torch.int64)
    peak = int(timeline.max()) if timeline.numel() else 0
    return Trace(float(flops), out, max(0, peak), max(0, rise), timeline)
