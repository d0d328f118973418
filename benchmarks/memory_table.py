"""Estimated peak memory of every method per size, default and ``--low-vram`` (the README's memory table).

Each cell is the cost model's estimate (:mod:`hiresdiff.cost`, :mod:`hiresdiff.memory`): the method's real code
path on shape-only modules, previews on (as ``hiresdiff generate`` runs by default), at the run's dtype, for a run
on a CUDA card (the text encoders wait on the CPU between prompts, :func:`hiresdiff.placement.parks_text`). The
default columns settle ``max_batch`` auto as ``generate``'s plan does on a card of ``--sdxl-card`` /
``--flux-card`` GiB (12 and 24, half a GiB of it taken by the CUDA context); the number chosen follows the
peak, ``†`` where the plan tiles the VAE to fit (:func:`hiresdiff.plan.budget`). ``--low-vram`` runs one row per call.
It is an estimate, not a measurement: framework workspace and allocator fragmentation come on top (see
:mod:`hiresdiff.memory`). The letter after a value names what sets the peak: ``D`` a denoiser call, ``V`` a VAE
call, ``T`` a text-encoder call, ``C`` the work between calls. ::

    python benchmarks/memory_table.py                       # SDXL fp16 at 2048² and 4096², FLUX.1-dev bf16 at 2048²
    python benchmarks/memory_table.py --steps 4 --sdxl-methods demofusion --flux-methods "" --sdxl-card 16

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
from hiresdiff.cost.model import STAND_IN_PROMPT, architecture_of, controlnet_extras, counting_controlnet
from hiresdiff.errors import HiresError
from hiresdiff.memory import CARD_CONTEXT, GIB, MemoryEstimate, gib
from hiresdiff.pipeline import build_request
from hiresdiff.plan import budget_for

SDXL_METHODS = ",".join(
    (
        "direct,multidiffusion,demofusion,accdiffusion,apt:apt,apldm,scalediff",
        "hidiffusion,scalecrafter,fouriscale,diffusehigh,freescale,upsample-guidance,accdiffusion-v2",
    )
)
#: the methods that run on FLUX (AccDiffusion needs UNet cross-attention; APT's default SAS a DDPM β schedule)
FLUX_METHODS = "direct,multidiffusion,demofusion,apldm,scalediff"
#: methods that run with a ControlNet of the architecture (AccDiffusion v2: a canny SDXL one, required)
CONTROLNET_METHODS = {"accdiffusion-v2": "canny ControlNet"}
#: the letter of the component that sets the peak
SETTERS = {"denoiser": "D", "vae": "V", "text_encoder": "T", "controlnet": "N", "canvas": "C"}
DEVICE = "cuda"


@dataclass(frozen=True)
class Cell:
    """One estimate, the ``max_batch`` it ran with and whether the plan tiled the VAE to fit."""

    estimate: MemoryEstimate
    max_batch: int
    tiled: bool = False


@dataclass(frozen=True)
class Row:
    """One method's estimates on one model: ``cells[(side, low_vram)]``."""

    label: str
    cells: dict[tuple[int, bool], Cell]


def estimate(
    model: str,
    method: str,
    preset: str | None,
    side: int,
    dtype: torch.dtype,
    low_vram: bool,
    steps: int | None,
    card: int,
) -> Cell:
    """The estimated peak of one ``side × side`` generation with previews on, on a CUDA card of ``card`` bytes:
    ``max_batch`` auto settled for its free memory (``--low-vram``: its batch and tile defaults)."""
    kwargs: dict[str, object] = {"steps": steps} if steps is not None else {}
    if method in CONTROLNET_METHODS:
        kwargs["extras"] = controlnet_extras(counting_controlnet(architecture_of(model)))
    req = build_request(STAND_IN_PROMPT, method, side, side, preset=preset, previews=True, low_vram=low_vram, **kwargs)
    b = budget_for(req, model, DEVICE, dtype, card - CARD_CONTEXT)
    if b.estimate is None:
        raise HiresError(f"{method} at {side}²: {b.reason}")
    return Cell(b.estimate, int(req.settings.max_batch), b.tiled)


def table_rows(
    model: str,
    methods: str,
    sides: Sequence[int],
    dtype: torch.dtype,
    steps: int | None,
    card: int = 12 * GIB,
    log: bool = True,
) -> list[Row]:
    """Every method × side × {default, ``--low-vram``}."""
    rows = []
    for method, preset in parse_methods(methods):
        label = f"`{method}`" + (f" (`{preset}`)" if preset else "")
        label += f" (+ {CONTROLNET_METHODS[method]})" if method in CONTROLNET_METHODS else ""
        cells = {}
        for side in sides:
            for low in (False, True):
                cells[(side, low)] = c = estimate(model, method, preset, side, dtype, low, steps, card)
                if log:
                    est, mode = c.estimate, "--low-vram" if low else "default"
                    print(
                        f"{model} {method} {side}² {mode}: {gib(est.peak)} max_batch {c.max_batch} ({est.describe()})",
                        file=sys.stderr,
                    )
        rows.append(Row(label, cells))
    return rows


def cell(c: Cell) -> str:
    """``10.1 GiB V · 8``: the peak, what sets it and the rows per denoiser call (``†``: VAE tiled to fit)."""
    return f"{gib(c.estimate.peak)} {SETTERS.get(c.estimate.largest, '?')} · {c.max_batch}" + " †" * c.tiled


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
    ap.add_argument("--sdxl-card", type=float, default=12.0, help="GiB of the card SDXL's max_batch auto fits")
    ap.add_argument("--flux-card", type=float, default=24.0, help="GiB of the card FLUX's max_batch auto fits")
    return ap.parse_args(argv)


def sides_of(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise HiresError(f"sizes are square sides in pixels separated by commas, got {text!r}") from None


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    tables = [
        (args.sdxl_model, args.sdxl_methods, args.sdxl_sizes, torch.float16, args.sdxl_card, "SDXL, float16"),
        (args.flux_model, args.flux_methods, args.flux_sizes, torch.bfloat16, args.flux_card, "FLUX.1-dev, bfloat16"),
    ]
    try:
        out = []
        for model, methods, sizes, dtype, card, title in tables:
            if methods.strip():
                sides = sides_of(sizes)
                rows = table_rows(model, methods, sides, dtype, args.steps, int(card * GIB))
                out.append(markdown(f"{title}, {card:g} GiB card", rows, sides))
    except HiresError as exc:
        print(f"memory_table: error: {exc}", file=sys.stderr)
        return 2
    print("\n\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
