"""The page's "advanced" panel, derived from each method's parameter dataclass — no page code per parameter.

For every field: its name, default, kind (switch, integer, number, text), the help text the class docstring
gives it (the ``name``: … clause), and for numbers the range its own checks accept, found by probing the dataclass
with values at the edges (so a new check shows up as a new bound).
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from dataclasses import dataclass
from typing import Any

from hiresdiff.config import _field_type
from hiresdiff.errors import HiresError
from hiresdiff.methods import Method


@dataclass(frozen=True)
class FieldSpec:
    """One parameter of a method as the page shows it."""

    method: str
    name: str
    kind: str  # "bool", "int", "float" or "text"
    default: Any
    help: str
    minimum: float | None = None
    maximum: float | None = None

    @property
    def elem_id(self) -> str:
        return f"param-{self.method}-{self.name}"

    def text_default(self) -> str:
        """The default as the text box shows it (``none``, comma lists)."""
        if self.default is None:
            return "none"
        if isinstance(self.default, tuple):
            return ",".join(str(v) for v in self.default)
        return str(self.default)


def _accepts(cls: type, name: str, value: Any) -> bool:
    try:
        cls(**{name: value})
    except (HiresError, ValueError, TypeError):
        return False
    return True


def _range(cls: type, name: str, kind: str) -> tuple[float | None, float | None]:
    """The bounds the dataclass's own checks put on a number: lower 0 (or the smallest step above it), upper 1."""
    step = 1 if kind == "int" else 1e-6
    low: float | None = None
    if not _accepts(cls, name, -1 if kind == "int" else -1.0):
        low = 0 if _accepts(cls, name, 0 if kind == "int" else 0.0) else step
    high = 1.0 if kind == "float" and _accepts(cls, name, 1.0) and not _accepts(cls, name, 1.0 + 1e-6) else None
    return low, high


def _clause(text: str) -> str:
    """``text`` up to the first ``;`` or sentence end outside parentheses."""
    depth = 0
    for i, ch in enumerate(text):
        depth += (ch == "(") - (ch == ")")
        if depth <= 0 and (ch == ";" or (ch == "." and (i + 1 == len(text) or text[i + 1] == " "))):
            return text[:i]
    return text


def _help(cls: type, name: str) -> str:
    """The docstring clause about ``name`` (the class's or a base's): from its ``name`` mention to the next ``;``
    or sentence end outside parentheses."""
    for klass in cls.__mro__:
        text = " ".join((klass.__dict__.get("__doc__") or "").split())
        at = text.find(f"``{name}``")
        if at >= 0:
            clause = _clause(text[at + len(name) + 4 :])
            clause = re.sub(r"^(\s*(/|,|and)\s*``[^`]+``)*\s*:?\s*", "", clause).strip()
            return clause.replace("``", "")
    return ""


def method_fields(method: Method) -> list[FieldSpec]:
    """The page fields of ``method``'s parameters, in declaration order."""
    cls = method.params
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        base, optional = _field_type(hints[f.name])
        kind = {bool: "bool", int: "int", float: "float"}.get(base, "text") if not optional else "text"
        default = f.default if f.default is not dataclasses.MISSING else None
        low, high = _range(cls, f.name, kind) if kind in ("int", "float") else (None, None)
        out.append(FieldSpec(method.name, f.name, kind, default, _help(cls, f.name), low, high))
    return out


def changed_values(fields: list[FieldSpec], values: list[Any]) -> dict[str, str]:
    """``--set`` strings of the fields whose value differs from the default (unchanged ones leave presets alone)."""
    out = {}
    for spec, value in zip(fields, values, strict=True):
        if spec.kind == "text":
            text = str(value if value is not None else "").strip()
            if text != spec.text_default() and not (text == "" and spec.default is None):
                out[spec.name] = text
        elif spec.kind == "bool":
            if bool(value) != bool(spec.default):
                out[spec.name] = "true" if value else "false"
        elif value is not None and not (isinstance(value, float) and math.isnan(value)) and value != spec.default:
            out[spec.name] = str(int(value)) if spec.kind == "int" else repr(float(value))
    return out
