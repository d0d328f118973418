"""Speed and memory of every method on a full-size random architecture (issue #7).

One command runs each method at each size, after one warm-up generation at native size, and appends a record per
run to ``benchmarks/results/<device>-<date>.json`` (written atomically after every run; a rerun skips records that
are already there)::

    python benchmarks/gpu_bench.py                       # random-sdxl, bf16, every SDXL method at 2048² and 4096²
    python benchmarks/gpu_bench.py --model random-flux --methods scalediff,direct --sizes 2x,4x

Each record holds ``method``, ``preset``, ``model``, ``width``, ``height``, ``dtype``, ``device``, ``torch``,
``wall_s``, ``peak_mem_gb``, ``model_flops`` (``hiresdiff cost`` of the same settings), ``matmul_tflops`` (the
device's bf16/fp16 large matrix-multiply rate measured in the same process, ``n³`` with ``n = --matmul``),
``params`` (the ``--set`` values, e.g. ``low_vram=true``), ``achieved_tflops`` = model FLOPs ÷ wall time,
``mfu`` = achieved ÷ matmul rate, and ``flop_bound_s`` = model FLOPs ÷ matmul rate. The same script runs on a
CPU with the tiny models (used by the tests).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from datetime import date
from pathlib import Path
from typing import Any

import torch

from hiresdiff.bench.plan import accepts, parse_methods, parse_sizes
from hiresdiff.bench.records import device_name, read_json, versions, write_json
from hiresdiff.bench.runner import timed_run
from hiresdiff.cost import model_cost
from hiresdiff.errors import HiresError, require
from hiresdiff.pipeline import HiresPipeline, build_request, check_for_model, resolve_device

SDXL_METHODS = "direct,multidiffusion,demofusion,accdiffusion,apt:apt,apldm,scalediff"
PROMPT = "a photograph of a mountain lake at sunrise, highly detailed"


def matmul_tflops(n: int, dtype: torch.dtype, device: str, repeats: int = 10) -> float:
    """Achieved rate of ``n × n @ n × n`` matrix products in ``dtype`` (TFLOP/s, 2n³ FLOPs each)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    sync(device)
    begin = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(device)
    return 2 * n**3 * repeats / (time.perf_counter() - begin) / 1e12


def sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def record_key(r: dict[str, Any]) -> tuple[Any, ...]:
    """What makes a run distinct (a rerun skips runs whose key is recorded)."""
    params = json.dumps(r.get("params", {}), sort_keys=True)
    size = (r["width"], r["height"])
    key = (r["method"], r["preset"], r["model"], *size, r["dtype"], r["steps"], r.get("max_batch"), params)
    return (*key, r.get("ranks", 1))


def method_kwargs(method: str, preset: str | None, params: dict[str, Any], **settings: Any) -> dict[str, Any]:
    """Settings plus the ``--set`` values that ``method`` takes (others are for other methods)."""
    return {"preset": preset, **settings, **{k: v for k, v in params.items() if accepts(method, k)}}


def main(argv: list[str] | None = None) -> int:
    try:
        return bench(argv)
    except HiresError as exc:
        print(f"gpu_bench: error: {exc}", file=sys.stderr)
        return 2


def bench(argv: list[str] | None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="random-sdxl")
    p.add_argument("--methods", default=SDXL_METHODS, help="comma list of method[:preset]")
    p.add_argument("--sizes", default="2x,4x", help="comma list: 2x, 4x (× native size per side) or WxH pixels")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default=None)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--max-batch", type=int, default=None, help="default 8 (1 with --set low_vram=true)")
    p.add_argument("--matmul", type=int, default=8192, help="side of the reference matrix product")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    p.add_argument("--set", dest="params", action="append", default=[], metavar="NAME=VALUE")
    p.add_argument(
        "--parallel",
        choices=("views",),
        default=None,
        help="under torchrun: one image over all ranks (records the wall time of the view-parallel run)",
    )
    args = p.parse_args(argv)
    from hiresdiff.config import parse_assignments
    from hiresdiff.models.loading import resolve_model

    device = resolve_device(args.device)
    dtype = getattr(torch, args.dtype)
    params = parse_assignments(args.params)
    spec = resolve_model(args.model)
    methods = parse_methods(args.methods)
    unused = [k for k in params if not any(accepts(m, k) for m, _ in methods)]
    require(not unused, f"--set {', '.join(unused)}: no method in --methods takes it")
    runs = []
    for method, preset in methods:
        given = {"max_batch": args.max_batch} if args.max_batch is not None else {}
        kwargs = method_kwargs(method, preset, params, steps=args.steps, **given)
        for size in parse_sizes(args.sizes, spec.native_size):
            w, h = size.width, size.height
            req = build_request(
                PROMPT, method, w, h, seed=0, previews=False, model_defaults=spec.sampling_defaults, **kwargs
            )
            check_for_model(req, spec.native_size, spec.pixel_grid)  # every run is validated before any work
            req.settings.max_batch = req.settings.rows_per_call  # measured at a stated batch, not the device's auto
            runs.append((method, kwargs, w, h, req))
    parallel = None
    if args.parallel == "views":
        from hiresdiff.parallel import ViewParallel, rank_device

        parallel = ViewParallel.from_environment()
        device = args.device or rank_device()
    lead = parallel is None or parallel.rank == 0
    pipe = HiresPipeline.from_model(args.model, dtype=args.dtype, device=device)
    if parallel is not None:
        pipe.adapter.parallel = parallel
    ranks = 1 if parallel is None else parallel.world
    native = pipe.native_size
    name = re.sub(r"[^A-Za-z0-9]+", "-", device_name(device)).strip("-").lower()
    path = Path(args.out) / f"{name}-{date.today().isoformat()}.json"
    records: list[dict[str, Any]] = read_json(path) if path.exists() else []
    done = {record_key(r) for r in records}
    rate = matmul_tflops(args.matmul, dtype, device)
    print(f"{device_name(device)}: {args.matmul}³ {args.dtype} matmul {rate:.3g} TFLOP/s", flush=True)
    timed_run(pipe, build_request(PROMPT, "direct", native, native, seed=0, steps=2, previews=False))  # warm-up
    for method, kwargs, w, h, req in runs:
        preset = kwargs["preset"]
        base = {"method": method, "preset": preset, "model": args.model, "width": w, "height": h}
        base |= {"dtype": args.dtype, "steps": args.steps, "max_batch": req.settings.max_batch, "params": params}
        base |= {"ranks": ranks}
        if record_key(base) in done:
            continue
        _, seconds, peak = timed_run(pipe, req)
        flops = model_cost(method, args.model, w, h, **kwargs).model_flops
        record = {
            **base,
            "device": device_name(device),
            "torch": torch.__version__,
            "versions": versions(),
            "wall_s": seconds,
            "peak_mem_gb": None if peak is None else peak / 2**30,
            "model_flops": flops,
            "matmul_tflops": rate,
            "achieved_tflops": flops / seconds / 1e12,
            "mfu": flops / seconds / 1e12 / (rate * ranks),
            "flop_bound_s": flops / (rate * ranks * 1e12),
        }
        if not lead:
            continue  # every rank runs; rank 0 records
        records.append(record)
        write_json(path, records)
        mem = "n/a" if peak is None else f"{record['peak_mem_gb']:.1f} GB"
        print(
            f"{method}{':' + preset if preset else ''} {w}×{h}: {seconds:.1f} s, {mem}, MFU {record['mfu']:.0%}",
            flush=True,
        )
    if lead:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
