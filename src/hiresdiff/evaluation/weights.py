"""Where the metric networks' weights come from, and one-line errors when they cannot be had.

* Inception-v3 (FID/KID/IS): torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth`` (the TensorFlow FID
  network ported to PyTorch), downloaded by ``torch.hub`` into ``torch.hub.get_dir()/checkpoints``, or any local
  copy passed explicitly.
* CLIP (CLIP score) and captioners: Hugging Face models, from a local folder or the hub cache.
* MUSIQ / CLIPIQA: pyiqa downloads its checkpoints into ``torch.hub.get_dir()``: MUSIQ's KonIQ-10k checkpoint into
  ``pyiqa/``, CLIPIQA's OpenAI CLIP ResNet-50 into ``clip/``.

Offline means ``HF_HUB_OFFLINE=1`` or ``HIRESDIFF_OFFLINE=1``: nothing is downloaded, and a missing file is reported
in one line naming the file and where to put it, before any network is built.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

import torch

from hiresdiff.errors import HiresError, require

T = TypeVar("T")

INCEPTION_WEIGHTS = "weights-inception-2015-12-05-6726825d.pth"
#: pyiqa metric → (folder under ``torch.hub.get_dir()``, checkpoint file) of the weights it loads by default
PYIQA_WEIGHTS: dict[str, tuple[str, str]] = {
    "musiq": ("pyiqa", "musiq_koniq_ckpt-e95806b9.pth"),
    "clipiqa": ("clip", "RN50.pt"),
}
EVAL_EXTRA = "pip install 'hiresdiff[eval]' on a torch build that has a matching torchvision"
_TRUE = {"1", "ON", "YES", "TRUE"}
#: how every missing-weights message starts
OFFLINE = "offline (HF_HUB_OFFLINE/HIRESDIFF_OFFLINE)"


def offline() -> bool:
    """Whether downloads are off: ``HIRESDIFF_OFFLINE`` or the Hugging Face hub's offline mode."""
    from hiresdiff.models.loading import hub_offline

    return os.environ.get("HIRESDIFF_OFFLINE", "").strip().upper() in _TRUE or hub_offline()


def one_line(error: BaseException) -> str:
    """The first line of an exception message (shortened)."""
    from hiresdiff.models.loading import _one_line

    return _one_line(error)


def import_optional(module: str, purpose: str) -> ModuleType:
    """Import an optional dependency, or raise a one-line :class:`HiresError` saying what to install.

    Packages that import torchvision fail in several ways when it is missing or built for another torch
    (``ImportError``, ``RuntimeError``, ``AttributeError`` …), so any exception counts as "not importable".
    """
    try:
        return importlib.import_module(module)
    except Exception as exc:  # a broken torchvision raises arbitrary errors at import time
        raise HiresError(
            f"{purpose}: {module.split('.')[0]} cannot be imported ({one_line(exc)}); {EVAL_EXTRA}"
        ) from None


def hub_dir() -> Path:
    """``torch.hub.get_dir()`` (``$TORCH_HOME/hub``, by default ``~/.cache/torch/hub``)."""
    return Path(torch.hub.get_dir())


def inception_weights(explicit: str | Path | None = None) -> str | None:
    """The Inception weights file to load, or ``None`` to let torch-fidelity download it.

    Args:
        explicit: A local copy of :data:`INCEPTION_WEIGHTS` (``--inception-weights``); must exist.

    Raises:
        HiresError: ``explicit`` is not a file, or downloads are off and the file is not in torch hub's cache.
    """
    if explicit is not None:
        path = Path(explicit).expanduser()
        require(path.is_file(), f"--inception-weights {str(explicit)!r} is not a file")
        return str(path)
    cached = hub_dir() / "checkpoints" / INCEPTION_WEIGHTS
    if cached.is_file():
        return str(cached)
    if offline():
        raise HiresError(
            f"{OFFLINE} and the Inception weights {INCEPTION_WEIGHTS} are missing: put the file in {cached.parent} "
            "or pass --inception-weights PATH"
        )
    return None


def check_pyiqa_weights(metric: str) -> None:
    """When offline, fail in one line unless pyiqa's default checkpoint for ``metric`` (``musiq``, ``clipiqa``) is
    in its download folder under ``torch.hub.get_dir()``."""
    if metric not in PYIQA_WEIGHTS or not offline():
        return
    folder, name = PYIQA_WEIGHTS[metric]
    target = hub_dir() / folder / name
    if not target.is_file():
        raise HiresError(
            f"{OFFLINE} and the {metric.upper()} weights {name} are missing: put the file in {target.parent}"
        )


def _looks_like_path(ref: str) -> bool:
    return Path(ref).expanduser().exists() or ref.startswith((".", "/", "~")) or "\\" in ref


def load_pretrained(load: Callable[..., T], ref: str, what: str, **kwargs: Any) -> T:
    """``load(ref, …)`` for a Hugging Face ``from_pretrained`` loader, local folder or hub id, offline-aware.

    Args:
        load: e.g. ``CLIPModel.from_pretrained``.
        ref: A local folder (saved with ``save_pretrained``) or a hub id.
        what: What is loaded, for messages (``CLIP model``).
        **kwargs: Passed to ``load``.

    Raises:
        HiresError: The folder does not exist or cannot be loaded; or downloads are off and the hub id is not in
            the Hugging Face cache (the message names the model and the cache folder).
    """
    if _looks_like_path(ref):
        path = Path(ref).expanduser()
        require(path.is_dir(), f"{what} {ref!r} is not a folder")
        try:
            return load(str(path), **kwargs)
        except (OSError, ValueError) as exc:
            raise HiresError(f"cannot load the {what} from {ref!r} ({one_line(exc)})") from None
    from huggingface_hub import constants

    local_only = offline()
    try:
        return load(ref, cache_dir=constants.HF_HUB_CACHE, local_files_only=local_only, **kwargs)
    except (OSError, ValueError) as exc:
        if local_only:
            raise HiresError(
                f"{OFFLINE} and the {what} {ref!r} is not in the Hugging Face cache {constants.HF_HUB_CACHE}: "
                f"download it while online (hf download {ref}) or pass a local folder"
            ) from None
        raise HiresError(f"cannot load the {what} {ref!r} ({one_line(exc)})") from None
