"""ComfyUI's ``CONTROL_NET`` as the run's ControlNet: the spec hiresdiff's checks read, from the network itself.

A ControlNet Loader hands over the network without its file name or a diffusers config, so the spec is read off the
modules: SDXL when its class embedding is the ``sequential`` one of SDXL's size conditioning, the text width from
its cross-attention keys. The residuals themselves come from ComfyUI's own ControlNet call
(:meth:`hiresdiff.comfy.adapter.ComfyAdapter._controlnet_call`).
"""

from __future__ import annotations

from typing import Any

from hiresdiff.errors import require
from hiresdiff.models.controlnet import CONTROLNET_CLASS, ControlNetSpec

#: how a run records a ControlNet that reached it through the node's ``controlnet`` input
COMFY_CONTROLNET = "ComfyUI CONTROL_NET (the node's controlnet input)"


def controlnet_spec(net: Any, ref: str = COMFY_CONTROLNET) -> ControlNetSpec:
    """The :class:`ControlNetSpec` of ComfyUI's ControlNet ``net`` (unnamed: :attr:`ControlNetSpec.named`), recorded
    as ``ref``; one line when ``net`` is not a ControlNet of an SD/SDXL UNet."""
    model = getattr(net, "control_model", None)
    where = "the controlnet input" if ref == COMFY_CONTROLNET else "the conditioning's ControlNet (Apply ControlNet)"
    require(
        model is not None and hasattr(model, "input_hint_block") and hasattr(net, "get_control"),
        f"{where} is not a ControlNet of an SD or SDXL UNet: load one with ComfyUI's ControlNet Loader",
    )
    keys = (m for name, m in model.named_modules() if name.endswith("attn2.to_k"))
    width = next((int(m.in_features) for m in keys), None)
    sdxl = getattr(model, "num_classes", None) == "sequential"
    config = {"_class_name": CONTROLNET_CLASS, "addition_embed_type": "text_time" if sdxl else None}
    if width is not None:
        config["cross_attention_dim"] = width
    return ControlNetSpec(ref, None, config, named=False)
