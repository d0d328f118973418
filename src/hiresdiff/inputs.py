"""A user's own picture as the start of an upscale: decode, size the target, fit its aspect, resize.

The picture is decoded the way a photo viewer shows it (EXIF orientation applied, transparency flattened on white,
16-bit and CMYK files brought to 8-bit RGB) so the upscale starts from what the user sees. Every problem with the file
or the requested size is a one-line :class:`~hiresdiff.errors.HiresError` raised before any model work.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from hiresdiff.config import FIT_MODES
from hiresdiff.errors import HiresError, require
from hiresdiff.stages import round_to_grid

#: name recorded for images handed over as PIL objects rather than files
PIL_IMAGE_NAME = "<PIL image>"

#: what to pass instead, appended to every "cannot read" error
_READABLE_HINT = "pass a PNG, JPEG or WebP file"

#: EXIF tag holding the orientation; 1 means "as stored", 2 … 8 a flip and/or rotation
_ORIENTATION_TAG = 0x0112

_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_PREMULTIPLIED_MODES = ("La", "RGBa")


@dataclass(frozen=True)
class SourceImage:
    """A user's input picture, decoded like a photo viewer shows it.

    ``pixels`` is ``(1, 3, H, W)`` float32 RGB in [−1, 1] with the EXIF orientation applied. ``sha256`` identifies
    the input in run metadata: the hash of the file's bytes, or for an in-memory PIL image the hash of its decoded
    RGB bytes and size. ``notes`` lists, in order, every conversion made on the way, so a surprising result can be
    traced back to the file.
    """

    pixels: torch.Tensor
    name: str
    sha256: str
    notes: tuple[str, ...] = ()

    @property
    def height(self) -> int:
        return int(self.pixels.shape[-2])

    @property
    def width(self) -> int:
        return int(self.pixels.shape[-1])

    def metadata(self) -> dict[str, Any]:
        """JSON-ready description of the input, for the settings stored with the result."""
        return {
            "name": self.name,
            "width": self.width,
            "height": self.height,
            "sha256": self.sha256,
            "notes": list(self.notes),
        }


def _first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message, or its type name when it has none."""
    if isinstance(exc, UnidentifiedImageError):
        # PIL's own text names the in-memory buffer we decode from, which means nothing to the user
        return "not a recognised image format"
    for line in str(exc).splitlines():
        if line.strip():
            return line.strip()
    return type(exc).__name__


def _bomb_error(label: str, exc: BaseException) -> HiresError:
    """One-line error for an image above PIL's decompression-bomb limit (warning or error range alike)."""
    limit = Image.MAX_IMAGE_PIXELS
    found = re.search(r"\((\d+) pixels\)", str(exc))
    count = f"{int(found.group(1))} pixels" if found else "more pixels"
    return HiresError(
        f"image {label!r} has {count}, above PIL's decompression-bomb limit of {limit} pixels "
        f"(PIL.Image.MAX_IMAGE_PIXELS); shrink the image, or raise PIL.Image.MAX_IMAGE_PIXELS if you trust the file"
    )


def _orientation(img: Image.Image) -> int:
    """The EXIF orientation tag (1 when absent or unreadable)."""
    try:
        value = img.getexif().get(_ORIENTATION_TAG, 1)
    except Exception:  # a broken EXIF block must not stop decoding; the viewer would ignore it too
        return 1
    return value if isinstance(value, int) else 1


def _composite_on_white(rgb: np.ndarray, alpha: np.ndarray, premultiplied: bool) -> np.ndarray:
    """Flatten ``rgb`` (H, W, 3) with ``alpha`` (H, W) over a white background, rounded to uint8."""
    c = rgb.astype(np.float64)
    a = alpha.astype(np.float64)[..., None] / 255.0
    out = c + 255.0 * (1.0 - a) if premultiplied else c * a + 255.0 * (1.0 - a)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _to_rgb_array(img: Image.Image, notes: list[str]) -> np.ndarray:
    """Any PIL mode → (H, W, 3) uint8 RGB, appending what was done to ``notes``."""
    mode = img.mode
    if mode in ("P", "PA"):
        has_alpha = mode == "PA" or "transparency" in img.info
        img = img.convert("RGBA" if has_alpha else "RGB")
        notes.append("palette converted")
        mode = img.mode
    elif mode in ("L", "RGB") and "transparency" in img.info:
        # a tRNS chunk makes one grey level / colour transparent
        img = img.convert("RGBA")
        mode = img.mode

    if mode in ("LA", "RGBA", *_PREMULTIPLIED_MODES):
        arr = np.asarray(img)
        colour, alpha = arr[..., :-1], arr[..., -1]
        if colour.shape[-1] == 1:
            colour = np.repeat(colour, 3, axis=-1)
        if bool((alpha < 255).any()):
            notes.append("alpha composited on white")
            return _composite_on_white(colour, alpha, premultiplied=mode in _PREMULTIPLIED_MODES)
        return np.ascontiguousarray(colour, dtype=np.uint8)

    if mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(img).astype(np.int64)
        if mode == "I" and (values.size == 0 or int(values.max()) <= 255):
            grey = np.clip(values, 0, 255).astype(np.uint8)
        else:
            grey = np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8)
            notes.append("16-bit scaled to 8-bit")
        return np.repeat(grey[..., None], 3, axis=-1)

    if mode == "F":
        values = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0, posinf=255.0, neginf=0.0)
        if values.size and (values.min() < 0 or values.max() > 255):
            notes.append("float values clipped to 0–255")
        grey = np.clip(np.rint(values), 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=-1)

    if mode == "CMYK":
        notes.append("CMYK converted to RGB")
    if mode != "RGB":
        try:
            img = img.convert("RGB")
        except (ValueError, OSError) as exc:
            raise HiresError(
                f"image mode {mode!r} cannot be converted to RGB ({_first_line(exc)}); save the image as 8-bit RGB "
                f"and pass it again"
            ) from None
    return np.ascontiguousarray(np.asarray(img), dtype=np.uint8)


def _decode(img: Image.Image, label: str, notes: list[str]) -> np.ndarray:
    """A loaded PIL image → (H, W, 3) uint8 RGB as a viewer shows it (first frame, EXIF orientation applied)."""
    width, height = img.size
    require(
        width > 0 and height > 0,
        f"image {label!r} is empty ({height}×{width} pixels); pass an image with at least one pixel",
    )
    if getattr(img, "is_animated", False):
        notes.append("animated: first frame used")
    orientation = _orientation(img)
    img = ImageOps.exif_transpose(img)
    if orientation in range(2, 9):
        notes.append("EXIF orientation applied")
    return _to_rgb_array(img, notes)


def _open_bytes(data: bytes, label: str, notes: list[str]) -> np.ndarray:
    """Decode file bytes fully (so truncation shows), turning PIL's complaints into one-line errors."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                img.seek(0)
                img.load()
                return _decode(img, label, notes)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _bomb_error(label, exc) from None
    except HiresError:
        raise
    except (OSError, ValueError, UnidentifiedImageError, SyntaxError, EOFError) as exc:
        raise HiresError(f"cannot read image {label!r}: {_first_line(exc)}; {_READABLE_HINT}") from None


def _read_file(source: str | os.PathLike[str]) -> tuple[bytes, str]:
    """The bytes of an image file and its base name, or a one-line error for a missing path or a folder."""
    path = Path(os.fspath(source))
    label = str(path)
    require(path.exists(), f"no such image file {label!r}; check the path")
    require(not path.is_dir(), f"{label!r} is a folder, not an image file; {_READABLE_HINT}")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise HiresError(f"cannot read image {label!r}: {_first_line(exc)}; {_READABLE_HINT}") from None
    return data, path.name


def _to_pixels(rgb: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 → (1, 3, H, W) float32 in [−1, 1] (copied: PIL's arrays are read-only)."""
    t = torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1).unsqueeze(0)
    return (t.to(torch.float32) / 127.5 - 1.0).contiguous()


def load_source_image(source: str | os.PathLike[str] | Image.Image) -> SourceImage:
    """Decode a file path or an in-memory PIL image into a :class:`SourceImage`.

    Files are read once: the bytes are hashed and decoded from memory, so the hash is of exactly what was decoded.
    PIL's decompression-bomb warning is treated like its error, because an image that large would exhaust memory
    long before the upscale finished.
    """
    require(
        isinstance(source, (str, os.PathLike, Image.Image)),
        f"an input image must be a file path or a PIL image, got {source!r:.60} ({type(source).__name__})",
    )
    notes: list[str] = []
    if isinstance(source, Image.Image):
        label = PIL_IMAGE_NAME
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                source.load()
                rgb = _decode(source, label, notes)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise _bomb_error(label, exc) from None
        except HiresError:
            raise
        except (OSError, ValueError, SyntaxError, EOFError) as exc:
            raise HiresError(f"cannot read image {label!r}: {_first_line(exc)}; {_READABLE_HINT}") from None
        digest = hashlib.sha256(f"{rgb.shape[0]}x{rgb.shape[1]}:".encode())
        digest.update(rgb.tobytes())
        return SourceImage(_to_pixels(rgb), label, digest.hexdigest(), tuple(notes))

    data, name = _read_file(source)
    rgb = _open_bytes(data, str(Path(os.fspath(source))), notes)
    return SourceImage(_to_pixels(rgb), name, hashlib.sha256(data).hexdigest(), tuple(notes))


def check_min_size(image: SourceImage, native: int) -> None:
    """The input's long side must reach the model's base canvas: the upscale starts from the input at native size."""
    require(
        max(image.height, image.width) >= native,
        f"input image {image.height}×{image.width} is smaller than the model's base canvas: its long side must be at "
        f"least {native} px (upscale it first or use a model with a smaller native size)",
    )


def _check_side(flag: str, value: int, grid: int) -> None:
    """A requested output side: a positive integer on the latent grid."""
    require(
        isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value > 0,
        f"{flag} must be a positive integer, got {value!r}",
    )
    require(
        value % grid == 0,
        f"{flag} {value} is not a multiple of the latent grid ({grid} px); try {round_to_grid(value, grid)}",
    )


def target_size(
    height: int,
    width: int,
    *,
    scale: float | None,
    target_height: int | None,
    target_width: int | None,
    grid: int,
) -> tuple[int, int]:
    """The output ``(height, width)`` for an ``height × width`` input, on the ``grid``.

    ``scale`` multiplies both sides; a single given side keeps the input's aspect; both sides are taken as given;
    nothing given means ``scale = 2``. The result must enlarge the input along at least one side.
    """
    require(height > 0 and width > 0, f"input size {height}×{width} must be positive; pass a non-empty image")
    sized = target_height is not None or target_width is not None
    require(scale is None or not sized, "give --scale or --width/--height, not both")
    if target_height is not None:
        _check_side("--height", target_height, grid)
    if target_width is not None:
        _check_side("--width", target_width, grid)

    if target_height is not None and target_width is not None:
        out = (target_height, target_width)
    elif target_width is not None:
        out = (round_to_grid(target_width * height / width, grid), target_width)
    elif target_height is not None:
        out = (target_height, round_to_grid(target_height * width / height, grid))
    else:
        s = 2.0 if scale is None else scale
        finite = isinstance(s, (int, float, np.number)) and not isinstance(s, bool) and math.isfinite(s)
        require(finite and s > 1, f"--scale must be a finite number above 1 (it enlarges the input), got {s!r}")
        out = (round_to_grid(height * s, grid), round_to_grid(width * s, grid))

    require(
        out[0] > height or out[1] > width,
        f"the target {out[0]}×{out[1]} does not enlarge the input {height}×{width}; ask for a larger --scale or size",
    )
    return out


def _same_aspect(height: int, width: int, target: tuple[int, int], grid: int) -> bool:
    """Whether ``target`` has the input's aspect up to rounding its sides to the grid."""
    th, tw = target
    return abs(th - tw * height / width) <= grid or abs(tw - th * width / height) <= grid


def check_aspect(height: int, width: int, target: tuple[int, int], grid: int, fit: str | None) -> None:
    """Refuse to stretch: a target of another aspect needs an explicit ``--fit``."""
    require(
        fit is None or fit in FIT_MODES,
        f"unknown --fit {fit!r}; use one of: {', '.join(FIT_MODES)}",
    )
    require(
        fit is not None or _same_aspect(height, width, target, grid),
        f"the target {target[0]}×{target[1]} has another aspect ratio than the input {height}×{width}; pass --fit "
        f"crop (centre crop) or --fit pad (extend the edges), or drop --width/--height to keep the input's aspect",
    )


def fit_to_aspect(pixels: torch.Tensor, target: tuple[int, int], fit: str | None, *, grid: int = 8) -> torch.Tensor:
    """Bring ``pixels`` (1, 3, H, W) to the aspect of ``target`` by centre crop or edge padding.

    Returns ``pixels`` unchanged when ``fit`` is None or the aspects already agree up to rounding on ``grid``
    (the latent grid the target was rounded to: 8 for SD/SDXL, 16 for Flux), so a plain upscale never loses a row.
    ``"pad"`` replicates the edge pixels; an odd remainder goes to the bottom/right, as does the extra cropped row.
    """
    if fit is None:
        return pixels
    require(fit in FIT_MODES, f"unknown --fit {fit!r}; use one of: {', '.join(FIT_MODES)}")
    height, width = int(pixels.shape[-2]), int(pixels.shape[-1])
    if _same_aspect(height, width, target, grid):
        return pixels
    th, tw = target
    taller = height * tw > th * width  # the input is taller (relative to its width) than the target
    if fit == "crop":
        new_h = min(height, max(1, round(width * th / tw))) if taller else height
        new_w = width if taller else min(width, max(1, round(height * tw / th)))
        top, left = (height - new_h) // 2, (width - new_w) // 2
        return pixels[..., top : top + new_h, left : left + new_w]
    new_h = height if taller else max(height, round(width * th / tw))
    new_w = max(width, round(height * tw / th)) if taller else width
    dh, dw = new_h - height, new_w - width
    return F.pad(pixels, (dw // 2, dw - dw // 2, dh // 2, dh - dh // 2), mode="replicate")
