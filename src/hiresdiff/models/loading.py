"""Resolve what the user typed into a model, cheaply, then load it into a diffusers pipeline.

:func:`resolve_model` reads only small JSON configs, safetensors headers or the pickle opcode stream of a
checkpoint (never weights, and never executing pickled code), so every input check can run before any model
work. It raises :class:`~hiresdiff.errors.HiresError` with one actionable line when the reference cannot be
used. :func:`load_pipeline` then builds or loads the pipeline.

Accepted references:

* a built-in name (:data:`hiresdiff.models.tiny.BUILTIN_MODELS`);
* a local diffusers folder (with ``model_index.json``, saved by ``save_pretrained``): SD, SDXL or FLUX.1;
* a single-file SD/SDXL checkpoint: ``.safetensors``, or a pickled ``.ckpt`` / ``.pt`` / ``.bin`` / ``.pth`` with
  ``allow_pickle=True`` (single-file FLUX checkpoints are recognised and rejected with a one-line message);
* a Hugging Face hub id ``owner/name`` (from the local cache when offline). Online, a config that is not cached
  is fetched only after a quick check that the hub answers (:func:`hub_unreachable`), so an unreachable hub
  stops at once with one line instead of huggingface_hub's retries.

FLUX's transformer config has no sample size. Its native size is the VAE config's ``sample_size`` (1024 in the
FLUX.1-dev/schnell VAE configs, equal to diffusers' ``FluxPipeline.default_sample_size`` 128 × VAE factor 8), or
:data:`~hiresdiff.models.flux.FLUX_NATIVE_SIZE` (1024) when the VAE config has none; loading a FLUX pipeline sets
its ``default_sample_size`` to match, so the adapter sees the same native size.
"""

from __future__ import annotations

import dataclasses
import inspect
import io
import json
import math
import os
import pickletools
import re
import socket
import threading
import time
import urllib.request
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit

import torch

from hiresdiff.config import DEFAULT_MODEL, model_sampling_defaults
from hiresdiff.errors import HiresError
from hiresdiff.models.builtins import BUILTIN_MODELS
from hiresdiff.models.flux import FLUX_NATIVE_SIZE, PATCH

if TYPE_CHECKING:  # diffusers is imported where a pipeline is loaded, not to resolve or check a model reference
    from diffusers import FluxPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

    Pipeline = StableDiffusionPipeline | StableDiffusionXLPipeline | FluxPipeline

Family = Literal["sd", "sdxl", "flux"]
Source = Literal["builtin", "hub", "folder", "single_file"]

SUPPORTED_PIPELINES: dict[str, Family] = {
    "StableDiffusionPipeline": "sd",
    "StableDiffusionXLPipeline": "sdxl",
    "FluxPipeline": "flux",
}
PICKLE_SUFFIXES = (".ckpt", ".pt", ".bin", ".pth")
SAFETENSORS_SUFFIX = ".safetensors"
#: the denoiser's config file per family (after model_index.json, before vae/config.json)
_DENOISER_CONFIG: dict[Family, str] = {
    "sd": "unet/config.json",
    "sdxl": "unet/config.json",
    "flux": "transformer/config.json",
}
#: where a diffusers pipeline folder keeps its scheduler's config
SCHEDULER_CONFIG = "scheduler/scheduler_config.json"
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
# Largest safetensors header we accept (the format's own reference implementation caps it at 100 MB).
_MAX_HEADER_BYTES = 100 * 1024 * 1024
# How much of a legacy (non-zip) pickle checkpoint is scanned for state-dict key names.
_MAX_PICKLE_SCAN_BYTES = 64 * 1024 * 1024
#: seconds to wait for the hub to answer (DNS lookup + connect, then each metadata request);
#: ``HIRESDIFF_HUB_TIMEOUT`` overrides it
HUB_TIMEOUT = 3.0
# How long a reachability result is reused (a long-running web server notices a hub that comes back).
_PROBE_TTL = 60.0
_PROBES: dict[tuple[str, int], tuple[float, str | None]] = {}
_DEFAULT_PORTS = {"http": 80, "https": 443, "socks5": 1080, "socks5h": 1080}
_USE_LOCAL = "pass --model a local folder, .safetensors file or tiny-sdxl"


@dataclass(frozen=True)
class ModelSpec:
    """A model reference resolved to what hiresdiff needs to know before loading it.

    Attributes:
        ref: What the user typed.
        source: ``builtin``, ``hub``, ``folder`` or ``single_file``.
        family: ``sd`` (SD 1.x / 2.x), ``sdxl`` or ``flux`` (FLUX.1-dev / schnell).
        native_size: Training resolution in pixels (UNet ``sample_size`` × ``vae_scale_factor``; FLUX: see the
            module docstring).
        vae_scale_factor: Pixels per latent cell along each side.
        path: Resolved local path for ``folder`` and ``single_file`` sources, else ``None``.
        guidance_distilled: FLUX only: the transformer has a guidance embedding (FLUX.1-dev), not (schnell).
        scheduler_config: The model's ``scheduler/scheduler_config.json`` where it could be read without a download
            (folders, cached hub models), else ``None``; the step limits are checked against it before loading.
        cross_attention_dim: The denoiser's text-embedding width from its config (``None`` where unknown), which a
            ControlNet must match.
    """

    ref: str
    source: Source
    family: Family
    native_size: int
    vae_scale_factor: int
    path: str | None = None
    guidance_distilled: bool = True
    scheduler_config: dict[str, Any] | None = field(default=None, compare=False)
    cross_attention_dim: int | None = field(default=None, compare=False)

    @property
    def sampling_defaults(self) -> dict[str, Any]:
        """The model's own steps/guidance defaults (:func:`~hiresdiff.config.model_sampling_defaults`)."""
        return model_sampling_defaults(self.family, self.guidance_distilled)

    @property
    def pixel_grid(self) -> int:
        """Canvas sides must be multiples of this (FLUX packs 2×2 latent cells into one token)."""
        return 2 * self.vae_scale_factor if self.family == "flux" else self.vae_scale_factor


def hub_offline() -> bool:
    """Whether hub access is disabled (``HF_HUB_OFFLINE`` in the environment now, or at import of the hub lib)."""
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE", "").strip().upper()
    return value in {"1", "ON", "YES", "TRUE"} or bool(constants.HF_HUB_OFFLINE)


def _one_line(error: BaseException, limit: int = 240) -> str:
    """The first non-empty line of an exception message, cut to ``limit`` characters; its type when empty."""
    for line in str(error).splitlines():
        line = line.strip()
        if line:
            return line if len(line) <= limit else line[: limit - 3] + "..."
    return type(error).__name__


def hub_timeout() -> float:
    """Seconds to wait for the hub: ``HIRESDIFF_HUB_TIMEOUT`` when set, else :data:`HUB_TIMEOUT`."""
    raw = os.environ.get("HIRESDIFF_HUB_TIMEOUT", "").strip()
    if not raw:
        return HUB_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise HiresError(f"HIRESDIFF_HUB_TIMEOUT must be a positive number of seconds, got {raw!r}")
    return value


def _probe_target(endpoint: str) -> tuple[str, int, str]:
    """``(host, port, label)`` a hub request connects to first: the endpoint's host, or the proxy set for it."""
    parts = urlsplit(endpoint)
    host = parts.hostname or ""
    proxies = urllib.request.getproxies()
    proxy = proxies.get(parts.scheme) or proxies.get("all")
    if proxy and not urllib.request.proxy_bypass(host):
        via = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        return via.hostname or "", via.port or _DEFAULT_PORTS.get(via.scheme, 80), f"the proxy {via.hostname}"
    return host, parts.port or _DEFAULT_PORTS.get(parts.scheme, 443), host or repr(endpoint)


def _connect(host: str, port: int, timeout: float) -> str | None:
    """``None`` when a TCP connection to ``host:port`` opens within ``timeout`` s (DNS lookup included), else why."""
    silent = f"no answer within {timeout:g} s"
    outcome: list[str | None] = []

    def attempt() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            outcome.append(None)
        except socket.gaierror:
            outcome.append("DNS lookup failed")
        except TimeoutError:
            outcome.append(silent)
        except (OSError, ValueError) as error:  # ValueError: a host name IDNA cannot encode
            outcome.append(getattr(error, "strerror", None) or _one_line(error, 60))

    # create_connection's timeout does not cover the DNS lookup; waiting on a thread bounds both.
    thread = threading.Thread(target=attempt, name="hiresdiff-hub-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    return outcome[0] if outcome else silent


def hub_unreachable() -> str | None:
    """Why the hub cannot be reached now (``"<host> is unreachable (<reason>)"``), or ``None`` when it can.

    Opens (and closes) one TCP connection to the host of ``huggingface_hub.constants.ENDPOINT`` (``HF_ENDPOINT``),
    or to the proxy configured for it, within :func:`hub_timeout`. Results are reused for a minute.
    """
    from huggingface_hub import constants

    host, port, label = _probe_target(constants.ENDPOINT)
    now = time.monotonic()
    seen = _PROBES.get((host, port))
    if seen is None or now - seen[0] > _PROBE_TTL:
        reason = _connect(host, port, hub_timeout())
        seen = _PROBES[(host, port)] = (now, None if reason is None else f"{label} is unreachable ({reason})")
    return seen[1]


# ------------------------------------------------------------------------------------------- resolving


def resolve_model(ref: str, *, allow_pickle: bool = False) -> ModelSpec:
    """Resolve a model reference without loading weights.

    Args:
        ref: Built-in name, local diffusers folder, single-file checkpoint, or hub id ``owner/name``.
        allow_pickle: Accept pickled checkpoints (``.ckpt``, ``.pt``, ``.bin``, ``.pth``). Even then,
            resolving only scans the pickle's opcodes for key names and never unpickles anything.

    Returns:
        The :class:`ModelSpec` with family, native size and VAE scale factor.

    Raises:
        HiresError: The reference cannot be used (unknown name, missing path, not an SD/SDXL/FLUX diffusers folder,
            pickle without ``allow_pickle``, invalid safetensors file, hub id unavailable offline or
            unreachable), in one actionable line.
    """
    if not isinstance(ref, str):
        raise HiresError(f"model must be a name, path or hub id (a string), got {type(ref).__name__}")
    if not ref or not ref.strip():
        raise HiresError(
            "empty model reference; pass a built-in name, a diffusers folder, a checkpoint file or a hub id"
        )
    if ref in BUILTIN_MODELS:
        info = BUILTIN_MODELS[ref]
        return ModelSpec(ref, "builtin", info.family, info.native_size, info.vae_scale_factor)
    path = Path(ref).expanduser()
    if path.is_dir():
        return _resolve_folder(ref, path)
    if path.is_file():
        return _resolve_file(ref, path, allow_pickle=allow_pickle)
    if path.exists():
        raise HiresError(f"model path {ref!r} is neither a folder nor a regular file")
    looks_like_path = (
        ref.startswith((".", "/", "~"))
        or "\\" in ref
        or ref.lower().endswith((SAFETENSORS_SUFFIX, *PICKLE_SUFFIXES, ".json"))
    )
    if not looks_like_path and _HUB_ID.match(ref):
        return _resolve_hub(ref)
    if looks_like_path or "/" in ref:
        raise HiresError(f"model path {ref!r} does not exist; check the path (or use a hub id of the form owner/name)")
    known = ", ".join(BUILTIN_MODELS)
    raise HiresError(f"unknown model {ref!r}: not a built-in model ({known}), an existing path, or a hub id owner/name")


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise HiresError(f"cannot read {what} {str(path)!r}: {_one_line(error)}") from error
    if not isinstance(data, dict):
        raise HiresError(f"{what} {str(path)!r} is not a JSON object; the model folder looks corrupted")
    return data


def _family_of_index(ref: str, index: dict[str, Any]) -> Family:
    """The family named by ``model_index.json``'s ``_class_name``, or a HiresError listing the supported ones."""
    class_name = index.get("_class_name")
    if not isinstance(class_name, str) or class_name not in SUPPORTED_PIPELINES:
        supported = ", ".join(SUPPORTED_PIPELINES)
        raise HiresError(f"model {ref!r} is a {class_name or 'unknown'} pipeline; supported pipelines are: {supported}")
    return SUPPORTED_PIPELINES[class_name]


def flux_native_size(vae: dict[str, Any], factor: int) -> int:
    """FLUX native size: the VAE config's ``sample_size`` when it is a positive multiple of the token size
    (``factor × 2`` px), else :data:`FLUX_NATIVE_SIZE`."""
    size = vae.get("sample_size")
    if isinstance(size, (list, tuple)) and size:
        size = max(size)
    ok = isinstance(size, int) and not isinstance(size, bool) and size > 0 and size % (factor * PATCH) == 0
    return int(size) if ok else FLUX_NATIVE_SIZE  # type: ignore[arg-type]


def _spec_from_configs(
    ref: str,
    source: Source,
    index: dict[str, Any],
    unet: dict[str, Any],
    vae: dict[str, Any],
    path: str | None,
    scheduler: dict[str, Any] | None = None,
) -> ModelSpec:
    """Family and native size from ``model_index.json``, the denoiser config (``unet/config.json``, FLUX:
    ``transformer/config.json``) and ``vae/config.json``; the scheduler config and text width are carried along."""
    spec = _spec_of_family(ref, source, index, unet, vae, path)
    width = unet.get("cross_attention_dim")
    width = width if isinstance(width, int) and not isinstance(width, bool) else None
    return dataclasses.replace(spec, scheduler_config=scheduler, cross_attention_dim=width)


def _spec_of_family(
    ref: str, source: Source, index: dict[str, Any], unet: dict[str, Any], vae: dict[str, Any], path: str | None
) -> ModelSpec:
    family = _family_of_index(ref, index)
    if family == "flux":
        blocks = vae.get("block_out_channels")
        if not isinstance(blocks, (list, tuple)) or not blocks:
            raise HiresError(
                f"model {ref!r} has no usable vae block_out_channels in its config; re-save it with diffusers "
                "save_pretrained"
            )
        factor = 2 ** (len(blocks) - 1)
        distilled = bool(unet.get("guidance_embeds", False))
        return ModelSpec(ref, source, family, flux_native_size(vae, factor), factor, path, distilled)
    sample_size = unet.get("sample_size")
    if isinstance(sample_size, (list, tuple)) and sample_size:
        sample_size = max(sample_size)
    blocks = vae.get("block_out_channels")
    if not isinstance(sample_size, int) or not isinstance(blocks, (list, tuple)) or not blocks:
        raise HiresError(
            f"model {ref!r} has no usable unet sample_size / vae block_out_channels in its configs; "
            "re-save it with diffusers save_pretrained"
        )
    factor = 2 ** (len(blocks) - 1)
    return ModelSpec(ref, source, family, sample_size * factor, factor, path)


def _resolve_folder(ref: str, path: Path) -> ModelSpec:
    if not (path / "model_index.json").is_file():
        raise HiresError(
            f"folder {ref!r} has no model_index.json, so it is not a diffusers pipeline folder; pass a folder "
            "saved with save_pretrained or a single .safetensors checkpoint file"
        )
    index = _read_json(path / "model_index.json", "model_index.json")
    # An unsupported pipeline is reported before any missing part.
    family = _family_of_index(ref, index)
    configs = [index]
    for name in (_DENOISER_CONFIG[family], "vae/config.json"):
        file = path / name
        if not file.is_file():
            raise HiresError(f"diffusers folder {ref!r} lacks {name}; the download or save looks incomplete")
        configs.append(_read_json(file, name))
    scheduler_file = path / SCHEDULER_CONFIG
    scheduler = _read_json(scheduler_file, SCHEDULER_CONFIG) if scheduler_file.is_file() else None
    return _spec_from_configs(ref, "folder", *configs, path=str(path.resolve()), scheduler=scheduler)


def _hub_config(ref: str, name: str, offline: bool, *, instead: str = _USE_LOCAL) -> dict[str, Any]:
    """One small JSON config of hub model ``ref``: from the local cache when offline, else fetched (and cached).

    Online, a file not in the cache is fetched only once the hub answers (:func:`hub_unreachable`, then one HEAD
    request without retries); ``instead`` is the alternative the unreachable-hub message offers.
    """
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    cached = try_to_load_from_cache(ref, name)
    if offline:
        if not isinstance(cached, str):
            raise HiresError(
                f"hub model {ref!r} is not in the local cache ({name} missing) and HF_HUB_OFFLINE is set; "
                "download it once online, or pass a local diffusers folder"
            )
        return _read_json(Path(cached), name)
    timeout, fresh = hub_timeout(), not isinstance(cached, str)
    if fresh:
        _require_hub(ref, name, instead)
    try:
        if fresh:
            _head_once(ref, name, timeout)
        file = hf_hub_download(ref, name, etag_timeout=timeout)
    except Exception as error:
        raise HiresError(
            f"cannot fetch {name} of hub model {ref!r} ({type(error).__name__}: {_one_line(error, 100)}); check the "
            "id, network and token (gated models), or set HF_HUB_OFFLINE=1 to use the local cache"
        ) from error
    return _read_json(Path(file), name)


def _require_hub(ref: str, name: str, instead: str) -> None:
    """Raise the one-line unreachable-hub error (naming the default ``--model``) when the hub does not answer."""
    reason = hub_unreachable()
    if reason is not None:
        default = " (the default --model)" if ref == DEFAULT_MODEL else ""
        raise HiresError(
            f"cannot fetch {name} of hub model {ref!r}{default}: {reason}; {instead}, or set HF_HUB_OFFLINE=1 to "
            "use the local cache"
        )


def _head_once(ref: str, name: str, timeout: float) -> None:
    """One metadata request for a hub file, failing fast: when the first request of ``hf_hub_download`` fails and
    nothing is cached, it retries up to 5 times with backoff and a 60 s timeout."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    no_retry = (
        {"retry_on_errors": False} if "retry_on_errors" in inspect.signature(get_hf_file_metadata).parameters else {}
    )
    get_hf_file_metadata(hf_hub_url(ref, name), timeout=timeout, **no_retry)


def _resolve_hub(ref: str) -> ModelSpec:
    offline = hub_offline()
    index = _hub_config(ref, "model_index.json", offline)
    family = _family_of_index(ref, index)
    unet = _hub_config(ref, _DENOISER_CONFIG[family], offline)
    vae = _hub_config(ref, "vae/config.json", offline)
    return _spec_from_configs(
        ref, "hub", index, unet, vae, path=None, scheduler=_cached_hub_config(ref, SCHEDULER_CONFIG)
    )


def _cached_hub_config(ref: str, name: str) -> dict[str, Any] | None:
    """A hub model's config file when it is in the local cache and readable, else ``None`` (never downloads)."""
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(ref, name)
    if not isinstance(cached, str):
        return None
    try:
        return _read_json(Path(cached), name)
    except HiresError:
        return None


def _resolve_file(ref: str, path: Path, *, allow_pickle: bool) -> ModelSpec:
    suffix = path.suffix.lower()
    if suffix == SAFETENSORS_SUFFIX:
        keys: Iterable[str] = _safetensors_keys(ref, path)
    elif suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise HiresError(
                f"{ref!r} is a pickle checkpoint ({suffix}): pickled weights can execute code; "
                "pass --allow-pickle to load it anyway"
            )
        keys = _pickle_strings(ref, path)
    elif path.name == "model_index.json":
        return _resolve_folder(str(path.parent), path.parent)
    else:
        raise HiresError(
            f"unsupported model file {ref!r}; pass a .safetensors checkpoint, a diffusers folder or a hub id"
        )
    family, native = _family_from_keys(ref, keys)
    return ModelSpec(ref, "single_file", family, native, 8, str(path.resolve()))


def _safetensors_keys(ref: str, path: Path) -> list[str]:
    """Tensor names from a safetensors header (8-byte little-endian length, then a JSON object)."""
    size = path.stat().st_size
    bad = f"{ref!r} is not a valid safetensors file"
    with path.open("rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise HiresError(f"{bad} (too short); re-download or re-export the checkpoint")
        length = int.from_bytes(head, "little")
        if length < 2 or length > min(_MAX_HEADER_BYTES, size - 8):
            raise HiresError(f"{bad} (corrupt header length); re-download or re-export the checkpoint")
        raw = handle.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise HiresError(f"{bad} (header is not JSON); re-download or re-export the checkpoint") from error
    if not isinstance(header, dict):
        raise HiresError(f"{bad} (header is not a JSON object); re-download or re-export the checkpoint")
    keys = [key for key in header if key != "__metadata__"]
    for key in keys:
        entry = header[key]
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
            raise HiresError(f"{bad} (bad entry for {key!r}); re-download or re-export the checkpoint")
    return keys


def _pickle_strings(ref: str, path: Path) -> list[str]:
    """String constants of a pickled checkpoint, read from its opcode stream without unpickling anything.

    torch's zip format keeps the pickle in ``<archive>/data.pkl``; the legacy format starts with a few pickles
    (magic number, protocol, system info, then the object), whose strings include the state-dict keys.
    """
    strings: list[str] = []
    string_ops = {"BINUNICODE", "SHORT_BINUNICODE", "UNICODE", "BINUNICODE8"}

    def scan(data: bytes, streams: int) -> None:
        stream = io.BytesIO(data)
        for _ in range(streams):
            if stream.tell() >= len(data):
                return
            try:
                # genops stops after each pickle's STOP opcode; the next pickle starts right after it.
                for opcode, arg, _position in pickletools.genops(stream):
                    if opcode.name in string_ops and isinstance(arg, str):
                        strings.append(arg)
            except (ValueError, EOFError, UnicodeDecodeError):
                return

    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                pickles = [name for name in archive.namelist() if name.endswith("data.pkl")]
                if not pickles:
                    raise HiresError(f"{ref!r} is a zip archive but not a torch checkpoint (no data.pkl)")
                scan(archive.read(pickles[0]), 1)
        else:
            with path.open("rb") as handle:
                scan(handle.read(_MAX_PICKLE_SCAN_BYTES), 4)
    except (OSError, zipfile.BadZipFile) as error:
        raise HiresError(f"cannot read checkpoint {ref!r}: {_one_line(error)}") from error
    if not strings:
        raise HiresError(f"{ref!r} is not a readable pickle checkpoint; re-download it or convert it to safetensors")
    return strings


def _family_from_keys(ref: str, keys: Iterable[str]) -> tuple[Family, int]:
    """Guess family and native size of an original-format (CompVis / SGM) checkpoint from its key names.

    * ``conditioner.embedders.1…`` (two text encoders): SDXL base, native 1024 px.
    * ``conditioner.…`` without a second embedder: SDXL refiner, which is not a text-to-image base model.
    * ``cond_stage_model.model.…`` (OpenCLIP text encoder): SD 2.x. The checkpoint does not say whether it is
      the 768 px v-prediction model or the 512 px base; we guess 768 (the common SD 2.x release).
    * otherwise ``model.diffusion_model.…``: SD 1.x, native 512 px.

    FLUX checkpoints (``double_blocks.…`` of the original format, ``single_transformer_blocks.…`` of diffusers'
    transformer) are rejected: they hold no VAE/text encoders and diffusers needs hub configs to load them.
    """
    has_unet = has_sdxl = has_conditioner = has_openclip = False
    for key in keys:
        bare = key.removeprefix("model.diffusion_model.")
        if bare.startswith(("double_blocks.", "single_blocks.", "single_transformer_blocks.")):
            raise HiresError(
                f"{ref!r} looks like a single-file FLUX checkpoint, which hiresdiff does not load; pass a FLUX "
                "diffusers folder or hub id (e.g. black-forest-labs/FLUX.1-dev)"
            )
        has_unet = has_unet or key.startswith("model.diffusion_model.")
        has_sdxl = has_sdxl or key.startswith("conditioner.embedders.1")
        has_conditioner = has_conditioner or key.startswith("conditioner.")
        has_openclip = has_openclip or key.startswith("cond_stage_model.model.")
    if has_sdxl:
        return "sdxl", 1024
    if has_conditioner:
        raise HiresError(f"{ref!r} looks like an SDXL refiner checkpoint; pass an SDXL base or SD checkpoint")
    if not has_unet:
        raise HiresError(
            f"{ref!r} does not look like a Stable Diffusion / SDXL checkpoint (no model.diffusion_model.* keys); "
            "pass an original-format SD/SDXL checkpoint or a diffusers folder"
        )
    if has_openclip:
        return "sd", 768
    return "sd", 512


# --------------------------------------------------------------------------------------------- loading


def _dtype_kwarg(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """``dtype=`` where diffusers renamed it (``torch_dtype=`` is deprecated there), else ``torch_dtype=``."""
    try:
        from diffusers.utils.deprecation_utils import _resolve_dtype  # noqa: F401
    except ImportError:
        return {"torch_dtype": dtype}
    return {"dtype": dtype}


def _pipeline_class(spec: ModelSpec) -> type[Pipeline]:
    from diffusers import FluxPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

    return {"sdxl": StableDiffusionXLPipeline, "flux": FluxPipeline}.get(spec.family, StableDiffusionPipeline)


def load_pipeline(
    spec: ModelSpec,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    allow_pickle: bool = False,
) -> Pipeline:
    """Load (or build) the pipeline a :class:`ModelSpec` describes and move it to ``device``.

    Args:
        spec: Result of :func:`resolve_model`.
        dtype: Parameter dtype (``torch_dtype`` of diffusers).
        device: Where the pipeline runs.
        allow_pickle: Allow pickled weight files (``.bin`` in folders, ``.ckpt`` single files); without it only
            safetensors weights are read.

    Returns:
        A :class:`StableDiffusionPipeline`, :class:`StableDiffusionXLPipeline` or :class:`FluxPipeline` (whose
        ``default_sample_size`` is set from ``spec.native_size``).

    Raises:
        HiresError: Loading failed (missing or corrupt files, configs unavailable offline, …), in one line.
    """
    if spec.source == "builtin":
        from hiresdiff.models.tiny import build_builtin

        pipe = build_builtin(spec.ref, dtype)
        return _to_device(pipe, device, spec)
    cls = _pipeline_class(spec)
    offline = hub_offline()
    try:
        if spec.source == "single_file":
            if spec.path is None:
                raise HiresError(f"single-file model {spec.ref!r} has no resolved path; call resolve_model first")
            if spec.path.lower().endswith(PICKLE_SUFFIXES) and not allow_pickle:
                raise HiresError(
                    f"{spec.ref!r} is a pickle checkpoint: pickled weights can execute code; "
                    "pass --allow-pickle to load it anyway"
                )
            pipe = cls.from_single_file(spec.path, **_dtype_kwarg(dtype), local_files_only=offline)
        else:
            location = spec.path if spec.source == "folder" and spec.path is not None else spec.ref
            pipe = cls.from_pretrained(
                location,
                **_dtype_kwarg(dtype),
                use_safetensors=None if allow_pickle else True,
                local_files_only=offline or spec.source == "folder",
            )
    except HiresError:
        raise
    except Exception as error:
        raise HiresError(_load_error_message(spec, error, offline, allow_pickle)) from error
    if spec.family == "flux":
        # FluxPipeline.__init__ hard-codes default_sample_size = 128; the adapter reads the native size from it.
        pipe.default_sample_size = spec.native_size // spec.vae_scale_factor
    return _to_device(pipe, device, spec)


def _load_error_message(spec: ModelSpec, error: Exception, offline: bool, allow_pickle: bool) -> str:
    """One actionable line for a failed ``from_pretrained`` / ``from_single_file``."""
    detail = f"{type(error).__name__}: {_one_line(error)}"
    if spec.source == "single_file" and offline and isinstance(error, OSError):
        return (
            f"cannot load single-file checkpoint {spec.ref!r} offline: diffusers needs the model's configs from "
            f"the hub ({detail}); run once online to cache them, or convert it to a diffusers folder"
        )
    if spec.source == "single_file":
        return (
            f"cannot load single-file checkpoint {spec.ref!r} ({detail}); it may be corrupt or not a standard "
            "SD/SDXL checkpoint; try a diffusers folder instead"
        )
    if spec.source in ("folder", "hub") and not allow_pickle and "safetensors" in str(error).lower():
        return (
            f"cannot load {spec.ref!r}: no safetensors weights found ({detail}); pickled weights can execute "
            "code; pass --allow-pickle to load them anyway"
        )
    return f"cannot load model {spec.ref!r} ({detail})"


def _to_device(pipe: Pipeline, device: str | torch.device, spec: ModelSpec) -> Pipeline:
    try:
        return pipe.to(device)
    except (RuntimeError, AssertionError, ValueError) as error:
        raise HiresError(f"cannot move model {spec.ref!r} to device {str(device)!r}: {_one_line(error)}") from error
