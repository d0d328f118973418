"""``hiresdiff eval`` and ``hiresdiff dataset``: registered by :func:`register` (heavy imports in the handlers)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from hiresdiff.evaluation.defaults import DEFAULT_CAPTIONER, DEFAULT_CLIP_MODEL

if TYPE_CHECKING:
    from hiresdiff.evaluation.evaluator import EvalResult
    from hiresdiff.evaluation.extractors import Extractors

Handler = Callable[[argparse.Namespace], int]


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="FID, KID, IS, CLIP score, MUSIQ, CLIPIQA and crop variants of a folder of images",
        description="Score a folder of generated images (hiresdiff PNGs carry their prompts and model).",
    )
    p.add_argument("images", metavar="IMAGES_DIR", help="folder of generated images")
    p.add_argument("--reference", metavar="DIR", help="folder of real images (needed by FID and KID)")
    p.add_argument("--prompts", metavar="CSV", help="file,prompt CSV (default: prompts stored in the PNGs)")
    p.add_argument(
        "--metrics",
        default=None,
        help="comma-separated: fid,kid,is,clip,musiq,clipiqa (default fid,kid,is,clip; is,clip without --reference)",
    )
    p.add_argument(
        "--crops",
        default=None,
        metavar="SPEC",
        help="crop variants of FID/KID/IS: native | windows:K[xS] | fixed:NxS (e.g. fixed:50000x299)",
    )
    p.add_argument("--crop-seed", type=int, default=0, help="seeds crop positions, KID subsets, IS shuffle")
    p.add_argument("--native", type=int, default=None, metavar="PX", help="native size for native/windows crops")
    p.add_argument("--inception-weights", metavar="PATH", help="local weights-inception-2015-12-05-6726825d.pth")
    p.add_argument(
        "--clip-model", default=DEFAULT_CLIP_MODEL, metavar="NAME_OR_PATH", help=f"default {DEFAULT_CLIP_MODEL}"
    )
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", type=int, default=4, help="threads decoding images ahead (0: none)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda when available)")
    p.add_argument("--json", default=None, metavar="OUT", help="also write the results as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_dataset(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "dataset",
        help="build a reference set: large real images, centre-cropped square, resized, with captions",
    )
    p.add_argument("src", metavar="SRC_DIR", help="folder of real images (searched recursively)")
    p.add_argument("out", metavar="OUT_DIR", help="output folder: PNGs and captions.csv")
    p.add_argument("--min-side", type=int, default=2048, help="keep images whose shorter side is at least this")
    p.add_argument("--size", type=int, default=2048, help="side of the square outputs")
    p.add_argument("--captions", metavar="CSV", help="file,prompt CSV with captions of the source images")
    p.add_argument(
        "--captioner",
        nargs="?",
        const=DEFAULT_CAPTIONER,
        default=None,
        metavar="MODEL",
        help=f"caption images the CSV does not cover with this model (default {DEFAULT_CAPTIONER})",
    )
    p.add_argument("--limit", type=int, default=None, metavar="N", help="keep at most N images")
    p.add_argument("--device", default=None, help="device of the captioning model")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run_eval(args: argparse.Namespace, extractors: Extractors | None = None) -> int:
    """``hiresdiff eval`` with optional injected networks (the handler passes none; tests pass tiny ones)."""
    from hiresdiff.evaluation.report import check_json_path, format_table, write_json

    if args.json is not None:
        check_json_path(args.json)
    try:
        result = _evaluate(args, extractors)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(_interrupted_line(args.json, "nothing written")) from None
    for note in result.notes:
        print(f"hiresdiff: note: {note}", file=sys.stderr)
    print(format_table(result))
    if args.json is not None:
        try:
            print(write_json(result, args.json))  # atomic: an interrupt leaves the old file or the new one
        except KeyboardInterrupt:
            raise KeyboardInterrupt(_interrupted_line(args.json, "scores printed above, not written")) from None
    return 0


def _interrupted_line(json_path: str | None, done: str) -> str:
    """What an interrupted evaluation leaves: ``done``, and an earlier ``--json`` file as it was."""
    if json_path is not None and Path(json_path).expanduser().is_file():
        done += f"; {json_path!r} is as it was"
    return f"{done}; run the same command again to score"


def _evaluate(args: argparse.Namespace, extractors: Extractors | None) -> EvalResult:
    from hiresdiff.evaluation.evaluator import evaluate

    return evaluate(
        args.images,
        reference=args.reference,
        prompts=args.prompts,
        metrics=args.metrics,
        crops=args.crops,
        crop_seed=args.crop_seed,
        native=args.native,
        extractors=extractors,
        inception_weights=args.inception_weights,
        clip_model=args.clip_model,
        batch_size=args.batch_size,
        device=args.device,
        workers=args.workers,
        progress=not args.quiet,
    )


def cmd_eval(args: argparse.Namespace) -> int:
    return run_eval(args)


def cmd_dataset(args: argparse.Namespace) -> int:
    from hiresdiff.evaluation.dataset import build_reference_set
    from hiresdiff.outputs import check_writable

    check_writable(args.out, "the dataset folder")
    report = build_reference_set(
        args.src,
        args.out,
        min_side=args.min_side,
        size=args.size,
        captions=args.captions,
        captioner=args.captioner,
        limit=args.limit,
        device=args.device,
        progress=not args.quiet,
    )
    line = f"{len(report.written)} images written, {report.existing} already there"
    line += f", {report.too_small} too small, {len(report.unreadable)} unreadable; {report.captioned} captioned"
    if report.unreadable:
        line += " (unreadable: " + ", ".join(p.name for p in report.unreadable[:3])
        line += ", …)" if len(report.unreadable) > 3 else ")"
    print(f"{line} -> {report.out}" + (f" ({report.captions})" if report.captions else ""))
    return 0


def register(sub: argparse._SubParsersAction) -> dict[str, Handler]:
    """Add ``eval`` and ``dataset`` to the ``hiresdiff`` subcommands."""
    _add_eval(sub)
    _add_dataset(sub)
    return {"eval": cmd_eval, "dataset": cmd_dataset}
