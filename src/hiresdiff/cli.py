"""Command line: ``hiresdiff generate | demo | methods`` and the measuring commands of :data:`SUBCOMMAND_MODULES`.

Building the parser imports no torch, diffusers or transformers (the method registry, settings and option tables
are torch-free), so ``--help``, ``methods`` and argument errors answer at once; each command imports what its work
needs. Argument errors are one line (:class:`Parser`); Ctrl-C at any point of :func:`main`, the heavy imports
included, is one ``hiresdiff: interrupted`` line and exit status 130.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hiresdiff.cli_options import Parser, add_memory_check_option, add_sampling_options, sampling_settings
from hiresdiff.config import DEFAULT_MODEL, DEFAULT_TILE_AREA, DTYPES, FIT_MODES, parse_assignments
from hiresdiff.errors import HiresError, HiresWarning, require
from hiresdiff.methods import METHODS
from hiresdiff.methods.base import FAMILY_NAMES
from hiresdiff.outputs import NumberedImage, check_writable, png_bytes, save_numbered

if TYPE_CHECKING:  # the generation stack (torch, PIL, the pipeline) is imported by the commands that run it
    import torch

    from hiresdiff.from_png import PngRequest
    from hiresdiff.pipeline import GenerationRequest, GenerationResult


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate images at high resolution")
    p.add_argument("prompt", nargs="*", help="one or more prompts")
    p.add_argument("--method", default="demofusion", help=f"one of: {', '.join(METHODS)}")
    p.add_argument(
        "--model",
        default=None,
        help=f"hub id, diffusers folder, .safetensors file, tiny-sd, tiny-sdxl, "
        f"random-sd15, random-sdxl, tiny-flux, random-flux (default {DEFAULT_MODEL})",
    )
    p.add_argument("--width", type=int, default=None, help="pixels (default: twice the native size)")
    p.add_argument("--height", type=int, default=None, help="pixels (default: twice the native size)")
    p.add_argument("--seed", type=int, default=0, help="image i of the batch uses seed + i")
    p.add_argument("--preset", default=None, help="named parameter preset of the method (see `hiresdiff methods`)")
    p.add_argument("--batch", type=int, default=1, help="images per prompt")
    p.add_argument(
        "--tile-area", type=int, default=None, help=f"VAE tiles above this pixel area (default {DEFAULT_TILE_AREA})"
    )
    p.add_argument("--dtype", default=None, choices=DTYPES, help="default: float16 on CUDA, float32 on CPU")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda when available)")
    p.add_argument("--allow-pickle", action="store_true", help="allow loading pickled (.ckpt/.bin) weights")
    p.add_argument("--no-previews", action="store_true", help="do not write per-phase previews")
    _add_image_options(p)
    add_sampling_options(p, set_help="method parameter (see `hiresdiff methods`)")
    p.add_argument("--from-png", default=None, metavar="FILE", help="regenerate the image stored in a hiresdiff PNG")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the run plan (stages, sizes, denoiser samples, model TFLOP, peak memory) and exit without "
        "loading weights",
    )
    add_memory_check_option(p)
    p.add_argument(
        "--parallel",
        default=None,
        choices=("views",),
        help="share each step's denoiser calls over the ranks of torchrun/accelerate (one image, several devices)",
    )
    p.add_argument("--out", default="out", help="output folder")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_image_options(p: argparse.ArgumentParser) -> None:
    """Upscaling an input picture, ControlNet and LoRA options of ``generate``."""
    g = p.add_argument_group("upscale your own image, ControlNet, LoRA, SR model")
    g.add_argument("--image", default=None, metavar="FILE", help="picture to upscale (PNG, JPEG, WebP, …)")
    g.add_argument("--scale", type=float, default=None, help="with --image: enlarge by this factor (default 2)")
    g.add_argument(
        "--fit", default=None, choices=FIT_MODES, help="with --image: reach another aspect by centre crop or edge pad"
    )
    g.add_argument(
        "--strength",
        type=float,
        default=None,
        help="with --image, in (0, 1]: later phases start at step ⌊N·(1 − strength)⌋ (default: the method's own)",
    )
    g.add_argument("--controlnet", default=None, metavar="ID_OR_FOLDER", help="diffusers ControlNet (SD/SDXL)")
    g.add_argument(
        "--control-image", default=None, metavar="FILE", help="ControlNet condition (default: the --image itself)"
    )
    g.add_argument("--control-scale", type=float, default=None, help="ControlNet conditioning scale (default 1.0)")
    g.add_argument(
        "--lora", dest="loras", action="append", default=[], metavar="FILE[:SCALE]", help="LoRA file; repeatable"
    )
    g.add_argument(
        "--upscaler",
        default=None,
        metavar="FILE",
        help="SR model (ESRGAN/BSRGAN/Real-ESRGAN/SwinIR-type .safetensors; .pth with --allow-pickle) for every "
        "pixel-space enlargement: resize, apldm, scalediff, the input picture",
    )


def _extras_args(args: argparse.Namespace) -> dict[str, Any]:
    values = {
        "image": args.image,
        "scale": args.scale,
        "fit": args.fit,
        "strength": args.strength,
        "controlnet": args.controlnet,
        "control_image": args.control_image,
        "control_scale": args.control_scale,
        "upscaler": args.upscaler,
    }
    return {k: v for k, v in values.items() if v is not None} | {"loras": list(args.loras)}


def _write(res: GenerationResult, out: Path, quiet: bool) -> list[Path]:
    """Final images and per-phase previews, each image under its own fresh ``NNN-`` index (claimed race-free, so
    concurrent runs into one folder never overwrite each other), written atomically with their settings (a full
    disk or an interrupt leaves the files written before it complete and no partial file)."""
    count = len(res.previews)
    items = [
        NumberedImage(
            f"{meta['method']}-seed{meta['seed']}",
            img,
            meta,
            tuple((f"phase{k}of{count}", phase[i]) for k, phase in enumerate(res.previews[:-1], 1)),
        )
        for i, (img, meta) in enumerate(zip(res.images, res.metadata, strict=True))
    ]
    written = save_numbered(out, items)
    if not quiet:
        for path in written:
            print(path)
    return written


def cmd_generate(args: argparse.Namespace) -> int:
    from hiresdiff.from_png import check_flags, read_request
    from hiresdiff.pipeline import generate

    png: PngRequest | None = None
    if args.from_png:
        check_flags(vars(args), vars(build_parser().parse_args(["generate"])))
        png = read_request(
            args.from_png,
            model=args.model,
            image=args.image,
            control_image=args.control_image,
            allow_pickle=args.allow_pickle,
        )
        kwargs = png.kwargs
    else:
        require(bool(args.prompt), 'give a prompt: hiresdiff generate "a photo of a cat" [options]')
        kwargs = {
            "prompt": list(args.prompt),
            "method": args.method,
            "model": args.model or DEFAULT_MODEL,
            "dtype": args.dtype,
            "width": args.width,
            "height": args.height,
            **sampling_settings(args),
            "seed": args.seed,
            "num_images_per_prompt": args.batch,
            "decode_tile_area": args.tile_area,
            "preset": args.preset,
            "paper": args.paper,
            **_extras_args(args),
            **parse_assignments(args.params),
        }
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
    out = check_writable(args.out, "--out")
    parallel, device = None, args.device
    if args.parallel == "views":
        from hiresdiff.parallel import ViewParallel, rank_device

        parallel = ViewParallel.from_environment()
        device = device or rank_device()
    lead = parallel is None or parallel.rank == 0
    try:
        res = generate(
            device=device,
            allow_pickle=args.allow_pickle,
            progress=not args.quiet and lead,
            previews=not args.no_previews,
            parallel=parallel,
            before_model=lambda req, native, grid, **target: _plan(
                req, native, grid, out, args, lead, model=kwargs["model"], **target
            ),
            **kwargs,
        )
    except DryRun:
        return 0
    if png is not None:
        res = png.pick(res)
    if lead:  # only rank 0 writes files
        _write(res, out, args.quiet)
    return 0


class DryRun(Exception):
    """``--dry-run``: the plan is printed, nothing is loaded."""


def _plan(
    req: GenerationRequest,
    native: int,
    grid: int,
    out: Path,
    args: argparse.Namespace,
    lead: bool,
    *,
    model: str,
    device: str,
    dtype: torch.dtype,
) -> None:
    """Before any weights load: room for the PNGs, the run plan with its cost and memory estimate on ``model`` (the
    one being generated; one line; the full plan and stop with ``--dry-run``), and a stop with what fits when the
    estimate exceeds free memory."""
    from hiresdiff.plan import budget, check_budget, describe_plan, plan_phases

    s = req.settings
    files = s.batch_size * (1 + len(plan_phases(req, native, grid))) if s.previews else s.batch_size
    check_writable(out, "--out", png_bytes(s.width, s.height, files))
    b = budget(req, model, device, dtype)
    if args.dry_run:
        for line in describe_plan(req, native, grid, b, full=True):
            print(line)
    elif lead and not args.quiet:
        print(describe_plan(req, native, grid, b)[0], file=sys.stderr)
    if not args.skip_memory_check:
        check_budget(b, req, model, dtype, grid)
    if args.dry_run:
        raise DryRun


def cmd_demo(args: argparse.Namespace) -> int:
    from hiresdiff.demo import run_demo

    sheet, _ = run_demo(Path(args.out), model=args.model, steps=args.steps, progress=not args.quiet)
    print(sheet)
    return 0


def cmd_make_tiny(args: argparse.Namespace) -> int:
    from hiresdiff.models.tiny_addons import save_tiny_addons, save_tiny_upscaler

    if args.upscaler:
        print(save_tiny_upscaler(Path(args.out) / "upscaler.safetensors", args.seed))
        return 0
    for path in save_tiny_addons(args.model, Path(args.out), args.seed):
        print(path)
    return 0


def _shown(value: object) -> str:
    return "auto" if value is None else ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def cmd_methods(args: argparse.Namespace) -> int:
    from hiresdiff.config import GenerationSettings

    common = [f for f in dataclasses.fields(GenerationSettings) if f.name.startswith("ag_") or f.name == "hidiffusion"]
    print("every method (native-size first phase): " + ", ".join(f"--set {f.name}={f.default}" for f in common))
    for m in METHODS.values():
        print(f"{m.name}: {m.summary}" + (f"  [{m.paper}]" if m.paper else ""))
        print("    models: " + ", ".join(FAMILY_NAMES[f] for f in m.families))
        if m.default_negative:
            print(f"    default negative prompt: {m.default_negative!r}")
        for name, values in m.presets.items():
            print(f"    --preset {name}: " + ", ".join(f"{k}={'none' if v is None else v}" for k, v in values.items()))
        fields = dataclasses.fields(m.params)
        if not fields:
            print("    (no parameters)")
        for f in fields:
            print(f"    --set {f.name}={_shown(f.default)}")
        for name, value in m.setting_defaults.items():
            print(f"    --set {name}={_shown(value)} (this method's default)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="hiresdiff", description="Training-free high-resolution diffusion.")
    sub = parser.add_subparsers(dest="command", required=True)  # subcommand parsers are Parsers too
    _add_generate(sub)
    d = sub.add_parser("demo", help="offline demo on a tiny random model: contact sheet of the methods")
    d.add_argument("--out", default="demo-out")
    d.add_argument("--model", default="tiny-sdxl")
    d.add_argument("--steps", type=int, default=12)
    d.add_argument("--quiet", action="store_true")
    sub.add_parser("methods", help="list methods, their parameters and defaults")
    t = sub.add_parser("make-tiny", help="write a tiny random ControlNet folder and LoRA file for a tiny model")
    t.add_argument("--model", default="tiny-sdxl", help="tiny-sdxl or tiny-sd")
    t.add_argument(
        "--out",
        default="tiny-addons",
        help="folder: OUT/controlnet and OUT/lora/…safetensors (tiny-sdxl: also OUT/controlnet-canny)",
    )
    t.add_argument("--seed", type=int, default=0)
    t.add_argument(
        "--upscaler", action="store_true", help="write OUT/upscaler.safetensors instead: a tiny random ×4 ESRGAN"
    )
    for module in SUBCOMMAND_MODULES:
        COMMANDS.update(importlib.import_module(module).register(sub))
    return parser


Handler = Callable[[argparse.Namespace], int]
COMMANDS: dict[str, Handler] = {
    "generate": cmd_generate,
    "demo": cmd_demo,
    "methods": cmd_methods,
    "make-tiny": cmd_make_tiny,
}
#: Modules whose ``register(subparsers) -> {name: handler}`` adds further commands (imports kept light:
#: heavy libraries are imported inside the handlers).
SUBCOMMAND_MODULES: tuple[str, ...] = (
    "hiresdiff.cost.cli",
    "hiresdiff.bench.cli",
    "hiresdiff.bench.reproduce",
    "hiresdiff.evaluation.cli",
    "hiresdiff.web.cli",
    "hiresdiff.comfy.cli",
)


def _show_warning(message: Any, category: type[Warning], *args: Any, **kwargs: Any) -> None:
    """hiresdiff's own warnings as one ``hiresdiff: warning:`` line; others as Python prints them."""
    if issubclass(category, HiresWarning):
        print(f"hiresdiff: warning: {message}", file=sys.stderr)
    else:
        _PYTHON_SHOW_WARNING(message, category, *args, **kwargs)


_PYTHON_SHOW_WARNING = warnings.showwarning


def main(argv: list[str] | None = None) -> int:
    """Run one command; its errors are one ``hiresdiff: error:`` line (exit 2) and Ctrl-C — also while the parser
    is built or a command imports its libraries — one ``hiresdiff: interrupted`` line (exit 130)."""
    warnings.showwarning = _show_warning
    try:
        args = build_parser().parse_args(argv)
        return COMMANDS[args.command](args)
    except HiresError as exc:
        print(f"hiresdiff: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        print(f"hiresdiff: interrupted{f'; {exc}' if str(exc) else ''}", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of our output went away (`hiresdiff methods | head`): nothing to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        return 0


if __name__ == "__main__":
    sys.exit(main())
