"""Local-view geometry of MultiDiffusion / DemoFusion (SPEC §2.2), in latent cells."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class View:
    """A ``height × width`` window whose top-left corner is at ``(top, left)`` of the canvas.

    Jittered views may start above/left of the canvas (negative) or end past it; the part outside the canvas lies
    on the zero padding and its predictions are discarded.
    """

    top: int
    left: int
    height: int
    width: int


def view_starts(side: int, window: int, stride: int) -> list[int]:
    """Start offsets along one side: 1 view if ``side ≤ window``, else ``⌈(side − window)/stride⌉ + 1`` views.

    Views are ``stride`` apart and the last one is clamped to end exactly at the border, so they cover the side.
    """
    if window <= 0 or stride <= 0:
        raise ValueError(f"window and stride must be positive, got {window}, {stride}")
    if side <= window:
        return [0]
    count = -(-(side - window) // stride) + 1
    return [min(k * stride, side - window) for k in range(count)]


def views_for(height: int, width: int, window: int, stride: int) -> list[View]:
    """Row-major grid of views covering a ``height × width`` canvas (no jitter)."""
    hs, ws = view_starts(height, window, stride), view_starts(width, window, stride)
    vh, vw = min(window, height), min(window, width)
    return [View(top, left, vh, vw) for top in hs for left in ws]


def _jitter_bounds(start: int, size: int, side: int, j: int) -> tuple[int, int]:
    """Allowed shift range: first view ``[−j, 0]``, last ``[0, j]``, middle ``[−j, j]``, a lone view 0.

    Border views only move outwards (over the zero padding), as in the official DemoFusion code.
    """
    first, last = start == 0, start + size == side
    return (0 if last else -j), (0 if first else j)


def jitter_views(
    views: list[View], height: int, width: int, max_jitter: int | tuple[int, int], generator: torch.Generator | None
) -> list[View]:
    """Shift each view by integers drawn uniformly from its jitter range (SPEC §2.2), using ``generator``.

    One uniform draw per view and axis; the ranges depend on whether the view touches a border. ``max_jitter`` is
    one bound for both axes or (rows, columns) (FreeScale's windows jitter by ⅛ of each side).
    """
    jh, jw = max_jitter if isinstance(max_jitter, tuple) else (max_jitter, max_jitter)
    if max(jh, jw) <= 0 or not views:
        return list(views)
    device = generator.device if generator is not None else torch.device("cpu")
    u = torch.rand((len(views), 2), generator=generator, device=device).tolist()
    out = []
    for v, (uh, uw) in zip(views, u, strict=True):
        lo_h, hi_h = _jitter_bounds(v.top, v.height, height, jh)
        lo_w, hi_w = _jitter_bounds(v.left, v.width, width, jw)
        dh = lo_h + min(int(uh * (hi_h - lo_h + 1)), hi_h - lo_h)
        dw = lo_w + min(int(uw * (hi_w - lo_w + 1)), hi_w - lo_w)
        out.append(View(v.top + dh, v.left + dw, v.height, v.width))
    return out
