"""What a method is: a named recipe with typed parameters, run over a :class:`~hiresdiff.sampler.Run`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from hiresdiff.config import GenerationSettings
from hiresdiff.errors import require
from hiresdiff.sampler import Run


@dataclass
class MethodOutput:
    """Final latents (decoded by the caller) or final images in [−1, 1] when the method ends in pixel space."""

    latents: torch.Tensor | None = None
    images: torch.Tensor | None = None


@dataclass
class Params:
    """Base of every method's parameters; :meth:`check` validates what depends on the model."""

    def check(self, settings: GenerationSettings, native: int, grid: int) -> None:
        """Raise a one-line error for values that do not fit the settings or a model of ``native``/``grid`` px."""


@dataclass
class ViewParams(Params):
    """Local views (SPEC §2.2): ``window``/``stride`` in pixels (default: native size and half of it)."""

    window: int | None = None
    stride: int | None = None
    jitter: bool = True

    def __post_init__(self) -> None:
        for name in ("window", "stride"):
            value = getattr(self, name)
            require(value is None or (isinstance(value, int) and value > 0), f"{name} must be > 0 px, got {value}")
        if self.window is not None and self.stride is not None:
            require(
                self.stride < self.window,
                f"stride {self.stride} must be smaller than window {self.window} so views overlap",
            )

    def latent_window(self, native: int, grid: int) -> tuple[int, int]:
        """(window, stride) in latent cells."""
        window = self.window or native
        stride = self.stride or window // 2
        return window // grid, stride // grid

    def check(self, settings: GenerationSettings, native: int, grid: int) -> None:
        window = self.window or native
        stride = self.stride or window // 2
        for name, value in (("window", window), ("stride", stride)):
            require(value % grid == 0, f"{name} {value} px is not a multiple of the latent grid ({grid} px)")
        require(stride < window, f"stride {stride} must be smaller than window {window} so views overlap")


#: maps an input image's ``strength`` onto a method's own parameters: ``(strength, settings) → {name: value}``
StrengthMap = Callable[[float, GenerationSettings], dict[str, Any]]


def no_strength_params(strength: float, settings: GenerationSettings) -> dict[str, Any]:
    """Methods that read ``settings.strength`` themselves (SDEdit in ``direct``/``multidiffusion``)."""
    return {}


@dataclass(frozen=True)
class Method:
    """A registered method: name, summary, paper link, parameter class, recipe, named presets, the
    :class:`~hiresdiff.config.GenerationSettings` defaults it changes (explicit values win), and how an input
    image's ``strength`` maps onto its own start parameter (``None``: the method does not denoise an input)."""

    name: str
    summary: str
    paper: str
    params: type[Params]
    run: Callable[[Run, Any], MethodOutput]
    default_negative: str | None = None
    presets: dict[str, dict[str, Any]] = field(default_factory=dict)
    setting_defaults: dict[str, Any] = field(default_factory=dict)
    strength_params: StrengthMap | None = no_strength_params
