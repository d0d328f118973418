"""The benchmark matrix: methods/presets × sizes × prompts × seeds × swept values, validated before any model work.

A :class:`Group` is one row of the report (method, preset, size, swept values); its images are the
:class:`Item` s prompts × seeds. Every name here is derived from coordinates, never from positions in the
command line, so a rerun with the same arguments finds the same files (resuming) and ``plan.json`` can be compared.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import re
from dataclasses import dataclass, field
from typing import Any

from hiresdiff.bench.prompts import Prompt
from hiresdiff.errors import HiresError, require

#: names the benchmark sets itself (or that have their own option); not allowed in ``--set`` / ``--sweep``
RESERVED = frozenset({"prompt", "width", "height", "seed", "num_images_per_prompt", "previews", "preset", "paper"})
#: version of the ``plan.json`` layout
PLAN_FORMAT = 1
_SIZE = re.compile(r"^(\d+)[xX](\d+)$")
_SCALE = re.compile(r"^(\d+(?:\.\d+)?)[xX]$")
_UNSAFE = re.compile(r"[^A-Za-z0-9._+=-]")


def safe_name(text: str) -> str:
    """``text`` usable as a file name: unsafe characters become ``_``, plus a short hash when any did."""
    cleaned = _UNSAFE.sub("_", text)
    if cleaned == text:
        return text
    return f"{cleaned}~{hashlib.sha1(text.encode()).hexdigest()[:6]}"


@dataclass(frozen=True)
class Size:
    """An output size: as typed (``2x`` or ``512x768``) and in pixels."""

    label: str
    width: int
    height: int

    @property
    def pixels(self) -> str:
        return f"{self.width}x{self.height}"

    @property
    def megapixels(self) -> float:
        return self.width * self.height / 1e6

    @property
    def text(self) -> str:
        """``512x512 (2x)``, or just the pixels when typed as pixels."""
        return self.pixels if self.label == self.pixels else f"{self.pixels} ({self.label})"


@dataclass(frozen=True)
class Group:
    """One report row: a method (and preset) at one size with one value per swept parameter it takes."""

    method: str
    preset: str | None
    size: Size
    sweep: tuple[tuple[str, str], ...] = ()

    @property
    def method_label(self) -> str:
        """``method`` or ``method:preset`` as on the command line."""
        return self.method if self.preset is None else f"{self.method}:{self.preset}"

    @property
    def label(self) -> str:
        """Method, preset and swept values (the size is a column of its own)."""
        return " ".join([self.method_label, *(f"{n}={v}" for n, v in self.sweep)])

    @property
    def slug(self) -> str:
        """Folder name of the group's images, e.g. ``apt+apt-sas_2048x2048_sas_eta=2.0``."""
        head = self.method if self.preset is None else f"{self.method}+{self.preset}"
        return "_".join(safe_name(p) for p in (head, self.size.pixels, *(f"{n}={v}" for n, v in self.sweep)))

    def to_dict(self) -> dict[str, Any]:
        return {"slug": self.slug, **dataclasses.asdict(self), "sweep": dict(self.sweep)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Group:
        return cls(data["method"], data["preset"], Size(**data["size"]), tuple(data["sweep"].items()))


@dataclass(frozen=True)
class Item:
    """One image: a group, a prompt (by index) and a seed."""

    group: Group
    prompt_index: int
    seed: int

    @property
    def stem(self) -> str:
        return f"p{self.prompt_index:04d}-s{self.seed}"

    @property
    def id(self) -> str:
        return f"{self.group.slug}/{self.stem}"


@dataclass
class BenchPlan:
    """The whole matrix and the settings shared by every image.

    ``settings`` are :class:`~hiresdiff.config.GenerationSettings` values given on the command line (steps,
    guidance, …); ``fixed`` the ``--set`` values and ``sweeps`` the ``--sweep`` values, as typed (strings, parsed
    with each field's type by :func:`~hiresdiff.pipeline.build_request`). A ``--set``/``--sweep`` name applies to
    the methods that have such a parameter (settings apply to all).
    """

    model: str
    dtype: str | None
    paper: bool
    settings: dict[str, Any]
    fixed: dict[str, str]
    sweeps: dict[str, list[str]]
    seeds: list[int]
    prompts: list[Prompt]
    groups: list[Group]
    #: the model's own sampling defaults (FLUX steps/guidance); derived from ``model``, not stored in plan.json
    model_defaults: dict[str, Any] = field(default_factory=dict)
    items: list[Item] = field(init=False)

    def __post_init__(self) -> None:
        self.items = [
            Item(group, index, seed)
            for group in self.groups
            for index, prompt in enumerate(self.prompts)
            for seed in ([prompt.seed] if prompt.seed is not None else self.seeds)
        ]

    def request_kwargs(self, group: Group) -> dict[str, Any]:
        """Keyword arguments of :func:`~hiresdiff.pipeline.build_request` (and of the cost model) for ``group``."""
        fixed = {k: v for k, v in self.fixed.items() if accepts(group.method, k)}
        return {
            "preset": group.preset,
            "paper": self.paper,
            "model_defaults": self.model_defaults,
            **self.settings,
            **fixed,
            **dict(group.sweep),
        }

    def to_dict(self) -> dict[str, Any]:
        """The matrix as stored in ``plan.json`` (two runs with equal dicts write the same files)."""
        return {
            "format": PLAN_FORMAT,
            "model": self.model,
            "dtype": self.dtype,
            "paper": self.paper,
            "settings": self.settings,
            "fixed": self.fixed,
            "sweeps": self.sweeps,
            "seeds": self.seeds,
            "prompts": [dataclasses.asdict(p) for p in self.prompts],
            "groups": [g.to_dict() for g in self.groups],
            "items": len(self.items),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BenchPlan:
        return cls(
            model=data["model"],
            dtype=data["dtype"],
            paper=data["paper"],
            settings=data["settings"],
            fixed=data["fixed"],
            sweeps=data["sweeps"],
            seeds=data["seeds"],
            prompts=[Prompt(**p) for p in data["prompts"]],
            groups=[Group.from_dict(g) for g in data["groups"]],
        )


def accepts(method: str, name: str) -> bool:
    """Whether ``method`` takes ``name``: a common generation setting or one of its parameters."""
    from hiresdiff.methods import get_method
    from hiresdiff.pipeline import SETTING_NAMES

    return name in SETTING_NAMES or name in {f.name for f in dataclasses.fields(get_method(method).params)}


def _split(text: str, what: str) -> list[str]:
    parts = [p.strip() for p in text.split(",")]
    require(bool(text.strip()) and all(parts), f"{what} expects a comma-separated list, got {text!r}")
    return list(dict.fromkeys(parts))


def parse_methods(text: str) -> list[tuple[str, str | None]]:
    """``"direct,apt:apt-sas"`` → ``[("direct", None), ("apt", "apt-sas")]``, checked against the registry."""
    from hiresdiff.methods import get_method

    out = []
    for entry in _split(text, "--methods"):
        name, _, preset = entry.partition(":")
        method = get_method(name.strip())
        preset = preset.strip() or None
        require(
            preset is None or preset in method.presets,
            f"method {method.name!r} has no preset {preset!r}; presets: {', '.join(method.presets) or 'none'}",
        )
        out.append((method.name, preset))
    return out


def parse_sizes(text: str, native: int) -> list[Size]:
    """``"2x,4x,2048x1024"``: multiples of the model's native size per side, or ``WIDTHxHEIGHT`` pixels."""
    sizes: dict[tuple[int, int], Size] = {}
    for entry in _split(text, "--sizes"):
        if m := _SIZE.match(entry):
            width, height = int(m[1]), int(m[2])
        elif m := _SCALE.match(entry):
            width = height = round(float(m[1]) * native)
        else:
            raise HiresError(f"--sizes: {entry!r} is neither a scale like 2x nor pixels like 2048x1024")
        sizes.setdefault((width, height), Size(entry, width, height))
    return list(sizes.values())


def parse_seeds(text: str) -> list[int]:
    """``"0,1,5"`` or ranges ``"0-3"`` (inclusive)."""
    seeds: list[int] = []
    for entry in _split(text, "--seeds"):
        low, dash, high = entry.partition("-")
        ok = low.isdigit() and (not dash or high.isdigit())
        require(ok, f"--seeds: {entry!r} is not a non-negative integer or a range like 0-7")
        seeds.extend(range(int(low), int(high or low) + 1))
    require(bool(seeds), f"--seeds {text!r} names no seed (is a range reversed?)")
    require(max(seeds) < 2**63, "--seeds: seeds must be below 2^63")
    return list(dict.fromkeys(seeds))


def parse_sweeps(items: list[str]) -> dict[str, list[str]]:
    """``["sas_eta=0.3,0.5"]`` → ``{"sas_eta": ["0.3", "0.5"]}``; values holding commas are separated by ``;``."""
    from hiresdiff.config import parse_assignments

    sweeps: dict[str, list[str]] = {}
    for item in items:
        ((name, raw),) = parse_assignments([item]).items()
        require(name not in sweeps, f"--sweep {name} is given twice; list all its values in one --sweep")
        values = [v.strip() for v in raw.split(";" if ";" in raw else ",")]
        require(bool(raw) and all(values), f"--sweep {name}: expected name=v1,v2,… (v1;v2;… when values hold commas)")
        sweeps[name] = list(dict.fromkeys(values))
    return sweeps


def _check_names(methods: list[str], fixed: dict[str, str], sweeps: dict[str, list[str]]) -> None:
    """Every ``--set``/``--sweep`` name is settable, given once, and taken by at least one method."""
    for option, names in (("--set", fixed), ("--sweep", sweeps)):
        for name in names:
            require(name not in RESERVED, f"{option} {name}: set {name} with the bench options, not {option}")
            require(
                any(accepts(m, name) for m in methods),
                f"{option} {name}: none of the methods ({', '.join(methods)}) has a parameter {name!r}; "
                "see `hiresdiff methods`",
            )
    both = sorted(set(fixed) & set(sweeps))
    require(not both, f"{', '.join(both)} is given with both --set and --sweep; keep one")


def build_plan(
    model: str,
    methods: str,
    sizes: str,
    seeds: str,
    prompts: list[Prompt],
    *,
    sweeps: dict[str, list[str]],
    fixed: dict[str, str],
    settings: dict[str, Any],
    dtype: str | None = None,
    paper: bool = False,
    allow_pickle: bool = False,
) -> BenchPlan:
    """Expand and validate the whole matrix with the model's native size and grid (no weights are read).

    Raises :class:`~hiresdiff.errors.HiresError` naming the first group that cannot run.
    """
    from hiresdiff.models.loading import resolve_model
    from hiresdiff.pipeline import build_request, check_for_model, resolve_dtype

    spec = resolve_model(model, allow_pickle=allow_pickle)
    if dtype is not None:
        resolve_dtype(dtype)
    require(bool(prompts), "the prompt set is empty")
    choices = list(dict.fromkeys(parse_methods(methods)))
    _check_names([m for m, _ in choices], fixed, sweeps)
    size_list, seed_list = parse_sizes(sizes, spec.native_size), parse_seeds(seeds)
    groups = []
    for method, preset in choices:
        names = [n for n in sweeps if accepts(method, n)]
        for values in itertools.product(*(sweeps[n] for n in names)):
            groups.extend(Group(method, preset, size, tuple(zip(names, values, strict=True))) for size in size_list)
    plan = BenchPlan(model, dtype, paper, settings, fixed, sweeps, seed_list, prompts, groups, spec.sampling_defaults)
    for group in groups:
        try:
            size = group.size
            req = build_request("validation", group.method, size.width, size.height, **plan.request_kwargs(group))
            check_for_model(req, spec.native_size, spec.pixel_grid)
        except HiresError as exc:
            raise HiresError(f"{group.label} at {group.size.pixels}: {exc}") from None
    return plan
