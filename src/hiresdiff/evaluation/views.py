"""What the metrics see of one image, prepared in worker threads, a bounded number of images ahead.

Each image is decoded once and immediately reduced to small tensors: the whole image and its crops resized to
the extractor input (PIL bicubic, antialiased), the CLIP input, and (only for no-reference metrics) the full
image. Only a few decoded images exist at any time, so folders of 4096² images stream in constant memory.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np
import torch
from PIL import Image

from hiresdiff.errors import HiresError
from hiresdiff.evaluation.crops import CropBox
from hiresdiff.evaluation.files import ImageRecord, open_rgb

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class ViewRequest:
    """Which views to prepare for every image of a set.

    Attributes:
        input_size: Side of the extractor input for the whole image and its crops; ``None``: no Inception views.
        clip_pixels: Turns an RGB image into the CLIP input; ``None``: no CLIP view.
        full: Keep the full image (for no-reference quality metrics).
    """

    input_size: int | None = None
    clip_pixels: Callable[[Image.Image], torch.Tensor] | None = None
    full: bool = False


@dataclass(frozen=True)
class ImageViews:
    """The prepared views of one image (``None`` where not requested)."""

    whole: torch.Tensor | None  # (3, S, S) uint8
    crops: torch.Tensor | None  # (k, 3, S, S) uint8
    clip: torch.Tensor | None  # (3, C, C) float
    full: torch.Tensor | None  # (3, H, W) uint8


def to_uint8_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image → (3, H, W) uint8 tensor."""
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).contiguous()


def resized(
    image: Image.Image,
    box: tuple[int, int, int, int],
    size: int,
    resample: Image.Resampling = Image.Resampling.BICUBIC,
) -> Image.Image:
    """The ``box`` region of ``image`` cropped, then resized to ``size`` × ``size`` (antialiased PIL filter).

    Cropping first keeps pixels outside the box out of the filter support at the crop's edges.
    """
    region = image if box == (0, 0, *image.size) else image.crop(box)
    return region if region.size == (size, size) else region.resize((size, size), resample)


def center_box(width: int, height: int) -> tuple[int, int, int, int]:
    """The largest centred square of a ``width`` × ``height`` image, as a PIL box."""
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


def prepare(record: ImageRecord, boxes: list[CropBox], request: ViewRequest) -> ImageViews:
    """Decode one image and build its :class:`ImageViews`."""
    image = open_rgb(record.path)
    if image.size != (record.width, record.height):
        raise HiresError(f"{record.path} changed while being evaluated ({record.width}×{record.height} → {image.size})")
    whole = crops = None
    if request.input_size is not None:
        s = request.input_size
        whole = to_uint8_tensor(resized(image, (0, 0, *image.size), s))
        if boxes:
            crops = torch.stack([to_uint8_tensor(resized(image, (x, y, x + c, y + c), s)) for x, y, c in boxes])
    clip = request.clip_pixels(image) if request.clip_pixels is not None else None
    full = to_uint8_tensor(image) if request.full else None
    return ImageViews(whole, crops, clip, full)


def prefetch(fn: Callable[[T], R], items: Iterable[T], workers: int) -> Iterator[R]:
    """``map(fn, items)`` in order, computed by ``workers`` threads at most ``2 · workers`` items ahead.

    PIL decodes and resizes with the GIL released, so threads overlap image preparation with the networks.
    ``workers = 0`` runs everything in the calling thread.
    """
    if workers <= 0:
        yield from map(fn, items)
        return
    source = iter(items)
    pool = ThreadPoolExecutor(workers, thread_name_prefix="hiresdiff-eval")
    pending: deque[Future[R]] = deque()
    try:
        for item in source:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


class Batcher(Generic[T]):
    """Collects items and hands them to ``consume`` in lists of ``size`` (the rest on :meth:`flush`)."""

    def __init__(self, size: int, consume: Callable[[list[T]], None]) -> None:
        self.size = size
        self.consume = consume
        self.items: list[T] = []

    def extend(self, items: Iterable[T]) -> None:
        for item in items:
            self.items.append(item)
            if len(self.items) >= self.size:
                self.flush()

    def flush(self) -> None:
        if self.items:
            batch, self.items = self.items, []
            self.consume(batch)
