"""Image tensors ↔ PIL, PNG settings chunks, atomic writes."""

from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, PngImagePlugin

from hiresdiff.errors import HiresError

#: PNG text-chunk key holding the JSON generation settings
PNG_KEY = "hiresdiff"


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images in [−1, 1] (B, 3, H, W) → 8-bit RGB values (B, H, W, 3) on the images' device, ``round((x + 1)·127.5)``
    with one float32 temporary (the clamped copy, scaled in place)."""
    scaled = images.float().clamp(-1, 1).add_(1).mul_(127.5).round_()
    return scaled.to(torch.uint8).permute(0, 2, 3, 1)


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """Images in [−1, 1] (B, 3, H, W) → 8-bit RGB PIL images (:func:`to_uint8`)."""
    return [Image.fromarray(np.ascontiguousarray(a)) for a in to_uint8(images).cpu().numpy()]


def atomic_write_bytes(path: Path, data: bytes, *, exclusive: bool = False) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder, then move it into place.

    An interrupt leaves either the old file or the new one, never a half-written file. ``exclusive=True`` never
    replaces an existing file: the complete temporary file is hard-linked to ``path`` (atomic, fails when the name
    exists) and :class:`FileExistsError` is raised when another writer holds the name.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; written files get the umask's usual mode
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if exclusive:
            _link_new(tmp, path)
        else:
            os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _link_new(tmp: str, path: Path) -> None:
    """Give the complete file ``tmp`` the new name ``path``; :class:`FileExistsError` if the name is taken.

    File systems without hard links (some network and FUSE mounts) fall back to an exclusive rename: the name is
    checked and taken by one ``os.open(O_EXCL)``, then the complete file replaces that empty placeholder.
    """
    try:
        os.link(tmp, path)
        return
    except FileExistsError:
        raise
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            raise
    os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666 & ~_UMASK))
    try:
        os.replace(tmp, path)
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def png_bytes_of(image: Image.Image, settings: dict[str, Any] | None = None) -> bytes:
    """``image`` encoded as PNG, with ``settings`` as JSON in the :data:`PNG_KEY` text chunk."""
    import io

    info = PngImagePlugin.PngInfo()
    if settings is not None:
        info.add_text(PNG_KEY, json.dumps(settings, sort_keys=True))
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def save_png(
    image: Image.Image, path: Path, settings: dict[str, Any] | None = None, *, exclusive: bool = False
) -> Path:
    """Save ``image`` atomically as PNG, with ``settings`` as JSON in a text chunk (``exclusive``: never replace an
    existing file, see :func:`atomic_write_bytes`)."""
    atomic_write_bytes(path, png_bytes_of(image, settings), exclusive=exclusive)
    return path


def read_png_settings(path: str | Path) -> dict[str, Any]:
    """The generation settings stored in a hiresdiff PNG (a JSON object, not yet checked: see
    :mod:`hiresdiff.from_png`), or a one-line error naming the file."""
    p = Path(path)
    where = f"--from-png {str(p)!r}"
    if not p.is_file():
        raise HiresError(f"{where}: no such file")
    try:
        with Image.open(p) as img:
            text = getattr(img, "text", {}).get(PNG_KEY)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise HiresError(f"{where}: not a readable PNG ({exc})") from None
    if text is None:
        raise HiresError(f"{where}: carries no hiresdiff settings (was it written by hiresdiff?)")
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        raise HiresError(f"{where}: the settings chunk is not valid JSON") from None
    if not isinstance(data, dict):
        raise HiresError(f"{where}: the settings chunk is not a JSON object")
    return data
