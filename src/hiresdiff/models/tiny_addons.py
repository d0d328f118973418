"""Tiny offline ControlNets and LoRAs for the tiny built-in models (tests, the README's examples, trying things out).

They have the real file layouts — a ``ControlNetModel`` folder saved with ``save_pretrained`` and a LoRA
``.safetensors`` saved with diffusers' ``save_lora_weights`` — so they go through the same loading path as real
ones. Their weights are random (seeded): the pictures they steer are noise, like the tiny models' own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from hiresdiff.errors import require
from hiresdiff.models.tiny import BUILTIN_MODELS, build_builtin_unet

#: attention projections the tiny LoRAs adapt
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
#: LoRA rank of the tiny LoRAs
LORA_RANK = 4
#: standard deviation of the tiny ControlNet's zero convolutions (made non-zero so that it steers the output)
CONTROL_INIT_STD = 0.05


def tiny_controlnet(unet: Any, seed: int = 0) -> Any:
    """A ControlNet copied from ``unet`` (``ControlNetModel.from_unet``) with seeded non-zero zero-convolutions."""
    from diffusers import ControlNetModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 8, 8, 8))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for block in [*net.controlnet_down_blocks, net.controlnet_mid_block]:
            for p in block.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * CONTROL_INIT_STD)
    return net.eval()


def save_tiny_lora(model: str, folder: Path, seed: int = 0) -> Path:
    """A LoRA (rank :data:`LORA_RANK`, seeded random matrices) for the UNet of built-in ``model``, saved as
    ``folder/pytorch_lora_weights.safetensors``."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = build_builtin_unet(model)
    config = LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, target_modules=list(LORA_TARGETS), init_lora_weights=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet.add_adapter(config)
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    cls = StableDiffusionXLPipeline if BUILTIN_MODELS[model].family == "sdxl" else StableDiffusionPipeline
    folder.mkdir(parents=True, exist_ok=True)
    cls.save_lora_weights(str(folder), unet_lora_layers=layers, safe_serialization=True)
    return folder / "pytorch_lora_weights.safetensors"


def save_tiny_addons(model: str, out: Path, seed: int = 0) -> tuple[Path, ...]:
    """``out/controlnet`` (a ControlNet folder) and ``out/lora/pytorch_lora_weights.safetensors`` for ``model``;
    for tiny-sdxl also ``out/controlnet-canny``, a ControlNet that counts as canny-type by its name (accdiffusion-v2
    feeds it edge maps; random weights have no type), with another seed."""
    require(
        model in BUILTIN_MODELS and BUILTIN_MODELS[model].family != "flux" and model.startswith("tiny-"),
        f"tiny ControlNets and LoRAs are made for tiny-sd and tiny-sdxl, not {model!r}",
    )
    controlnet = out / "controlnet"
    unet = build_builtin_unet(model)
    tiny_controlnet(unet, seed).save_pretrained(controlnet)
    paths = (controlnet, save_tiny_lora(model, out / "lora", seed + 1))
    if BUILTIN_MODELS[model].family == "sdxl":
        tiny_controlnet(unet, seed + 2).save_pretrained(out / "controlnet-canny")
        paths += (out / "controlnet-canny",)
    return paths


#: shape of the tiny SR model: ×4 (two upsampling convs), like ESRGAN/BSRGAN, with few features and one block
TINY_UPSCALER = {"features": 8, "growth": 32, "blocks": 1, "ups": 2}  # spandrel assumes ESRGAN's growth of 32
#: gain on the tiny SR model's last conv, so that its random outputs spread over [0, 1] instead of clamping
TINY_UPSCALER_GAIN = 8.0


def save_tiny_upscaler(path: Path, seed: int = 0) -> Path:
    """A ×4 RRDBNet (ESRGAN) with seeded random weights, saved in BasicSR's ESRGAN key layout (``conv_first``,
    ``body.N.rdbK.convJ``, ``conv_body``, ``conv_up1/2``, ``conv_hr``, ``conv_last``) that spandrel detects."""
    from safetensors.torch import save_file

    from hiresdiff.models.rrdbnet import RRDBNet

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = RRDBNet(3, 3, **TINY_UPSCALER)
    with torch.no_grad():  # default init gives outputs ≈ −0.06 ± 0.03, all clamped to black: spread around grey
        net.conv_last.weight.mul_(TINY_UPSCALER_GAIN)
        net.conv_last.bias.fill_(0.5)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return path
