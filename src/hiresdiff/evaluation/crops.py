"""Seeded crop protocols for the crop variants of FID, KID and IS (FIDc, KIDc, ISc).

Whole-image FID/KID/IS resize every image to the Inception input (299 px), which hides the fine detail that
high-resolution methods are about, so the papers also score crops (after Chai et al. 2022, "Any-resolution
training for high-resolution image synthesis"):

* ``native`` — one crop of the model's native size per image, resized to the extractor input (DemoFusion's
  FID_crop / IS_crop; ScaleDiff's FIDp / KIDp / ISp);
* ``windows:K`` — K crops of the native size per image (AP-LDM: ten window crops per image); ``windows:KxS``
  uses S px crops instead of the native size;
* ``fixed:NxS`` — N crops of S×S px over the whole set (APT: 50,000 crops).

**Positions.** :func:`crop_boxes` is a pure function of (seed, image width, image height, crop size): every image
of a given size gets the same crop positions, whichever method made it and whichever folder it is in, and the
reference images of that size get them too. Positions never depend on file names, file order or Python's
per-process ``hash`` randomisation. Crop i takes its corner from the BLAKE2b digest of
``(seed, width, height, size, i)`` (two 64-bit integers reduced modulo the number of valid positions; the bias is
below 2⁻⁴⁰ for any image side), so the positions are the same on every platform and every library version, and a
shorter list of crops is a prefix of a longer one.

**Counts.** ``fixed:NxS`` over M images gives ``q = ceil(N / M)`` crops to each image in file order, the last
images fewer so that the total is exactly N: image i gets ``clamp(N − i·q, 0, q)`` crops (N = 10, M = 4 →
3, 3, 3, 1). ``native`` gives one crop per image and ``windows:K`` K crops per image.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, replace
from typing import Literal, NamedTuple

from hiresdiff.errors import HiresError, require

ProtocolKind = Literal["native", "windows", "fixed"]

_SPEC = re.compile(r"^(?:(?P<native>native)|windows:(?P<k>\d+)(?:x(?P<ks>\d+))?|fixed:(?P<n>\d+)x(?P<ns>\d+))$")
SPEC_HELP = "native, windows:K, windows:KxS or fixed:NxS (e.g. fixed:50000x299)"


class CropBox(NamedTuple):
    """A square crop: its top-left corner and side, in pixels of the full image."""

    left: int
    top: int
    size: int


@dataclass(frozen=True)
class CropProtocol:
    """How many crops of which size each image contributes (see the module docstring).

    Attributes:
        kind: ``native``, ``windows`` or ``fixed``.
        size: Crop side in pixels; ``None`` until the model's native size is known (:meth:`with_native`).
        per_image: Crops per image (``native``, ``windows``).
        total: Crops over the whole set (``fixed``).
    """

    kind: ProtocolKind
    size: int | None
    per_image: int | None = None
    total: int | None = None

    @property
    def spec(self) -> str:
        """The protocol written as on the command line, with the resolved size when known."""
        if self.kind == "fixed":
            return f"fixed:{self.total}x{self.size}"
        if self.kind == "native":
            return "native" if self.size is None else f"native ({self.size} px)"
        return f"windows:{self.per_image}" + ("" if self.size is None else f"x{self.size}")

    def with_native(self, native: int) -> CropProtocol:
        """This protocol with the native size filled in where it crops at the native size."""
        require(native >= 1, f"the native size must be a positive number of pixels, got {native}")
        return self if self.size is not None else replace(self, size=native)

    def counts(self, n_images: int) -> list[int]:
        """Crops per image for a set of ``n_images`` images, in file order (see the module docstring)."""
        if self.kind != "fixed":
            return [int(self.per_image or 0)] * n_images
        total = int(self.total or 0)
        if n_images == 0:
            return []
        q = math.ceil(total / n_images)
        return [min(q, max(total - i * q, 0)) for i in range(n_images)]


def parse_crop_spec(spec: str) -> CropProtocol:
    """Parse ``native``, ``windows:K[xS]`` or ``fixed:NxS`` into a :class:`CropProtocol` (one-line error if not)."""
    m = _SPEC.match(spec.strip().lower())
    if m is None:
        raise HiresError(f"--crops: expected {SPEC_HELP}, got {spec!r}")
    if m["native"]:
        return CropProtocol("native", None, per_image=1)
    if m["k"] is not None:
        k, size = int(m["k"]), int(m["ks"]) if m["ks"] else None
        require(k >= 1 and (size is None or size >= 1), f"--crops {spec!r}: counts and sizes must be at least 1")
        return CropProtocol("windows", size, per_image=k)
    n, size = int(m["n"]), int(m["ns"])
    require(n >= 1 and size >= 1, f"--crops {spec!r}: counts and sizes must be at least 1")
    return CropProtocol("fixed", size, total=n)


def crop_boxes(width: int, height: int, size: int, count: int, seed: int) -> list[CropBox]:
    """The first ``count`` crop positions for an image of ``width`` × ``height`` px (pure, see module docstring).

    Every corner is uniform over the positions that keep the crop inside the image: ``left`` in
    ``[0, width − size]``, ``top`` in ``[0, height − size]``.

    Raises:
        HiresError: The crop does not fit the image, or ``count`` / ``seed`` is negative.
    """
    require(1 <= size <= min(width, height), f"a {size} px crop does not fit a {width}×{height} image")
    require(count >= 0 and seed >= 0, f"crop count and seed must not be negative (got {count}, {seed})")
    boxes = []
    for i in range(count):
        key = f"hiresdiff-crop:{seed}:{width}:{height}:{size}:{i}".encode()
        digest = hashlib.blake2b(key, digest_size=16).digest()
        left = int.from_bytes(digest[:8], "little") % (width - size + 1)
        top = int.from_bytes(digest[8:], "little") % (height - size + 1)
        boxes.append(CropBox(left, top, size))
    return boxes
