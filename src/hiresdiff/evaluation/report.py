"""The evaluation report: a small text table and an atomically written JSON file."""

from __future__ import annotations

import json
import math
from pathlib import Path

from hiresdiff.errors import require
from hiresdiff.evaluation.evaluator import EvalResult
from hiresdiff.images import atomic_write_bytes
from hiresdiff.outputs import check_writable


def _value(v: float | None) -> str:
    return "-" if v is None or math.isnan(v) else f"{v:.6g}"


def format_table(result: EvalResult) -> str:
    """Metric values, one per line, then the sample counts and crop protocol."""
    width = max((len(k) for k in result.metrics), default=6)
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  -----"]
    lines += [f"{k:<{width}}  {_value(v)}" for k, v in result.metrics.items()]
    d = result.details
    counts = f"{d['n_images']} images"
    if d.get("reference"):
        counts += f", {d['n_reference']} reference images"
    if d.get("crops"):
        counts += f"; crops {d['crops']}: {d['n_crops']} generated, {d['n_reference_crops']} reference"
    lines.append(f"({counts}; device {d['device']})")
    return "\n".join(lines)


def check_json_path(path: str | Path) -> Path:
    """``--json`` target, checked before any work: not a folder."""
    p = Path(path).expanduser()
    require(not p.is_dir(), f"--json {str(path)!r} is a folder; give a file name")
    check_writable(p.parent, "the --json folder")
    return p


def write_json(result: EvalResult, path: str | Path) -> Path:
    """Write ``result`` as JSON, atomically (NaN written as null)."""
    p = check_json_path(path)
    data = result.to_dict()
    data["metrics"] = {k: (None if v is None or math.isnan(v) else v) for k, v in result.metrics.items()}
    atomic_write_bytes(p, (json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))
    return p
