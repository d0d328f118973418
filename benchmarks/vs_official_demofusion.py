"""hiresdiff's DemoFusion against the official pipeline, on the same weights, steps and decodes (a benchmark).

The official ``pipeline_demofusion_sdxl.py`` (github.com/PRIS-CV/DemoFusion) is not part of hiresdiff: download it
and pass its path with ``--official``. Both run on the same tiny random SDXL (``tiny-sdxl``, CPU, float32), the
same prompt, size (3× native by default), steps, guidance, Euler scheduler (the model's own configuration), σ and
cosine scales (the official's input check, which hard-codes SDXL's 1024 px, sees the sides in SDXL's terms), and
both decode every phase — the first whole, later ones tiled (the official ``multi_decoder``,
hiresdiff's previews with ``decode_tile_area=0``). The runs are interleaved (official, hiresdiff, official, …) so
that the load of a shared machine hits both alike; the table gives the median wall and CPU seconds of each and
hiresdiff's ratio to the official. Rows: hiresdiff with ``max_batch`` auto (the default: as many rows per call as
the estimate fits into free memory), and at the fixed 8 rows that were the default before. The official batches 16
views per call (``view_batch_size``), i.e. up to 32 UNet rows with both guidance halves.

    python benchmarks/vs_official_demofusion.py --official /path/to/pipeline_demofusion_sdxl.py --reps 3
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

PROMPT = "a photograph of a mountain lake at sunrise"


def load_official(path: Path, components: dict[str, Any], native: int) -> Any:
    """The official ``DemoFusionSDXLPipeline`` class from the user's file, built on ``components``.

    Its input check insists on sides divisible by 1024 (SDXL's native size, hard-coded); everything else follows
    the UNet's ``sample_size``. The check is given the sides in SDXL's terms (× 1024 / ``native``), so the tiny
    model's native multiples pass it unchanged otherwise."""
    spec = importlib.util.spec_from_file_location("official_demofusion", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"--official {path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cls = module.DemoFusionSDXLPipeline

    class AtTinySizes(cls):  # type: ignore[misc, valid-type]
        def check_inputs(self, prompt: Any, prompt_2: Any, height: int, width: int, *rest: Any, **kw: Any) -> Any:
            return super().check_inputs(prompt, prompt_2, height * 1024 // native, width * 1024 // native, *rest, **kw)

    accepted = set(inspect.signature(cls.__init__).parameters)
    pipe = AtTinySizes(**{k: v for k, v in components.items() if k in accepted})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def timed(fn: Any) -> tuple[float, float]:
    """Wall and CPU seconds of ``fn()``."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--official", type=Path, required=True, help="path of the official pipeline_demofusion_sdxl.py")
    p.add_argument("--scale", type=int, default=3, help="target side in multiples of the native size")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    args = p.parse_args()

    from hiresdiff.models.tiny import build_builtin
    from hiresdiff.pipeline import HiresPipeline

    torch.set_grad_enabled(False)
    pipe = build_builtin("tiny-sdxl", torch.float32, "cpu")
    native = pipe.unet.config.sample_size * pipe.vae_scale_factor
    side = args.scale * native
    official = load_official(args.official, dict(pipe.components), native)
    ours = HiresPipeline(pipe, "tiny-sdxl")
    common = {"num_inference_steps": args.steps, "guidance_scale": 7.5}

    def run_official() -> None:
        official(
            PROMPT, height=side, width=side, generator=torch.Generator().manual_seed(0), view_batch_size=16,
            multi_decoder=True, stride=native // pipe.vae_scale_factor // 2, sigma=0.8,
            cosine_scale_1=3.0, cosine_scale_2=1.0, cosine_scale_3=1.0, output_type="pil", **common,
        )  # fmt: skip

    def run_ours(max_batch: int | str) -> Any:
        def go() -> None:
            ours(
                PROMPT, "demofusion", side, side, generator=torch.Generator().manual_seed(0), progress=False,
                steps=args.steps, guidance=7.5, scheduler="euler", max_batch=max_batch, previews=True,
                decode_tile_area=0,
            )  # fmt: skip

        return go

    contenders = {"official (view_batch_size 16)": run_official, "hiresdiff max_batch auto": run_ours("auto")}
    contenders["hiresdiff max_batch 8"] = run_ours(8)
    for fn in contenders.values():  # warm-up: first-call costs (imports, allocator, the plan's traces) left out
        fn()
    seconds: dict[str, list[tuple[float, float]]] = {name: [] for name in contenders}
    for _ in range(args.reps):
        for name, fn in contenders.items():
            seconds[name].append(timed(fn))
    base_wall = statistics.median(w for w, _ in seconds["official (view_batch_size 16)"])
    base_cpu = statistics.median(c for _, c in seconds["official (view_batch_size 16)"])
    rows = []
    for name, times in seconds.items():
        wall, cpu = statistics.median(w for w, _ in times), statistics.median(c for _, c in times)
        ratios = {"wall_ratio": wall / base_wall, "cpu_ratio": cpu / base_cpu}
        rows.append({"run": name, "wall_s": wall, "cpu_s": cpu, **ratios})
    print(f"DemoFusion {side}×{side}, {args.steps} steps, tiny-sdxl, CPU, median of {args.reps} interleaved runs:")
    print("| run | wall s | CPU s | × official (wall) | × official (CPU) |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['run']} | {r['wall_s']:.2f} | {r['cpu_s']:.2f} | {r['wall_ratio']:.2f} | {r['cpu_ratio']:.2f} |")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
