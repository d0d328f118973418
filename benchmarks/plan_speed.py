"""How long the plan's estimate (FLOPs and peak memory, :func:`hiresdiff.cost.model_cost`) takes per method and size.

A benchmark, not a test: CPU seconds of one estimate at the method's default settings (previews on, as a plain
``hiresdiff generate`` plans it), first in the process (``cold``: shape-only traces of each new call signature
included, the counting pipeline already built) and again (``warm``: every signature known). Prints a Markdown
table (the README's) and writes JSON with ``--out``.

    python benchmarks/plan_speed.py --models random-sdxl,random-flux --sizes 1024,2048,4096,8192

``--plan`` times the whole run plan instead — what ``hiresdiff generate --dry-run`` computes: ``max_batch="auto"``
settled against ``--free-gib`` of free memory (:func:`hiresdiff.plan.budget`: the estimate at the cap and the
search's candidates), first in the process (``cold``) and for the same request again (``warm``: the reports are
reused). Shape-only traces kept on disk by earlier processes (:mod:`hiresdiff.cost.store`) count as known; set
``HIRESDIFF_TRACE_CACHE=off`` to time a first run ever.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any
from unittest import mock

from hiresdiff.cost.model import STAND_IN_PROMPT, architecture_of, counting_pipeline, model_cost
from hiresdiff.errors import HiresError
from hiresdiff.methods import METHODS


def _seconds(method: str, model: str, side: int) -> float:
    begin = time.process_time()
    model_cost(method, model, side, side, previews=True, max_pixels=side * side)
    return time.process_time() - begin


def _plan_seconds(method: str, model: str, side: int, free: int) -> float:
    import torch

    from hiresdiff import plan
    from hiresdiff.pipeline import build_request

    req = build_request(STAND_IN_PROMPT, method, side, side, max_pixels=side * side)
    begin = time.process_time()
    with mock.patch.object(plan, "free_memory", lambda device: free):
        plan.budget(req, model, "cpu", torch.float32)
    return time.process_time() - begin


def _timed(method: str, model: str, side: int, free: int | None) -> float:
    return _plan_seconds(method, model, side, free) if free else _seconds(method, model, side)


def measure(models: list[str], methods: list[str], sizes: list[int], free: int | None = None) -> list[dict[str, Any]]:
    """One row per (model, method, size): cold and warm CPU seconds, or why there is no estimate; ``free`` (bytes):
    time the whole plan with ``max_batch="auto"`` at that free memory instead of one estimate."""
    rows = []
    for model in models:
        counting_pipeline(architecture_of(model))  # built once per architecture, before any timing
        for method in methods:
            for side in sizes:
                row: dict[str, Any] = {"model": model, "method": method, "size": side}
                try:
                    row["cold_s"] = _timed(method, model, side, free)
                    row["warm_s"] = _timed(method, model, side, free)
                except HiresError as exc:
                    row["skipped"] = str(exc)
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def table(rows: list[dict[str, Any]], sizes: list[int]) -> str:
    """Markdown: one line per model and method, ``cold / warm`` CPU seconds per size."""
    lines = ["| model | method | " + " | ".join(f"{s}²" for s in sizes) + " |", "|---|---|" + "---|" * len(sizes)]
    keys = dict.fromkeys((r["model"], r["method"]) for r in rows)
    for model, method in keys:
        cells = []
        for side in sizes:
            r = next(r for r in rows if (r["model"], r["method"], r["size"]) == (model, method, side))
            cells.append("—" if "skipped" in r else f"{r['cold_s']:.1f} / {r['warm_s']:.2f}")
        lines.append(f"| {model} | {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="random-sdxl,random-flux")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--sizes", default="1024,2048,4096,8192")
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    p.add_argument("--plan", action="store_true", help="time the whole plan (auto max_batch) at --free-gib")
    p.add_argument("--free-gib", type=float, default=22.3, help="free memory the plan fits max_batch into")
    args = p.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    free = int(args.free_gib * 2**30) if args.plan else None
    rows = measure(args.models.split(","), args.methods.split(","), sizes, free)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=2)
    print(table(rows, sizes))


if __name__ == "__main__":
    main()
