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
CPU with the tiny models (used by the tests). Where the time goes: ``denoiser_s``, ``vae_s`` and ``text_s`` (inside
the adapter's denoiser, VAE and prompt calls, the device synchronised around each), ``denoiser_mfu`` (denoiser and
ControlNet FLOPs ÷ ``denoiser_s`` ÷ matmul rate) and ``vae_tflops`` (VAE FLOPs ÷ ``vae_s``).

Each record also holds the plan's memory estimate of the same settings next to the measurement:
``estimated_peak_gb`` (:mod:`hiresdiff.memory`: weights plus the live tensors of the largest call, no CUDA context or
workspace), ``estimate_setter`` (what sets it: ``denoiser``, ``vae``, ``text_encoder``, ``canvas``…),
``peak_reserved_gb`` (the caching allocator's peak) and ``measured_over_estimated`` (allocated ÷ estimated).
``--card 12`` settles ``max_batch`` auto and the VAE tiling as ``hiresdiff generate``'s plan does on a 12 GiB card
(half a GiB of it the CUDA context) — the README's memory table, measured — and on CUDA caps the caching allocator
at the card's free memory (``torch.cuda.set_per_process_memory_fraction``), so a run that would not fit the card
fails here too, fragmentation included. ``--previews`` decodes each phase's preview as ``generate`` does by
default. A run that fails (out of memory, say) is recorded with its ``error`` and the next one starts; a rerun tries
it again. ``--done DIR`` skips the runs recorded for this device in ``DIR`` on any date (``benchmarks/results``).
``--deadline S`` starts no run after ``S`` seconds (a lent device's time is counted); ``--plan-only`` prints each
run's plan and estimate and loads nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from datetime import date
from pathlib import Path
from typing import Any

import torch

from hiresdiff.bench.plan import accepts, parse_methods, parse_sizes
from hiresdiff.bench.records import device_name, device_slug, read_json, versions, write_json
from hiresdiff.bench.runner import timed_run
from hiresdiff.cost import model_cost
from hiresdiff.errors import HiresError, require
from hiresdiff.memory import CARD_CONTEXT, GIB
from hiresdiff.pipeline import HiresPipeline, build_request, check_for_model, resolve_device
from hiresdiff.plan import Budget, budget_for

SDXL_METHODS = "direct,multidiffusion,demofusion,accdiffusion,apt:apt,apldm,scalediff"
PROMPT = "a photograph of a mountain lake at sunrise, highly detailed"
#: pipelines loaded by earlier calls of :func:`main` in this process (a full-size random build takes a minute)
PIPES: dict[tuple[str, str, str], HiresPipeline] = {}


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
    batch = r.get("max_batch") if r.get("card") is None else ("auto", r["card"])  # settled per card: known later
    key = (r["method"], r["preset"], r["model"], *size, r["dtype"], r["steps"], batch, params)
    return (*key, r.get("ranks", 1), bool(r.get("previews", False)), r.get("allocator_cap_gb"))


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
    p.add_argument("--card", type=float, default=None, help="GiB: settle max_batch and VAE tiling as on such a card")
    p.add_argument("--previews", action="store_true", help="decode each phase's preview, as generate does")
    p.add_argument("--deadline", type=float, default=None, help="seconds after which no run starts")
    p.add_argument("--traceback", action="store_true", help="print the traceback of a failed run")
    p.add_argument("--done", default=None, help="a folder of earlier records of this device: runs there are skipped")
    p.add_argument("--plan-only", action="store_true", help="print each run's plan (device: cuda by default)")
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

    begun = time.perf_counter()
    require(args.card is None or args.card > 0.5, f"--card is the card's GiB (above 0.5), got {args.card}")
    require(args.card is None or args.max_batch is None, "--card settles max_batch: give one of --card, --max-batch")
    device = (args.device or "cuda") if args.plan_only else resolve_device(args.device)  # a plan needs no device
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
                PROMPT, method, w, h, seed=0, previews=args.previews, model_defaults=spec.sampling_defaults, **kwargs
            )
            check_for_model(req, spec.native_size, spec.pixel_grid)  # every run is validated before any work
            if args.card is None:  # measured at a stated batch, not the device's auto
                req.settings.max_batch = req.settings.rows_per_call
            runs.append((method, kwargs, w, h, req))
    card = None if args.card is None else int(args.card * GIB) - CARD_CONTEXT
    if args.plan_only:
        for method, kwargs, w, h, req in runs:
            plan = budget_for(req, args.model, str(device), dtype, card)
            setter = "" if plan.estimate is None else f" (set by the {plan.estimate.largest})"
            label = f"{method}{':' + kwargs['preset'] if kwargs['preset'] else ''} {w}×{h}"
            print(f"{label}: {plan.summary()}{setter}, max_batch {req.settings.max_batch}", flush=True)
        return 0
    parallel = None
    if args.parallel == "views":
        from hiresdiff.parallel import ViewParallel, rank_device

        parallel = ViewParallel.from_environment()
        device = args.device or rank_device()
    lead = parallel is None or parallel.rank == 0
    ranks = 1 if parallel is None else parallel.world
    cap = allocator_cap(device, card)  # before the model loads: the weights count against the card too
    name = device_slug(device)
    path = Path(args.out) / f"{name}-{date.today().isoformat()}.json"
    records: list[dict[str, Any]] = read_json(path) if path.exists() else []
    earlier = [r for f in sorted(Path(args.done).glob(f"{name}-*.json")) for r in read_json(f)] if args.done else []
    done = {record_key(r) for r in [*earlier, *records] if "error" not in r}
    pending = []
    for method, kwargs, w, h, req in runs:
        base = {"method": method, "preset": kwargs["preset"], "model": args.model, "width": w, "height": h}
        base |= {"dtype": args.dtype, "steps": args.steps, "max_batch": req.settings.max_batch, "params": params}
        base |= {"ranks": ranks, "card": args.card, "previews": args.previews, "allocator_cap_gb": cap}
        if record_key(base) not in done:
            pending.append((method, kwargs, w, h, req, base))
    if not pending:
        print(f"every run is recorded already: {path if records else args.done}", flush=True)
        return 0
    key = (args.model, args.dtype, str(device))
    pipe = PIPES[key] = PIPES.get(key) or HiresPipeline.from_model(args.model, dtype=args.dtype, device=device)
    if parallel is not None:
        pipe.adapter.parallel = parallel
    native = pipe.native_size
    rate = matmul_tflops(args.matmul, dtype, device)
    print(f"{device_name(device)}: {args.matmul}³ {args.dtype} matmul {rate:.3g} TFLOP/s", flush=True)
    timed_run(pipe, build_request(PROMPT, "direct", native, native, seed=0, steps=2, previews=False))  # warm-up
    for method, kwargs, w, h, req, base in pending:
        label = f"{method}{':' + kwargs['preset'] if kwargs['preset'] else ''} {w}×{h}"
        if args.deadline is not None and time.perf_counter() - begun > args.deadline:
            print(f"{label}: not started (--deadline {args.deadline:g} s passed)", flush=True)
            continue
        plan = budget_for(req, args.model, str(device), dtype, card)  # settles max_batch / tiling with --card
        base |= {"max_batch": req.settings.max_batch, "decode_tile_area": req.settings.decode_tile_area}
        try:
            with phase_times(pipe.adapter, device) as spent:
                _, seconds, peak = timed_run(pipe, req)
        except (RuntimeError, HiresError) as exc:  # out of memory, or a device fault: the next run still starts
            if torch.device(device).type == "cuda":
                torch.cuda.empty_cache()
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            if args.traceback:
                traceback.print_exc()
            print(f"{label}: failed: {type(exc).__name__}: {first}", flush=True)
            if lead:
                records.append({**base, **estimate_fields(plan), "error": f"{type(exc).__name__}: {first}"[:400]})
                write_json(path, records)
            continue
        report = plan.report or model_cost(method, args.model, w, h, previews=args.previews, **kwargs)
        flops = report.model_flops  # the plan's report is of this very request
        denoising = report.denoiser_flops + report.controlnet_flops
        record = {
            **base,
            "device": device_name(device),
            "torch": torch.__version__,
            "versions": versions(),
            "wall_s": seconds,
            "peak_mem_gb": None if peak is None else peak / 2**30,
            "peak_reserved_gb": reserved_gb(device),
            **estimate_fields(plan, peak),
            "model_flops": flops,
            "matmul_tflops": rate,
            "achieved_tflops": flops / seconds / 1e12,
            "mfu": flops / seconds / 1e12 / (rate * ranks),
            "flop_bound_s": flops / (rate * ranks * 1e12),
            **spent,
            "denoiser_mfu": _rate(denoising, spent["denoiser_s"]) / (rate * ranks),
            "vae_tflops": _rate(report.vae_flops, spent["vae_s"]),
        }
        if not lead:
            continue  # every rank runs; rank 0 records
        records.append(record)
        write_json(path, records)
        mem = "n/a" if peak is None else f"{record['peak_mem_gb']:.2f} GB"
        est = "" if plan.estimate is None else f" (estimated {plan.estimate.peak / GIB:.2f})"
        print(
            f"{label}: {seconds:.1f} s, {mem}{est}, max_batch {req.settings.max_batch}, MFU {record['mfu']:.0%}",
            flush=True,
        )
    if lead:
        print(path)
    return 0


@contextlib.contextmanager
def phase_times(adapter: Any, device: str | torch.device) -> Iterator[dict[str, float]]:
    """Seconds inside the adapter's denoiser calls (``predict``, ControlNet included), VAE calls (``decode``,
    ``encode``) and prompt encoding, the device synchronised around each outermost call (what it did, not what was
    queued): ``denoiser_s``, ``vae_s``, ``text_s``."""
    spent = {"denoiser_s": 0.0, "vae_s": 0.0, "text_s": 0.0}
    parts = {"predict": "denoiser_s", "decode": "vae_s", "encode": "vae_s", "encode_prompt": "text_s"}
    inside = [False]

    def timed(call: Callable[..., Any], key: str) -> Callable[..., Any]:
        def run(*args: Any, **kwargs: Any) -> Any:
            if inside[0]:  # a call inside another (an encode within a decode step): counted by the outer one
                return call(*args, **kwargs)
            inside[0] = True
            sync(str(device))
            begin = time.perf_counter()
            try:
                return call(*args, **kwargs)
            finally:
                sync(str(device))
                spent[key] += time.perf_counter() - begin
                inside[0] = False

        return run

    own = {name: adapter.__dict__[name] for name in parts if name in adapter.__dict__}
    for name, key in parts.items():
        setattr(adapter, name, timed(getattr(adapter, name), key))
    try:
        yield spent
    finally:
        for name in parts:
            if name in own:
                setattr(adapter, name, own[name])
            else:
                delattr(adapter, name)


def _rate(flops: float, seconds: float) -> float:
    """TFLOP/s of ``flops`` in ``seconds`` (0 when nothing was timed)."""
    return flops / seconds / 1e12 if seconds > 0 else 0.0


def estimate_fields(plan: Budget, peak: int | None = None) -> dict[str, Any]:
    """The plan's memory estimate of a run, and the measured peak's ratio to it."""
    est = plan.estimate
    if est is None:
        return {"estimated_peak_gb": None, "estimate_setter": None, "estimate_failed": plan.reason}
    ratio = None if peak is None else peak / est.peak
    return {"estimated_peak_gb": est.peak / GIB, "estimate_setter": est.largest, "measured_over_estimated": ratio}


def allocator_cap(device: str | torch.device, card: int | None) -> float | None:
    """On CUDA with a card's free bytes: cap the caching allocator there (GiB), as if the card were all there is;
    without one, lift an earlier call's cap (a process may run several benchmarks)."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return None
    if card is None:
        torch.cuda.set_per_process_memory_fraction(1.0, dev)
        return None
    total = torch.cuda.get_device_properties(dev).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, card / total), dev)
    return min(card, total) / GIB


def reserved_gb(device: str | torch.device) -> float | None:
    """The caching allocator's peak reservation since the last reset (GiB), on CUDA."""
    dev = torch.device(device)
    return torch.cuda.max_memory_reserved(dev) / GIB if dev.type == "cuda" else None


if __name__ == "__main__":
    sys.exit(main())
