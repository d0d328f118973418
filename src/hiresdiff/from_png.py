"""``hiresdiff generate --from-png``: regenerate the image whose settings a hiresdiff PNG records.

A PNG's settings chunk is input like a command line: anyone can edit it. :func:`read_request` first checks the
record's shape — every field :meth:`~hiresdiff.pipeline.HiresPipeline._metadata` writes, with its JSON type, and
no field it does not write — then validates the values through :func:`~hiresdiff.pipeline.validate_request`, the
path a command line takes, against the model that will run, and refuses a batch index outside its batch. All of it
happens before any weights load, and every refusal is one line naming the PNG and, where it can be told, the field.
"""

from __future__ import annotations

import dataclasses
import json
import re
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from hiresdiff.config import GenerationSettings
from hiresdiff.errors import HiresError, require
from hiresdiff.images import read_png_settings
from hiresdiff.methods import get_method
from hiresdiff.pipeline import PHASE_SETTINGS, GenerationResult, ModelFacts, resolve_dtype, validate_request

#: flags ``--from-png`` uses besides the PNG's own settings (where to run and write, the input files)
FROM_PNG_FLAGS = frozenset(
    {
        "from_png",
        "model",
        "out",
        "quiet",
        "image",
        "control_image",
        "device",
        "allow_pickle",
        "no_previews",
        "dry_run",
        "skip_memory_check",
        "parallel",
        "command",
    }
)


def ignored_flags(given: Mapping[str, Any], defaults: Mapping[str, Any]) -> list[str]:
    """The flags of ``given`` (the parsed ``generate`` arguments) that ``--from-png`` would not use: those outside
    :data:`FROM_PNG_FLAGS` whose value differs from the parser's ``defaults``, spelled as on the command line."""
    return [
        "--" + k.replace("_", "-") if k != "prompt" else "a prompt"
        for k, v in given.items()
        if k not in FROM_PNG_FLAGS and v != defaults.get(k)
    ]


def check_flags(given: Mapping[str, Any], defaults: Mapping[str, Any]) -> None:
    """Refuse flags that ``--from-png`` would silently ignore (:func:`ignored_flags`): the PNG's settings win."""
    ignored = ignored_flags(given, defaults)
    require(
        not ignored,
        f"--from-png regenerates the image's own settings; drop {', '.join(ignored)} (or generate without "
        "--from-png to change them)",
    )


@dataclass(frozen=True)
class Kind:
    """A JSON type a settings field may hold: its description in an error message and its test."""

    name: str
    test: Callable[[Any], bool]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


INTEGER = Kind("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool))
NUMBER = Kind("a number", _is_number)
STRING = Kind("a string", lambda v: isinstance(v, str))
BOOLEAN = Kind("true or false", lambda v: isinstance(v, bool))
NULL = Kind("null", lambda v: v is None)
STRINGS = Kind("a list of strings", lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v))
NUMBERS = Kind("a list of numbers", lambda v: isinstance(v, list) and all(_is_number(x) for x in v))
OBJECT = Kind("an object", lambda v: isinstance(v, dict))
OBJECTS = Kind("a list of objects", lambda v: isinstance(v, list) and all(isinstance(x, dict) for x in v))


def kinds_of(annotation: Any) -> tuple[Kind, ...]:
    """The JSON kinds a dataclass field of type ``annotation`` is written as (``int | None`` → integer or null;
    tuples become lists)."""
    args = typing.get_args(annotation) if typing.get_origin(annotation) is not tuple else ()
    if args and type(None) in args:
        return (*(k for a in args if a is not type(None) for k in kinds_of(a)), NULL)
    if args and typing.get_origin(annotation) is typing.Literal:  # ``max_batch``'s "auto"
        return (STRING,)
    if args and typing.get_origin(annotation) is not tuple:  # a union without None: ``int | Literal["auto"]``
        return tuple(k for a in args for k in kinds_of(a))
    if annotation is tuple or typing.get_origin(annotation) is tuple:
        return (NUMBERS,)
    simple = {bool: BOOLEAN, int: INTEGER, float: NUMBER, str: STRING}
    if annotation not in simple:
        raise TypeError(f"no JSON kind for the annotation {annotation!r}")  # a new field type: extend this table
    return (simple[annotation],)


@dataclass(frozen=True)
class Field:
    """One field of a settings record: the JSON kinds it may hold, whether every record has it, and the fields of
    the object (or of each object of the list) it holds."""

    kinds: tuple[Kind, ...]
    required: bool = True
    record: Mapping[str, Field] | None = None


IMAGE_RECORD = {
    "name": Field((STRING,)),
    "width": Field((INTEGER,)),
    "height": Field((INTEGER,)),
    "sha256": Field((STRING,)),
    "notes": Field((STRINGS,), required=False),
}
LORA_RECORD = {
    "name": Field((STRING,), required=False),
    "path": Field((STRING,)),
    "sha256": Field((STRING,)),
    "scale": Field((NUMBER,)),
}
UPSCALER_RECORD = {
    "name": Field((STRING,), required=False),
    "path": Field((STRING,)),
    "sha256": Field((STRING,)),
}
BATCH_RECORD = {
    "index": Field((INTEGER,)),
    "prompts": Field((STRINGS,)),
    "negative_prompts": Field((STRINGS, NULL)),
    "images_per_prompt": Field((INTEGER,)),
    "first_seed": Field((INTEGER, NULL)),
}
_HINTS = typing.get_type_hints(GenerationSettings)
#: settings written as the :class:`~hiresdiff.config.GenerationSettings` field of the same name; older PNGs lack
#: those of :data:`_LATER`
_SETTINGS = ("width", "height", "steps", "guidance", "scheduler", "seed", "max_batch", "decode_tile_area")
_LATER = ("strength", "eta", *PHASE_SETTINGS)
#: the settings record of one image (:meth:`~hiresdiff.pipeline.HiresPipeline._metadata`); ``params`` is checked
#: against its method's parameters (:func:`check_params`)
SETTINGS_RECORD: dict[str, Field] = {
    "hiresdiff": Field((STRING,), required=False),
    "model": Field((STRING,)),
    "dtype": Field((STRING, NULL), required=False),
    "method": Field((STRING,)),
    "prompt": Field((STRING,)),
    "prompt_seen": Field((STRING,), required=False),
    "negative_prompt": Field((STRING, NULL)),
    **{name: Field(kinds_of(_HINTS[name])) for name in _SETTINGS},
    **{name: Field(kinds_of(_HINTS[name]), required=False) for name in _LATER},
    "params": Field((OBJECT,)),
    "image": Field((OBJECT,), required=False, record=IMAGE_RECORD),
    "fit": Field((STRING, NULL), required=False),
    "controlnet": Field((STRING,), required=False),
    "control_scale": Field((NUMBER,), required=False),
    "control_image": Field((OBJECT,), required=False, record=IMAGE_RECORD),
    "loras": Field((OBJECTS,), required=False, record=LORA_RECORD),
    "upscaler": Field((OBJECT,), required=False, record=UPSCALER_RECORD),
    "batch": Field((OBJECT,), required=False, record=BATCH_RECORD),
}


def png_error(png: str, message: str, field: str | None = None) -> HiresError:
    """The one-line refusal of a PNG's settings: ``--from-png 'x.png': field 'steps': <message>``."""
    return HiresError(f"--from-png {png!r}: " + (f"field {field!r}: " if field else "") + message)


def require_png(condition: bool, png: str, message: str, field: str | None = None) -> None:
    """Raise :func:`png_error` unless ``condition`` holds."""
    if not condition:
        raise png_error(png, message, field)


def _shown(value: Any) -> str:
    """A value as the settings JSON spells it, cut short."""
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "…"


def check_record(record: Mapping[str, Any], fields: Mapping[str, Field], png: str, where: str = "") -> None:
    """Refuse a record that lacks a required field, holds one that hiresdiff does not write, or a value of another
    JSON type, recursing into the records of :attr:`Field.record`; ``where`` prefixes the field names."""
    unknown = sorted(set(record) - set(fields))
    if unknown:
        raise png_error(png, "hiresdiff writes no such setting (drop it)", where + unknown[0])
    for name, spec in fields.items():
        path = where + name
        if name not in record:
            if spec.required:
                raise png_error(png, "is missing (the PNG's settings are incomplete)", path)
            continue
        value = record[name]
        if not any(kind.test(value) for kind in spec.kinds):
            raise png_error(png, f"must be {' or '.join(k.name for k in spec.kinds)}, got {_shown(value)}", path)
        if spec.record is not None and isinstance(value, dict):
            check_record(value, spec.record, png, path + ".")
        elif spec.record is not None:
            for i, item in enumerate(value):
                check_record(item, spec.record, png, f"{path}[{i}].")


def check_params(method: str, params: Mapping[str, Any], png: str) -> None:
    """Each ``params`` entry must be a parameter of ``method``, of its field's JSON kind (entries a PNG of an older
    version lacks keep their defaults)."""
    try:
        m = get_method(method)
    except HiresError as exc:
        raise png_error(png, str(exc), "method") from None
    hints = typing.get_type_hints(m.params)
    fields = {name: Field(kinds_of(hint), required=False) for name, hint in hints.items()}
    unknown = sorted(set(params) - set(fields))
    if unknown:
        names = ", ".join(sorted(fields)) or "none"
        raise png_error(
            png, f"method {m.name!r} has no such parameter; its parameters: {names}", f"params.{unknown[0]}"
        )
    check_record(params, fields, png, "params.")


def field_named(message: str, sources: Mapping[str, str]) -> str | None:
    """The PNG field a validation ``message`` is about: of the settings in ``sources`` (the name a message uses for
    it, mostly its keyword → the PNG field it came from), the one the message names first, in any case and with
    dashes or underscores (``steps``, ``--max-batch``, ``LoRA``); ``None`` when it names none."""
    first: tuple[int, str] | None = None
    for name, field in sources.items():
        spelled = "|".join(re.escape(n) for n in {name, name.replace("_", "-")})
        hit = re.search(rf"(?<![\w-])(?:--)?(?:{spelled})(?![\w-])", message, re.IGNORECASE)
        if hit is not None and (first is None or hit.start() < first[0]):
            first = (hit.start(), field)
    return None if first is None else first[1]


@dataclass(frozen=True)
class PngRequest:
    """What ``--from-png`` generates: the PNG, :func:`~hiresdiff.generate`'s keyword arguments and, for an image of
    a batch, its index (the whole batch is regenerated: batched model calls round differently from single ones)."""

    png: str
    kwargs: dict[str, Any]
    keep: int | None = None

    def pick(self, res: GenerationResult) -> GenerationResult:
        """The recorded image of ``res`` (all of it when the PNG is not part of a batch)."""
        return res if self.keep is None else keep_only(res, self.keep)


def keep_only(res: GenerationResult, index: int) -> GenerationResult:
    """Image ``index`` of a batch result (with its previews)."""
    return dataclasses.replace(
        res, images=[res.images[index]], metadata=[res.metadata[index]], previews=[[p[index]] for p in res.previews]
    )


def _settings_kwargs(s: Mapping[str, Any], png: str) -> tuple[dict[str, Any], dict[str, str]]:
    """:func:`~hiresdiff.generate`'s keyword arguments from a checked record, and the PNG field of each."""
    names = ("prompt", "method", "negative_prompt", *_SETTINGS, *(k for k in _LATER if s.get(k) is not None))
    kwargs = {name: s[name] for name in names}
    sources = {name: name for name in names} | {name: f"params.{name}" for name in s["params"]}
    kwargs.update(s["params"])
    batch = s.get("batch")
    if batch is not None:  # regenerate its whole batch (same model calls, same rounding), keep this image
        renamed = {
            "prompt": "prompts",
            "negative_prompt": "negative_prompts",
            "num_images_per_prompt": "images_per_prompt",
            "seed": "first_seed",
        }
        kwargs.update({name: batch[field] for name, field in renamed.items()})
        sources.update({name: f"batch.{field}" for name, field in renamed.items()})
        negatives, prompts = batch["negative_prompts"], batch["prompts"]
        ok = negatives is None or len(negatives) == len(prompts)
        require_png(
            ok,
            png,
            f"holds {len(negatives or [])} negative prompt(s) for {len(prompts)} prompts (give one per prompt)",
            "batch.negative_prompts",
        )
    why = "is null: the image was made with a caller's generator, not a seed, and cannot be made again"
    require_png(kwargs["seed"] is not None, png, why, sources["seed"])
    return kwargs, sources


def _extras_kwargs(
    s: Mapping[str, Any], png: str, files: Mapping[str, str | None]
) -> tuple[dict[str, Any], dict[str, str]]:
    """The input picture, ControlNet and LoRAs a record names, and the PNG field of each. The input files must be
    passed again (``files``: ``image``, ``control_image``) and have the recorded sha256 (``expected``)."""
    out: dict[str, Any] = {"expected": {}}
    for key, flag in (("image", "--image"), ("control_image", "--control-image")):
        recorded, given = s.get(key), files.get(key)
        if recorded is None:
            require_png(given is None, png, f"the image was made without {flag}; drop it")
            continue
        made_from = f"{recorded['name']!r} ({recorded['width']}×{recorded['height']})"
        require_png(
            given is not None, png, f"the image was made from {made_from}; pass that file again with {flag}", key
        )
        out[key], out["expected"][key] = given, recorded["sha256"]
    if s.get("fit") is not None:
        out["fit"] = s["fit"]
    if s.get("controlnet") is not None:
        why = "is missing (every PNG made with a ControlNet records it)"
        require_png("control_scale" in s, png, why, "control_scale")
        out["controlnet"], out["control_scale"] = s["controlnet"], s["control_scale"]
    loras = s.get("loras") or []
    out["loras"] = [(lora["path"], lora["scale"]) for lora in loras]
    out["expected"]["loras"] = [lora["sha256"] for lora in loras]
    if s.get("upscaler") is not None:  # loaded again from its recorded path, refused if its bytes changed
        out["upscaler"], out["expected"]["upscaler"] = s["upscaler"]["path"], s["upscaler"]["sha256"]
    keys = ("image", "control_image", "fit", "controlnet", "control_scale", "loras", "upscaler")
    sources = {key: key for key in keys}
    sources["lora"] = "loras"  # messages speak of one "LoRA file"
    return out, sources


def _check_place(s: Mapping[str, Any], index: int, png: str) -> None:
    """A batch image's own prompt, negative prompt and seed are those of its place ``index`` in the batch record
    (the batch is what is regenerated: a record that contradicts itself is refused, not half obeyed)."""
    batch = s["batch"]
    row = index // batch["images_per_prompt"]
    negatives = batch["negative_prompts"]
    place = {
        "prompt": batch["prompts"][row],
        "negative_prompt": None if negatives is None else negatives[row],
        "seed": batch["first_seed"] + index,
    }
    for name, value in place.items():
        why = f"{_shown(s[name])} differs from image {index} of the batch record ({_shown(value)})"
        require_png(s[name] == value, png, why, name)


def read_request(
    png: str,
    *,
    model: str | None = None,
    image: str | None = None,
    control_image: str | None = None,
    allow_pickle: bool = False,
) -> PngRequest:
    """The request a hiresdiff PNG records, checked as a command line would be, before any weights load.

    ``model`` replaces the PNG's model (same architecture, other location); ``image`` and ``control_image`` are
    the input files the PNG names (their sha256 must match). Raises :class:`~hiresdiff.errors.HiresError` in one
    line naming the PNG and the field for a malformed record (:data:`SETTINGS_RECORD`), a value the command line
    would refuse (:func:`~hiresdiff.pipeline.validate_request` on ``model``'s facts) or a batch index outside the
    batch.
    """
    from hiresdiff.models.loading import resolve_model

    s = read_png_settings(png)
    check_record(s, SETTINGS_RECORD, png)
    check_params(s["method"], s["params"], png)
    settings, sources = _settings_kwargs(s, png)
    extras, extra_sources = _extras_kwargs(s, png, {"image": image, "control_image": control_image})
    sources |= extra_sources
    try:
        if s.get("dtype") is not None:
            resolve_dtype(s["dtype"])
    except HiresError as exc:
        raise png_error(png, str(exc), "dtype") from None
    try:
        spec = resolve_model(model or s["model"], allow_pickle=allow_pickle)
    except HiresError as exc:
        raise (png_error(png, str(exc), "model") if model is None else exc) from None
    facts = ModelFacts.of_spec(spec)
    given = {k: v for k, v in {**settings, **extras}.items() if k not in ("prompt", "method", "width", "height")}
    try:
        req = validate_request(
            settings["prompt"], s["method"], s["width"], s["height"], facts, allow_pickle=allow_pickle, **given
        )
    except HiresError as exc:
        raise png_error(png, str(exc), field_named(str(exc), sources)) from None
    keep = None
    if "batch" in s:
        keep = s["batch"]["index"]
        size = req.settings.batch_size
        require_png(0 <= keep < size, png, f"{keep} is outside the batch of {size} image(s)", "batch.index")
        _check_place(s, keep, png)
    kwargs = {**settings, "model": model or s["model"], "dtype": s.get("dtype"), **extras}
    return PngRequest(png, kwargs, keep)
