"""The benchmark report: ``report.csv`` and ``report.md`` (one row per group), contact sheets and plots.

Each row gathers a group's records (images, mean wall time, peak memory, TFLOPs per image) and the metrics that
``hiresdiff eval`` wrote to the group's ``metrics.json``, in the papers' column order (:data:`METRICS`; absent
values are ``—`` in Markdown and empty in CSV); the CSV's last column and a header line of ``report.md`` name the
processes that made the images (``made_by`` of the records: pid, host, rank). Everything is rebuilt from the
files in ``--out``, so ``hiresdiff bench --report-only --out DIR`` regenerates it at any time, e.g. after scoring
each group with ``hiresdiff eval DIR/images/<group> --reference REF --json DIR/images/<group>/metrics.json``.
"""

from __future__ import annotations

import csv
import io
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hiresdiff.bench.plan import BenchPlan
from hiresdiff.bench.records import METRICS_FILE, group_dir, load_plan, load_records
from hiresdiff.bench.rows import MEASURES, METRICS, Row, maker, read_metrics
from hiresdiff.images import atomic_write_bytes

CAPTIONS_FILE = "captions.csv"
MISSING = "—"


def _made_by(records: list[dict[str, Any]]) -> str:
    """``pid 1 on host h (4 images), …`` over ``records``."""
    counts = Counter(m for r in records if (m := maker(r)) is not None)
    return ", ".join(f"{m} ({k} images)" for m, k in counts.items()) or MISSING


def collect_rows(out: Path, plan: BenchPlan) -> list[Row]:
    """A row per group, in plan order, with its finished records and metrics."""
    records = load_records(out, plan)
    rows = {g: Row(g, 0, metrics=read_metrics(group_dir(out, g) / METRICS_FILE)) for g in plan.groups}
    for item in plan.items:
        row = rows[item.group]
        row.planned += 1
        if item.id in records:
            row.records.append(records[item.id])
    return list(rows.values())


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


@dataclass(frozen=True)
class Column:
    """A report column: its CSV name and Markdown header (``None``: not in that file) and its value."""

    csv: str | None
    markdown: str | None
    get: Callable[[Row], Any]


def columns(plan: BenchPlan) -> list[Column]:
    """Coordinates, swept values, image count, measures, the metrics in the papers' order, then (CSV) the processes
    that made the images."""
    return [
        Column("group", None, lambda r: r.group.slug),
        Column("method", "Method", lambda r: r.group.method),
        Column("preset", "Preset", lambda r: r.group.preset),
        Column("size", None, lambda r: r.group.size.label),
        Column(None, "Size", lambda r: r.group.size.text),
        Column("width", None, lambda r: r.group.size.width),
        Column("height", None, lambda r: r.group.size.height),
        Column("megapixels", "MP", lambda r: round(r.group.size.megapixels, 3)),
        *(Column(n, n, lambda r, n=n: r.sweep_value(n)) for n in plan.sweeps),
        Column("images", None, lambda r: len(r.records)),
        Column("planned", None, lambda r: r.planned),
        Column(None, "Images", lambda r: f"{len(r.records)}/{r.planned}"),
        *(Column(name, header, lambda r, a=attr: r.value(a)) for name, header, attr in MEASURES),
        *(Column(m, m, lambda r, m=m: r.metrics.get(m)) for m in METRICS),
        Column("made_by", None, lambda r: r.makers),
    ]


def _csv(head: list[str], cells: list[list[str]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(head)
    writer.writerows(cells)
    return buf.getvalue()


def report_csv(plan: BenchPlan, rows: list[Row]) -> str:
    """One line per group; absent values are empty cells."""
    cols = [c for c in columns(plan) if c.csv is not None]
    return _csv([c.csv or "" for c in cols], [[_fmt(c.get(row)) for c in cols] for row in rows])


def report_markdown(plan: BenchPlan, rows: list[Row], links: list[str]) -> str:
    """Header (model, devices, versions), the table (absent values ``—``) and the figures."""
    cols = [c for c in columns(plan) if c.markdown is not None]
    records = [r for row in rows for r in row.records]
    first = records[0] if records else {}
    lines = [
        "# hiresdiff benchmark",
        "",
        f"- model: `{plan.model}`, dtype: {', '.join(sorted({r['dtype'] for r in records})) or MISSING}",
        f"- device: {', '.join(sorted({r['device'] for r in records})) or MISSING}",
        f"- images: {len(records)} of {sum(row.planned for row in rows)}",
        f"- made by: {_made_by(records)}",
        "- settings: "
        + (", ".join(f"{k}={v}" for k, v in {**plan.settings, **plan.fixed}.items()) or "defaults")
        + (" (--paper)" if plan.paper else ""),
        "- versions: " + (", ".join(f"{k} {v}" for k, v in first.get("versions", {}).items()) or MISSING),
        "",
        "Time: mean wall time per image. Peak memory: the largest per image (GB = 2³⁰ bytes). TFLOPs: model FLOPs "
        "per image (`hiresdiff cost`). Metrics: `metrics.json` in the group's image folder (`hiresdiff eval`).",
        "",
        "| " + " | ".join(c.markdown or "" for c in cols) + " |",
        "|" + "---|" * len(cols),
    ]
    lines += ["| " + " | ".join(_fmt(c.get(row)).replace("|", "\\|") or MISSING for c in cols) + " |" for row in rows]
    lines += ["", *(f"![{Path(link).stem}]({link})" for link in links), ""]
    return "\n".join(lines)


def write_captions(out: Path, rows: list[Row]) -> None:
    """``captions.csv`` (file,prompt) in each group folder with images, so eval can take the folder as it is."""
    for row in rows:
        if row.records:
            cells = [[r["image"], r["prompt"]] for r in sorted(row.records, key=lambda r: r["image"])]
            atomic_write_bytes(group_dir(out, row.group) / CAPTIONS_FILE, _csv(["file", "prompt"], cells).encode())


def write_report(out: Path, sheets: int = 8) -> list[Path]:
    """Write ``report.csv``, ``report.md``, contact sheets of the first ``sheets`` prompts and the plots."""
    from hiresdiff.bench.plots import write_plots
    from hiresdiff.bench.sheets import write_sheets

    plan = load_plan(out)
    rows = collect_rows(out, plan)
    write_captions(out, rows)
    figures = write_sheets(out, plan, rows, sheets) + write_plots(out, plan, rows)
    links = [p.relative_to(out).as_posix() for p in figures]
    table, markdown = out / "report.csv", out / "report.md"
    atomic_write_bytes(table, report_csv(plan, rows).encode())
    atomic_write_bytes(markdown, report_markdown(plan, rows, links).encode())
    return [markdown, table, *figures]
