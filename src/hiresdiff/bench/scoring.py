"""Scoring a benchmark's groups with ``hiresdiff eval`` (``--metrics``, ``--reference``, ``--crops``).

Every group folder ``OUT/images/<group>`` is evaluated with the same networks (built once) and its results
written to the group's ``metrics.json``, which the report reads. A group is scored again only when one of its
images is newer than its ``metrics.json``, so resumed runs score only what changed.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from hiresdiff.bench.plan import BenchPlan
from hiresdiff.bench.records import METRICS_FILE, group_dir
from hiresdiff.errors import require

if TYPE_CHECKING:
    from hiresdiff.evaluation.extractors import Extractors


@dataclass(frozen=True)
class ScoringOptions:
    """What to compute for each group (validated by :func:`scoring_options`)."""

    metrics: tuple[str, ...]
    reference: Path | None
    crops: str | None
    crop_seed: int
    inception_weights: str | None
    clip_model: str
    device: str | None


def scoring_options(args: argparse.Namespace) -> ScoringOptions | None:
    """The validated scoring options of the command line, ``None`` when no metric is asked for.

    Names, the crop spec, the reference folder and the metric packages (and, offline, their weight files) are
    checked here, before any image is generated.
    """
    if args.metrics is None and args.reference is None:
        return None
    from hiresdiff.evaluation.crops import parse_crop_spec
    from hiresdiff.evaluation.evaluator import resolve_device
    from hiresdiff.evaluation.extractors import inception_builder, pyiqa_builder
    from hiresdiff.evaluation.plan import DISTRIBUTION_METRICS, parse_metrics
    from hiresdiff.evaluation.scores import require_torchmetrics

    reference = Path(args.reference) if args.reference else None
    require(reference is None or reference.is_dir(), f"--reference {args.reference!r} is not a folder")
    metrics = parse_metrics(args.metrics, reference is not None)
    if args.crops is not None:
        parse_crop_spec(args.crops)
    if set(metrics) & set(DISTRIBUTION_METRICS):
        require_torchmetrics()
        inception_builder(args.inception_weights)  # checks torch-fidelity and the weights, builds nothing
    for name in {"musiq", "clipiqa"} & set(metrics):
        pyiqa_builder(name, resolve_device(args.device))
    return ScoringOptions(
        metrics, reference, args.crops, args.crop_seed, args.inception_weights, args.clip_model, args.device
    )


def stale(folder: Path) -> bool:
    """Whether the group has images and its ``metrics.json`` is missing or older than one of them."""
    images = list(folder.glob("*.png"))
    target = folder / METRICS_FILE
    if not images:
        return False
    return not target.is_file() or target.stat().st_mtime < max(p.stat().st_mtime for p in images)


def default_extractors(opts: ScoringOptions) -> Extractors:
    """The default networks of ``opts.metrics`` (built once for every group)."""
    from hiresdiff.evaluation.evaluator import resolve_device
    from hiresdiff.evaluation.extractors import complete_extractors

    return complete_extractors(
        None,
        opts.metrics,
        resolve_device(opts.device),
        inception_weights_path=opts.inception_weights,
        clip_model=opts.clip_model,
    )


def score_groups(out: Path, plan: BenchPlan, opts: ScoringOptions, *, progress: bool = True) -> list[Path]:
    """Evaluate every stale group of ``plan`` into its ``metrics.json``; returns the files written."""
    from hiresdiff.evaluation.evaluator import evaluate
    from hiresdiff.evaluation.report import write_json

    folders = [group_dir(out, g) for g in plan.groups]
    todo = [f for f in folders if stale(f)]
    if not todo:
        return []
    extractors = default_extractors(opts)
    written = []
    for folder in todo:
        if progress:
            print(f"hiresdiff bench: scoring {folder.name}", flush=True)
        result = evaluate(
            folder,
            reference=opts.reference,
            metrics=opts.metrics,
            crops=opts.crops,
            crop_seed=opts.crop_seed,
            extractors=extractors,
            device=opts.device,
            progress=False,
        )
        written.append(write_json(result, folder / METRICS_FILE))
    return written
