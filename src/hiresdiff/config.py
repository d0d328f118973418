"""Typed, self-validating settings shared by every method.

Method-specific parameters live in each method's own dataclass (``methods/*.py``); :func:`coerce_params`
turns ``--set name=value`` strings into them with the field's type.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from hiresdiff.errors import HiresError, require
from hiresdiff.ops.schedule import AG_DECAYS
from hiresdiff.schedulers import check_eta, check_scheduler_name

#: negative prompt of the DemoFusion / APT papers
PAPER_NEGATIVE_PROMPT = "blurry, ugly, duplicate, poorly drawn, deformed, mosaic"
#: the sampling setting of the APT paper's tables: DDIM, 50 steps, guidance 7.5, the paper negative prompt
PAPER_SETTING: dict[str, Any] = {
    "scheduler": "ddim",
    "steps": 50,
    "guidance": 7.5,
    "negative_prompt": PAPER_NEGATIVE_PROMPT,
}
#: sampling defaults of FLUX.1-dev (SPEC §6): 30 steps at distilled guidance 3.5
FLUX_DEV_SAMPLING: dict[str, Any] = {"steps": 30, "guidance": 3.5}
#: sampling defaults of FLUX.1-schnell (SPEC §6): 4 steps, no guidance embedding
FLUX_SCHNELL_SAMPLING: dict[str, Any] = {"steps": 4, "guidance": 0.0}


def model_sampling_defaults(family: str, guidance_distilled: bool = True) -> dict[str, Any]:
    """The model's own sampling defaults, applied where the caller gives no value (below presets, ``--paper``
    and method defaults): FLUX-dev :data:`FLUX_DEV_SAMPLING`, FLUX-schnell (no guidance embedding)
    :data:`FLUX_SCHNELL_SAMPLING`; SD/SDXL keep :class:`GenerationSettings`' 50 steps at guidance 7.5."""
    if family != "flux":
        return {}
    return dict(FLUX_DEV_SAMPLING if guidance_distilled else FLUX_SCHNELL_SAMPLING)


#: decode/encode in tiles above this many pixels (SPEC §2.4: more than 2048²)
DEFAULT_TILE_AREA = 2048 * 2048
#: ``max_batch="auto"``: the number of rows the cost model's estimate fits into the free memory
AUTO: Literal["auto"] = "auto"
DTYPES = ("float32", "float16", "bfloat16")
#: most inference steps any request may ask for: schedules have 1000 training timesteps (the model's own scheduler
#: sets the exact limit, :func:`~hiresdiff.pipeline.check_steps`); this bound answers a huge count before any model
MAX_STEPS = 10_000
#: the model ``generate`` loads when none is named
DEFAULT_MODEL = "stabilityai/stable-diffusion-xl-base-1.0"
#: the ways to reconcile a target whose aspect ratio differs from the input's (``--fit``)
FIT_MODES = ("crop", "pad")
#: pixel-space upscalers (the ``resize`` method, :func:`hiresdiff.ops.resample.resize_images`)
PIXEL_FILTERS = ("bicubic", "lanczos")


def got(value: Any) -> str:
    """How messages show a received value: its repr and type, e.g. ``True (bool)``, ``'5' (str)``."""
    text = repr(value)
    return f"{text if len(text) <= 60 else text[:57] + '...'} ({type(value).__name__})"


def _is_bool(value: Any) -> bool:
    """Python and numpy booleans (``np.bool_``, named ``numpy.bool`` since numpy 2; numpy is not imported here)."""
    kind = type(value)
    return isinstance(value, bool) or (kind.__module__ == "numpy" and kind.__name__ in ("bool", "bool_"))


def _is_number(value: Any) -> bool:
    """Python and numpy numbers (``numbers.Real``: int, float, ``np.int64``, ``np.float32``…), never booleans."""
    return isinstance(value, numbers.Real) and not _is_bool(value)


def as_int(name: str, value: Any) -> int:
    """``value`` as a plain ``int``: integers of any kind, or a float with an integral value (``256.0``);
    booleans, fractions and non-numbers are a one-line error naming ``name`` and the type received."""
    if _is_number(value):
        if isinstance(value, numbers.Integral):
            return int(value)
        number = float(value)
        if math.isfinite(number) and number.is_integer():
            return int(number)
    raise HiresError(f"{name} must be an integer, got {got(value)}")


def as_float(name: str, value: Any) -> float:
    """``value`` as a plain ``float`` (Python or numpy numbers); booleans and non-numbers are a one-line error."""
    require(_is_number(value), f"{name} must be a number, got {got(value)}")
    return float(value)


def as_bool(name: str, value: Any) -> bool:
    """``value`` as a plain ``bool`` (Python or numpy booleans only: ``1`` or ``"yes"`` are refused)."""
    require(_is_bool(value), f"{name} must be true or false, got {got(value)}")
    return bool(value)


def as_str(name: str, value: Any) -> str:
    """``value`` as a plain ``str`` (also numpy strings), with no byte that is not UTF-8 (:func:`check_text`)."""
    require(isinstance(value, str), f"{name} must be a string, got {got(value)}")
    return check_text(name, str(value))


def check_text(name: str, text: str) -> str:
    """``text`` unchanged when it is valid Unicode; else one line naming the field and the first bad byte.

    Bytes that are not UTF-8 reach Python as lone surrogates: the command line and ``os.environ`` decode them with
    ``surrogateescape`` (byte ``0xB5`` → ``'\\udcb5'``). Such text cannot be encoded for the tokenizer or the metadata.
    """
    for index, char in enumerate(text):
        code = ord(char)
        if 0xD800 <= code <= 0xDFFF:
            what = f"byte 0x{code - 0xDC00:02x}" if code >= 0xDC80 and code <= 0xDCFF else f"code point U+{code:04X}"
            raise HiresError(
                f"the {name} is not valid UTF-8 text: {what} at character {index + 1} ({text[:index]!r} comes before "
                "it); save the text as UTF-8 or remove that character"
            )
    return text


def as_text(name: str, value: Any) -> str:
    """A prompt: a ``str``, or ``bytes`` that decode as UTF-8; one line naming the field and the first bad byte."""
    if isinstance(value, (bytes, bytearray)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError as error:
            before = bytes(value)[: error.start].decode("utf-8", "replace")
            raise HiresError(
                f"the {name} is not valid UTF-8 text: byte 0x{value[error.start]:02x} at byte {error.start + 1} "
                f"({before!r} comes before it); save the text as UTF-8 or remove that byte"
            ) from None
    require(isinstance(value, str), f"the {name} must be a string, got {got(value)}")
    return check_text(name, str(value))


def as_texts(name: str, value: Any) -> list[str]:
    """One text or a list/tuple of texts (:func:`as_text` each, numbered in messages when there are several)."""
    if isinstance(value, (str, bytes, bytearray)):
        return [as_text(name, value)]
    require(isinstance(value, (list, tuple)), f"the {name} must be a string or a list of strings, got {got(value)}")
    return [as_text(f"{name} {i + 1}" if len(value) > 1 else name, v) for i, v in enumerate(value)]


def _as_floats(name: str, value: Any) -> tuple[float, ...]:
    """A sequence of numbers (or one number) as a tuple of plain floats."""
    if _is_number(value):
        return (float(value),)
    ok = (isinstance(value, Sequence) and not isinstance(value, str)) or hasattr(value, "tolist")
    require(ok, f"{name} must be a list of numbers, got {got(value)}")
    items = value.tolist() if hasattr(value, "tolist") else value
    return tuple(as_float(name, v) for v in (items if isinstance(items, list | tuple) else [items]))


def normalise(name: str, value: Any, annotation: Any) -> Any:
    """``value`` checked against the dataclass field type ``annotation`` and converted to plain Python.

    The one place where API values become typed settings: ``int``/``float``/``bool``/``str`` fields accept Python
    and numpy values of that kind (converted, so the metadata JSON stays plain) and refuse everything else in one
    line naming the field and the type received; ``X | None`` also takes ``None``; ``tuple[float, ...]`` takes a
    list, tuple, array or single number; ``int | Literal["auto"]`` also takes that word (any case). Other
    annotations pass values through unchanged.
    """
    base, optional = _field_type(annotation)
    if value is None:
        require(optional, f"{name} must not be None")
        return None
    words = _words(annotation)
    if words and isinstance(value, str):
        word = value.strip().lower()
        require(word in words, f"{name} must be a positive integer or {' or '.join(words)}, got {value!r}")
        return word
    if base is bool:
        return as_bool(name, value)
    if base is int:
        return as_int(name, value)
    if base is float:
        return as_float(name, value)
    if base is str:
        return as_str(name, value)
    if base is tuple or typing.get_origin(base) is tuple:
        return _as_floats(name, value)
    return value


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """The resolved annotations of a dataclass's fields (cached: ``get_type_hints`` evaluates strings)."""
    return {f.name: typing.get_type_hints(cls)[f.name] for f in dataclasses.fields(cls)}


def check_finite(name: str, value: float, *, low: float | None = None, strict: bool = False) -> None:
    """One-line error unless ``value`` is a finite number (and ``> low`` / ``≥ low``)."""
    require(_is_number(value) and math.isfinite(value), f"{name} must be a finite number, got {value}")
    if low is not None:
        ok = value > low if strict else value >= low
        require(ok, f"{name} must be {'>' if strict else '≥'} {low}, got {value}")


@dataclass
class GenerationSettings:
    """What every method needs: prompts, canvas, sampling and batching.

    ``width``/``height`` are the final image size in pixels; ``steps`` the inference steps N; ``guidance`` the
    classifier-free guidance scale (≤ 1 disables guidance); ``max_batch`` the most UNet samples per forward pass
    (views, dilated samples and both guidance halves together), or ``"auto"``: the most that fit the device's free
    memory by the cost model's estimate, settled before the run (:func:`hiresdiff.plan.choose_max_batch`; the run,
    its plan and its metadata hold the number chosen); ``decode_tile_area`` the pixel area above which
    the VAE runs tiled (``0`` = always tile, ``None`` = never). ``ag_*``: AP-LDM attentive guidance in the
    native-size first phase of any method (strength λ, 0 = off; delay; decay exponent f; decay ``cosine``,
    ``linear`` or ``none``; SPEC §5). ``low_vram`` keeps the text encoders and the VAE on the CPU between their
    uses (see :func:`low_vram_defaults` for the batch and tile sizes it implies). ``strength`` (input images only,
    in (0, 1]): later phases start at step index ``⌊N·(1 − strength)⌋``, mapped onto each method's own start
    parameter (``None``: the method's default). ``eta`` is DDIM's stochasticity η (0 = deterministic DDIM, 1 = the
    ancestral DDPM-like step the ScaleCrafter/FouriScale/HiDiffusion code samples with), only for schedulers whose
    step takes it (:data:`~hiresdiff.schedulers.ETA_SCHEDULERS`); its noise comes from each image's generator.
    ``hidiffusion`` switches HiDiffusion (RAU-Net and MSW-MSA with the ``hidiffusion`` method's default parameters)
    on in the first phase of any method sampled from noise (``direct``'s only phase, with or without an input
    image), the way its users apply it to other pipelines; SD 1.x/2.x and SDXL only.

    Construction checks every field with :func:`normalise`: numpy numbers become plain ``int``/``float``/``bool``
    (so the metadata JSON stays plain), booleans where numbers belong and other types are one line naming the
    field; prompts may be ``bytes`` that decode as UTF-8, and text that is not UTF-8 is refused saying where.
    """

    prompt: list[str]
    width: int
    height: int
    negative_prompt: list[str] | None = None
    steps: int = 50
    guidance: float = 7.5
    scheduler: str = "euler"
    num_images_per_prompt: int = 1
    seed: int | None = 0
    max_batch: int | Literal["auto"] = AUTO
    decode_tile_area: int | None = DEFAULT_TILE_AREA
    previews: bool = True
    ag_lambda: float = 0.0
    ag_delay: int = 3
    ag_exponent: float = 3.0
    ag_decay: str = "cosine"
    low_vram: bool = False
    strength: float | None = None
    max_pixels: int | None = None
    eta: float = 0.0
    hidiffusion: bool = False

    def __post_init__(self) -> None:
        self.prompt = as_texts("prompt", self.prompt)
        require(len(self.prompt) > 0, "give at least one prompt")
        if self.negative_prompt is not None:
            negatives = as_texts("negative prompt", self.negative_prompt)
            one = isinstance(self.negative_prompt, (str, bytes, bytearray))
            self.negative_prompt = negatives * len(self.prompt) if one else negatives
            require(
                len(self.negative_prompt) == len(self.prompt),
                f"got {len(self.negative_prompt)} negative prompts for {len(self.prompt)} prompts; give one or "
                "one per prompt",
            )
        types_ = field_types(GenerationSettings)
        for f in dataclasses.fields(self):
            if f.name not in ("prompt", "negative_prompt"):
                setattr(self, f.name, normalise(f.name, getattr(self, f.name), types_[f.name]))
        for name in ("width", "height"):
            value = getattr(self, name)
            require(value > 0, f"{name} must be a positive number of pixels, got {value!r}")
        require(self.steps > 0, f"steps must be a positive integer, got {self.steps}")
        require(
            self.steps <= MAX_STEPS,
            f"steps {self.steps:,} is above the limit of {MAX_STEPS:,} (schedules have 1000 training timesteps; "
            "50 is typical)",
        )
        check_finite("guidance", self.guidance, low=0.0)
        check_scheduler_name(self.scheduler)
        check_finite("eta", self.eta, low=0.0)
        check_eta(self.eta, self.scheduler)
        require(
            self.num_images_per_prompt >= 1,
            f"num_images_per_prompt (--batch) must be ≥ 1, got {self.num_images_per_prompt}",
        )
        require(self.seed is None or 0 <= self.seed < 2**63, f"seed must be an integer in [0, 2^63), got {self.seed!r}")
        require(
            self.max_batch == AUTO or int(self.max_batch) >= 1, f"max_batch must be ≥ 1 or auto, got {self.max_batch}"
        )
        check_finite("ag_lambda", self.ag_lambda, low=0.0)
        require(self.ag_delay >= 0, f"ag_delay must be ≥ 0, got {self.ag_delay}")
        check_finite("ag_exponent", self.ag_exponent, low=0.0)
        require(
            self.ag_decay in AG_DECAYS, f"unknown ag_decay {self.ag_decay!r}; choose one of: {', '.join(AG_DECAYS)}"
        )
        require(
            self.max_pixels is None or self.max_pixels > 0,
            f"--max-pixels must be a positive integer, got {self.max_pixels!r}",
        )
        if self.strength is not None:
            ok = math.isfinite(self.strength) and 0 < self.strength <= 1
            require(ok, f"--strength must be in (0, 1] (the fraction of the steps that redraws), got {self.strength}")
        require(
            self.decode_tile_area is None or self.decode_tile_area >= 0,
            f"decode_tile_area must be ≥ 0 or None, got {self.decode_tile_area}",
        )

    @property
    def batch_size(self) -> int:
        return len(self.prompt) * self.num_images_per_prompt

    @property
    def rows_per_call(self) -> int:
        """The denoiser's row budget: ``max_batch``, or — where nothing settled ``auto`` (a :class:`Run` built
        directly) — :func:`fallback_batch`."""
        return fallback_batch(self.low_vram) if self.max_batch == AUTO else int(self.max_batch)

    @property
    def cfg(self) -> bool:
        return self.guidance > 1.0


def _field_type(tp: Any) -> tuple[type, bool]:
    """(base type, optional) of a dataclass field annotation such as ``int | None`` (``Literal`` words aside:
    :func:`_words`)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        given = typing.get_args(tp)
        args = [a for a in given if a is not type(None) and typing.get_origin(a) is not Literal]
        return args[0], type(None) in given
    return tp, False


def _words(tp: Any) -> tuple[str, ...]:
    """The words a field annotated ``X | Literal["word", …]`` takes besides values of ``X``."""
    if typing.get_origin(tp) not in (typing.Union, types.UnionType):
        return ()
    literals = [a for a in typing.get_args(tp) if typing.get_origin(a) is Literal]
    return tuple(str(w) for a in literals for w in typing.get_args(a))


def _parse(name: str, raw: str, tp: Any) -> Any:
    base, optional = _field_type(tp)
    if optional and raw.lower() in ("none", "null", ""):
        return None
    if raw.strip().lower() in _words(tp):
        return raw.strip().lower()
    try:
        if base is bool:
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if base in (int, float, str):
            return base(raw)
        if typing.get_origin(base) is tuple or base is tuple:
            return tuple(float(v) for v in raw.split(",") if v.strip())
    except ValueError:
        raise HiresError(f"parameter {name}={raw!r}: expected {getattr(base, '__name__', base)}") from None
    return raw


def coerce_params(cls: type, values: dict[str, Any], method: str) -> Any:
    """Build the method's parameter dataclass from ``values`` (strings from ``--set`` are parsed by type)."""
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - fields)
    require(
        not unknown,
        f"method {method!r} has no parameter {', '.join(unknown)}; "
        f"its parameters: {', '.join(sorted(fields)) or 'none'}",
    )
    return cls(**parse_fields(cls, values))


def parse_fields(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """``values`` typed by the dataclass's fields: strings (``--set``, ``--from-png``) parsed with the field's
    type, then every value :func:`normalise`-d (numpy numbers → plain ones, wrong types refused in one line).
    Names that are not fields pass through unchanged (the caller reports them)."""
    hints = field_types(cls)
    out: dict[str, Any] = {}
    for k, v in values.items():
        if k not in hints:
            out[k] = v
            continue
        parsed = _parse(k, v, hints[k]) if isinstance(v, str) and hints[k] is not str else v
        out[k] = normalise(k, parsed, hints[k])
    return out


def parse_assignments(items: list[str]) -> dict[str, str]:
    """``["a=1", "b=x"]`` → ``{"a": "1", "b": "x"}`` with a clear error for malformed items."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        require(bool(sep) and bool(name.strip()), f"--set expects name=value, got {item!r}")
        out[name.strip().replace("-", "_")] = value.strip()
    return out


#: ``low_vram`` defaults: one denoiser row per call (a CFG pair runs as two calls,
#: :meth:`~hiresdiff.models.guidance.GuidanceRule.parts`) and VAE tiles from 1024² px on. Low-VRAM keeps an
#: explicit small batch rather than ``auto``: on a device that tight the estimate's error (a lower bound, some
#: hundreds of MiB under real runs) matters most; ``--low-vram --max-batch auto`` asks for the estimate's choice.
LOW_VRAM_DEFAULTS: dict[str, Any] = {"max_batch": 1, "decode_tile_area": 1024 * 1024}
#: what ``auto`` becomes without a usable estimate (cost model failed, free memory unknown such as on MPS, no device
#: as in ``hiresdiff cost``): the former fixed default; with ``low_vram`` its own default
AUTO_FALLBACK = 8


def fallback_batch(low_vram: bool) -> int:
    """``max_batch`` when ``auto`` cannot be settled from an estimate (:data:`AUTO_FALLBACK`)."""
    return int(LOW_VRAM_DEFAULTS["max_batch"]) if low_vram else AUTO_FALLBACK


def low_vram_defaults(kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` with :data:`LOW_VRAM_DEFAULTS` filled in where ``low_vram`` is on and the caller gave none."""
    return {**LOW_VRAM_DEFAULTS, **kwargs} if kwargs.get("low_vram") else kwargs
