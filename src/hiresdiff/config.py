"""Typed, self-validating settings shared by every method.

Method-specific parameters live in each method's own dataclass (``methods/*.py``); :func:`coerce_params`
turns ``--set name=value`` strings into them with the field's type.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from typing import Any

from hiresdiff.errors import HiresError, require
from hiresdiff.ops.schedule import AG_DECAYS
from hiresdiff.schedulers import check_scheduler_name

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
DTYPES = ("float32", "float16", "bfloat16")


def check_finite(name: str, value: float, *, low: float | None = None, strict: bool = False) -> None:
    """One-line error unless ``value`` is a finite number (and ``> low`` / ``≥ low``)."""
    require(isinstance(value, (int, float)) and math.isfinite(value), f"{name} must be a finite number, got {value}")
    if low is not None:
        ok = value > low if strict else value >= low
        require(ok, f"{name} must be {'>' if strict else '≥'} {low}, got {value}")


@dataclass
class GenerationSettings:
    """What every method needs: prompts, canvas, sampling and batching.

    ``width``/``height`` are the final image size in pixels; ``steps`` the inference steps N; ``guidance`` the
    classifier-free guidance scale (≤ 1 disables guidance); ``max_batch`` the most UNet samples per forward pass
    (views, dilated samples and both guidance halves together); ``decode_tile_area`` the pixel area above which
    the VAE runs tiled (``0`` = always tile, ``None`` = never). ``ag_*``: AP-LDM attentive guidance in the
    native-size first phase of any method (strength λ, 0 = off; delay; decay exponent f; decay ``cosine``,
    ``linear`` or ``none``; SPEC §5). ``low_vram`` keeps the text encoders and the VAE on the CPU between their
    uses (see :func:`low_vram_defaults` for the batch and tile sizes it implies). ``strength`` (input images only,
    in (0, 1]): later phases start at step index ``⌊N·(1 − strength)⌋``, mapped onto each method's own start
    parameter (``None``: the method's default).
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
    max_batch: int = 8
    decode_tile_area: int | None = DEFAULT_TILE_AREA
    previews: bool = True
    ag_lambda: float = 0.0
    ag_delay: int = 3
    ag_exponent: float = 3.0
    ag_decay: str = "cosine"
    low_vram: bool = False
    strength: float | None = None
    max_pixels: int | None = None

    def __post_init__(self) -> None:
        require(
            isinstance(self.prompt, (str, list, tuple)),
            f"the prompt must be a string or a list of strings, got {type(self.prompt).__name__}",
        )
        if isinstance(self.prompt, str):
            self.prompt = [self.prompt]
        self.prompt = list(self.prompt)
        require(len(self.prompt) > 0, "give at least one prompt")
        require(all(isinstance(p, str) for p in self.prompt), "prompts must be strings")
        if isinstance(self.negative_prompt, str):
            self.negative_prompt = [self.negative_prompt] * len(self.prompt)
        if self.negative_prompt is not None:
            require(
                len(self.negative_prompt) == len(self.prompt),
                f"got {len(self.negative_prompt)} negative prompts for {len(self.prompt)} prompts; give one or "
                "one per prompt",
            )
        for name in ("width", "height"):
            value = getattr(self, name)
            ok = isinstance(value, int) and not isinstance(value, bool) and value > 0
            require(ok, f"{name} must be a positive number of pixels, got {value!r}")
        require(isinstance(self.steps, int) and self.steps > 0, f"steps must be a positive integer, got {self.steps}")
        check_finite("guidance", self.guidance, low=0.0)
        check_scheduler_name(self.scheduler)
        require(
            isinstance(self.num_images_per_prompt, int) and self.num_images_per_prompt >= 1,
            f"num_images_per_prompt (--batch) must be ≥ 1, got {self.num_images_per_prompt}",
        )
        require(
            self.seed is None or (isinstance(self.seed, int) and 0 <= self.seed < 2**63),
            f"seed must be an integer in [0, 2^63), got {self.seed!r}",
        )
        require(isinstance(self.max_batch, int) and self.max_batch >= 1, f"max_batch must be ≥ 1, got {self.max_batch}")
        check_finite("ag_lambda", self.ag_lambda, low=0.0)
        require(isinstance(self.ag_delay, int) and self.ag_delay >= 0, f"ag_delay must be ≥ 0, got {self.ag_delay}")
        check_finite("ag_exponent", self.ag_exponent, low=0.0)
        require(
            self.ag_decay in AG_DECAYS, f"unknown ag_decay {self.ag_decay!r}; choose one of: {', '.join(AG_DECAYS)}"
        )
        require(
            self.max_pixels is None or (isinstance(self.max_pixels, int) and self.max_pixels > 0),
            f"--max-pixels must be a positive integer, got {self.max_pixels!r}",
        )
        if self.strength is not None:
            ok = isinstance(self.strength, (int, float)) and math.isfinite(self.strength) and 0 < self.strength <= 1
            require(ok, f"--strength must be in (0, 1] (the fraction of the steps that redraws), got {self.strength}")
        require(
            self.decode_tile_area is None or self.decode_tile_area >= 0,
            f"decode_tile_area must be ≥ 0 or None, got {self.decode_tile_area}",
        )

    @property
    def batch_size(self) -> int:
        return len(self.prompt) * self.num_images_per_prompt

    @property
    def cfg(self) -> bool:
        return self.guidance > 1.0


def _field_type(tp: Any) -> tuple[type, bool]:
    """(base type, optional) of a dataclass field annotation such as ``int | None``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def _parse(name: str, raw: str, tp: Any) -> Any:
    base, optional = _field_type(tp)
    if optional and raw.lower() in ("none", "null", ""):
        return None
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
    """Values given as strings (``--set``) parsed with the dataclass field's type; others unchanged."""
    hints = typing.get_type_hints(cls)
    return {k: _parse(k, v, hints[k]) if isinstance(v, str) and hints[k] is not str else v for k, v in values.items()}


def parse_assignments(items: list[str]) -> dict[str, str]:
    """``["a=1", "b=x"]`` → ``{"a": "1", "b": "x"}`` with a clear error for malformed items."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        require(bool(sep) and bool(name.strip()), f"--set expects name=value, got {item!r}")
        out[name.strip().replace("-", "_")] = value.strip()
    return out


#: ``low_vram`` defaults: at most two denoiser samples per call and VAE tiles from 1024² px on
LOW_VRAM_DEFAULTS: dict[str, Any] = {"max_batch": 2, "decode_tile_area": 1024 * 1024}


def low_vram_defaults(kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` with :data:`LOW_VRAM_DEFAULTS` filled in where ``low_vram`` is on and the caller gave none."""
    return {**LOW_VRAM_DEFAULTS, **kwargs} if kwargs.get("low_vram") else kwargs
