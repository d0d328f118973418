"""Where a benchmark lives on disk, and the environment each image record names.

Layout of ``--out DIR``::

    DIR/plan.json                       the matrix (a rerun must match it)
    DIR/images/<group slug>/pNNNN-sS.png  one image, its settings in a PNG text chunk
    DIR/images/<group slug>/pNNNN-sS.json its record: settings, time, memory, FLOPs, device, versions, made_by
    DIR/images/<group slug>/pNNNN-sS.claim  while a process makes it (see :mod:`~hiresdiff.bench.claims`)
    DIR/images/<group slug>/captions.csv  file,prompt of the group's images (a captioned folder, for eval)
    DIR/images/<group slug>/metrics.json  written by ``hiresdiff eval`` on that folder (optional)
    DIR/report.md, report.csv, sheets/, plots/  (DIR/report.claim while a process writes them)

An image is finished when its PNG and JSON both exist: the PNG is written first, the JSON last, each atomically
(temporary file + ``os.replace``), so an interrupted run never leaves a record without its image (nor, as the PNG
is removed when the JSON cannot be written, an image without its record).
"""

from __future__ import annotations

import json
import platform
import re
from importlib import metadata
from pathlib import Path
from typing import Any

from hiresdiff.bench.claims import CLAIM_SUFFIX
from hiresdiff.bench.plan import BenchPlan, Group, Item
from hiresdiff.errors import HiresError
from hiresdiff.images import atomic_write_bytes

PLAN_FILE = "plan.json"
IMAGES_DIR = "images"
METRICS_FILE = "metrics.json"
REPORT_CLAIM = "report.claim"


def group_dir(out: Path, group: Group) -> Path:
    return out / IMAGES_DIR / group.slug


def item_paths(out: Path, item: Item) -> tuple[Path, Path]:
    """(PNG, JSON) of ``item``."""
    folder = group_dir(out, item.group)
    return folder / f"{item.stem}.png", folder / f"{item.stem}.json"


def claim_path(out: Path, item: Item) -> Path:
    """The claim file of ``item`` (:mod:`~hiresdiff.bench.claims`)."""
    return group_dir(out, item.group) / f"{item.stem}{CLAIM_SUFFIX}"


def is_finished(out: Path, item: Item) -> bool:
    return all(p.is_file() for p in item_paths(out, item))


def count_finished(out: Path, plan: BenchPlan) -> int:
    return sum(is_finished(out, item) for item in plan.items)


def write_json(path: Path, data: Any) -> Path:
    """``data`` as indented JSON, written atomically."""
    atomic_write_bytes(path, (json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode())
    return path


def read_json(path: Path) -> Any:
    """The JSON in ``path``, or a one-line error."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HiresError(f"cannot read {str(path)!r}: {exc}") from None


def prepare_out(out: Path, plan: BenchPlan, *, write: bool) -> None:
    """Check ``DIR/plan.json`` against ``plan`` (one-line error when it differs); create it when ``write``."""
    if out.exists() and not out.is_dir():
        raise HiresError(f"--out {str(out)!r} exists and is not a folder")
    path, wanted = out / PLAN_FILE, json.loads(json.dumps(plan.to_dict()))
    if path.is_file():
        found = read_json(path)
        differs = sorted(k for k in wanted.keys() | found.keys() if found.get(k) != wanted.get(k))
        if differs:
            differs = [k for k in differs if k != "items"] or differs  # the item count follows from the rest
            raise HiresError(
                f"{str(out)!r} holds a benchmark with a different matrix (plan.json differs in: {', '.join(differs)});"
                " pick another --out, or rerun with the same arguments to resume it"
            )
    elif write:
        write_json(path, wanted)


def load_plan(out: Path) -> BenchPlan:
    """The plan of the benchmark in ``out`` (``--report-only``)."""
    path = out / PLAN_FILE
    if not path.is_file():
        raise HiresError(f"no benchmark in {str(out)!r} ({PLAN_FILE} is missing); run `hiresdiff bench … --out` first")
    try:
        return BenchPlan.from_dict(read_json(path))
    except (KeyError, TypeError, AttributeError) as exc:
        raise HiresError(f"{str(path)!r} is not a hiresdiff bench plan (bad or missing {exc})") from None


def load_records(out: Path, plan: BenchPlan) -> dict[str, dict[str, Any]]:
    """The records of the finished images of ``plan``, by item id."""
    records = {}
    for item in plan.items:
        if is_finished(out, item):
            records[item.id] = read_json(item_paths(out, item)[1])
    return records


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_name(device: Any) -> str:
    """Human name of a torch device: the GPU model, or the CPU model."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return _cpu_name() if dev.type == "cpu" else str(dev)


def device_slug(device: Any) -> str:
    """:func:`device_name` as a file-name part: ``nvidia-h200``, ``amd-epyc``."""
    return re.sub(r"[^A-Za-z0-9]+", "-", device_name(device)).strip("-").lower()


def versions() -> dict[str, str | None]:
    """Versions of hiresdiff, torch, diffusers, transformers, accelerate and Python."""
    from hiresdiff import __version__

    out: dict[str, str | None] = {"hiresdiff": __version__, "python": platform.python_version()}
    for name in ("torch", "diffusers", "transformers", "accelerate"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out
