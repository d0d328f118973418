"""A lent GPU's whole measurement session in one process, most important first, inside a time budget.

A device is lent for minutes, so everything runs in one process (the full-size random SDXL is built once, the
cost model's traces come from a carried cache) and each part starts only while the budget lasts:

1. :mod:`device_parity` — every method on the tiny models against the CPU (device bugs first);
2. :mod:`gpu_bench` — the SDXL methods at 4096² in float16 with previews, ``max_batch`` and tiling settled for a
   12 GiB card as ``hiresdiff generate`` plans them, the allocator capped at the card: wall time, MFU, the
   measured peak next to the plan's estimate;
3. the baselines of the papers' tables, as 2;
4. a profile of two DemoFusion steps at 4096² (top CUDA kernels) and the CUDA-only tests;
5. 2 with ``--low-vram`` (a view method and a whole-canvas one).

Runs recorded for the device in ``--done`` (``benchmarks/results``) on any date are skipped, so a later session
measures what is missing.

Records go to ``--out`` (``gpu_bench``/``device_parity`` JSON, ``profile.txt``, ``tests.log``). On the device::

    python benchmarks/device_run.py --out "$OUT" --budget 420

and on a CPU, as a dry run of the same code with the tiny model: ``--model tiny-sdxl --device cpu --size 2x``.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType

HERE = Path(__file__).resolve().parent
#: the runs not measured yet come first (the first session measured DemoFusion, direct and APT, uncapped)
CORE = "scalediff,apldm,accdiffusion,multidiffusion,demofusion,direct,apt:apt"
LOW_VRAM = "direct,demofusion"
#: the card every run is planned for and capped at (the README's memory table: a 12 GiB card)
CARD_GIB = 12
BASELINES = "hidiffusion,scalecrafter,fouriscale,freescale,upsample-guidance,diffusehigh"
#: the test files with CUDA-only tests (``-m gpu``)
GPU_TESTS = ("tests/test_gpu_bench.py", "tests/test_random_init.py")


def script(name: str) -> ModuleType:
    """A sibling benchmark script as a module."""
    spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def profile(bench: ModuleType, args: argparse.Namespace, out: Path) -> None:
    """Two DemoFusion steps at ``--size`` under the profiler: the top 15 operators by their own CUDA time."""
    import torch
    from torch.profiler import ProfilerActivity

    from hiresdiff.memory import CARD_CONTEXT, GIB
    from hiresdiff.pipeline import build_request
    from hiresdiff.plan import budget_for

    pipe = next(iter(bench.PIPES.values()))
    side = int(args.size[:-1]) * pipe.native_size
    req = build_request(bench.PROMPT, "demofusion", side, side, seed=0, steps=2, previews=False)
    budget_for(req, args.model, args.device, getattr(torch, args.dtype), int(CARD_GIB * GIB) - CARD_CONTEXT)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.startswith("cuda") else [])
    with torch.profiler.profile(activities=activities) as prof:
        pipe.run(req, progress=False)
    averages = prof.key_averages()
    key = "self_device_time_total" if args.device.startswith("cuda") else "self_cpu_time_total"
    table = averages.table(sort_by=key, row_limit=15)
    (out / "profile.txt").write_text(f"demofusion {side}² 2 steps, max_batch {req.settings.max_batch}\n{table}\n")
    print(table, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--budget", type=float, default=420, help="seconds; no part starts after them")
    p.add_argument("--model", default="random-sdxl")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="float16")
    p.add_argument("--size", default="4x", help="× native size per side")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--matmul", default="8192", help="side of gpu_bench's reference matrix product")
    p.add_argument("--done", default=str(HERE / "results"), help="earlier records: their runs are skipped")
    args = p.parse_args(argv)
    begun = time.perf_counter()
    if args.device.startswith("cuda"):  # random-* weights initialised on the GPU: seconds, not a minute of CPU
        from hiresdiff.models.tiny import INIT_DEVICE_ENV

        os.environ.setdefault(INIT_DEVICE_ENV, args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def left() -> float:
        return args.budget - (time.perf_counter() - begun)

    def part(name: str, share: float) -> float | None:
        """The seconds part ``name`` may start runs in (``share`` of what is left), or ``None`` when none are."""
        if left() <= 0:
            print(f"== {name}: skipped, the budget is spent", flush=True)
            return None
        print(f"== {name} ({time.perf_counter() - begun:.0f} s in)", flush=True)
        return max(1.0, left() * share)

    parity, bench = script("device_parity"), script("gpu_bench")
    common = ["--model", args.model, "--dtype", args.dtype, "--device", args.device, "--sizes", args.size]
    common += ["--steps", str(args.steps), "--card", str(CARD_GIB), "--previews", "--traceback", "--out", str(out)]
    common += ["--matmul", args.matmul, "--done", args.done]

    def tests(limit: float) -> None:
        done = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", *GPU_TESTS],
            capture_output=True,
            text=True,
            timeout=max(30.0, limit),
        )
        (out / "tests.log").write_text(done.stdout + done.stderr)
        print(done.stdout[-2000:], flush=True)

    parts: list[tuple[str, float, Callable[[float], object]]] = [
        ("parity on the tiny models", 0.1,
         lambda t: parity.main(["--device", args.device, "--deadline", f"{t:.0f}", "--out", str(out)])),
        ("core methods, default (12 GiB card)", 0.6,
         lambda t: bench.main([*common, "--methods", CORE, "--deadline", f"{t:.0f}"])),
        ("baselines, default (12 GiB card)", 0.6,
         lambda t: bench.main([*common, "--methods", BASELINES, "--deadline", f"{t:.0f}"])),
        ("profile", 1.0, lambda t: bench.PIPES and profile(bench, args, out)),
        ("CUDA-only tests", 1.0, lambda t: args.device.startswith("cuda") and tests(t)),
        ("low VRAM", 1.0,
         lambda t: bench.main([*common, "--methods", LOW_VRAM, "--set", "low_vram=true", "--deadline", f"{t:.0f}"])),
    ]  # fmt: skip
    for name, share, run in parts:
        if (limit := part(name, share)) is None:
            continue
        try:
            run(limit)
        except Exception:  # one part's failure is a finding; the next part still runs
            traceback.print_exc()
    print(f"== done in {time.perf_counter() - begun:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
