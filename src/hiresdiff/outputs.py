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
from pathlib import Path

from hiresdiff.errors import HiresError

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
