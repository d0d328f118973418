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
        "SDXL, SD 1.5 and FLUX.1-dev map to the built-in random-* architectures (no download). Prices what "
        "`hiresdiff generate` with the same options runs: previews on, max_batch auto settled for --device as its "
        "plan does.",
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
        "--upscaler",
        default=None,
        metavar="FILE",
        help="SR model for every pixel-space enlargement (as generate's flag): its tile calls get their own line",
    )
    p.add_argument("--allow-pickle", action="store_true", help="allow a pickled (.pth) --upscaler file")
    p.add_argument(
        "--ranks", type=int, default=None, help="view-parallel over N ranks: per-rank FLOPs and all-reduce volume"
    )
    p.add_argument("--device", default=None, help="the device max_batch auto is settled for (default: as generate)")
    p.add_argument("--no-previews", action="store_true", help="without the per-phase previews (as generate's flag)")
    p.add_argument("--peak-tflops", type=float, default=None, help="also print the FLOP-bound time at this rate")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    return {"cost": cmd_cost}


def cmd_cost(args: argparse.Namespace) -> int:
    import torch

    from hiresdiff.cost.model import model_cost
    from hiresdiff.errors import require
    from hiresdiff.memory import MemoryEstimate, gib
    from hiresdiff.pipeline import resolve_device

    require(args.peak_tflops is None or args.peak_tflops > 0, f"--peak-tflops must be > 0, got {args.peak_tflops}")
    upscaler = None
    if args.upscaler is not None:  # checked and loaded as generate does (the pickle rule included)
        from hiresdiff.models.upscalers import resolve_upscaler

        upscaler = resolve_upscaler(args.upscaler, allow_pickle=args.allow_pickle)
    options = {
        "preset": args.preset,
        "num_images_per_prompt": args.batch,
        "controlnet": args.controlnet or None,
        "upscaler": upscaler,
        "ranks": args.ranks,
    }
    kwargs = {**sampling_settings(args), **{k: v for k, v in options.items() if v is not None}}
    kwargs.update(previews=not args.no_previews, paper=args.paper, **parse_assignments(args.params))
    settled, req = settle_auto(args, kwargs)
    if req is not None:  # the plan priced this very request while settling auto: its report (kept, also on disk)
        from hiresdiff.plan import request_cost

        report = request_cost(req, args.model)
    else:
        report = model_cost(args.method, args.model, args.width, args.height, **kwargs)
    data = {**report.to_dict(), "max_batch": kwargs["max_batch"]}
    if args.peak_tflops is not None:
        data["flop_bound_s"] = report.seconds_at(args.peak_tflops * TERA)
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    print(
        f"{report.method} on {report.model} ({report.architecture}) at {report.width}×{report.height}, "
        f"{report.steps} steps, {report.images} image(s), max_batch {kwargs['max_batch']}{settled}"
    )
    rows = [
        ("denoiser", report.denoiser_flops, f"calls: {report.denoiser_calls}, samples: {report.denoiser_samples}"),
        ("VAE", report.vae_flops, f"calls: {report.vae_calls}"),
        ("text encoders", report.text_encoder_flops, f"calls: {report.text_encoder_calls}"),
        *([("ControlNet", report.controlnet_flops, f"calls: {report.controlnet_calls}")] if args.controlnet else []),
        *([("upscaler", report.upscaler_flops, f"calls: {report.upscaler_calls}")] if upscaler else []),
        ("total", report.model_flops, ""),
    ]
    for name, flops, note in rows:
        print(f"  {name:<14} {flops / TERA:>14,.1f} TFLOP  {note}")
    print(f"  native-size denoiser samples: {report.native_samples:g} ({report.native_samples_per_step:g} per step)")
    for dtype in (torch.float16, torch.float32):
        est = MemoryEstimate.of(report, dtype, bool(kwargs.get("low_vram")), resolve_device(args.device))
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


def settle_auto(args: argparse.Namespace, kwargs: dict[str, Any]) -> tuple[str, Any]:
    """Settle ``max_batch="auto"`` in ``kwargs`` as ``hiresdiff generate``'s plan does on ``--device`` (its
    default dtype there; :func:`hiresdiff.plan.budget`, which may also tile the VAE to fit), so that both report the
    same numbers; returns how it was chosen for the report's first line and the settled request (``None`` where
    nothing was settled: the caller prices ``kwargs`` itself). Rank-split runs keep the stated fallback (no device
    to fit)."""
    from hiresdiff.config import AUTO, fallback_batch
    from hiresdiff.cost.model import STAND_IN_PROMPT, architecture_of
    from hiresdiff.extras import Extras
    from hiresdiff.models.builtins import BUILTIN_MODELS
    from hiresdiff.pipeline import build_request, resolve_device, resolve_dtype
    from hiresdiff.plan import budget

    if kwargs.get("max_batch", AUTO) != AUTO:
        return "", None
    if kwargs.get("ranks", 1) > 1 or kwargs.get("controlnet"):
        kwargs["max_batch"] = fallback_batch(bool(kwargs.get("low_vram")))
        return " (the fallback of auto with --ranks or --controlnet)", None
    device = resolve_device(args.device)
    native = BUILTIN_MODELS[architecture_of(args.model)].native_size
    width, height = args.width or 2 * native, args.height or 2 * native
    settings = {k: v for k, v in kwargs.items() if k not in ("controlnet", "ranks", "upscaler")}
    extras = Extras(upscaler=kwargs.get("upscaler"))
    req = build_request(STAND_IN_PROMPT, args.method, width, height, extras=extras, **settings)
    chosen = budget(req, args.model, device, resolve_dtype("float16" if device.startswith("cuda") else "float32"))
    kwargs["max_batch"] = req.settings.max_batch
    tiled = ""
    if chosen.tiled:  # the plan tiles the VAE where its whole call does not fit: so does this report
        kwargs["decode_tile_area"], tiled = req.settings.decode_tile_area, ", VAE tiled to fit"
    free = "" if chosen.free is None else f", {chosen.free / 2**30:.1f} GiB free"
    return f" (auto on {device}{free}{tiled}, as generate's plan)", req if chosen.report is not None else None
