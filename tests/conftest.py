"""Shared test setup: offline hub, two passive CPU threads, tiny built-in pipelines (built once per test module)."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
# idle OpenMP workers sleep instead of spinning: on a shared 2-core machine spinning slows torch down 30×
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest
import torch

torch.set_num_threads(min(2, torch.get_num_threads()))


#: attention projections the offline test LoRAs adapt
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


@pytest.fixture(scope="session")
def make_lora():
    """``make(family, seed, folder) → file``: a LoRA for the tiny ``family`` UNet (``tiny-sd``/``tiny-sdxl``) with
    seeded random (non-zero) matrices, made with peft and saved by diffusers' ``save_lora_weights``."""
    from pathlib import Path

    def make(family: str, seed: int, folder: Path) -> Path:
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft import LoraConfig
        from peft.utils import get_peft_model_state_dict

        from hiresdiff.models.tiny import build_builtin_unet

        unet = build_builtin_unet(family)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=LORA_TARGETS, init_lora_weights=False))
        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
        cls = StableDiffusionXLPipeline if family == "tiny-sdxl" else StableDiffusionPipeline
        folder.mkdir(parents=True, exist_ok=True)
        cls.save_lora_weights(str(folder), unet_lora_layers=layers, safe_serialization=True)
        return folder / "pytorch_lora_weights.safetensors"

    return make


@pytest.fixture(scope="session")
def make_controlnet():
    """``make(unet, seed=0) → ControlNetModel`` copied from ``unet`` (``ControlNetModel.from_unet``) with its zero
    convolutions made non-zero, so that it changes the output."""

    def make(unet, seed: int = 0):
        from diffusers import ControlNetModel

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 8, 8, 8))
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for block in [*net.controlnet_down_blocks, net.controlnet_mid_block]:
                for p in block.parameters():
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        return net.eval()

    return make


@pytest.fixture(scope="module")
def tiny_sdxl_pipe():
    from hiresdiff.models.tiny import build_builtin

    return build_builtin("tiny-sdxl")


@pytest.fixture(scope="module")
def tiny_sd_pipe():
    from hiresdiff.models.tiny import build_builtin

    return build_builtin("tiny-sd")


@pytest.fixture(scope="module")
def tiny_flux():
    from hiresdiff.models.tiny import build_builtin

    return build_builtin("tiny-flux")


@pytest.fixture(scope="module")
def sdxl(tiny_sdxl_pipe):
    """HiresPipeline over tiny-sdxl."""
    from hiresdiff import HiresPipeline

    return HiresPipeline.from_pipe(tiny_sdxl_pipe, "tiny-sdxl")


@pytest.fixture(scope="module")
def sd(tiny_sd_pipe):
    """HiresPipeline over tiny-sd."""
    from hiresdiff import HiresPipeline

    return HiresPipeline.from_pipe(tiny_sd_pipe, "tiny-sd")
