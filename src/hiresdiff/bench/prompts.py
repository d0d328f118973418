"""Prompt sets for ``hiresdiff bench``: a built-in smoke set, prompt files, caption CSVs and captioned image folders.

``load_prompts(spec)`` accepts:

* ``builtin:NAME`` — a set bundled here (:data:`BUILTIN_SETS`; ``builtin:smoke`` for quick runs);
* a plain text file — one prompt per line, blank lines skipped;
* a CSV/TSV file with a header — the prompt column is the first of :data:`TEXT_COLUMNS` present (``prompt``,
  ``caption``, ``text`` …, case-insensitive; LAION metadata uses ``caption`` or ``TEXT``), an optional ``seed``
  column overrides the seed list for that prompt, an optional ``url``/``key``/``file`` column is kept as the
  prompt's source;
* a folder of images with captions (the papers' reference sets) — a ``captions.csv`` (``file,prompt``) or a
  sidecar ``.txt`` next to each image.

``limit`` keeps the first N prompts (the papers' protocols take the first N captions of a set).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from hiresdiff.errors import HiresError, require

#: prompt sets bundled with hiresdiff, by name
BUILTIN_SETS: dict[str, tuple[str, ...]] = {
    "smoke": (
        "a lighthouse on a rocky cliff at sunset, waves crashing, highly detailed",
        "a close-up portrait of an old fisherman with a weathered face, natural light",
        "a bowl of ramen with a soft-boiled egg on a wooden table, food photography",
        "a futuristic city skyline at night with neon signs and flying cars",
        "a red fox sitting in a snowy forest, morning mist, wildlife photography",
        "an oil painting of a sailing ship in a storm, dramatic clouds",
        "a cozy reading nook with bookshelves, a cat asleep on an armchair, warm lamp light",
        "an aerial view of terraced rice fields in the mountains, golden hour",
    ),
}
BUILTIN_PREFIX = "builtin:"
#: column names that hold the prompt, in order of preference (compared case-insensitively)
TEXT_COLUMNS = ("prompt", "caption", "text", "captions", "prompts")
#: column names that identify where a prompt came from (an image file, a URL, a dataset key)
SOURCE_COLUMNS = ("file", "filename", "image", "path", "url", "key")
SEED_COLUMN = "seed"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
CAPTIONS_FILE = "captions.csv"


@dataclass(frozen=True)
class Prompt:
    """One prompt, the seed its row fixes (``None``: use the seed list) and where it came from."""

    text: str
    seed: int | None = None
    source: str | None = None


def load_prompts(spec: str, limit: int | None = None) -> list[Prompt]:
    """The prompts named by ``spec`` (see the module docstring), at most ``limit``, or a one-line error."""
    require(limit is None or limit >= 1, f"--limit must be ≥ 1, got {limit}")
    if spec.startswith(BUILTIN_PREFIX):
        name = spec[len(BUILTIN_PREFIX) :]
        require(
            name in BUILTIN_SETS,
            f"unknown built-in prompt set {name!r}; choose one of: "
            + ", ".join(BUILTIN_PREFIX + n for n in BUILTIN_SETS),
        )
        prompts = [Prompt(text) for text in BUILTIN_SETS[name]]
    else:
        path = Path(spec).expanduser()
        require(path.exists(), f"prompt file {spec!r} does not exist")
        if path.is_dir():
            prompts = _load_folder(path)
        elif path.suffix.lower() in (".csv", ".tsv"):
            prompts = _load_csv(path)
        else:
            prompts = [Prompt(line.strip()) for line in _read_text(path).splitlines() if line.strip()]
        require(bool(prompts), f"no prompts in {spec!r}")
    return prompts[:limit]


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise HiresError(f"cannot read prompt file {str(path)!r}: {exc}") from None


def _column(fields: list[str], names: tuple[str, ...]) -> str | None:
    """The first of ``names`` among the header ``fields`` (case-insensitive), as spelled in the header."""
    lower = {f.strip().lower(): f for f in fields}
    return next((lower[n] for n in names if n in lower), None)


def _parse_seed(raw: str, where: str) -> int | None:
    raw = raw.strip()
    if not raw:
        return None
    require(raw.isdigit() and int(raw) < 2**63, f"{where}: seed {raw!r} is not an integer in [0, 2^63)")
    return int(raw)


def _read_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """Header and rows of a CSV (``.tsv``: tab-separated)."""
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    try:
        reader = csv.DictReader(_read_text(path).splitlines(), delimiter=delimiter)
        rows = list(reader)
    except csv.Error as exc:
        raise HiresError(f"{str(path)!r} is not a readable CSV file: {exc}") from None
    return list(reader.fieldnames or []), rows


def _load_csv(path: Path) -> list[Prompt]:
    """A CSV with a header: prompt column (:data:`TEXT_COLUMNS`), optional ``seed`` and source columns."""
    fields, rows = _read_rows(path)
    text = _column(fields, TEXT_COLUMNS)
    require(
        text is not None,
        f"{str(path)!r} has no prompt column (one of {', '.join(TEXT_COLUMNS)}); its header is: "
        + (", ".join(fields) or "empty"),
    )
    seed, source = _column(fields, (SEED_COLUMN,)), _column(fields, SOURCE_COLUMNS)
    prompts = []
    for line, row in enumerate(rows, start=2):
        caption = (row.get(text) or "").strip()  # type: ignore[arg-type]
        if caption:
            row_seed = _parse_seed(row.get(seed) or "", f"{path.name} line {line}") if seed else None
            origin = (row.get(source) or "").strip() if source else ""
            prompts.append(Prompt(caption, row_seed, origin or None))
    return prompts


def _load_folder(folder: Path) -> list[Prompt]:
    """Images with captions: ``captions.csv`` (``file,prompt``) or a sidecar ``.txt`` per image."""
    listed = folder / CAPTIONS_FILE
    if listed.is_file():
        prompts = _load_csv(listed)
        missing = [p.source for p in prompts if p.source is None or not (folder / p.source).is_file()]
        require(
            not missing,
            f"{str(listed)!r} names images that are not in the folder (or no file column): {missing[:3]}",
        )
        return prompts
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    require(bool(images), f"folder {str(folder)!r} has no images ({', '.join(IMAGE_SUFFIXES)})")
    prompts = []
    for image in images:
        sidecar = image.with_suffix(".txt")
        caption = _read_text(sidecar).strip() if sidecar.is_file() else ""
        if caption:
            prompts.append(Prompt(caption, None, image.name))
    require(
        bool(prompts),
        f"folder {str(folder)!r} has images but no captions: add {CAPTIONS_FILE} (file,prompt) or a .txt per image",
    )
    return prompts
