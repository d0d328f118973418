"""Report plots: time and TFLOPs against resolution, and every measure or metric against each swept parameter.

Drawn with matplotlib's object API on the Agg renderer (no pyplot, no global backend switch), written atomically.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

from hiresdiff.bench.plan import BenchPlan, safe_name
from hiresdiff.bench.rows import METRICS, Row
from hiresdiff.images import atomic_write_bytes

PLOTS_DIR = "plots"
#: (Row quantity, axis label) in plotting order
QUANTITIES: tuple[tuple[str, str], ...] = (
    ("seconds", "wall time per image (s)"),
    ("tflops", "TFLOPs per image"),
    ("memory_gb", "peak memory (GB)"),
    *((m, m) for m in METRICS),
)
Series = dict[str, list[tuple[Any, float | None]]]


def _figure(panels: int) -> tuple[Any, list[Any]]:
    """A figure with ``panels`` axes, three per line."""
    from matplotlib.figure import Figure

    cols = min(3, panels)
    lines = math.ceil(panels / cols)
    fig = Figure(figsize=(5.5 * cols, 4.2 * lines), layout="constrained")
    axes = list(fig.subplots(lines, cols, squeeze=False).flat)
    for ax in axes[panels:]:
        ax.set_visible(False)
    return fig, axes[:panels]


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def draw(ax: Any, series: Series, xlabel: str, ylabel: str) -> int:
    """One line per series through its points with a value; categorical x when any x is not a number.

    Returns the number of lines drawn ("no data" is written on empty axes).
    """
    valued = {name: [(x, y) for x, y in points if y is not None] for name, points in series.items()}
    numeric = all(_is_number(x) for points in valued.values() for x, _ in points)
    categories = list(dict.fromkeys(str(x) for points in valued.values() for x, _ in points))
    drawn = 0
    for name, points in valued.items():
        if points:
            kept = sorted((x if numeric else categories.index(str(x)), y) for x, y in points)
            ax.plot([x for x, _ in kept], [y for _, y in kept], marker="o", label=name)
            drawn += 1
    if not numeric:
        ax.set_xticks(range(len(categories)), categories)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize="small")
    else:
        ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center")
    return drawn


def resolution_figure(rows: list[Row]) -> Any:
    """Wall time and TFLOPs per image against megapixels, one line per method/preset/swept values."""
    fig, axes = _figure(2)
    for ax, (quantity, label) in zip(axes, QUANTITIES[:2], strict=True):
        series: Series = {}
        for row in rows:
            series.setdefault(row.group.label, []).append((row.group.size.megapixels, row.value(quantity)))
        draw(ax, series, "megapixels", label)
    return fig


def sweep_figure(rows: list[Row], name: str) -> Any:
    """Every quantity with a value against swept ``name``, one line per method/preset, size and other sweeps."""
    swept = [row for row in rows if name in dict(row.group.sweep)]
    quantities = [(q, label) for q, label in QUANTITIES if any(row.value(q) is not None for row in swept)]
    fig, axes = _figure(len(quantities) or 1)
    for ax, (quantity, label) in zip(axes, quantities or list(QUANTITIES[:1]), strict=True):
        series: Series = {}
        for row in swept:
            g = row.group
            key = " ".join([g.method_label, g.size.pixels, *(f"{n}={v}" for n, v in g.sweep if n != name)])
            series.setdefault(key, []).append((row.sweep_value(name), row.value(quantity)))
        draw(ax, series, name, label)
    fig.suptitle(f"sweep of {name}")
    return fig


def save_figure(fig: Any, path: Path) -> Path:
    """``fig`` as PNG, written atomically."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    atomic_write_bytes(path, buf.getvalue())
    return path


def write_plots(out: Path, plan: BenchPlan, rows: list[Row]) -> list[Path]:
    """``plots/resolution.png`` and ``plots/sweep-<name>.png`` per swept parameter."""
    folder = out / PLOTS_DIR
    paths = [save_figure(resolution_figure(rows), folder / "resolution.png")]
    paths += [save_figure(sweep_figure(rows, name), folder / f"sweep-{safe_name(name)}.png") for name in plan.sweeps]
    return paths
