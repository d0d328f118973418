"""What a generation takes besides text — an input picture to upscale, a ControlNet, LoRAs — validated up front.

:func:`prepare_extras` reads files and small configs only (never weights), so every bad input stops with one line
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

from hiresdiff.errors import require
from hiresdiff.inputs import SourceImage, check_aspect, check_min_size, load_source_image, target_size
from hiresdiff.models.controlnet import ControlNetSpec, resolve_controlnet
from hiresdiff.models.lora import LoraSpec, parse_lora_arg, resolve_lora

#: ControlNet conditioning scale when none is given (diffusers' ControlNet pipelines default to 1.0)
DEFAULT_CONTROL_SCALE = 1.0

ImageInput = str | os.PathLike[str] | Image.Image
LoraInput = str | tuple[str, float] | LoraSpec


@dataclass(frozen=True)
class Extras:
    """Validated non-text inputs of one generation.

    ``source``: the picture to upscale; ``fit``: how it (and the control image) is brought to the target's aspect
    (``crop``/``pad``, ``None`` = same aspect); ``controlnet`` with its ``control_image`` (``None``: the source
    itself, ControlNet-tile use) and ``control_scale``; ``loras`` applied for the generation only.
    """

    source: SourceImage | None = None
    fit: str | None = None
    controlnet: ControlNetSpec | None = None
    control_image: SourceImage | None = None
    control_scale: float = DEFAULT_CONTROL_SCALE
    loras: tuple[LoraSpec, ...] = ()

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
        return out


def _same_file(what: str, found: SourceImage | LoraSpec, expected: str | None) -> None:
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
EXTRA_ARGS = ("image", "scale", "fit", "controlnet", "control_image", "control_scale", "loras", "expected")


def split_extras(kwargs: dict[str, Any], **context: Any) -> tuple[Extras, int, int]:
    """Take the :data:`EXTRA_ARGS` out of ``kwargs`` (in place) and :func:`prepare_extras` them with ``context``
    (``native``, ``grid``, ``family``, ``width``, ``height``, ``allow_pickle``)."""
    return prepare_extras(**context, **{k: kwargs.pop(k) for k in EXTRA_ARGS if k in kwargs})


def prepare_extras(
    *,
    native: int,
    grid: int,
    family: str,
    width: int | None = None,
    height: int | None = None,
    image: ImageInput | None = None,
    scale: float | None = None,
    fit: str | None = None,
    controlnet: str | None = None,
    control_image: ImageInput | None = None,
    control_scale: float | None = None,
    loras: Sequence[LoraInput] = (),
    allow_pickle: bool = False,
    expected: dict[str, Any] | None = None,
) -> tuple[Extras, int, int]:
    """Validate the extras and decide the target size: ``(extras, width, height)``.

    With ``image`` the target keeps the picture's aspect (``scale``, or one of ``width``/``height``; default twice
    its size); a target of another aspect needs ``fit``. Without it the target is ``width × height`` (default
    twice the native size). ``expected`` holds sha256 hashes recorded in a PNG (``image``, ``control_image``,
    ``loras``): a file that differs is refused.
    """
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
        net = resolve_controlnet(controlnet, allow_pickle=allow_pickle)
        if control_image is not None:
            cond = load_source_image(control_image)
            _same_file("--control-image", cond, exp.get("control_image"))
            check_aspect(cond.height, cond.width, (height, width), grid, fit)
        require(
            cond is not None or source is not None,
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
    extras = Extras(source, fit, net, cond, float(c_scale), specs)
    return extras, width, height
