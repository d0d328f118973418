"""Every method on an accelerator against the same run on the CPU, on the tiny models.

The noise is drawn from CPU generators (:func:`hiresdiff.pipeline._generators`) and the tiny weights are built on the
CPU, so a float32 run on ``--device`` differs from the CPU's only by its kernels (TF32 convolutions, other reduction
orders): a device bug — a tensor left on the wrong device, a dtype a kernel does not take, a CPU-only code path — shows
as a failure or as latents far from the CPU's. One record per run goes to ``<out>/parity-<device>-<date>.json``:
``method``, ``model``, ``max_abs`` (largest latent difference), ``scale`` (largest CPU latent), ``relative``
(their ratio), ``image_mean_abs`` (mean pixel difference in [0, 1]) or ``error`` (the first line of a failure; a
refusal of the method for the model is recorded as ``refused``). Extra rows on tiny-sdxl exercise the device paths
that the plain runs do not: a ControlNet and a LoRA, AccDiffusion v2's canny ControlNet, ``low_vram`` (against the
CPU run without it) and bfloat16 (finite latents only). ::

    python benchmarks/device_parity.py --device cuda
    python benchmarks/device_parity.py --device cpu --models tiny-sd --methods direct,demofusion   # a dry run
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hiresdiff.bench.records import device_slug, write_json
from hiresdiff.errors import HiresError
from hiresdiff.methods import METHODS
from hiresdiff.pipeline import GenerationResult, HiresPipeline

PROMPT = "a lighthouse on a cliff"
#: the relative latent difference above which a run counts as diverged (TF32 and reduction order stay far below)
TOLERANCE = 0.05
Runner = Callable[[HiresPipeline], GenerationResult]


def compare(cpu: GenerationResult, dev: GenerationResult) -> dict[str, Any]:
    """Largest latent difference, its ratio to the largest CPU latent, and the mean pixel difference (a method
    without latents, ``resize``, by its pixels alone)."""
    pixels = [np.abs(np.asarray(x, np.float32) - np.asarray(y, np.float32)) / 255 for x, y in
              zip(cpu.images, dev.images, strict=True)]  # fmt: skip
    out: dict[str, Any] = {"image_mean_abs": float(np.mean([p.mean() for p in pixels]))}
    if cpu.latents is None or dev.latents is None:
        return out | {"ok": out["image_mean_abs"] <= TOLERANCE / 10}
    a, b = cpu.latents.float(), dev.latents.float().cpu()
    max_abs, scale = float((a - b).abs().max()), float(a.abs().max())
    relative = max_abs / max(scale, 1e-12)
    return out | {"max_abs": max_abs, "scale": scale, "relative": relative, "ok": relative <= TOLERANCE}


def first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: " + (str(exc).strip().splitlines() or [""])[0][:300]


def plain_cases(model: str, family: str, methods: Sequence[str] | None, steps: int) -> list[tuple[str, Runner]]:
    """Every method that runs on ``family`` (AccDiffusion v2 only with its ControlNet, below), at twice native."""
    names = [n for n, m in METHODS.items() if family in m.families and n != "accdiffusion-v2"]
    names = [n for n in names if methods is None or n in methods]

    def case(name: str) -> Runner:
        def run(hp: HiresPipeline) -> GenerationResult:
            side = 2 * hp.native_size
            return hp(PROMPT, name, side, side, steps=steps, seed=0, previews=False, progress=False)

        return run

    return [(f"{model} {n}", case(n)) for n in names]


def addon_cases(folder: Path, steps: int) -> list[tuple[str, Runner]]:
    """tiny-sdxl with a ControlNet and a LoRA (demofusion), AccDiffusion v2 with its canny ControlNet."""
    from hiresdiff.models.tiny_addons import save_tiny_addons

    controlnet, lora, canny = save_tiny_addons("tiny-sdxl", folder)
    kw = {"steps": steps, "seed": 0, "previews": False, "progress": False}
    image = folder / "input.png"
    rng = np.random.default_rng(0)
    from PIL import Image

    Image.fromarray(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)).save(image)

    def controlled(hp: HiresPipeline) -> GenerationResult:
        return hp(PROMPT, "demofusion", 256, 256, controlnet=str(controlnet), control_image=str(image),
                  loras=str(lora), **kw)  # fmt: skip

    def accv2(hp: HiresPipeline) -> GenerationResult:
        return hp(PROMPT, "accdiffusion-v2", 256, 256, controlnet=str(canny), **kw)

    return [("tiny-sdxl demofusion+controlnet+lora", controlled), ("tiny-sdxl accdiffusion-v2+canny", accv2)]


def parity(args: argparse.Namespace) -> list[dict[str, Any]]:
    begun = time.perf_counter()
    methods = [m.strip() for m in args.methods.split(",")] if args.methods else None
    records: list[dict[str, Any]] = []

    def over() -> bool:
        return args.deadline is not None and time.perf_counter() - begun > args.deadline

    def record(label: str, cpu_run: Runner, dev_run: Runner, pipes: tuple[HiresPipeline, HiresPipeline]) -> None:
        if over():
            print(f"{label}: not started (--deadline)", flush=True)
            return
        row: dict[str, Any] = {"case": label}
        t0 = time.perf_counter()
        try:
            cpu = cpu_run(pipes[0])
        except HiresError as exc:
            row["refused"] = first_line(exc)
        else:
            try:
                row |= compare(cpu, dev_run(pipes[1]))
            except Exception as exc:  # a device fault is the finding: record it and go on
                row["error"] = first_line(exc)
        row["seconds"] = time.perf_counter() - t0
        records.append(row)
        shown = {k: (f"{v:.3g}" if isinstance(v, float) else v) for k, v in row.items() if k != "case"}
        print(label, shown, flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models.split(","):
            cpu_pipe = HiresPipeline.from_model(model, device="cpu")
            dev_pipe = HiresPipeline.from_model(model, device=args.device)
            pipes = (cpu_pipe, dev_pipe)
            family = cpu_pipe.adapter.family
            for label, run in plain_cases(model, family, methods, args.steps):
                record(label, run, run, pipes)
            if model == "tiny-sdxl" and methods is None:
                for label, run in addon_cases(Path(tmp), args.steps):
                    record(label, run, run, pipes)

                def low(hp: HiresPipeline, low_vram: bool = False) -> GenerationResult:
                    return hp(PROMPT, "demofusion", 256, 256, steps=args.steps, seed=0, previews=True,
                              progress=False, low_vram=low_vram, max_batch=1)  # fmt: skip

                record("tiny-sdxl demofusion low_vram", low, lambda hp: low(hp, True), pipes)
                bf16 = HiresPipeline.from_model(model, dtype="bfloat16", device=args.device)
                t0 = time.perf_counter()
                try:
                    res = bf16(PROMPT, "demofusion", 256, 256, steps=args.steps, seed=0, progress=False)
                    assert res.latents is not None
                    row = {"finite": bool(torch.isfinite(res.latents).all()), "dtype": str(res.latents.dtype)}
                except Exception as exc:
                    row = {"error": first_line(exc)}
                records.append({"case": "tiny-sdxl demofusion bfloat16", **row, "seconds": time.perf_counter() - t0})
                print("tiny-sdxl demofusion bfloat16", row, flush=True)
    return records


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--models", default="tiny-sd,tiny-sdxl,tiny-flux")
    p.add_argument("--methods", default=None, help="comma list (default: every method of each model's family)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--deadline", type=float, default=None, help="seconds after which no run starts")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args(argv)
    try:
        records = parity(args)
    except HiresError as exc:
        print(f"device_parity: error: {exc}", file=sys.stderr)
        return 2
    path = write_json(Path(args.out) / f"parity-{device_slug(args.device)}-{date.today().isoformat()}.json", records)
    bad = [r["case"] for r in records if "error" in r or r.get("ok") is False or r.get("finite") is False]
    print(f"{len(records) - len(bad)} of {len(records)} runs agree; diverged or failed: {bad or 'none'}")
    print(path)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
