"""``hiresdiff bench``: the command, its options, and the order of work across processes.

Every process validates the whole matrix first (cheap, no weights), then the main process writes ``plan.json``;
all processes list the unfinished images once, then process k of n generates unfinished images k, k + n, … on its
own device; after all have finished, the main process writes the report. Each image is claimed before it is made
(:mod:`~hiresdiff.bench.claims`), so separate runs on one ``--out`` share the images and each is made once.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from hiresdiff.bench.plan import BenchPlan, build_plan, parse_sweeps
from hiresdiff.bench.prompts import load_prompts
from hiresdiff.cli_options import add_memory_check_option, add_sampling_options, sampling_settings
from hiresdiff.config import DTYPES, parse_assignments
from hiresdiff.errors import HiresError, require
from hiresdiff.evaluation.defaults import DEFAULT_CLIP_MODEL
from hiresdiff.outputs import check_writable, os_reason

if TYPE_CHECKING:
    from accelerate import PartialState

    from hiresdiff.bench.scoring import ScoringOptions

DEFAULT_OUT = "bench-out"
EXAMPLE = (
    "example: hiresdiff bench --model tiny-sd --methods direct,demofusion,apt:apt-sas --prompts builtin:smoke "
    "--sizes 2x --seeds 0 --steps 3 --out bench-out; multi-GPU: accelerate launch -m "
    "hiresdiff bench …"
)


def register(sub: argparse._SubParsersAction) -> dict[str, Callable[[argparse.Namespace], int]]:
    """Add the ``bench`` subcommand."""
    p = sub.add_parser(
        "bench",
        help="generate methods × sizes × prompts × seeds × sweeps and report time, memory, FLOPs, metrics",
        description="Resumable benchmark; run it under `accelerate launch -m hiresdiff bench …` to shard the "
        "images over processes (GPUs).",
        epilog=EXAMPLE,
    )
    p.add_argument("--methods", help="comma-separated methods, method:preset for a preset (e.g. direct,apt:apt-sas)")
    p.add_argument("--model", default=None, help="as for `hiresdiff generate` (built-ins: tiny-sd, tiny-sdxl, …)")
    p.add_argument(
        "--prompts",
        help="builtin:smoke, a text file (one prompt a line), a CSV with a prompt/caption column and optional seed "
        "column, or a folder of images with captions.csv or .txt sidecars",
    )
    p.add_argument("--limit", type=int, default=None, help="use the first N prompts")
    p.add_argument("--sizes", default="2x", help="comma-separated: 2x, 4x (× native size per side) or WxH pixels")
    p.add_argument("--seeds", default="0", help="comma-separated seeds or ranges (0,1 or 0-7); a CSV seed column wins")
    add_sampling_options(p, set_help="fixed parameter for the methods that have it")
    p.add_argument(
        "--sweep",
        action="append",
        default=[],
        metavar="NAME=V1,V2",
        help="swept parameter (for the methods that have it; V1;V2 when values hold commas); several --sweep "
        "give their product",
    )
    p.add_argument("--dtype", default=None, choices=DTYPES, help="default: float16 on CUDA, float32 on CPU")
    p.add_argument("--device", default=None, help="default: this process's accelerate device, else CUDA or CPU")
    p.add_argument("--allow-pickle", action="store_true", help="allow loading pickled (.ckpt/.bin) weights")
    p.add_argument("--warmup", action="store_true", help="one untimed generation per process before timing")
    p.add_argument("--no-flops", action="store_true", help="do not count model FLOPs")
    add_memory_check_option(p)
    p.add_argument("--sheets", type=int, default=8, help="contact sheets for the first N prompts (default 8)")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"benchmark folder (default {DEFAULT_OUT}); rerun to resume")
    p.add_argument("--reference", default=None, metavar="DIR", help="real images: score each group (FID, KID)")
    p.add_argument(
        "--metrics", default=None, help="score each group with `hiresdiff eval` metrics: fid,kid,is,clip,musiq,clipiqa"
    )
    p.add_argument(
        "--crops", default=None, metavar="SPEC", help="crop protocol of the scores: native | windows:K | fixed:NxS"
    )
    p.add_argument("--crop-seed", type=int, default=0, help="seeds crop positions, KID subsets, IS shuffle")
    p.add_argument("--inception-weights", default=None, metavar="PATH", help="local Inception weights (FID/KID/IS)")
    p.add_argument("--clip-model", default=DEFAULT_CLIP_MODEL, metavar="NAME_OR_PATH", help="CLIP score model")
    p.add_argument("--report-only", action="store_true", help="only (re)write the report of --out (and scores)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    return {"bench": cmd_bench}


def plan_from_args(args: argparse.Namespace) -> BenchPlan:
    """The validated :class:`~hiresdiff.bench.plan.BenchPlan` of the command line (no model work)."""
    from hiresdiff.pipeline import DEFAULT_MODEL

    require(bool(args.methods), "give --methods, e.g. --methods direct,demofusion,apt:apt-sas (or --report-only)")
    require(bool(args.prompts), "give --prompts: builtin:smoke, a prompt file, a caption CSV or a captioned folder")
    return build_plan(
        args.model or DEFAULT_MODEL,
        args.methods,
        args.sizes,
        args.seeds,
        load_prompts(args.prompts, args.limit),
        sweeps=parse_sweeps(args.sweep),
        fixed=parse_assignments(args.params),
        settings=sampling_settings(args),
        dtype=args.dtype,
        paper=args.paper,
        allow_pickle=args.allow_pickle,
    )


def _use_cpu(device: str | None) -> bool:
    """Whether accelerate should set up CPU processes (gloo): asked for (``accelerate launch --cpu`` sets
    ``ACCELERATE_USE_CPU``; ``--device cpu``) or no CUDA device."""
    import torch

    asked = os.environ.get("ACCELERATE_USE_CPU", "").strip().lower() in ("1", "true", "yes", "on")
    return asked or device == "cpu" or not torch.cuda.is_available()


def _print_paths(paths: list[Path], quiet: bool) -> None:
    if not quiet:
        for path in paths:
            print(path)


def cmd_bench(args: argparse.Namespace) -> int:
    """Validate, generate this process's share of the unfinished images, then (main process) report; Ctrl-C
    says how many items are finished (a rerun resumes)."""
    from hiresdiff.bench.scoring import scoring_options

    out = Path(args.out) if args.report_only else check_writable(args.out, "--out")
    require(args.sheets >= 0, f"--sheets must be ≥ 0, got {args.sheets}")
    scoring = scoring_options(args)
    if args.report_only:
        _report(out, None, scoring, args)
        return 0
    return run_plan(args, plan_from_args(args), out, scoring)


def run_plan(args: argparse.Namespace, plan: BenchPlan, out: Path, scoring: ScoringOptions | None) -> int:
    """Generate the unfinished images of ``plan`` in ``out`` (this process's share), then score and report; also
    the engine of ``hiresdiff reproduce``. ``args`` supplies device, dtype, allow_pickle, no_flops,
    skip_memory_check, warmup, quiet and sheets."""
    from accelerate import PartialState

    from hiresdiff.bench.records import prepare_out

    state = PartialState(cpu=_use_cpu(args.device))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    require(
        state.num_processes == world,
        f"launched as {world} processes (WORLD_SIZE) but accelerate set up {state.num_processes}; start several "
        "processes with `accelerate launch -m hiresdiff bench …` (CPU processes: ACCELERATE_USE_CPU=1)",
    )
    prepare_out(out, plan, write=state.is_main_process)
    from hiresdiff.bench.runner import ItemWriteError

    try:
        _generate(args, plan, out, scoring, state)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(interrupted_line(out, plan)) from None
    except ItemWriteError as exc:  # disk full, permission lost: the items before it are intact
        raise HiresError(
            f"cannot write {str(exc.path)!r}: {os_reason(exc.error)}; {interrupted_line(out, plan)}"
        ) from None
    return 0


def interrupted_line(out: Path, plan: BenchPlan) -> str:
    """What an interrupted run leaves: ``N of M item(s) finished; run the same command again to resume``."""
    from hiresdiff.bench.records import count_finished

    return f"{count_finished(out, plan)} of {len(plan.items)} item(s) finished; run the same command again to resume"


def _generate(
    args: argparse.Namespace, plan: BenchPlan, out: Path, scoring: ScoringOptions | None, state: PartialState
) -> None:
    """This process's share of the unfinished items, then (main process) scores and the report."""
    from hiresdiff.bench.records import is_finished
    from hiresdiff.bench.runner import RunOptions, run_items

    pending = [item for item in plan.items if not is_finished(out, item)]
    state.wait_for_everyone()  # every process has the same list before any image is written
    if state.is_main_process and not args.quiet:
        done, n = len(plan.items) - len(pending), state.num_processes
        print(f"hiresdiff bench: {len(pending)} images to generate, {done} already finished, {n} process(es)")
    device = args.device
    if device in (None, "cuda") and state.device.type == "cuda":
        device = str(state.device)  # this process's GPU (cuda:<local rank>)
    opts = RunOptions(
        device=device,
        dtype=args.dtype,
        allow_pickle=args.allow_pickle,
        flops=not args.no_flops,
        memory_check=not args.skip_memory_check,
        warmup=args.warmup,
        progress=not args.quiet,
        process_index=state.process_index,
        num_processes=state.num_processes,
    )
    summary = run_items(plan, pending[state.process_index :: state.num_processes], out, opts)
    if (line := summary.left_line()) is not None:
        print(f"hiresdiff bench: {line}", file=sys.stderr)
    state.wait_for_everyone()
    if state.is_main_process:
        _report(out, plan, scoring, args)


def _report(out: Path, plan: BenchPlan | None, scoring: ScoringOptions | None, args: argparse.Namespace) -> None:
    """Scores (when asked for) and the report of ``out``, under its claim: runs sharing ``out`` write it in turn,
    the last of them from every record."""
    from hiresdiff.bench.claims import Owner, holding
    from hiresdiff.bench.records import REPORT_CLAIM, load_plan
    from hiresdiff.bench.report import write_report
    from hiresdiff.bench.scoring import score_groups

    plan = plan or load_plan(out)  # --report-only: no benchmark, one line, nothing written
    with holding(out / REPORT_CLAIM, Owner.this_process()):
        if scoring is not None:
            _print_paths(score_groups(out, plan, scoring, progress=not args.quiet), args.quiet)
        _print_paths(write_report(out, args.sheets), args.quiet)
