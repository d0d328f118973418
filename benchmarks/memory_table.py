"""Estimated peak memory of every method per size, default and ``--low-vram`` (the README's memory table).

Each cell is the cost model's estimate (:mod:`hiresdiff.cost`, :mod:`hiresdiff.memory`): the method's real code
path on shape-only modules, previews on (as ``hiresdiff generate`` runs by default), at the run's dtype. It is an
estimate, not a measurement: framework workspace and allocator fragmentation come on top (see
:mod:`hiresdiff.memory`). The letter after a value names what sets the peak: ``D`` a denoiser call, ``V`` a VAE
call, ``T`` a text-encoder call, ``C`` the work between calls. ::

    python benchmarks/memory_table.py                       # SDXL fp16 at 2048² and 4096², FLUX.1-dev bf16 at 2048²
    python benchmarks/memory_table.py --steps 4 --sdxl-methods demofusion --flux-methods ""

The peak does not depend on the number of steps (every step runs the same calls), so ``--steps`` only trades
time: it defaults to each model's own (SDXL 50, FLUX.1-dev 30).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from hiresdiff.bench.plan import parse_methods
from hiresdiff.cost import model_cost
from hiresdiff.errors import HiresError
from hiresdiff.memory import MemoryEstimate, gib

SDXL_METHODS = ",".join(
    ("direct,multidiffusion,demofusion,accdiffusion,apt:apt,apldm,scalediff", "hidiffusion,scalecrafter,fouriscale")
)
#: the methods that run on FLUX (AccDiffusion needs UNet cross-attention; APT's default SAS a DDPM β schedule)
FLUX_METHODS = "direct,multidiffusion,demofusion,apldm,scalediff"
#: the letter of the component that sets the peak
SETTERS = {"denoiser": "D", "vae": "V", "text_encoder": "T", "controlnet": "N", "canvas": "C"}


@dataclass(frozen=True)
class Row:
    """One method's estimates on one model: ``cells[(side, low_vram)]``."""

    label: str
    cells: dict[tuple[int, bool], MemoryEstimate]


def estimate(
    model: str, method: str, preset: str | None, side: int, dtype: torch.dtype, low_vram: bool, steps: int | None
) -> MemoryEstimate:
    """The estimated peak of one ``side × side`` generation with previews on (``--low-vram``: its batch and tile
    defaults too)."""
    kwargs = {"steps": steps} if steps is not None else {}
    report = model_cost(method, model, side, side, preset=preset, previews=True, low_vram=low_vram, **kwargs)
    return MemoryEstimate.of(report, dtype, low_vram)


def table_rows(
    model: str, methods: str, sides: Sequence[int], dtype: torch.dtype, steps: int | None, log: bool = True
) -> list[Row]:
    """Every method × side × {default, ``--low-vram``}."""
    rows = []
    for method, preset in parse_methods(methods):
        label = f"`{method}`" + (f" (`{preset}`)" if preset else "")
        cells = {}
        for side in sides:
            for low in (False, True):
                cells[(side, low)] = est = estimate(model, method, preset, side, dtype, low, steps)
                if log:
                    mode = "--low-vram" if low else "default"
                    print(f"{model} {method} {side}² {mode}: {gib(est.peak)} ({est.describe()})", file=sys.stderr)
        rows.append(Row(label, cells))
    return rows


def cell(est: MemoryEstimate) -> str:
    """``10.1 GiB V``: the peak and what sets it."""
    return f"{gib(est.peak)} {SETTERS.get(est.largest, '?')}"


def markdown(title: str, rows: list[Row], sides: Sequence[int]) -> str:
    """A markdown table: one row per method, columns side × {default, ``--low-vram``}."""
    heads = [f"{side}² {mode}" for side in sides for mode in ("default", "`--low-vram`")]
    lines = [
        f"| {title} | " + " | ".join(heads) + " |",
        "| --- | " + " | ".join("---:" for _ in heads) + " |",
    ]
    for row in rows:
        values = [cell(row.cells[(side, low)]) for side in sides for low in (False, True)]
        lines.append(f"| {row.label} | " + " | ".join(values) + " |")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sdxl-model", default="random-sdxl")
    ap.add_argument("--sdxl-methods", default=SDXL_METHODS, help="method[:preset],… ('' for none)")
    ap.add_argument("--sdxl-sizes", default="2048,4096", help="square sides in pixels")
    ap.add_argument("--flux-model", default="random-flux")
    ap.add_argument("--flux-methods", default=FLUX_METHODS, help="method[:preset],… ('' for none)")
    ap.add_argument("--flux-sizes", default="2048")
    ap.add_argument("--steps", type=int, default=None, help="inference steps (the peak does not depend on them)")
    return ap.parse_args(argv)


def sides_of(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise HiresError(f"sizes are square sides in pixels separated by commas, got {text!r}") from None


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    tables = [
        (args.sdxl_model, args.sdxl_methods, args.sdxl_sizes, torch.float16, "SDXL, float16"),
        (args.flux_model, args.flux_methods, args.flux_sizes, torch.bfloat16, "FLUX.1-dev, bfloat16"),
    ]
    try:
        out = []
        for model, methods, sizes, dtype, title in tables:
            if methods.strip():
                sides = sides_of(sizes)
                out.append(markdown(title, table_rows(model, methods, sides, dtype, args.steps), sides))
    except HiresError as exc:
        print(f"memory_table: error: {exc}", file=sys.stderr)
        return 2
    print("\n\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
