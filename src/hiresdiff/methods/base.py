"""What a method is: a named recipe with typed parameters, run over a :class:`~hiresdiff.sampler.Run`.

Torch-free on purpose: the registry (:data:`hiresdiff.methods.METHODS`), the parameter classes and the command
line's ``--help``, ``methods`` and settings checks import this module without torch or diffusers; a method's recipe
(its algorithm, which needs them) is imported when the method first runs.
"""

from __future__ import annotations

import importlib
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from hiresdiff.config import GenerationSettings, check_finite
from hiresdiff.errors import require
from hiresdiff.patches.tables import FREEU_RULES

if TYPE_CHECKING:
    import torch

    from hiresdiff.models.controlnet import ControlNetSpec
    from hiresdiff.pipeline import ModelFacts
    from hiresdiff.sampler import Run


def weakly(method: Callable[..., Any]) -> Callable[..., Any]:
    """The bound ``method`` called through a weak reference to its object. A phase loop that keeps a bound method
    of itself (or of the object that holds the loop) in its own lists would be a reference cycle, freed — with the
    canvases, edge maps and conditions it holds — only when Python's cyclic GC happens to run: what is alive at the
    final decode (the peak memory, the estimate) would then vary with the GC's timing."""
    ref, name = weakref.WeakMethod(method), method.__qualname__  # nothing that holds the object itself

    def call(*args: Any, **kwargs: Any) -> Any:
        bound = ref()
        if bound is None:
            raise RuntimeError(f"{name} called after its object was freed")
        return bound(*args, **kwargs)

    return call


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

    def check_model(self, settings: GenerationSettings, model: ModelFacts) -> None:
        """Raise a one-line error for values that cannot run on ``model``, a model of a family the method runs on
        (family, native size, text width: facts known before its weights load), e.g. a size none of the family's
        official tables covers — so the refusal comes before any model work, not from inside the recipe."""

    def check_controlnet(self, controlnet: ControlNetSpec | None) -> None:
        """Raise a one-line error when the run's ControlNet (``None``: none), known from its config and reference
        before weights load, does not fit these parameters (AccDiffusion v2 needs a canny one)."""

    def check_fractions(self, *names: str) -> None:
        """One line for a parameter of ``names`` that is set (not None) and is no fraction of the steps in [0, 1]."""
        for name in names:
            value = getattr(self, name)
            if value is not None:
                check_finite(name, value)
                require(0.0 <= value <= 1.0, f"{name} is a fraction of the steps in [0, 1], got {value}")


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


@dataclass
class FreeUParams(Params):
    """FreeU on the decoder (SPEC-baselines-unet §0): ``freeu`` switches it on (off by default, as AP-LDM ran
    every baseline), ``freeu_rule`` picks the resnets: ``channels`` (the official ScaleCrafter/FouriScale/FreeU
    scripts, by channel count generalised by level) or ``diffusers`` (``enable_freeu``, by up-block index).
    Applied with :func:`hiresdiff.patches.freeu.freeu_hooks`; the factors are the model's official ones."""

    freeu: bool = False
    freeu_rule: str = "channels"

    def __post_init__(self) -> None:
        require(
            self.freeu_rule in FREEU_RULES,
            f"unknown freeu_rule {self.freeu_rule!r}; choose one of: {', '.join(FREEU_RULES)}",
        )


#: the model families hiresdiff runs (:class:`~hiresdiff.models.loading.ModelSpec` ``family``)
FAMILIES = ("sd", "sdxl", "flux")
FAMILY_NAMES = {"sd": "SD 1.x/2.x", "sdxl": "SDXL", "flux": "FLUX"}

#: where ``hidiffusion=true`` (:attr:`GenerationSettings.hidiffusion`) applies to a method
#: (:attr:`Method.hidiffusion_switch`): ``"image"`` its first phase is a whole-canvas generation from noise or
#: from an input picture (SDEdit); ``"noise"`` only from noise (an input picture replaces that phase); ``"never"``
#: it has no such phase, or patches the UNet itself
SWITCH_PHASES = ("image", "noise", "never")

#: maps an input image's ``strength`` onto a method's own parameters: ``(strength, settings) → {name: value}``
StrengthMap = Callable[[float, GenerationSettings], dict[str, Any]]


def no_strength_params(strength: float, settings: GenerationSettings) -> dict[str, Any]:
    """Methods that read ``settings.strength`` themselves (SDEdit in ``direct``/``multidiffusion``)."""
    return {}


@dataclass(frozen=True)
class Method:
    """A registered method: name, summary, paper link, parameter class, recipe, named presets, the
    :class:`~hiresdiff.config.GenerationSettings` defaults it changes (explicit values win), and how an input
    image's ``strength`` maps onto its own start parameter (``None``: the method does not denoise an input).

    ``recipe`` names the function that runs the method as ``"module:function"``; it is imported by :meth:`run`,
    so listing, validating and planning methods never imports torch, the sampler or the model adapters.
    """

    name: str
    summary: str
    paper: str
    params: type[Params]
    recipe: str
    default_negative: str | None = None
    presets: dict[str, dict[str, Any]] = field(default_factory=dict)
    setting_defaults: dict[str, Any] = field(default_factory=dict)
    strength_params: StrengthMap | None = no_strength_params
    families: tuple[str, ...] = FAMILIES
    unsupported: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: whether the recipe feeds a ControlNet's residuals to its denoiser calls (checked before any model work)
    takes_controlnet: bool = True
    #: whether the recipe makes its ControlNet conditions itself (AccDiffusion v2's edge maps): it takes no control
    #: image, and its parameters check the ControlNet (:meth:`Params.check_controlnet`)
    own_control: bool = False
    #: where the HiDiffusion switch applies (:data:`SWITCH_PHASES`; checked before any model work)
    hidiffusion_switch: str = "noise"
    #: whether the recipe enlarges decoded images in pixel space (``Run.pixel_upsample``/``upsample_image``), which
    #: ``--upscaler`` then does; an input picture is enlarged that way by every method
    pixel_upsampling: bool = False

    def check_family(self, family: str, params: Params) -> None:
        """One line when this method, or one of its parameter values, cannot run on a ``family`` model."""
        label = FAMILY_NAMES.get(family, family)
        runs_on = ", ".join(FAMILY_NAMES[f] for f in self.families)
        require(
            family in self.families,
            f"method {self.name!r} runs on {runs_on} models, not {label}; choose another method "
            "(see `hiresdiff methods`) or model",
        )
        for name, bad in self.unsupported.get(family, {}).items():
            value = getattr(params, name)
            fix = f"--set {name}={str(not value).lower()}" if isinstance(bad, bool) else f"--set {name}=<another>"
            require(value != bad, f"{self.name} with {name}={value} cannot run on {label} models; pass {fix}")

    def check_controlnet(self, controlnet: bool, switched: bool = False) -> None:
        """One line when a ControlNet is asked for and this method (or the HiDiffusion switch, ``switched``)
        cannot feed it."""
        require(
            not controlnet or self.takes_controlnet,
            f"method {self.name!r} cannot run with a ControlNet yet; drop --controlnet or choose another method",
        )
        require(
            not (controlnet and switched),
            "hidiffusion=true cannot run with a ControlNet yet; drop --controlnet or --set hidiffusion=true",
        )

    def check_upscaler(self, upscaler: bool, has_source: bool, others: Sequence[str]) -> None:
        """One line when ``--upscaler`` would change nothing: no input picture to enlarge and a recipe whose phases
        grow in latent space only (``others``: the methods that upsample decoded images)."""
        require(
            not upscaler or has_source or self.pixel_upsampling,
            f"--upscaler enlarges images in pixel space, which {self.name} does only with an input picture: add "
            f"--image, drop --upscaler, or use a method that upsamples decoded images: {', '.join(others)}",
        )

    def check_switch(self, switched: bool, has_source: bool) -> None:
        """One line when ``hidiffusion=true`` (``switched``) would change nothing: the method has no whole-canvas
        first phase (``never``), or an input picture stands in for it (``noise`` with ``has_source``)."""
        if not switched:
            return
        require(
            self.hidiffusion_switch != "never",
            f"hidiffusion=true adds HiDiffusion to a method's whole-canvas first phase; {self.name} has none or "
            "patches the UNet already: drop --set hidiffusion=true (or use method direct)",
        )
        require(
            self.hidiffusion_switch == "image" or not has_source,
            f"hidiffusion=true patches {self.name}'s first phase, which an input image replaces: drop --set "
            "hidiffusion=true or --image (method direct takes both)",
        )

    def __post_init__(self) -> None:
        require(
            self.hidiffusion_switch in SWITCH_PHASES,
            f"method {self.name}: hidiffusion_switch must be one of {', '.join(SWITCH_PHASES)}, "
            f"got {self.hidiffusion_switch!r}",
        )
        module, _, function = self.recipe.partition(":")
        require(bool(module and function), f"method {self.name}: recipe must be 'module:function', got {self.recipe!r}")

    def recipe_function(self) -> Callable[[Run, Any], MethodOutput]:
        """The recipe itself (its module imported on first use)."""
        module, _, function = self.recipe.partition(":")
        return getattr(importlib.import_module(module), function)

    def run(self, run: Run, params: Any) -> MethodOutput:
        """Run the method's recipe over ``run`` with validated ``params``."""
        return self.recipe_function()(run, params)
