"""A persistent cache of shape-only traces, so that a fresh process does not trace the same calls again.

Tracing one call of a full-size denoiser on ``meta`` (:class:`~hiresdiff.cost.meta.MetaModule`) takes about a
second of CPU, and a run plan meets several new signatures (rows per call, view sizes) each time a process starts.
What a trace yields (:class:`~hiresdiff.cost.trace.Trace`: the call's FLOPs, its activation peak and timeline,
the host bytes it raises transiently and the shapes of its output) depends only on the module's architecture and
the call's signature, so it is kept on disk:

* one file per trace under ``~/.cache/hiresdiff/traces`` (``$HIRESDIFF_TRACE_CACHE`` names another folder;
  ``off`` disables the cache), named by a SHA-256 of the module's class and config, the call's signature, the
  versions of torch and diffusers and a digest of hiresdiff's own sources (a changed attention processor or model
  patch counts differently, so its traces must not be reused);
* written atomically (a temporary file moved into place: concurrent writers leave one whole file); a file that
  cannot be read (truncated, corrupt, another format) counts as absent and is replaced.

Whole reports of a request (:func:`hiresdiff.plan.request_cost`) are kept beside them as JSON under ``reports/``
(:func:`load_report`, :func:`save_report`): the same request planned again — a ``--dry-run`` and then the run,
every image of a bench group, a new web session — costs a file read.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import io
import json
import os
import pickle
from pathlib import Path
from typing import Any

import torch

from hiresdiff.cost.trace import Trace
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
    """torch's and diffusers' versions and hiresdiff's sources: what a stored trace or report was made with.
    diffusers' version is read from its installed metadata, not by importing it: a plan whose reports are all
    on disk then never imports diffusers."""
    from importlib.metadata import version

    return (torch.__version__, version("diffusers"), _sources_digest())


def folder() -> Path | None:
    """Where traces are kept, or ``None`` when the cache is off."""
    where = os.environ.get(ENV, "")
    if where.lower() == "off":
        return None
    return Path(where) if where else Path.home() / ".cache" / "hiresdiff" / "traces"


def module_identity(module: Any) -> str:
    """What makes two modules trace alike: their class and configuration (weights do not matter on ``meta``).

    The configuration is written with sorted keys and without the private entries (``_use_default_values`` and
    the like, whose order follows a set's and so changes from one process to the next)."""
    config = getattr(module, "config", None)
    if hasattr(config, "to_dict"):  # transformers' PretrainedConfig
        config = config.to_dict()
    if isinstance(config, dict):  # diffusers' FrozenDict, plain dicts
        public = {k: v for k, v in config.items() if not str(k).startswith("_")}
        described = json.dumps(public, sort_keys=True, default=repr)
    else:
        described = repr(config)
    return f"{type(module).__module__}.{type(module).__qualname__}:{described}"


def trace_name(identity: str, key: Any) -> str:
    """The file name of a call's trace: a digest of the module ``identity``, the call ``key`` and the versions."""
    return hashlib.sha256(repr((identity, key, _versions())).encode()).hexdigest() + ".pt"


#: where the classes of stored call outputs may come from (``ModelOutput``s, diffusers' Gaussian posterior)
OUTPUT_MODULES = ("diffusers.", "transformers.")


def _encode(obj: Any) -> Any:
    """A call's output as plain data (dicts, lists, strings, numbers): tensors by layout, structures by kind and
    class name — what :func:`_decode` rebuilds without unpickling any object. ``TypeError``: not storable."""
    if isinstance(obj, torch.Tensor):
        return {"tensor": [list(obj.shape), list(obj.stride()), str(obj.dtype).removeprefix("torch.")]}
    if type(obj) in (list, tuple):
        return {"seq": type(obj).__name__, "items": [_encode(v) for v in obj]}
    if obj is None or type(obj) in (bool, int, float, str):
        return {"value": obj}
    name = f"{type(obj).__module__}:{type(obj).__qualname__}"
    if hasattr(obj, "keys") and hasattr(obj, "items") and all(isinstance(k, str) for k, _ in obj.items()):
        return {"map": name, "items": [[k, _encode(v)] for k, v in obj.items()]}
    if hasattr(obj, "__dict__") and type(obj).__module__.startswith(OUTPUT_MODULES):
        return {"object": name, "fields": {k: _encode(v) for k, v in vars(obj).items()}}
    raise TypeError(f"cannot store a {name}")


def _output_class(name: str) -> type:
    """The class ``module:qualname`` of a stored output — only from :data:`OUTPUT_MODULES` (else ``ValueError``)."""
    module, _, qualname = name.partition(":")
    if module == "builtins" and qualname == "dict":
        return dict
    if not module.startswith(OUTPUT_MODULES):
        raise ValueError(f"a stored output names {name}")
    cls: Any = importlib.import_module(module)
    for part in qualname.split("."):
        cls = getattr(cls, part)
    if not isinstance(cls, type):
        raise ValueError(f"{name} is not a class")
    return cls


def _decode(data: Any) -> Any:
    """The output :func:`_encode` described: ``meta`` tensors of the recorded layouts in the recorded structures."""
    if "tensor" in data:
        shape, stride, dtype = data["tensor"]
        kind = getattr(torch, dtype)
        if not isinstance(kind, torch.dtype):
            raise ValueError(f"no dtype {dtype}")
        return torch.empty_strided(shape, stride, dtype=kind, device="meta")
    if "seq" in data:
        items = [_decode(v) for v in data["items"]]
        return tuple(items) if data["seq"] == "tuple" else items
    if "value" in data:
        return data["value"]
    if "map" in data:
        return _output_class(data["map"])(**{k: _decode(v) for k, v in data["items"]})
    cls = _output_class(data["object"])
    out = cls.__new__(cls)
    out.__dict__.update({k: _decode(v) for k, v in data["fields"].items()})
    return out


def load(name: str) -> Trace | None:
    """A stored trace, or ``None`` (absent, unreadable, of another format, off). Files are read as data only
    (``weights_only``: no object in them is unpickled; outputs are rebuilt by :func:`_decode`)."""
    base = folder()
    if base is None:
        return None
    try:
        data = torch.load(io.BytesIO((base / name).read_bytes()), weights_only=True)
        trail = data["trail"]
        if not isinstance(trail, torch.Tensor):
            return None
        return Trace(float(data["flops"]), _decode(data["out"]), int(data["peak"]), int(data["rise"]), trail)
    except Exception:  # absent, truncated or foreign: trace again (and replace it)
        return None


def save(name: str, trace: Trace) -> None:
    """Keep a trace (best effort: a folder that cannot be written, an output that cannot be described, leave the
    cache without it)."""
    base = folder()
    if base is None:
        return
    buffer = io.BytesIO()
    try:
        record = {"flops": trace.flops, "out": _encode(trace.out), "peak": trace.peak, "rise": trace.rise}
        torch.save({**record, "trail": trace.trail}, buffer)
        atomic_write_bytes(base / name, buffer.getvalue())
    except (OSError, RuntimeError, TypeError, AttributeError, pickle.PicklingError):  # unwritable, unstorable
        return


def _report_path(key: str) -> Path | None:
    base = folder()
    if base is None:
        return None
    return base / "reports" / (hashlib.sha256(repr((key, _versions())).encode()).hexdigest() + ".json")


def load_report(key: str) -> dict[str, Any] | None:
    """The stored report of request ``key`` (a JSON object), or ``None`` (absent, unreadable, off)."""
    path = _report_path(key)
    try:
        data = json.loads(path.read_text()) if path is not None else None
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("key") == key else None


def save_report(key: str, report: dict[str, Any]) -> None:
    """Keep the report of request ``key`` (best effort, as :func:`save`)."""
    path = _report_path(key)
    if path is None:
        return
    try:
        atomic_write_bytes(path, json.dumps({**report, "key": key}).encode())
    except (OSError, TypeError, ValueError):
        return
