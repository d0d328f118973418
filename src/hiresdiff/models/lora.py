"""LoRA files: cheap checks before any model work, then apply them to a diffusers pipeline for one generation.

:func:`parse_lora_arg` reads the CLI form ``FILE[:SCALE]``; :func:`resolve_lora` checks the file (exists, known
suffix, safetensors header with LoRA tensor names, pickle only when allowed) and hashes it for the PNG metadata,
without loading a single weight; :func:`applied_loras` loads the LoRAs as named PEFT adapters with their scales and
takes them out again when the block ends, so the caller's pipeline is left exactly as it was.

Why restoring is done by hand: diffusers' ``delete_adapters`` removes an adapter's LoRA matrices but keeps PEFT's
wrapper layers (``to_q`` becomes a ``lora.Linear`` holding the original ``Linear`` as ``base_layer``, so even the
state-dict keys change), and ``unload_lora_weights`` strips *every* wrapper, including those of adapters the user
loaded before. :func:`applied_loras` therefore deletes its own adapters, replaces only the wrappers it created by
their original layers, and puts back the user's adapter state, gradient flags and PEFT bookkeeping attributes.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import warnings
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hiresdiff.errors import HiresError
from hiresdiff.models.loading import PICKLE_SUFFIXES, SAFETENSORS_SUFFIX, _one_line, _safetensors_keys

#: prefix of the adapter names hiresdiff gives the LoRAs it loads (``hiresdiff_0``, ``hiresdiff_1``, …)
ADAPTER_PREFIX = "hiresdiff_"
_HASH_CHUNK = 1 << 20
#: diffusers loggers that report how a LoRA state dict matched the model while loading
_LOADER_LOGGERS = (
    "diffusers.loaders.peft",
    "diffusers.loaders.lora_base",
    "diffusers.loaders.lora_pipeline",
    "diffusers.utils.peft_utils",
)
#: diffusers' notice that a LoRA has no tensors for one of the text encoders: normal for UNet-only LoRAs
_NO_KEYS_NOTICE = "No LoRA keys associated to"
#: diffusers' warnings that LoRA tensors found no layer (unexpected) or layers got no tensors (missing)
_MISMATCH_WARNINGS = ("led to unexpected keys", "led to missing keys")
#: diffusers' log of a failed load, right before it re-raises the error (which hiresdiff reports in one line)
_FAILED_NOTICE = "was unsuccessful with the following error"
#: PEFT bookkeeping attributes that loading adds to a model (restored on exit to what they were)
_PEFT_ATTRS = ("peft_config", "_hf_peft_config_loaded")


@dataclass(frozen=True)
class LoraSpec:
    """A LoRA file checked by :func:`resolve_lora`, with the scale to apply it at.

    Attributes:
        path: Absolute path of the file.
        scale: Multiplier of the LoRA update (0 disables it; negative values invert it).
        sha256: Hex SHA-256 of the file bytes, so the PNG metadata pins the exact weights used.
        made_for: The model kind its tensor names show (:func:`lora_target`): ``"flux"``, ``"sdxl"``, ``"unet"``
            (SD or SDXL) or ``None`` (unknown, e.g. pickled files); not part of the metadata.
    """

    path: str
    scale: float
    sha256: str
    made_for: str | None = field(default=None, compare=False)

    @property
    def name(self) -> str:
        """The file's base name (what listings and messages show)."""
        return os.path.basename(self.path)

    def metadata(self) -> dict[str, Any]:
        """JSON-ready record of this LoRA for the PNG metadata."""
        return {"name": self.name, "path": self.path, "sha256": self.sha256, "scale": self.scale}


#: a LoRA's scale when none is given (``FILE`` without ``:SCALE``; the page's and the API's default)
DEFAULT_LORA_SCALE = 1.0


def parse_lora_arg(text: str) -> tuple[str, float]:
    """Split the CLI value ``FILE[:SCALE]`` into path and scale (default 1.0).

    Only the last ``:`` can start a scale, and only when what follows parses as a float, so Windows drive letters
    (``C:\\x.safetensors``) and colons inside file names stay part of the path.

    Raises:
        HiresError: Empty path, or a suffix after the last ``:`` that looks like a scale but is not a number.
    """
    path, scale = text, DEFAULT_LORA_SCALE
    head, sep, tail = text.rpartition(":")
    if sep:
        try:
            scale = float(tail)
        except ValueError:
            # "C:\x.safetensors" or "a:b.safetensors": the colon belongs to the path
            if not _looks_like_file(tail):
                raise HiresError(
                    f"--lora expects FILE[:SCALE], got {text!r}: {tail!r} is not a number; "
                    "write e.g. style.safetensors:0.8"
                ) from None
        else:
            path = head
    if not path.strip():
        raise HiresError(f"--lora expects FILE[:SCALE], got {text!r} without a file; write e.g. style.safetensors")
    return path, scale


def _looks_like_file(tail: str) -> bool:
    """Whether the text after a path's last ``:`` is the rest of a path rather than a mistyped scale."""
    lower = tail.lower()
    return "/" in tail or "\\" in tail or lower.endswith((SAFETENSORS_SUFFIX, *PICKLE_SUFFIXES))


def resolve_lora(
    path: str | os.PathLike[str], scale: float = DEFAULT_LORA_SCALE, *, allow_pickle: bool = False
) -> LoraSpec:
    """Check a LoRA file cheaply (no weights loaded, nothing unpickled) and hash it.

    Args:
        path: The LoRA file: ``.safetensors``, or a pickled ``.bin`` / ``.pt`` / ``.ckpt`` / ``.pth``.
        scale: Multiplier of the LoRA update; any finite value (0 disables it, negative inverts it).
        allow_pickle: Accept pickled files, which can run code when diffusers loads them.

    Returns:
        The :class:`LoraSpec` with absolute path, scale and SHA-256.

    Raises:
        HiresError: Missing path, not a regular file, non-finite scale, unsupported suffix, pickle without
            ``allow_pickle``, invalid safetensors header, or a safetensors file without LoRA tensors; one line.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise HiresError(f"a LoRA must be a file path, got {path!r} ({type(path).__name__})")
    ref = os.fspath(path)
    file = Path(ref).expanduser()
    try:
        if isinstance(scale, bool):
            raise TypeError(scale)
        scale = float(scale)
    except (TypeError, ValueError):
        raise HiresError(f"LoRA scale {scale!r} for {ref!r} is not a number; pass e.g. 0.8") from None
    if not math.isfinite(scale):
        raise HiresError(f"LoRA scale {scale!r} for {ref!r} is not finite; pass a finite number such as 0.8 or -0.5")
    if not file.exists():
        raise HiresError(f"LoRA file {ref!r} does not exist; check the path")
    if not file.is_file():
        raise HiresError(f"LoRA path {ref!r} is not a regular file; pass the .safetensors file itself")
    suffix = file.suffix.lower()
    made_for = None
    if suffix == SAFETENSORS_SUFFIX:
        keys = _safetensors_keys(ref, file)
        made_for = lora_target(keys)
        if not any("lora" in key.lower() for key in keys):
            raise HiresError(
                f"{ref!r} holds no LoRA weights (no tensor name contains 'lora'); pass a LoRA file, not a model "
                "checkpoint (use --model for checkpoints)"
            )
    elif suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise HiresError(
                f"{ref!r} is a pickled file; pass --allow-pickle to load it (it can run code) or convert it to "
                ".safetensors"
            )
    else:
        raise HiresError(
            f"unsupported LoRA file {ref!r} (suffix {suffix or 'none'!r}); pass a .safetensors LoRA "
            f"(or {', '.join(PICKLE_SUFFIXES)} with --allow-pickle)"
        )
    resolved = file.resolve()
    return LoraSpec(str(resolved), scale, _sha256(ref, resolved), made_for)


#: tensor-name parts only FLUX LoRAs have (diffusers' ``transformer.`` prefix, the original and kohya block names)
_FLUX_MARKERS = ("double_blocks", "single_blocks", "single_transformer_blocks")
#: tensor-name parts of UNet LoRAs (diffusers and kohya/original names), SD and SDXL alike
_UNET_MARKERS = ("down_blocks", "up_blocks", "mid_block", "input_blocks", "output_blocks", "middle_block")
#: tensor-name parts only SDXL LoRAs have: weights for the second text encoder
_SDXL_MARKERS = ("text_encoder_2.", "lora_te2_", "conditioner.embedders.1")


def lora_target(keys: Sequence[str]) -> str | None:
    """The model kind a LoRA's tensor names were made for: ``"flux"``, ``"sdxl"``, ``"unet"`` (SD 1.x/2.x or SDXL,
    undecided) or ``None``. Read from the safetensors header alone, so a LoRA of another family is refused before
    any weights load; a LoRA whose names say nothing is left to the load-time check (:func:`applied_loras`)."""
    if any(key.startswith("transformer.") or any(m in key for m in _FLUX_MARKERS) for key in keys):
        return "flux"
    if any(m in key for key in keys for m in _SDXL_MARKERS):
        return "sdxl"
    if any(key.startswith(("unet.", "lora_unet_")) or any(m in key for m in _UNET_MARKERS) for key in keys):
        return "unet"
    return None


def check_lora_fits(spec: LoraSpec, family: str) -> None:
    """One line when the tensor names of ``spec`` show it was made for another family than the model's."""
    kind = spec.made_for
    names = {"flux": "FLUX", "sdxl": "SDXL", "unet": "SD/SDXL UNet", "sd": "SD 1.x/2.x"}
    clash = (
        (family == "flux" and kind in ("sdxl", "unet"))
        or (family in ("sd", "sdxl") and kind == "flux")
        or (family == "sd" and kind == "sdxl")
    )
    if clash:
        raise HiresError(
            f"LoRA {spec.name!r} is made for {names[kind or '']} models (its tensor names), the model is "
            f"{names[family]}; use a LoRA trained for this model family"
        )


def _sha256(ref: str, file: Path) -> str:
    """Hex SHA-256 of a file, read in chunks so large LoRAs never sit in memory whole."""
    digest = hashlib.sha256()
    try:
        with file.open("rb") as handle:
            while chunk := handle.read(_HASH_CHUNK):
                digest.update(chunk)
    except OSError as error:
        raise HiresError(f"cannot read LoRA file {ref!r}: {_one_line(error)}") from error
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------- applying


class _LoadLog(logging.Filter):
    """Collects diffusers' LoRA-matching warnings while loading and drops the harmless text-encoder notices."""

    def __init__(self) -> None:
        super().__init__()
        self.mismatches: list[str] = []

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if _NO_KEYS_NOTICE in message or _FAILED_NOTICE in message:
            return False
        if any(marker in message for marker in _MISMATCH_WARNINGS):
            self.mismatches.append(message)
            return False  # reported as a HiresError instead
        return True


@contextmanager
def _watch_loader_logs() -> Iterator[_LoadLog]:
    """Attach a :class:`_LoadLog` to diffusers' LoRA loader loggers, at least at WARNING level, for the block."""
    log = _LoadLog()
    with ExitStack() as stack:
        for name in _LOADER_LOGGERS:
            logger = logging.getLogger(name)
            level = logger.level
            if logger.getEffectiveLevel() > logging.WARNING:
                logger.setLevel(logging.WARNING)
                stack.callback(logger.setLevel, level)
            logger.addFilter(log)
            stack.callback(logger.removeFilter, log)
        yield log


def _modules_of(pipe: Any) -> list[torch.nn.Module]:
    """The pipeline's torch components (denoiser, text encoders, VAE, …), each once."""
    seen: dict[int, torch.nn.Module] = {}
    components = getattr(pipe, "components", None)
    values = components.values() if isinstance(components, dict) else vars(pipe).values()
    for value in values:
        if isinstance(value, torch.nn.Module):
            seen.setdefault(id(value), value)
    return list(seen.values())


def _tuner_layers(model: torch.nn.Module) -> list[Any]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [module for module in model.modules() if isinstance(module, BaseTunerLayer)]


def _layer_adapters(layer: Any) -> set[str]:
    """Names of the adapters that hold weights in one PEFT layer (``lora_A``/``lora_B`` for LoRA, ``lokr_w1``…)."""
    names: set[str] = set()
    for attr in getattr(layer, "adapter_layer_names", ("lora_A",)):
        weights = getattr(layer, attr, None)
        if isinstance(weights, (dict, torch.nn.ModuleDict, torch.nn.ParameterDict)):
            names.update(weights.keys())
    return names


def _adapter_names(pipe: Any) -> set[str]:
    """Every PEFT adapter name present in any component of the pipeline."""
    names: set[str] = set()
    for model in _modules_of(pipe):
        config = getattr(model, "peft_config", None)
        if isinstance(config, dict):
            names.update(config)
        for layer in _tuner_layers(model):
            names.update(_layer_adapters(layer))
    return names


def _layers_with(pipe: Any, adapter: str) -> int:
    """How many layers of the pipeline hold weights of ``adapter``."""
    return sum(1 for model in _modules_of(pipe) for layer in _tuner_layers(model) if adapter in _layer_adapters(layer))


class _Snapshot:
    """What loading LoRAs may change in a pipeline's components, recorded so it can be put back exactly.

    Per component: the ``peft_config`` / ``_hf_peft_config_loaded`` entries of its instance dict, ``requires_grad``
    of every parameter, and for PEFT layers already present (adapters the user loaded) their active adapters,
    scalings and disabled flag. Layers that only loading created are recognised on restore by not being recorded.
    """

    _MISSING = object()

    def __init__(self, pipe: Any) -> None:
        self.models = _modules_of(pipe)
        self.attrs = [{name: vars(m).get(name, self._MISSING) for name in _PEFT_ATTRS} for m in self.models]
        self.grads = [[(p, p.requires_grad) for p in m.parameters()] for m in self.models]
        self.layers: dict[int, tuple[Any, list[str], dict[str, Any], bool]] = {}
        for model in self.models:
            for layer in _tuner_layers(model):
                self.layers[id(layer)] = (
                    layer,
                    list(layer.active_adapters),
                    dict(getattr(layer, "scaling", {})),
                    bool(getattr(layer, "disable_adapters", False)),
                )

    def restore(self) -> None:
        """Replace new PEFT wrappers by their original layers and put back the recorded state."""
        for model in self.models:
            for parent in list(model.modules()):
                for child_name, child in list(parent.named_children()):
                    if id(child) not in self.layers and _is_tuner_layer(child):
                        setattr(parent, child_name, child.get_base_layer())
        for model, attrs in zip(self.models, self.attrs, strict=True):
            for name, value in attrs.items():
                if value is self._MISSING:
                    vars(model).pop(name, None)
                else:
                    vars(model)[name] = value
        for layer, active, scaling, disabled in self.layers.values():
            layer.set_adapter(active)
            if hasattr(layer, "scaling"):
                layer.scaling.update(scaling)
            if hasattr(layer, "enable_adapters"):
                layer.enable_adapters(not disabled)
        for grads in self.grads:
            for param, flag in grads:
                param.requires_grad_(flag)


def _is_tuner_layer(module: torch.nn.Module) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return isinstance(module, BaseTunerLayer)


@contextmanager
def _quiet_peft() -> Iterator[None]:
    """Silence PEFT's warnings about several adapters (what hiresdiff wants) and about which adapter becomes
    active when one is deleted (the snapshot restores the user's active set anyway)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        warnings.filterwarnings("ignore", message="Adapter .* was active which is now deleted")
        yield


def _reason(message: str) -> str:
    """The first line of an error text, joined with the next one when it only introduces a list (ends in ``:``),
    shortened to one readable line."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    if not lines:
        return "unknown error"
    text = lines[0]
    if text.endswith(":") and len(lines) > 1:
        text = f"{text} {lines[1]}"
    return text if len(text) <= 300 else text[:297] + "..."


def _load_one(pipe: Any, spec: LoraSpec, adapter: str) -> None:
    """Load one LoRA file as adapter ``adapter``; raise a one-line HiresError when it does not fit the model."""
    file = Path(spec.path)
    family = type(pipe).__name__
    hint = "check that it was trained for this model family"
    with _watch_loader_logs() as log, _quiet_peft():
        try:
            pipe.load_lora_weights(
                str(file.parent),
                weight_name=file.name,
                adapter_name=adapter,
                use_safetensors=file.suffix.lower() == SAFETENSORS_SUFFIX,
                local_files_only=True,
            )
        except HiresError:
            raise
        except Exception as error:
            reason = f"{type(error).__name__}: {_reason(str(error))}"
            raise HiresError(f"LoRA {spec.name!r} does not fit this {family} ({reason}); {hint}") from error
    if log.mismatches:
        raise HiresError(f"LoRA {spec.name!r} does not fit this {family} ({_reason(log.mismatches[0])}); {hint}")
    if _layers_with(pipe, adapter) == 0:
        raise HiresError(
            f"LoRA {spec.name!r} changed no layer of this {family} (none of its tensor names match the model); {hint}"
        )


@contextmanager
def applied_loras(pipe: Any, loras: Sequence[LoraSpec]) -> Iterator[None]:
    """Apply ``loras`` (each at its scale) to ``pipe`` for the duration of the block, then remove them exactly.

    Every LoRA is loaded with ``pipe.load_lora_weights`` as PEFT adapter ``hiresdiff_<i>`` and all of them are
    activated together with ``pipe.set_adapters(names, adapter_weights=scales)``. On exit, also after an exception
    (including a LoRA that failed to load), ``pipe.delete_adapters(names)`` drops their weights and the wrappers
    they created are replaced by the original layers (see the module docstring), so state-dict keys and values,
    module types, and adapters the user had loaded before (active set, scales) are as they were. No LoRAs: no-op.

    Raises:
        HiresError: The pipeline cannot load LoRAs (or PEFT is missing), it already has an adapter named
            ``hiresdiff_<i>`` (nested use), or a LoRA does not fit the model; one line naming the file.
    """
    if not loras:
        yield
        return
    if not callable(getattr(pipe, "load_lora_weights", None)):
        raise HiresError(f"{type(pipe).__name__} cannot load LoRA weights; use an SD, SDXL or FLUX pipeline")
    try:
        import peft  # noqa: F401
    except ImportError as error:
        raise HiresError("LoRA support needs the 'peft' package; install it with: pip install peft") from error
    names = [f"{ADAPTER_PREFIX}{i}" for i in range(len(loras))]
    taken = sorted(_adapter_names(pipe) & set(names))
    if taken:
        raise HiresError(
            f"the pipeline already has LoRA adapter {taken[0]!r} (nested applied_loras?); pass all LoRAs in one call"
        )
    snapshot = _Snapshot(pipe)
    loaded: list[str] = []
    try:
        for spec, name in zip(loras, names, strict=True):
            loaded.append(name)  # a failed load may leave a partly registered adapter behind
            _load_one(pipe, spec, name)
        pipe.set_adapters(names, adapter_weights=[spec.scale for spec in loras])
        yield
    finally:
        try:
            present = _adapter_names(pipe) & set(loaded)
            if present:
                with _quiet_peft():
                    pipe.delete_adapters(sorted(present))
        finally:
            snapshot.restore()
