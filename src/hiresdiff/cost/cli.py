"""``hiresdiff cost``: model FLOPs of a whole generation, counted offline on the ``meta`` device."""

from __future__ import annotations

import argparse
import json
from typing import Any

from hiresdiff.cli_options import add_sampling_options, sampling_settings
from hiresdiff.config import parse_assignments

TERA = 1e12


def register(sub: argparse._SubParsersAction) -> dict[str, Any]:
    p = sub.add_parser(
        "cost",
        help="model FLOPs of a generation (denoiser, VAE, text encoders) counted on the meta device",
        description="Runs the method's real code path with shape-only models and counts their FLOPs. Hub ids of "
        "SDXL, SD 1.5 and FLUX.1-dev map to the built-in random-* architectures (no download).",
    )
    p.add_argument("--method", default="demofusion")
    p.add_argument("--model", default="random-sdxl", help="random-sdxl, random-sd15, random-flux, tiny-*, or a hub id")
    p.add_argument("--width", type=int, default=None, help="pixels (default: twice the native size)")
    p.add_argument("--height", type=int, default=None, help="pixels (default: twice the native size)")
    p.add_argument("--preset", default=None, help="named parameter preset of the method (see `hiresdiff methods`)")
    p.add_argument("--batch", type=int, default=None, help="images per prompt")
    add_sampling_options(p, set_help="method parameter (see `hiresdiff methods`)")
    p.add_argument(
        "--controlnet", action="store_true", help="add a ControlNet of the model's UNet to every denoiser call"
    )
    p.add_argument(
        "--ranks", type=int, default=None, help="view-parallel over N ranks: per-rank FLOPs and all-reduce volume"
    )
    p.add_argument("--peak-tflops", type=float, default=None, help="also print the FLOP-bound time at this rate")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    return {"cost": cmd_cost}


def cmd_cost(args: argparse.Namespace) -> int:
    import torch

    from hiresdiff.cost.model import model_cost
    from hiresdiff.errors import require
    from hiresdiff.memory import MemoryEstimate, gib

    require(args.peak_tflops is None or args.peak_tflops > 0, f"--peak-tflops must be > 0, got {args.peak_tflops}")
    options = {
        "preset": args.preset,
        "num_images_per_prompt": args.batch,
        "controlnet": args.controlnet or None,
        "ranks": args.ranks,
    }
    kwargs = {**sampling_settings(args), **{k: v for k, v in options.items() if v is not None}}
    report = model_cost(
        args.method, args.model, args.width, args.height, paper=args.paper, **kwargs, **parse_assignments(args.params)
    )
    data = report.to_dict()
    if args.peak_tflops is not None:
        data["flop_bound_s"] = report.seconds_at(args.peak_tflops * TERA)
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    print(
        f"{report.method} on {report.model} ({report.architecture}) at {report.width}×{report.height}, "
        f"{report.steps} steps, {report.images} image(s)"
    )
    rows = [
        ("denoiser", report.denoiser_flops, f"calls: {report.denoiser_calls}, samples: {report.denoiser_samples}"),
        ("VAE", report.vae_flops, f"calls: {report.vae_calls}"),
        ("text encoders", report.text_encoder_flops, f"calls: {report.text_encoder_calls}"),
        *([("ControlNet", report.controlnet_flops, f"calls: {report.controlnet_calls}")] if args.controlnet else []),
        ("total", report.model_flops, ""),
    ]
    for name, flops, note in rows:
        print(f"  {name:<14} {flops / TERA:>14,.1f} TFLOP  {note}")
    print(f"  native-size denoiser samples: {report.native_samples:g} ({report.native_samples_per_step:g} per step)")
    for dtype in (torch.float16, torch.float32):
        est = MemoryEstimate.of(report, dtype, bool(kwargs.get("low_vram")))
        print(f"  est. peak memory at {str(dtype)[6:]}: {gib(est.peak)} ({est.describe()})")
    if "flop_bound_s" in data:
        print(f"  FLOP bound at {args.peak_tflops:g} TFLOP/s: {data['flop_bound_s']:.1f} s")
    if report.ranks > 1:
        per_rank = ", ".join(f"{f / TERA / report.steps:,.1f}" for f in report.rank_flops)
        print(f"  {report.ranks} ranks, denoiser TFLOP per step per rank: {per_rank}")
        print(
            f"  all-reduced per step: {report.allreduce_bytes / report.steps / 2**20:,.1f} MiB; "
            f"denoiser-bound speed-up {report.parallel_speedup:.2f}×"
        )
    return 0
