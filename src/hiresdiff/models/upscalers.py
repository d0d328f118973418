"""Super-resolution models (``--upscaler FILE``): ESRGAN, BSRGAN, Real-ESRGAN, SwinIR, … as pixel upsamplers.

:func:`resolve_upscaler` checks and loads a file at request time — before any generation work — so a file that is
not an image SR model, or a pickled one without ``allow_pickle``, stops with one line; the loaded model is kept
per path, modification time and size. :func:`upscale` runs it tiled (overlapping tiles, linearly blended, batched)
on the run's device and dtype, and resamples the remainder to the exact target size (SR models have fixed ×2/×4).

Files load through spandrel's ``ModelLoader`` (the library ComfyUI uses: dozens of architectures detected from
their tensor names). spandrel imports torchvision as the package is imported (``spandrel/__init__`` → its main
registry → ``architectures/LaMa/__arch/LaMa.py`` and ``architectures/RestoreFormer/__init__.py``); where that
fails (a torch build without its torchvision), ESRGAN-family files load through :mod:`hiresdiff.models.rrdbnet`
and any other architecture is refused in one line.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import pickle
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hiresdiff.errors import HiresError, require
from hiresdiff.models.loading import PICKLE_SUFFIXES, SAFETENSORS_SUFFIX, _one_line
from hiresdiff.models.rrdbnet import build_rrdbnet, esrgan_state
from hiresdiff.ops.resample import resize_pixels

#: input-pixel side of one tile and overlap of neighbouring tiles (each blended over the overlap)
DEFAULT_TILE = 512
DEFAULT_OVERLAP = 32
#: tiles per model call
DEFAULT_TILE_BATCH = 4
#: keys that wrap the state dict in training checkpoints (BasicSR's EMA weights first)
_WRAPPERS = ("params_ema", "params", "state_dict", "model", "net")


@dataclass(frozen=True)
class UpscalerSpec:
    """A checked SR model file: absolute ``path``, ``sha256`` of its bytes (pins the weights in the PNG metadata),
    the ``arch`` detected and its ``scale``."""

    path: str
    sha256: str
    arch: str = field(compare=False)
    scale: int = field(compare=False)

    @property
    def name(self) -> str:
        return os.path.basename(self.path)

    def metadata(self) -> dict[str, Any]:
        """JSON-ready record for the PNG settings (``--from-png`` loads ``path`` again and checks ``sha256``)."""
        return {"name": self.name, "path": self.path, "sha256": self.sha256}


@dataclass(eq=False)
class Upscaler:
    """A loaded SR network on images in [0, 1]: ``(B, 3, h, w) → (B, 3, h·scale, w·scale)``, clamped to [0, 1] (as
    spandrel's descriptors clamp, so both loaders give the same tiles).

    ``run`` is the network's call (spandrel's descriptor, or the module itself); ``multiple_of``: input sides the
    network needs (inputs are reflect-padded up to it and the output cropped); ``half``: float16/bfloat16 allowed
    (else it runs in float32)."""

    module: torch.nn.Module
    run: Callable[[torch.Tensor], torch.Tensor]
    scale: int
    arch: str
    multiple_of: int = 1
    half: bool = True

    def place(self, device: torch.device | str, dtype: torch.dtype) -> torch.dtype:
        """Move the network to ``device`` in ``dtype`` (float32 where it cannot run in half precision); the dtype
        used."""
        dtype = dtype if self.half or dtype == torch.float32 else torch.float32
        self.module.to(device=device, dtype=dtype)
        return dtype

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        m = self.multiple_of
        pad_h, pad_w = -h % m, -w % m
        if pad_h or pad_w:
            x = torch.nn.functional.pad(x, (0, pad_w, 0, pad_h), mode="reflect")
        return self.run(x).clamp(0, 1)[..., : h * self.scale, : w * self.scale]


_CACHE: dict[tuple[str, int, int], tuple[UpscalerSpec, Upscaler]] = {}


def resolve_upscaler(path: str | os.PathLike[str], *, allow_pickle: bool = False) -> UpscalerSpec:
    """Check and load an SR model file (kept for :func:`load_upscaler`); one-line :class:`HiresError` for a missing
    file, an unknown suffix, a pickle without ``allow_pickle``, an unreadable file, or weights that are not an
    image super-resolution model."""
    return _loaded(path, allow_pickle)[0]


def load_upscaler(spec: UpscalerSpec, *, allow_pickle: bool = False) -> Upscaler:
    """The network of a resolved file (loaded once per path, mtime and size; a file replaced since is loaded again
    and must still have the recorded sha256)."""
    found, model = _loaded(spec.path, allow_pickle)
    require(found.sha256 == spec.sha256, f"upscaler {spec.name!r} changed on disk since it was checked; run again")
    return model


def _loaded(path: str | os.PathLike[str], allow_pickle: bool) -> tuple[UpscalerSpec, Upscaler]:
    require(isinstance(path, (str, os.PathLike)), f"an upscaler must be a file path, got {type(path).__name__}")
    ref = os.fspath(path)
    file = Path(ref).expanduser()
    require(file.is_file(), f"upscaler file {ref!r} does not exist or is not a file; check the path")
    suffix = file.suffix.lower()
    require(
        suffix in (SAFETENSORS_SUFFIX, *PICKLE_SUFFIXES),
        f"upscaler {ref!r}: unknown file type {suffix or '(none)'}; pass a .safetensors (or .pth/.ckpt) SR model",
    )
    require(
        suffix == SAFETENSORS_SUFFIX or allow_pickle,
        f"upscaler {ref!r} is a pickle file ({suffix}): pickled weights can execute code; "
        "pass --allow-pickle to load it anyway (or use a .safetensors file)",
    )
    stat = file.stat()
    key = (str(file.resolve()), stat.st_mtime_ns, stat.st_size)
    if key not in _CACHE:
        data = file.read_bytes()
        spec_path = key[0]
        state = _state_dict(ref, data, suffix)
        model = _build(ref, state)
        _CACHE.clear()  # one SR model at a time: a newer file or another model replaces it
        _CACHE[key] = UpscalerSpec(spec_path, hashlib.sha256(data).hexdigest(), model.arch, model.scale), model
    return _CACHE[key]


def _state_dict(ref: str, data: bytes, suffix: str) -> dict[str, torch.Tensor]:
    """The tensors of the file, unwrapped from a training checkpoint and without DataParallel's ``module.``."""
    try:
        if suffix == SAFETENSORS_SUFFIX:
            from safetensors.torch import load as load_safetensors

            raw: Any = load_safetensors(data)
        else:
            try:
                raw = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
            except pickle.UnpicklingError:  # objects beyond tensors: allowed by --allow-pickle
                raw = torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
    except Exception as error:  # any failure to read is one line for the user
        raise HiresError(f"upscaler {ref!r} cannot be read: {_one_line(error)}") from None
    for wrapper in _WRAPPERS:
        if isinstance(raw, Mapping) and isinstance(raw.get(wrapper), Mapping):
            raw = raw[wrapper]
            break
    tensors = {k: v for k, v in raw.items() if isinstance(v, torch.Tensor)} if isinstance(raw, Mapping) else {}
    require(tensors, f"upscaler {ref!r} holds no tensors; pass an SR model's weights file")
    return {k.removeprefix("module."): v for k, v in tensors.items()}


def _spandrel() -> Any | None:
    """The spandrel module, or ``None`` where it is not installed or cannot import: no torchvision
    (``ModuleNotFoundError``), or one built for another torch (its C ops fail to register: ``RuntimeError``)."""
    try:
        import spandrel
    except Exception:  # any failure to import means: not usable here
        return None
    return spandrel


def _build(ref: str, state: dict[str, torch.Tensor]) -> Upscaler:
    spandrel = _spandrel()
    if spandrel is not None:
        return _build_spandrel(ref, state, spandrel)
    esrgan = esrgan_state(state)
    require(
        esrgan is not None,
        f"upscaler {ref!r} is not an ESRGAN-type model; other SR architectures load through spandrel, which needs "
        "torchvision (pip install --no-deps spandrel, and a torchvision matching your torch)",
    )
    assert esrgan is not None
    try:
        net = build_rrdbnet(esrgan)
    except (RuntimeError, KeyError, IndexError, ValueError) as error:
        raise HiresError(f"upscaler {ref!r}: ESRGAN tensors that do not fit together ({_one_line(error)})") from None
    return Upscaler(net, net, net.scale, "ESRGAN", net.unshuffle)


def _build_spandrel(ref: str, state: dict[str, torch.Tensor], spandrel: Any) -> Upscaler:
    try:
        desc = spandrel.ModelLoader(device="cpu").load_from_state_dict(state)
    except spandrel.UnsupportedModelError:
        raise HiresError(
            f"upscaler {ref!r} is not a model spandrel knows (no SR architecture matches its tensor names); "
            "pass an ESRGAN/BSRGAN/Real-ESRGAN/SwinIR-type .safetensors file"
        ) from None
    except Exception as error:  # a detected architecture whose tensors do not fit
        raise HiresError(f"upscaler {ref!r} cannot be loaded: {_one_line(error)}") from None
    arch = str(desc.architecture.name)
    require(
        isinstance(desc, spandrel.ImageModelDescriptor) and desc.purpose == "SR" and desc.scale > 1,
        f"upscaler {ref!r} is a {arch} model for {desc.purpose} at scale {desc.scale}, not an image "
        "super-resolution model; pass an SR model (×2, ×4)",
    )
    desc.eval()
    multiple = int(desc.size_requirements.multiple_of)
    half = bool(desc.supports_half)
    return Upscaler(desc.model, desc, int(desc.scale), arch, multiple, half)


# ------------------------------------------------------------------------------------------- running


def _starts(length: int, tile: int, overlap: int) -> list[int]:
    """Tile offsets along one side: evenly spread, neighbours overlapping by at least ``overlap``."""
    if length <= tile:
        return [0]
    n = math.ceil((length - overlap) / (tile - overlap))
    return [i * (length - tile) // (n - 1) for i in range(n)]


def _ramp(start: int, size: int, length: int, overlap: int, scale: int) -> torch.Tensor:
    """Blend weight of one tile along one side (output pixels): 1, ramping linearly over the ``overlap`` at each
    edge that meets a neighbour (never at the image border), so pixels one tile covers have weight exactly 1."""
    w = torch.ones(size * scale)
    r = min(overlap * scale, size * scale)
    if r:
        up = (torch.arange(r, dtype=torch.float32) + 0.5) / r
        if start > 0:
            w[:r] = up
        if start + size < length:
            w[-r:] = torch.minimum(w[-r:], up.flip(0))
    return w


def _pass(x: torch.Tensor, model: Upscaler, tile: int, overlap: int, max_batch: int) -> torch.Tensor:
    """One pass of the network over ``x`` (B, 3, H, W in [0, 1]) in overlapping tiles, ``max_batch`` per call."""
    b, c, h, w = x.shape
    s = model.scale
    th, tw = min(tile, h), min(tile, w)
    ys, xs = _starts(h, tile, overlap), _starts(w, tile, overlap)
    out = torch.zeros((b, c, h * s, w * s), dtype=torch.float32, device=x.device)
    weight = torch.zeros((h * s, w * s), dtype=torch.float32, device=x.device)
    masks = {}
    for y in ys:
        for x0 in xs:
            mask = (_ramp(y, th, h, overlap, s)[:, None] * _ramp(x0, tw, w, overlap, s)[None, :]).to(x.device)
            masks[y, x0] = mask
            weight[y * s : (y + th) * s, x0 * s : (x0 + tw) * s].add_(mask)
    boxes = [(i, y, x0) for i in range(b) for y in ys for x0 in xs]
    for first in range(0, len(boxes), max_batch):
        chunk = boxes[first : first + max_batch]
        crops = torch.stack([x[i, :, y : y + th, x0 : x0 + tw] for i, y, x0 in chunk])
        for (i, y, x0), up in zip(chunk, model(crops).float(), strict=True):
            out[i, :, y * s : (y + th) * s, x0 * s : (x0 + tw) * s].add_(up * masks[y, x0])
    return out / weight


def upscale(
    images: torch.Tensor,
    model: Upscaler,
    size: tuple[int, int],
    *,
    tile: int = DEFAULT_TILE,
    overlap: int = DEFAULT_OVERLAP,
    max_batch: int = DEFAULT_TILE_BATCH,
) -> torch.Tensor:
    """Images in [−1, 1] (B, 3, H, W) enlarged by the SR network to exactly ``size`` (h, w), in [−1, 1].

    The network runs (on its device and dtype, see :meth:`Upscaler.place`) as many passes as it takes to reach
    ``size`` on both sides — once for a ×4 model and a 2× target — in tiles of ``tile`` input pixels overlapping by
    ``overlap`` (an image within one tile is one call); what it overshoots or falls short by is resampled by
    :func:`~hiresdiff.ops.resample.resize_pixels` (bicubic, antialiased when shrinking).
    """
    require(0 <= overlap < tile and max_batch >= 1, f"bad tiling: tile {tile}, overlap {overlap}, batch {max_batch}")
    param = next(model.module.parameters(), None)
    dtype = param.dtype if param is not None else torch.float32
    device = param.device if param is not None else images.device
    x = ((images.to(device=device, dtype=torch.float32).clamp(-1, 1) + 1) / 2).to(dtype)
    while x.shape[-2] < size[0] or x.shape[-1] < size[1]:
        x = _pass(x, model, tile, overlap, max_batch).to(dtype)
    out = resize_pixels(x.float() * 2 - 1, size)
    return out.to(device=images.device, dtype=images.dtype)
