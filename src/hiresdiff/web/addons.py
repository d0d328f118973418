"""The add-ons a server offers: ControlNets, LoRAs and SR upscalers named on ``hiresdiff serve``'s command line
(``--controlnet``, ``--lora``, ``--upscaler``; each ``[NAME=]PATH``, repeatable). Each is checked against the model
(family, text width) before the model loads, and the page and the HTTP API choose them by name — a browser never
names a path on the server.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hiresdiff.errors import require
from hiresdiff.extras import DEFAULT_CONTROL_SCALE
from hiresdiff.models.lora import DEFAULT_LORA_SCALE

#: the page's add-on inputs, in the order the generate handler receives them after the form
#: (:data:`hiresdiff.web.page.FORM`)
FORM = ("controlnet", "control_image", "control_scale", "loras", "lora_scale", "upscaler")
#: the dropdown entry for "no ControlNet" / "no upscaler"
NONE = "none"
_FLAGS = {"ControlNet": "--controlnet", "LoRA": "--lora", "upscaler": "--upscaler"}


def named(flag: str, items: Sequence[str]) -> dict[str, str]:
    """``[NAME=]PATH`` items as ``{name: path}``; a name defaults to the file's stem (a folder's name)."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name.strip() or "/" in name or "\\" in name:  # an '=' inside a path is no name
            name, path = "", item
        name = name.strip() or (Path(path).stem if Path(path).suffix else Path(path.rstrip("/\\")).name)
        require(bool(path.strip()), f"{flag} {item!r}: give a path, or NAME=PATH")
        require(name != NONE, f"{flag} {item!r}: '{NONE}' is the page's 'no add-on' entry; name it otherwise")
        require(name not in out, f"{flag}: two add-ons are named {name!r}; name them apart with NAME=PATH")
        out[name] = path
    return out


@dataclass(frozen=True)
class AddOns:
    """What a server offers, by name: ControlNet folders or hub ids, LoRA files, SR model files."""

    controlnets: dict[str, str] = field(default_factory=dict)
    loras: dict[str, str] = field(default_factory=dict)
    upscalers: dict[str, str] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.controlnets or self.loras or self.upscalers)

    @classmethod
    def offered(
        cls,
        facts: Any,
        controlnets: Sequence[str] = (),
        loras: Sequence[str] = (),
        upscalers: Sequence[str] = (),
        *,
        allow_pickle: bool = False,
    ) -> AddOns:
        """The add-ons of ``hiresdiff serve``'s flags, each checked against the model's ``facts``
        (:class:`~hiresdiff.pipeline.ModelFacts`) from its config or tensor names — no weights load."""
        from hiresdiff.models.controlnet import check_controlnet_fits, resolve_controlnet
        from hiresdiff.models.lora import check_lora_fits, resolve_lora
        from hiresdiff.models.upscalers import resolve_upscaler

        offer = cls(named("--controlnet", controlnets), named("--lora", loras), named("--upscaler", upscalers))
        if offer.controlnets:
            require(facts.family != "flux", "--controlnet: ControlNets work with SD 1.x/2.x and SDXL models here")
        for path in offer.controlnets.values():
            check_controlnet_fits(resolve_controlnet(path, allow_pickle=allow_pickle), facts.text_width, facts.family)
        for path in offer.loras.values():
            check_lora_fits(resolve_lora(path, allow_pickle=allow_pickle), facts.family)
        for path in offer.upscalers.values():
            resolve_upscaler(path, allow_pickle=allow_pickle)
        return offer

    def kwargs(self, choice: dict[str, Any]) -> dict[str, Any]:
        """The generation keywords (paths) of a page's or API call's ``choice`` of names: ``controlnet``,
        ``control_image``, ``control_scale``, ``loras`` (names), ``lora_scale``, ``upscaler``; absent or empty: none."""
        out: dict[str, Any] = {}
        net = _pick("ControlNet", self.controlnets, choice.get("controlnet"))
        if net is not None:
            out["controlnet"] = net
            if choice.get("control_image") is not None:
                out["control_image"] = choice["control_image"]
            if choice.get("control_scale") is not None:
                out["control_scale"] = choice["control_scale"]
        else:
            require(choice.get("control_image") is None, "a control image needs a ControlNet: choose one first")
            scale = choice.get("control_scale")
            require(
                scale in (None, DEFAULT_CONTROL_SCALE),
                f"a ControlNet scale of {scale} needs a ControlNet: choose one first",
            )
        names = choice.get("loras") or []
        require(
            isinstance(names, (list, tuple)) and all(isinstance(n, str) for n in names),
            f"loras must be a list of names, got {names!r}",
        )
        scale = DEFAULT_LORA_SCALE if choice.get("lora_scale") is None else choice["lora_scale"]
        picked = [path for name in dict.fromkeys(names) if (path := _pick("LoRA", self.loras, name)) is not None]
        require(bool(picked) or scale == DEFAULT_LORA_SCALE, f"a LoRA scale of {scale} needs a LoRA: choose one first")
        if picked:
            out["loras"] = [(path, scale) for path in picked]
        upscaler = _pick("upscaler", self.upscalers, choice.get("upscaler"))
        if upscaler is not None:
            out["upscaler"] = upscaler
        return out


def _pick(kind: str, offered: dict[str, str], name: Any) -> str | None:
    """The path of the add-on called ``name`` (``None``, ``""`` and :data:`NONE`: none), or a one-line refusal."""
    if name is None or name in ("", NONE):
        return None
    require(isinstance(name, str), f"{kind} must be given by name, got {name!r}")
    choices = ", ".join(offered) or "none"
    require(
        name in offered,
        f"{kind} {name!r} is not offered by this server (offered: {choices}; hiresdiff serve {_FLAGS[kind]} adds one)",
    )
    return offered[name]
