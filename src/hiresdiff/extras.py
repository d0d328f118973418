"""What a generation takes besides text — an input picture to upscale, a ControlNet, LoRAs, an SR model — validated
up front.

:func:`prepare_extras` reads files and small configs only (never weights, but for the small SR model of
``upscaler``, loaded and kept for the run), so every bad input stops with one line
before any model is built; :class:`Extras` then travels with the request and into each PNG's metadata, with file
names and sha256 hashes so that ``--from-png`` can refuse an input that changed.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image

from hiresdiff.config import as_float, as_int, as_str, got
from hiresdiff.errors import require
from hiresdiff.inputs import SourceImage, check_aspect, check_min_size, load_source_image, target_size
from hiresdiff.models.controlnet import ControlNetSpec, check_controlnet_fits, resolve_controlnet
from hiresdiff.models.lora import LoraSpec, check_lora_fits, parse_lora_arg, resolve_lora
from hiresdiff.models.upscalers import UpscalerSpec, resolve_upscaler

#: ControlNet conditioning scale when none is given (diffusers' ControlNet pipelines default to 1.0)
DEFAULT_CONTROL_SCALE = 1.0

ImageInput = str | os.PathLike[str] | Image.Image
LoraInput = str | tuple[str, float] | LoraSpec


@dataclass(frozen=True)
class Extras:
    """Validated non-text inputs of one generation.

    ``source``: the picture to upscale; ``fit``: how it (and the control image) is brought to the target's aspect
    (``crop``/``pad``, ``None`` = same aspect); ``controlnet`` with its ``control_image`` (``None``: the source
    itself, ControlNet-tile use) and ``control_scale``; ``loras`` applied for the generation only; ``upscaler``: the
    SR model of every pixel-space enlargement (:meth:`~hiresdiff.sampler.Run.upsample_image`).
    """

    source: SourceImage | None = None
    fit: str | None = None
    controlnet: ControlNetSpec | None = None
    control_image: SourceImage | None = None
    control_scale: float = DEFAULT_CONTROL_SCALE
    loras: tuple[LoraSpec, ...] = ()
    upscaler: UpscalerSpec | None = None

    @property
    def control_source(self) -> SourceImage | None:
        """The picture the ControlNet sees: the control image, else the input picture."""
        return self.control_image or self.source

    def metadata(self) -> dict[str, Any]:
        """The parts in use, for the PNG settings (file names, sizes, sha256, scales)."""
        out: dict[str, Any] = {}
        if self.source is not None:
            out["image"] = self.source.metadata()
            out["fit"] = self.fit
        if self.controlnet is not None:
            out["controlnet"] = self.controlnet.ref
            out["control_scale"] = self.control_scale
            if self.control_image is not None:
                out["control_image"] = self.control_image.metadata()
        if self.loras:
            out["loras"] = [lora.metadata() for lora in self.loras]
        if self.upscaler is not None:
            out["upscaler"] = self.upscaler.metadata()
        return out


def _same_file(what: str, found: SourceImage | LoraSpec | UpscalerSpec, expected: str | None) -> None:
    require(
        expected is None or found.sha256 == expected,
        f"{what} {found.name!r} is not the file this image was made from (sha256 {found.sha256[:12]}… ≠ recorded "
        f"{(expected or '')[:12]}…); pass the original file",
    )


def _loras(loras: Sequence[LoraInput], allow_pickle: bool, expected: Sequence[str] | None) -> tuple[LoraSpec, ...]:
    specs = []
    for item in loras:
        if isinstance(item, LoraSpec):
            specs.append(item)
            continue
        path, scale = parse_lora_arg(item) if isinstance(item, str) else item
        specs.append(resolve_lora(path, scale, allow_pickle=allow_pickle))
    if expected is not None:
        for spec, sha in zip(specs, expected, strict=False):
            _same_file("--lora", spec, sha)
    return tuple(specs)


#: the keyword arguments of :func:`~hiresdiff.generate` and :class:`~hiresdiff.HiresPipeline` that are extras
EXTRA_ARGS = ("image", "scale", "fit", "controlnet", "control_image", "control_scale", "loras", "upscaler", "expected")
_LORA_FORMS = "a list of LoRA files, 'file:scale' strings or (file, scale) pairs"


def _image_arg(name: str, value: Any) -> Any:
    require(
        value is None or isinstance(value, (str, os.PathLike, Image.Image)),
        f"{name} must be an image file path or a PIL image, got {got(value)}",
    )
    return value


def _lora_item(item: Any) -> LoraInput:
    """One ``loras`` entry checked for its form (the file itself is checked by :func:`resolve_lora`)."""
    if isinstance(item, (str, LoraSpec)):
        return item
    if isinstance(item, os.PathLike):
        return os.fspath(item)
    pair = isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], (str, os.PathLike))
    require(pair, f"loras must be {_LORA_FORMS}; got the item {got(item)}")
    return os.fspath(item[0]), as_float(f"the scale of LoRA {os.fspath(item[0])!r}", item[1])


def _lora_list(value: Any) -> tuple[LoraInput, ...]:
    """``loras`` as a tuple of entries; one file (a string, path or LoraSpec) is a list of one, never a sequence
    of characters."""
    if value is None:
        return ()
    if isinstance(value, (str, os.PathLike, LoraSpec)):
        value = [value]
    require(isinstance(value, (list, tuple)), f"loras must be {_LORA_FORMS}, got {got(value)}")
    return tuple(_lora_item(item) for item in value)


def typed_extras(args: dict[str, Any]) -> dict[str, Any]:
    """The :data:`EXTRA_ARGS` in ``args`` checked for their types (no file read, no model needed) and converted to
    plain values: numbers of any kind for ``scale``/``control_scale``, paths or PIL images for pictures, a list
    for ``loras``. One line naming the argument and the type received when one does not fit."""
    out = dict(args)
    for name in ("image", "control_image"):
        if name in out:
            out[name] = _image_arg(name, out[name])
    for name in ("scale", "control_scale"):
        if out.get(name) is not None:
            out[name] = as_float(name, out[name])
    if out.get("fit") is not None:
        out["fit"] = as_str("fit", out["fit"])
    if out.get("controlnet") is not None:
        net = out["controlnet"]
        ok = isinstance(net, (str, os.PathLike, ControlNetSpec))
        require(ok, f"controlnet must be a ControlNet folder or hub id (a string), got {got(net)}")
        out["controlnet"] = net if isinstance(net, ControlNetSpec) else os.fspath(net)
    if "loras" in out:
        out["loras"] = _lora_list(out["loras"])
    if out.get("upscaler") is not None:
        up = out["upscaler"]
        require(isinstance(up, (str, os.PathLike)), f"upscaler must be an SR model file path, got {got(up)}")
        out["upscaler"] = os.fspath(up)
    expected = out.get("expected")
    require(expected is None or isinstance(expected, dict), f"expected must be a dict or None, got {got(expected)}")
    return out


def split_extras(kwargs: dict[str, Any], **context: Any) -> tuple[Extras, int, int]:
    """Take the :data:`EXTRA_ARGS` out of ``kwargs`` (in place) and :func:`prepare_extras` them with ``context``
    (``native``, ``grid``, ``family``, ``text_width``, ``width``, ``height``, ``allow_pickle``)."""
    return prepare_extras(**context, **{k: kwargs.pop(k) for k in EXTRA_ARGS if k in kwargs})


def prepare_extras(
    *,
    native: int,
    grid: int,
    family: str,
    text_width: int | None = None,
    width: int | None = None,
    height: int | None = None,
    image: ImageInput | None = None,
    scale: float | None = None,
    fit: str | None = None,
    controlnet: str | ControlNetSpec | None = None,
    control_image: ImageInput | None = None,
    control_scale: float | None = None,
    loras: Sequence[LoraInput] = (),
    upscaler: str | os.PathLike[str] | None = None,
    allow_pickle: bool = False,
    expected: dict[str, Any] | None = None,
    own_control: bool = False,
) -> tuple[Extras, int, int]:
    """Validate the extras and decide the target size: ``(extras, width, height)``.

    With ``image`` the target keeps the picture's aspect (``scale``, or one of ``width``/``height``; default twice
    its size); a target of another aspect needs ``fit``. Without it the target is ``width × height`` (default
    twice the native size). ``expected`` holds sha256 hashes recorded in a PNG (``image``, ``control_image``,
    ``loras``, ``upscaler``): a file that differs is refused. ``upscaler`` is loaded here (cached), so a file that is
    not an SR model stops before any generation work. A ControlNet or LoRA made for another family than ``family``
    (ControlNet: also another text width than ``text_width``, the denoiser's ``cross_attention_dim``) is refused
    from its config or tensor names, before any weights load. ``own_control``: the method makes its own control
    images (:attr:`~hiresdiff.methods.base.Method.own_control`), so ``--controlnet`` needs none and takes none.
    """
    given = (image, scale, fit, controlnet, control_image, control_scale, loras, upscaler, expected)
    typed = typed_extras(dict(zip(EXTRA_ARGS, given, strict=True)))
    image, scale, fit, controlnet, control_image, control_scale, loras, upscaler, expected = (
        typed[k] for k in EXTRA_ARGS
    )
    if width is not None:
        width = as_int("width", width)
    if height is not None:
        height = as_int("height", height)
    exp = expected or {}
    source = None
    if image is None:
        require(scale is None, "--scale needs an input image (--image); without one give --width/--height")
        require(fit is None, "--fit needs an input image (--image)")
        width = 2 * native if width is None else width  # 0 is an error (GenerationSettings), not "default"
        height = 2 * native if height is None else height
    else:
        source = load_source_image(image)
        _same_file("--image", source, exp.get("image"))
        check_min_size(source, native)
        height, width = target_size(
            source.height, source.width, scale=scale, target_height=height, target_width=width, grid=grid
        )
        check_aspect(source.height, source.width, (height, width), grid, fit)
    net = cond = None
    if controlnet is not None:
        require(family != "flux", "ControlNet works with SD 1.x/2.x and SDXL models here; FLUX is not supported")
        resolved = isinstance(controlnet, ControlNetSpec)  # a host's ControlNet, provided to the pipeline
        net = controlnet if resolved else resolve_controlnet(controlnet, allow_pickle=allow_pickle)
        check_controlnet_fits(net, text_width, family)
        require(
            not (own_control and control_image is not None),
            "this method makes its own ControlNet condition (edges of each phase's image): drop --control-image",
        )
        if control_image is not None:
            cond = load_source_image(control_image)
            _same_file("--control-image", cond, exp.get("control_image"))
            check_aspect(cond.height, cond.width, (height, width), grid, fit)
        require(
            cond is not None or source is not None or own_control,
            "--controlnet needs a control image: pass --control-image, or --image (then also the control image)",
        )
    else:
        require(control_image is None, "--control-image needs --controlnet ID_OR_FOLDER")
        require(control_scale is None, "--control-scale needs --controlnet ID_OR_FOLDER")
    c_scale = DEFAULT_CONTROL_SCALE if control_scale is None else control_scale
    require(
        isinstance(c_scale, (int, float)) and math.isfinite(c_scale) and c_scale >= 0,
        f"--control-scale must be a finite number ≥ 0, got {c_scale}",
    )
    specs = _loras(loras, allow_pickle, exp.get("loras"))
    for spec in specs:
        check_lora_fits(spec, family)
    up = None if upscaler is None else resolve_upscaler(upscaler, allow_pickle=allow_pickle)
    if up is not None:
        _same_file("--upscaler", up, exp.get("upscaler"))
    extras = Extras(source, fit, net, cond, float(c_scale), specs, up)
    return extras, width, height
