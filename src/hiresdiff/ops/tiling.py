"""Tiled application of a local operator (VAE decode/encode, SPEC §2.4)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from hiresdiff.ops.geometry import view_starts


def _span(start: int, core: int, margin: int, side: int) -> tuple[int, int]:
    return max(0, start - margin), min(side, start + core + margin)


def tiled_apply(
    x: torch.Tensor,
    fn: Callable[[torch.Tensor], torch.Tensor],
    core: int,
    margin: int,
    scale: float,
) -> torch.Tensor:
    """Apply ``fn`` to ``x`` (B, C, H, W) tile by tile; ``fn`` maps a ``h × w`` input to ``h·scale × w·scale``.

    Cores of ``core × core`` input cells tile the canvas (the last core of a side is clamped to the border, so
    cores may overlap there). Each core is processed with ``margin`` cells of context on every side (clipped at
    the borders) and only the core's part of the output is kept; overlapping cores are averaged. For an operator
    whose receptive field is within ``margin`` the result equals ``fn(x)``.
    """
    b, _, h, w = x.shape
    out: torch.Tensor | None = None
    count: torch.Tensor | None = None
    for top in view_starts(h, core, core):
        for left in view_starts(w, core, core):
            h0, h1 = _span(top, min(core, h), margin, h)
            w0, w1 = _span(left, min(core, w), margin, w)
            y = fn(x[:, :, h0:h1, w0:w1])
            if out is None:
                out = torch.zeros(b, y.shape[1], round(h * scale), round(w * scale), dtype=y.dtype, device=y.device)
                count = torch.zeros(1, 1, out.shape[2], out.shape[3], dtype=y.dtype, device=y.device)
            ct, cl = round((top - h0) * scale), round((left - w0) * scale)
            ch, cw = round(min(core, h) * scale), round(min(core, w) * scale)
            ot, ol = round(top * scale), round(left * scale)
            # in place on the slices (``a[i] += b`` would also write each slice back onto itself: more operations)
            out[:, :, ot : ot + ch, ol : ol + cw].add_(y[:, :, ct : ct + ch, cl : cl + cw])
            count[:, :, ot : ot + ch, ol : ol + cw].add_(1)
    assert out is not None and count is not None
    return out / count
