"""A persistent cache of shape-only traces, so that a fresh process does not trace the same calls again.

Tracing one call of a full-size denoiser on ``meta`` (:class:`~hiresdiff.cost.meta.MetaModule`) takes about a
second of CPU, and a run plan meets several new signatures (rows per call, view sizes) each time a process starts.
What a trace yields — the call's FLOPs, its activation peak, the host bytes it raises transiently and the shapes of
its output — depends only on the module's architecture and the call's signature, so it is kept on disk:

* one file per trace under ``~/.cache/hiresdiff/traces`` (``$HIRESDIFF_TRACE_CACHE`` names another folder;
  ``off`` disables the cache), named by a SHA-256 of the module's class and config, the call's signature, the
  versions of torch and diffusers and a digest of hiresdiff's own sources (a changed attention processor or model
  patch counts differently, so its traces must not be reused);
* written atomically (a temporary file moved into place: concurrent writers leave one whole file); a file that
  cannot be read (truncated, corrupt, another format) counts as absent and is replaced.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import pickle
from pathlib import Path
from typing import Any

import torch

from hiresdiff.images import atomic_write_bytes

#: the environment variable naming the cache folder (``off``: no persistent cache)
ENV = "HIRESDIFF_TRACE_CACHE"


@functools.cache
def _sources_digest() -> str:
    """SHA-256 over hiresdiff's Python sources (names and contents): traces made by other code are not reused."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


@functools.cache
def _versions() -> tuple[str, ...]:
    import diffusers

    return (torch.__version__, diffusers.__version__, _sources_digest())


def folder() -> Path | None:
    """Where traces are kept, or ``None`` when the cache is off."""
    where = os.environ.get(ENV, "")
    if where.lower() == "off":
        return None
    return Path(where) if where else Path.home() / ".cache" / "hiresdiff" / "traces"


def module_identity(module: Any) -> str:
    """What makes two modules trace alike: their class and configuration (weights do not matter on ``meta``)."""
    config = getattr(module, "config", None)
    described = config.to_json_string() if hasattr(config, "to_json_string") else repr(config)
    return f"{type(module).__module__}.{type(module).__qualname__}:{described}"


def trace_name(identity: str, key: Any) -> str:
    """The file name of a call's trace: a digest of the module ``identity``, the call ``key`` and the versions."""
    return hashlib.sha256(repr((identity, key, _versions())).encode()).hexdigest() + ".pt"


def load(name: str) -> tuple[float, Any, int, int] | None:
    """``(flops, output, activation peak, host rise)`` of a stored trace, or ``None`` (absent, unreadable, off)."""
    base = folder()
    if base is None:
        return None
    try:
        data = torch.load(io.BytesIO((base / name).read_bytes()), weights_only=False)
        return float(data["flops"]), data["out"], int(data["peak"]), int(data["rise"])
    except Exception:  # absent, truncated or foreign: trace again (and replace it)
        return None


def save(name: str, flops: float, out: Any, peak: int, rise: int) -> None:
    """Keep a trace (best effort: a folder that cannot be written leaves the cache without it)."""
    base = folder()
    if base is None:
        return
    buffer = io.BytesIO()
    try:
        torch.save({"flops": flops, "out": out, "peak": peak, "rise": rise}, buffer)
        atomic_write_bytes(base / name, buffer.getvalue())
    except (OSError, RuntimeError, TypeError, AttributeError, pickle.PicklingError):  # unwritable, unpicklable
        return
