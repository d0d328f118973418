"""``build_reference_set``: real high-resolution images with captions, prepared like the papers' test sets.

APT builds its test set from OpenImages photos whose sides exceed 3K, centre-cropped to a square on the shorter
side and captioned with BLIP-2. This does the same for any folder: keep the images (searched recursively, sorted
by relative path) whose shorter side is at least ``min_side``, centre-crop them square, resize to ``size`` × ``size``
(Lanczos) and write PNGs, plus ``captions.csv`` (``file,prompt``) from an existing captions CSV (matched by
relative path, file name or stem) and/or a captioning model that captions the written (cropped) image.

Every file is written atomically and existing outputs are kept, so an interrupted run resumes where it stopped
(captions already in ``OUT/captions.csv`` are reused and the model is loaded only when a caption is missing).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from hiresdiff.errors import HiresError, require
from hiresdiff.evaluation.captioner import Captioner, load_captioner
from hiresdiff.evaluation.files import CaptionTable, ImageRecord, list_images, open_rgb, scan_image, write_captions
from hiresdiff.evaluation.views import center_box, resized
from hiresdiff.images import save_png

CAPTIONS_CSV = "captions.csv"


@dataclass
class DatasetReport:
    """What :func:`build_reference_set` did.

    Attributes:
        out: The output folder.
        written: PNGs written by this run.
        existing: Selected images whose output already existed (kept, not rewritten).
        too_small: Source images skipped because their shorter side is below ``min_side``.
        captioned: Captions produced by the captioning model in this run.
        captions: The captions CSV, or ``None`` when no captions were asked for.
        unreadable: Source files that could not be decoded (skipped, counted; the first few named).
    """

    out: Path
    written: list[Path] = field(default_factory=list)
    existing: int = 0
    unreadable: list[Path] = field(default_factory=list)
    too_small: int = 0
    captioned: int = 0
    captions: Path | None = None


def output_names(root: Path, files: Sequence[Path]) -> dict[Path, str]:
    """Flat, unique PNG names: the relative path without extension, ``/`` → ``__`` (``-ext`` added on clashes)."""
    base = {f: f.relative_to(root).with_suffix("").as_posix().replace("/", "__") for f in files}
    clashes = Counter(base.values())
    return {f: (f"{b}-{f.suffix[1:].lower()}" if clashes[b] > 1 else b) + ".png" for f, b in base.items()}


def _select(
    files: Sequence[Path], min_side: int, limit: int | None, unreadable: list[Path]
) -> tuple[list[ImageRecord], int]:
    """The images to keep (readable, large enough, up to ``limit``); unreadable files are skipped and listed."""
    selected, too_small = [], 0
    for f in files:
        if limit is not None and len(selected) >= limit:
            break
        try:
            record = scan_image(f)
        except HiresError:
            unreadable.append(f)
            continue
        if min(record.width, record.height) < min_side:
            too_small += 1
        else:
            selected.append(record)
    return selected, too_small


def _inside(path: Path, folder: Path) -> bool:
    return folder.resolve() in path.resolve().parents


def build_reference_set(
    src: str | Path,
    out: str | Path,
    *,
    min_side: int = 2048,
    size: int = 2048,
    captions: str | Path | None = None,
    captioner: str | Captioner | None = None,
    limit: int | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> DatasetReport:
    """Build a reference image set (see the module docstring).

    Args:
        src: Folder of real images (searched recursively; ``out`` is skipped when inside it).
        out: Output folder for ``<name>.png`` files and ``captions.csv``.
        min_side: Keep images whose shorter side has at least this many pixels.
        size: Side of the square outputs (at most ``min_side``: images are never upscaled).
        captions: ``file,prompt`` CSV with captions of the source images.
        captioner: Hub id or local folder of a captioning model, or a callable, for images the CSV does not cover.
        limit: Keep at most this many images (the first ones in sorted order).
        device: Device of the captioning model.
        progress: Show a progress bar.

    Raises:
        HiresError: Bad arguments or folders, unreadable images, a caption missing with no captioner, or a
            captioning model that cannot be loaded (offline and not cached: named with the cache folder).
    """
    require(min_side >= 1 and size >= 1, f"--min-side and --size must be positive (got {min_side}, {size})")
    require(size <= min_side, f"--size {size} exceeds --min-side {min_side}: images would be upscaled")
    require(limit is None or limit >= 1, f"--limit must be at least 1, got {limit}")
    src_root, out_root = Path(src).expanduser(), Path(out).expanduser()
    require(not out_root.exists() or out_root.is_dir(), f"OUT_DIR {str(out)!r} exists and is not a folder")
    files = [f for f in list_images(src_root, recursive=True, what="SRC_DIR") if not _inside(f, out_root)]
    require(bool(files), f"SRC_DIR {str(src)!r} holds no images outside OUT_DIR")
    table = CaptionTable.read(captions) if captions is not None else None
    unreadable: list[Path] = []
    selected, too_small = _select(files, min_side, limit, unreadable)
    require(
        bool(selected),
        f"no image of SRC_DIR {str(src)!r} can be kept: {too_small} below --min-side {min_side}, "
        f"{len(unreadable)} unreadable",
    )
    names = output_names(src_root, files)  # of every source file, so a name never depends on --limit or sizes
    previous = out_root / CAPTIONS_CSV
    prompts = CaptionTable.read(previous).rows if previous.is_file() else {}
    for r in selected:
        prompt = table.get(r.path, src_root) if table is not None else None
        if prompt is not None:
            prompts[names[r.path]] = prompt
    missing = [r for r in selected if names[r.path] not in prompts]
    if table is not None and captioner is None and missing:
        raise HiresError(f"--captions has no caption for {missing[0].path.name}; add it or pass --captioner MODEL")
    model: Captioner | None = captioner if not isinstance(captioner, str) else None
    if isinstance(captioner, str) and missing:
        model = load_captioner(captioner, device)  # only when some caption is missing: reruns stay offline
    report = DatasetReport(out_root, too_small=too_small, unreadable=unreadable)
    want_captions = table is not None or captioner is not None
    try:
        for r in tqdm(selected, desc="dataset", unit="img", disable=not progress):
            _one(r, out_root / names[r.path], size, prompts, model, report)
    finally:
        if want_captions:
            report.captions = out_root / CAPTIONS_CSV
            kept = {name: p for name, p in prompts.items() if (out_root / name).is_file()}
            write_captions(report.captions, sorted(kept.items()))
    return report


def _one(
    record: ImageRecord,
    target: Path,
    size: int,
    prompts: dict[str, str],
    captioner: Captioner | None,
    report: DatasetReport,
) -> None:
    image: Image.Image | None = None
    if target.is_file():
        report.existing += 1
    else:
        try:
            source = open_rgb(record.path)  # the header was fine: the pixel data may still be broken
        except HiresError:
            report.unreadable.append(record.path)
            return
        image = resized(source, center_box(*source.size), size, Image.Resampling.LANCZOS)
        report.written.append(save_png(image, target))
    if target.name not in prompts and captioner is not None:
        prompts[target.name] = captioner([image if image is not None else open_rgb(target)])[0]
        report.captioned += 1
