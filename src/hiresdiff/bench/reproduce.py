"""``hiresdiff reproduce TABLE``: regenerate one table of a paper with the benchmark and set it beside the paper's.

The table (:mod:`~hiresdiff.bench.tables`) expands to a bench matrix — one group per runnable row and size, the
sizes scaled from the paper's SDXL to the chosen model's native side — which :func:`hiresdiff.bench.cli.run_plan`
generates resumably in ``OUT/TABLE/`` (a rerun on a finished folder makes nothing) and, with ``--reference``,
scores with the table's metrics and crop protocol. ``OUT/TABLE.md`` then gives, per size, the paper's rows ×
metrics with hiresdiff's value and the published value side by side, and lists the rows hiresdiff cannot run.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from hiresdiff.bench.tables import TABLES, PaperSize, PaperTable, TableRow, get_table, published_values, row_problem
from hiresdiff.errors import HiresError, require
from hiresdiff.evaluation.defaults import DEFAULT_CLIP_MODEL

if TYPE_CHECKING:
    from hiresdiff.bench.plan import BenchPlan, Group
    from hiresdiff.bench.prompts import Prompt
    from hiresdiff.bench.rows import Row
    from hiresdiff.bench.scoring import ScoringOptions

DEFAULT_OUT = "reproduce-out"
DEFAULT_PROMPTS = "builtin:smoke"
MISSING = "—"
EXAMPLE = "example: hiresdiff reproduce apt-table1 --model tiny-sdxl --limit 2 --steps 3 --dry-run"


def register(sub: argparse._SubParsersAction) -> dict[str, Callable[[argparse.Namespace], int]]:
    """Add the ``reproduce`` subcommand."""
    tables = "; ".join(f"{t.name}: {t.title}" for t in TABLES.values())
    p = sub.add_parser(
        "reproduce",
        help="regenerate a paper's table (bench matrix, metrics) beside the published numbers",
        description=f"Tables: {tables}.",
        epilog=EXAMPLE,
    )
    p.add_argument("table", help=f"one of: {', '.join(TABLES)}")
    p.add_argument("--model", default=None, help="model to run (default: the paper's, SDXL base 1.0)")
    p.add_argument("--prompts", default=DEFAULT_PROMPTS, help=f"prompt set as for bench (default {DEFAULT_PROMPTS})")
    p.add_argument("--limit", type=int, default=None, help="use the first N prompts")
    p.add_argument("--rows", default=None, help="run only these rows, numbered from 1 as in --dry-run (e.g. 1,7)")
    p.add_argument("--steps", type=int, default=None, help="inference steps (default: the paper's, 50)")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"folder (default {DEFAULT_OUT}): OUT/TABLE.md, OUT/TABLE/")
    p.add_argument("--reference", default=None, metavar="DIR", help="real images: score with the table's metrics")
    p.add_argument("--crops", default=None, metavar="SPEC", help="crop protocol instead of the table's")
    p.add_argument("--crop-seed", type=int, default=0, help="seeds crop positions, KID subsets, IS shuffle")
    p.add_argument("--inception-weights", default=None, metavar="PATH", help="local Inception weights (FID/KID/IS)")
    p.add_argument("--clip-model", default=DEFAULT_CLIP_MODEL, metavar="NAME_OR_PATH", help="CLIP score model")
    p.add_argument("--dtype", default=None, help="default: float16 on CUDA, float32 on CPU")
    p.add_argument("--device", default=None, help="default: this process's accelerate device, else CUDA or CPU")
    p.add_argument("--allow-pickle", action="store_true", help="allow loading pickled (.ckpt/.bin) weights")
    p.add_argument("--no-flops", action="store_true", help="do not count model FLOPs")
    p.add_argument("--dry-run", action="store_true", help="print the matrix and exit without loading a model")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(warmup=False, skip_memory_check=False, sheets=4)
    return {"reproduce": cmd_reproduce}


@dataclass(frozen=True)
class Cell:
    """Where a table row at one paper size is generated: its bench group, or why it is not."""

    row: TableRow
    size: PaperSize
    group: Group | None
    problem: str | None = None


@dataclass
class TablePlan:
    """A table expanded for one model: the bench matrix and the row × size cells it fills."""

    table: PaperTable
    plan: BenchPlan
    cells: list[Cell]
    native: int

    def cell(self, row: TableRow, size: PaperSize) -> Cell:
        return next(c for c in self.cells if c.row is row and c.size is size)


def _settings(table: PaperTable, steps: int | None) -> dict[str, object]:
    return {**table.settings, **({"steps": steps} if steps is not None else {})}


def build_table_plan(
    table: PaperTable,
    model: str,
    prompts: list[Prompt],
    *,
    steps: int | None = None,
    dtype: str | None = None,
    allow_pickle: bool = False,
    only: set[int] | None = None,
) -> TablePlan:
    """The bench matrix of ``table`` on ``model``: every runnable row at every size, validated by the bench's own
    planner (:func:`~hiresdiff.bench.plan.build_plan`, no weights read). A row the registry lacks, or that the
    planner refuses on this model, becomes a cell with its reason; rows whose 1-based number is not in ``only``
    (when given) are left out with that reason; a table with no runnable row is an error."""
    from hiresdiff.bench.plan import BenchPlan, build_plan
    from hiresdiff.models.loading import resolve_model

    spec = resolve_model(model, allow_pickle=allow_pickle)
    pixels = {size: size.pixels(spec.native_size) for size in table.sizes}
    sizes_text = ",".join(dict.fromkeys(f"{w}x{h}" for w, h in pixels.values()))
    settings = _settings(table, steps)
    cells: list[Cell] = []
    groups: dict[Group, None] = {}
    sweeps: dict[str, list[str]] = {}
    for number, row in enumerate(table.rows, 1):
        problem = row_problem(row) if only is None or number in only else "not selected (--rows)"
        if problem is None:
            methods = f"{row.method}:{row.preset}" if row.preset else str(row.method)
            try:
                part = build_plan(
                    model,
                    methods,
                    sizes_text,
                    "0",
                    prompts,
                    sweeps={k: [v] for k, v in row.sets},
                    fixed={},
                    settings=settings,
                    dtype=dtype,
                    paper=table.paper_setting,
                    allow_pickle=allow_pickle,
                )
            except HiresError as exc:
                problem = f"not runnable on {model}: {exc}"
        if problem is not None:
            cells.extend(Cell(row, size, None, problem) for size in table.sizes)
            continue
        by_pixels = {g.size.pixels: g for g in part.groups}
        for size in table.sizes:
            group = by_pixels["{}x{}".format(*pixels[size])]
            cells.append(Cell(row, size, group))
            groups[group] = None
        for name, value in row.sets:
            sweeps.setdefault(name, [])
            if value not in sweeps[name]:
                sweeps[name].append(value)
    require(bool(groups), f"{table.name}: no row of the table can run on {model}")
    plan = BenchPlan(
        model, dtype, table.paper_setting, settings, {}, sweeps, [0], prompts, list(groups), spec.sampling_defaults
    )
    return TablePlan(table, plan, cells, spec.native_size)


def matrix_lines(tp: TablePlan) -> list[str]:
    """The dry-run listing: settings, then one line per group (size, steps, images), then the rows not run."""
    from hiresdiff.pipeline import build_request

    table, plan = tp.table, tp.plan
    per_group = len(plan.items) // max(len(plan.groups), 1)
    lines = [
        f"{table.name}: {table.title}",
        f"  source: {table.source}",
        f"  model: {plan.model} (native {tp.native} px; the paper's SDXL sizes scaled by {tp.native}/1024)",
        f"  prompts: {len(plan.prompts)} (the paper: {table.prompts}), seed 0, one image per prompt",
        f"  metrics: {', '.join(h for h, _ in table.metrics)}; crops {table.crops}",
        f"  groups: {len(plan.groups)}, images: {len(plan.items)}",
    ]
    for cell in tp.cells:
        if cell.group is None:
            continue
        group, size = cell.group, cell.group.size
        req = build_request("dry run", group.method, size.width, size.height, **plan.request_kwargs(group))
        lines.append(
            f"  {cell.row.label:<24} {group.label:<34} {cell.size.label:>10} → {size.pixels:<10} "
            f"steps {req.settings.steps:<3} {req.settings.scheduler:<8} images {per_group}"
        )
    skipped = {c.row.label: c.problem for c in tp.cells if c.group is None}
    lines += [f"  {label:<24} {problem}" for label, problem in skipped.items()]
    lines += ["  rows (--rows): " + ", ".join(f"{i} {row.label}" for i, row in enumerate(table.rows, 1))]
    return lines


def _fmt(value: float | None) -> str:
    return MISSING if value is None else f"{value:.4g}"


def _ours(row: Row | None, column: str) -> float | None:
    if row is None:
        return None
    return row.seconds if column == "Time" else row.metrics.get(column)


def table_markdown(tp: TablePlan, rows: dict[Group, Row], scoring: ScoringOptions | None) -> str:
    """``TABLE.md``: per size, the paper's rows × metrics, hiresdiff's value then the paper's."""
    table, plan = tp.table, tp.plan
    lines = [
        f"# {table.title}",
        "",
        f"- source: {table.source}",
        f"- model: `{plan.model}` (the paper: `{table.model}`); sizes scaled by {tp.native}/1024",
        f"- prompts: {len(plan.prompts)}, seed 0 (the paper: {table.prompts})",
        "- settings: "
        + (", ".join(f"{k}={v}" for k, v in plan.settings.items()) or "defaults")
        + (" (--paper: DDIM, guidance 7.5, the DemoFusion negative prompt)" if plan.paper else ""),
        f"- metrics: {', '.join(h for h, _ in table.metrics)}; crops `{scoring.crops if scoring else table.crops}`"
        + ("" if scoring else " — not scored (no --reference): only time is measured"),
        "",
        "Each metric: hiresdiff's value, then the paper's. Time: seconds per image (the paper's on its GPU).",
    ]
    headers = [h for header, _ in table.metrics for h in (header, f"{header} (paper)")]
    for size in table.sizes:
        lines += ["", f"## {size.label}", ""]
        lines += ["| Method (paper) | hiresdiff | Images | " + " | ".join(headers) + " |"]
        lines += ["|" + "---|" * (3 + len(headers))]
        for trow in table.rows:
            cell = tp.cell(trow, size)
            paper = published_values(table, trow).get(size.label, {})
            row = rows.get(cell.group) if cell.group is not None else None
            if cell.group is None:
                run, images = "not run", MISSING
            else:
                run = f"`{cell.group.label}` {cell.group.size.pixels}"
                images = f"{len(row.records) if row else 0}/{row.planned if row else 0}"
            values = []
            for _, column in table.metrics:
                values += [_fmt(_ours(row, column)), _fmt(paper.get(column))]
            lines.append(f"| {trow.label} | {run} | {images} | " + " | ".join(values) + " |")
    skipped = {c.row.label: c.problem for c in tp.cells if c.group is None}
    if skipped:
        lines += ["", "## Rows not run", "", *(f"- {label}: {why}" for label, why in skipped.items())]
    lines += ["", "## Notes on the transcription", "", *(f"- {note}" for note in table.notes), ""]
    return "\n".join(lines)


def write_table(out: Path, bench_dir: Path, tp: TablePlan, scoring: ScoringOptions | None) -> Path:
    """Write ``OUT/TABLE.md`` from the records and scores in ``bench_dir``."""
    from hiresdiff.bench.report import collect_rows
    from hiresdiff.images import atomic_write_bytes

    rows = {row.group: row for row in collect_rows(bench_dir, tp.plan)}
    path = out / f"{tp.table.name}.md"
    atomic_write_bytes(path, table_markdown(tp, rows, scoring).encode())
    return path


def parse_rows(text: str | None, table: PaperTable) -> set[int] | None:
    """``--rows 1,7`` → ``{1, 7}``, checked against the table's row count (``None``: every row)."""
    if text is None:
        return None
    entries = [e.strip() for e in text.split(",")]
    n = len(table.rows)
    ok = all(e.isdigit() and 1 <= int(e) <= n for e in entries)
    require(ok, f"--rows expects row numbers from 1 to {n} of {table.name} separated by commas, got {text!r}")
    return {int(e) for e in entries}


def _scoring(args: argparse.Namespace, table: PaperTable) -> ScoringOptions | None:
    """The bench's scoring options for the table's metrics and crops (``None`` without ``--reference``)."""
    from hiresdiff.bench import scoring

    if args.reference is None:
        return None
    ns = argparse.Namespace(
        metrics=",".join(table.eval_metrics),
        reference=args.reference,
        crops=args.crops or table.crops,
        crop_seed=args.crop_seed,
        inception_weights=args.inception_weights,
        clip_model=args.clip_model,
        device=args.device,
    )
    return scoring.scoring_options(ns)


def cmd_reproduce(args: argparse.Namespace) -> int:
    """Expand the table, then print it (``--dry-run``) or generate, score and write ``OUT/TABLE.md``."""
    from hiresdiff.bench.cli import run_plan
    from hiresdiff.bench.prompts import load_prompts
    from hiresdiff.outputs import check_writable

    table = get_table(args.table)
    require(args.limit is None or args.limit >= 1, f"--limit must be at least 1, got {args.limit}")
    if args.crops is not None:
        from hiresdiff.evaluation.crops import parse_crop_spec

        parse_crop_spec(args.crops)
    tp = build_table_plan(
        table,
        args.model or table.model,
        load_prompts(args.prompts, args.limit),
        steps=args.steps,
        dtype=args.dtype,
        allow_pickle=args.allow_pickle,
        only=parse_rows(args.rows, table),
    )
    if args.dry_run:
        print("\n".join(matrix_lines(tp)))
        return 0
    scoring = _scoring(args, table)
    out = check_writable(args.out, "--out")
    bench_dir = out / table.name
    code = run_plan(args, tp.plan, bench_dir, scoring)
    path = write_table(out, bench_dir, tp, scoring)
    if not args.quiet:
        print(path)
    return code
