"""Image folders and caption tables: listing, header-only scanning, decoding, ``file,prompt`` CSV files.

Scanning reads only image headers (size, EXIF orientation, the hiresdiff PNG settings chunk), so every check on a
folder of 4096² images runs before any pixel is decoded.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps

from hiresdiff.errors import HiresError, require
from hiresdiff.images import PNG_KEY, atomic_write_bytes

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
#: per-phase previews written next to the final images by ``hiresdiff generate`` (``…-phase1of3.png``)
PREVIEW_NAME = re.compile(r"-phase\d+of\d+$")
#: EXIF orientations that turn the image by 90° (width and height swap when applied)
_TRANSPOSING_ORIENTATIONS = {5, 6, 7, 8}
_READ_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


@dataclass(frozen=True)
class ImageRecord:
    """One image file as seen from its header.

    Attributes:
        path: The file.
        width: Width in pixels after applying the EXIF orientation.
        height: Height in pixels after applying the EXIF orientation.
        settings: The hiresdiff generation settings of a PNG written by ``hiresdiff generate``, else ``None``.
    """

    path: Path
    width: int
    height: int
    settings: dict[str, Any] | None = None


def list_images(folder: str | Path, *, recursive: bool = False, what: str = "folder") -> list[Path]:
    """Image files of ``folder`` (common extensions, sorted by relative path), skipping hiresdiff previews.

    Raises:
        HiresError: ``folder`` is not a folder or holds no image.
    """
    root = Path(folder).expanduser()
    require(root.is_dir(), f"{what} {str(folder)!r} is not a folder")
    pattern = "**/*" if recursive else "*"
    files = [
        p
        for p in root.glob(pattern)
        if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file() and not PREVIEW_NAME.search(p.stem)
    ]
    require(bool(files), f"{what} {str(folder)!r} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def scan_image(path: Path) -> ImageRecord:
    """Size (EXIF-oriented) and hiresdiff settings of one image, from its header only."""
    try:
        with Image.open(path) as img:
            width, height = img.size
            if img.getexif().get(0x0112, 1) in _TRANSPOSING_ORIENTATIONS:
                width, height = height, width
            text = img.info.get(PNG_KEY)
    except _READ_ERRORS as exc:
        raise HiresError(f"cannot read image {str(path)!r} ({exc})") from None
    return ImageRecord(path, width, height, _parse_settings(text))


def _parse_settings(text: object) -> dict[str, Any] | None:
    if not isinstance(text, str):
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return None
    return data if isinstance(data, dict) else None


def open_rgb(path: Path) -> Image.Image:
    """Decode an image as 8-bit RGB with its EXIF orientation applied (one-line error if unreadable)."""
    try:
        with Image.open(path) as img:
            img.load()
            upright = ImageOps.exif_transpose(img)
            return upright.convert("RGB")
    except _READ_ERRORS as exc:
        raise HiresError(f"cannot read image {str(path)!r} ({exc})") from None


class CaptionTable:
    """Prompts from a ``file,prompt`` CSV, looked up by relative path, file name or file stem (in that order)."""

    def __init__(self, rows: Mapping[str, str]) -> None:
        self.rows = dict(rows)
        self._by_key: dict[str, str] = {}
        for key in ("path", "name", "stem"):
            for file, prompt in rows.items():
                self._by_key.setdefault(_key(file, key), prompt)

    @classmethod
    def read(cls, csv_path: str | Path) -> CaptionTable:
        """Read a CSV with ``file`` and ``prompt`` columns (UTF-8, header row)."""
        path = Path(csv_path).expanduser()
        require(path.is_file(), f"captions CSV {str(csv_path)!r} is not a file")
        try:
            with path.open(newline="", encoding="utf-8-sig") as f:
                reader = csv.DictReader(f)
                require(
                    {"file", "prompt"} <= set(reader.fieldnames or ()),
                    f"captions CSV {str(csv_path)!r} needs 'file' and 'prompt' columns",
                )
                rows = {row["file"]: row["prompt"] for row in reader if row["file"] and row["prompt"] is not None}
        except (OSError, UnicodeDecodeError, csv.Error) as exc:
            raise HiresError(f"cannot read captions CSV {str(csv_path)!r} ({exc})") from None
        return cls(rows)

    def get(self, path: Path, root: Path | None = None) -> str | None:
        """The prompt of ``path`` (relative to ``root`` when given), or ``None``."""
        rel = path.relative_to(root).as_posix() if root is not None else path.name
        for key in (rel, path.name, path.stem):
            if key in self._by_key:
                return self._by_key[key]
        return None


def _key(file: str, kind: str) -> str:
    p = Path(file.replace("\\", "/"))
    return p.as_posix() if kind == "path" else p.name if kind == "name" else p.stem


def write_captions(path: Path, rows: Iterable[tuple[str, str]]) -> None:
    """Write ``file,prompt`` rows as CSV, atomically."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["file", "prompt"])
    writer.writerows(rows)
    atomic_write_bytes(path, buf.getvalue().encode("utf-8"))
