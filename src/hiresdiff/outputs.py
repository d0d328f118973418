"""Output locations checked before any model work, and file-system failures turned into one line.

:func:`check_writable` writes and removes a probe file, and compares the free space with what the run will write
(an upper bound: uncompressed RGB), so a read-only mount, a file in the way, missing permissions or a full disk
stop the run in one line before anything is computed — not after an hour of denoising. A folder that does not
exist yet is not created by the check (its nearest existing parent is probed). :func:`write_error` words an
``OSError`` met while writing.
"""

from __future__ import annotations

import errno
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hiresdiff.errors import HiresError

if TYPE_CHECKING:
    from PIL import Image

#: bytes a PNG of ``w × h`` px can take at most (8-bit RGB, uncompressed, plus headers): PNGs of noise do not shrink
PNG_BYTES_PER_PIXEL = 3
PNG_OVERHEAD_BYTES = 64 * 1024


def png_bytes(width: int, height: int, count: int = 1) -> int:
    """Upper bound of the bytes ``count`` PNGs of ``width × height`` pixels take."""
    return count * (width * height * PNG_BYTES_PER_PIXEL + PNG_OVERHEAD_BYTES)


def os_reason(exc: OSError) -> str:
    return exc.strerror or (errno.errorcode.get(exc.errno or 0) if exc.errno else None) or type(exc).__name__


def check_writable(folder: str | os.PathLike[str], what: str, need_bytes: int = 0, *, create: bool = False) -> Path:
    """``folder`` (or, while it does not exist, its nearest existing parent) accepts a new file and has ``need_bytes``
    free; else one line. Nothing is left behind: a missing folder is created only with ``create=True`` (the
    writers create it when they write).
    """
    path = Path(folder)
    if path.exists() and not path.is_dir():
        raise HiresError(f"{what} {str(path)!r} exists and is not a folder; choose another path")
    target = path
    if not create:
        while not target.exists() and target != target.parent:
            target = target.parent
        if not target.is_dir():
            raise HiresError(f"{what} {str(path)!r} lies under {str(target)!r}, which is not a folder")
    try:
        if create:
            path.mkdir(parents=True, exist_ok=True)
        probe = target / f".hiresdiff-write-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise HiresError(f"cannot write to {what} {str(path)!r}: {os_reason(exc)}; choose a writable folder") from None
    free = shutil.disk_usage(target).free
    if need_bytes > free:
        raise HiresError(
            f"{what} {str(path)!r} has {free / 2**20:,.0f} MiB free but this run writes up to "
            f"{need_bytes / 2**20:,.0f} MiB; free some space or choose another folder"
        )
    return path


def write_error(path: Path, exc: OSError, written: int) -> HiresError:
    """The one-line error of a failed write (disk full, permission lost, …) and what was saved before it."""
    saved = f"{written} file(s) written before it are complete" if written else "nothing was written"
    return HiresError(f"cannot write {str(path)!r}: {os_reason(exc)}; {saved}")


#: a run's claim on an index ``NNN`` of a folder while it writes that index's files (removed when done)
CLAIM_SUFFIX = ".claim"


@dataclass(frozen=True)
class NumberedImage:
    """One image to save under the folder's next free ``NNN-`` index: ``NNN-{name}.png``, and its previews
    ``NNN-{name}-{suffix}.png`` (``(suffix, image)`` pairs) under the same index, all carrying ``settings``."""

    name: str
    image: Image.Image
    settings: dict[str, Any] | None = None
    previews: tuple[tuple[str, Image.Image], ...] = ()


def _index_of(name: str) -> int | None:
    """The ``NNN`` of ``NNN-….png`` or of a claim ``.NNN.claim`` (``None`` for other names)."""
    if name.endswith(".png") and name[:3].isdigit() and name[3:4] == "-":
        return int(name[:3])
    if name.startswith(".") and name.endswith(CLAIM_SUFFIX) and name[1 : -len(CLAIM_SUFFIX)].isdigit():
        return int(name[1 : -len(CLAIM_SUFFIX)])
    return None


def next_free_index(out: Path) -> int:
    """One past the largest ``NNN-`` index of the PNGs (or claims of running writers) in ``out``; 0 when empty."""
    if not out.is_dir():
        return 0
    taken = [i for entry in os.scandir(out) if (i := _index_of(entry.name)) is not None]
    return max(taken, default=-1) + 1


def _claim(out: Path, index: int) -> Path | None:
    """Take index ``index`` of ``out`` for this writer (an ``O_EXCL`` claim file, so two writers never both hold
    it); ``None`` when another writer holds it or a PNG already uses it."""
    claim = out / f".{index:03d}{CLAIM_SUFFIX}"
    try:
        fd = os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return None
    os.write(fd, f"{os.getpid()}\n".encode())
    os.close(fd)
    if any(out.glob(f"{index:03d}-*.png")):  # written by a run that claimed it before this one looked
        claim.unlink(missing_ok=True)
        return None
    return claim


def save_numbered(out: Path, items: list[NumberedImage]) -> list[Path]:
    """Save each item under its own fresh ``NNN-`` index of ``out``, race-free: concurrent runs (several
    ``hiresdiff generate`` processes, the web page) writing into one folder never take the same index nor
    overwrite a file. Each index is claimed atomically (:func:`_claim`) while its files are written, each file is
    written atomically and exclusively (:func:`~hiresdiff.images.save_png` with ``exclusive=True``), and the
    claim is released afterwards, also on errors and interrupts.

    Returns the written paths in order (image, then its previews). An ``OSError`` while writing is raised as one
    line saying how many files were complete before it (:func:`write_error`); a ``KeyboardInterrupt`` carries
    the same count.
    """
    from hiresdiff.images import save_png

    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    index = next_free_index(out)
    for item in items:
        while (claim := _claim(out, index)) is None:
            index = max(index + 1, next_free_index(out))
        try:
            stem = f"{index:03d}-{item.name}"
            files = [(item.image, out / f"{stem}.png")]
            files += [(image, out / f"{stem}-{suffix}.png") for suffix, image in item.previews]
            for image, path in files:
                try:
                    written.append(save_png(image, path, item.settings, exclusive=True))
                except OSError as exc:
                    raise write_error(path, exc, len(written)) from None
                except KeyboardInterrupt:
                    raise KeyboardInterrupt(f"{len(written)} file(s) written before it are complete") from None
        finally:
            claim.unlink(missing_ok=True)
        index += 1
    return written
