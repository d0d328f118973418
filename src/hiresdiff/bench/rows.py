"""One benchmark group's line: its records (time, memory, FLOPs) and the metrics ``hiresdiff eval`` wrote for it.

Shared by the report tables (:mod:`hiresdiff.bench.report`), the plots and the contact sheets, which import this
module and never each other.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from statistics import mean
from typing import Any

from hiresdiff.bench.plan import Group
from hiresdiff.bench.records import read_json
from hiresdiff.errors import HiresError

#: metric columns in the papers' order, and the keys of ``metrics.json`` that fill them (compared lower-case,
#: without ``_``, ``-`` and spaces)
METRICS: dict[str, tuple[str, ...]] = {
    "FID": ("fid",),
    "KID": ("kid",),
    "IS": ("is", "inceptionscore"),
    "FIDc": ("fidc", "fidcrop", "fidp"),
    "KIDc": ("kidc", "kidcrop"),
    "ISc": ("isc", "iscrop"),
    "CLIP": ("clip", "clipscore"),
    "MUSIQ": ("musiq",),
    "CLIPIQA": ("clipiqa",),
}
#: measured columns: (CSV name, Markdown header, Row attribute)
MEASURES = (
    ("seconds", "Time (s)", "seconds"),
    ("peak_memory_gb", "Peak memory (GB)", "memory_gb"),
    ("tflops", "TFLOPs", "tflops"),
)


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def read_metrics(path: Path) -> dict[str, float]:
    """The :data:`METRICS` found in ``path`` (``hiresdiff eval --json``: values under ``"metrics"``, keyed ``fid``,
    ``kid``, ``is``, ``fid_crop`` …; a flat object works too); ``{}`` when absent."""
    if not path.is_file():
        return {}
    try:
        data = read_json(path)
    except HiresError as exc:
        print(f"hiresdiff: warning: metrics ignored: {exc}", file=sys.stderr)
        return {}
    if isinstance(data, dict) and isinstance(data.get("metrics"), dict):
        data = data["metrics"]
    if not isinstance(data, dict):
        return {}
    found = {"".join(c for c in str(k).lower() if c not in "_- "): v for k, v in data.items()}
    out = {}
    for column, keys in METRICS.items():
        value = next((_number(found[k]) for k in keys if k in found), None)
        if value is not None:
            out[column] = value
    return out


@dataclass
class Row:
    """One group's line of the report."""

    group: Group
    planned: int
    records: list[dict[str, Any]] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)

    def _values(self, key: str) -> list[float]:
        return [r[key] for r in self.records if r.get(key) is not None]

    @property
    def seconds(self) -> float | None:
        values = self._values("seconds")
        return mean(values) if values else None

    @property
    def memory_gb(self) -> float | None:
        values = self._values("peak_memory_gb")
        return max(values) if values else None

    @property
    def tflops(self) -> float | None:
        values = self._values("flops")
        return mean(values) / 1e12 if values else None

    def value(self, quantity: str) -> float | None:
        """A measured column (``Row`` attribute name) or a metric column."""
        return getattr(self, quantity) if hasattr(self, quantity) else self.metrics.get(quantity)

    @property
    def makers(self) -> str:
        """The processes that made the group's images (``; ``-separated), see :func:`maker`."""
        return "; ".join(dict.fromkeys(m for r in self.records if (m := maker(r)) is not None))

    def sweep_value(self, name: str) -> Any:
        """The typed value of swept ``name`` (from a record), else as given, else ``None``."""
        for record in self.records:
            if name in record.get("sweep", {}):
                return record["sweep"][name]
        return dict(self.group.sweep).get(name)


def maker(record: dict[str, Any]) -> str | None:
    """``pid P on host H`` (and its rank in a launch of several processes) of the process that made ``record``."""
    made = record.get("made_by")
    if not isinstance(made, dict):
        return None
    n = made.get("num_processes") or 1
    rank = f" (process {made.get('process_index')} of {n})" if n > 1 else ""
    return f"pid {made.get('pid')} on host {made.get('host')}{rank}"
