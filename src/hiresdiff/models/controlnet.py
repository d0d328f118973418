"""ControlNet references: resolved cheaply (configs only) before any model work, loaded once per pipeline.

Accepted: a local diffusers ``ControlNetModel`` folder (``config.json`` plus ``diffusion_pytorch_model.safetensors``,
saved with ``save_pretrained``) or a hub id ``owner/name`` (from the local cache when offline). Weights load as
safetensors unless the caller allows pickled ``.bin`` files. SD 1.x/2.x and SDXL UNets only: diffusers' FLUX
ControlNets drive the transformer through a different interface, which the FLUX adapter does not wire.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hiresdiff.errors import HiresError, require
from hiresdiff.models.loading import _HUB_ID, _hub_config, _read_json, hub_offline

CONTROLNET_CLASS = "ControlNetModel"
WEIGHTS_SAFETENSORS = "diffusion_pytorch_model.safetensors"
WEIGHTS_PICKLE = "diffusion_pytorch_model.bin"


@dataclass(frozen=True)
class ControlNetSpec:
    """A usable ControlNet reference: what the user typed, the local folder (``None`` for a hub id), its config.
    ``named``: ``ref``/``path`` name the weights (false for a ControlNet a host loaded and handed over without its
    file name, ComfyUI's ``CONTROL_NET``: its config is read off the network, its kind cannot be read off a name)."""

    ref: str
    path: str | None
    config: dict[str, Any]
    named: bool = True

    @property
    def cross_attention_dim(self) -> int | None:
        value = self.config.get("cross_attention_dim")
        return int(value) if isinstance(value, int) else None


def resolve_controlnet(ref: str | os.PathLike[str], *, allow_pickle: bool = False) -> ControlNetSpec:
    """Check ``ref`` names a ControlNet without loading weights; one actionable line when it does not."""
    require(
        isinstance(ref, (str, os.PathLike)),
        f"controlnet must be a ControlNet folder or hub id (a string), got {ref!r} ({type(ref).__name__})",
    )
    ref = os.fspath(ref)
    require(isinstance(ref, str) and bool(ref.strip()), "--controlnet needs a diffusers ControlNet folder or hub id")
    path = Path(ref).expanduser()
    if path.is_dir():
        file = path / "config.json"
        require(file.is_file(), f"ControlNet folder {ref!r} has no config.json; save it with save_pretrained")
        config = _read_json(file, "ControlNet config.json")
        has_safe, has_pickle = (path / WEIGHTS_SAFETENSORS).is_file(), (path / WEIGHTS_PICKLE).is_file()
        require(
            has_safe or (allow_pickle and has_pickle),
            f"ControlNet folder {ref!r} has no {WEIGHTS_SAFETENSORS}"
            + ("; pass --allow-pickle to load its pickled .bin weights" if has_pickle else ""),
        )
        spec = ControlNetSpec(ref, str(path.resolve()), config)
    elif path.exists():
        raise HiresError(f"--controlnet {ref!r} is a file; pass the diffusers ControlNet folder that holds it")
    elif _HUB_ID.match(ref) and not ref.startswith((".", "/", "~")):
        config = _hub_config(ref, "config.json", hub_offline(), instead="pass --controlnet a local ControlNet folder")
        spec = ControlNetSpec(ref, None, config)
    else:
        raise HiresError(f"--controlnet {ref!r} does not exist; pass a diffusers ControlNet folder or a hub id")
    name = spec.config.get("_class_name")
    require(name == CONTROLNET_CLASS, f"--controlnet {ref!r} is a {name or 'unknown'} model, not a {CONTROLNET_CLASS}")
    return spec


def check_controlnet_fits(spec: ControlNetSpec, text_width: int | None, family: str) -> None:
    """The ControlNet must be made for this UNet (same SDXL conditioning, same text width ``text_width`` where
    known); FLUX is refused. Needs only the model's config, so it runs before any weights load."""
    require(family != "flux", "ControlNet works with SD 1.x/2.x and SDXL models here; FLUX ControlNets are not wired")
    sdxl_net = spec.config.get("addition_embed_type") == "text_time"
    require(
        sdxl_net == (family == "sdxl"),
        f"ControlNet {spec.ref!r} is an {'SDXL' if sdxl_net else 'SD 1.x/2.x'} ControlNet; the model is "
        f"{'SDXL' if family == 'sdxl' else 'SD 1.x/2.x'}: use a ControlNet trained for this model family",
    )
    want, have = text_width, spec.cross_attention_dim
    require(
        have is None or want is None or have == want,
        f"ControlNet {spec.ref!r} is made for text embeddings of width {have}, the model's are {want}: use a "
        f"ControlNet trained for this model",
    )


def load_controlnet(spec: ControlNetSpec, dtype: torch.dtype, device: torch.device, allow_pickle: bool) -> Any:
    """The ControlNet, in eval mode on ``device`` in ``dtype`` (safetensors unless ``allow_pickle``)."""
    from diffusers import ControlNetModel

    try:
        model = ControlNetModel.from_pretrained(
            spec.path or spec.ref, torch_dtype=dtype, use_safetensors=None if allow_pickle else True
        )
    except (OSError, ValueError, RuntimeError) as exc:
        first = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise HiresError(f"cannot load ControlNet {spec.ref!r}: {first[:200]}") from None
    return model.to(device).eval()
