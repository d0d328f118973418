"""Tiny SD 1.x / SDXL / FLUX models that both diffusers and ComfyUI can build, with the same weights (test fixtures).

ComfyUI's model detection accepts only the real architectures and its UNet hard-codes 32-group GroupNorm (and,
for SDXL, 64-channel attention heads), so hiresdiff's ``tiny-*`` models cannot be loaded by it. These twins are
built twice instead: a seeded diffusers ``UNet2DConditionModel`` (channels multiples of 32) and ComfyUI's own
``BaseModel`` from the matching ``unet_config`` (``comfy.supported_models.SD15``/``SDXL``), its weights the
diffusers ones renamed with ``comfy.utils.unet_to_diffusers``. ComfyUI is imported from the checkout named by
``$HIRESDIFF_COMFYUI`` (or an importable ``comfy``); without it the tests that use these twins are skipped, unless
``HIRESDIFF_REQUIRE_COMFYUI=1`` makes that a failure (as in CI).

The FLUX twin is a seeded diffusers ``FluxTransformer2DModel`` of one double and one single block that ComfyUI loads
as its loaders load any diffusers FLUX file (``comfy.sd.load_diffusion_model_state_dict``: key conversion and model
detection from the weights). ComfyUI's FLUX detection fixes the RoPE axes (16, 56, 56) and so 128-channel heads;
one head and narrow text/pooled widths keep it at about 1.2 M parameters.
"""

from __future__ import annotations

import importlib
import os
import sys
from types import SimpleNamespace
from typing import Any

import pytest
import torch

#: the twins' latent side (their "native" resolution is 8× this in pixels)
LATENT = 16
NATIVE = LATENT * 8
SDXL_POOLED = 32
#: widths of the FLUX twin's T5 sequence and pooled CLIP conditioning
FLUX_TEXT = 32
FLUX_POOLED = 32


def comfy() -> Any:
    """ComfyUI's ``comfy`` package set up for the CPU (skipped or failed when there is none, as above)."""
    if "comfy.model_management" in sys.modules:
        return sys.modules["comfy"]
    where = os.environ.get("HIRESDIFF_COMFYUI")
    if where and where not in sys.path:
        sys.path.insert(0, where)
    argv = sys.argv
    try:
        import comfy.options

        comfy.options.enable_args_parsing()
        sys.argv = ["hiresdiff-tests", "--cpu"]  # ComfyUI parses its command line when first imported
        import comfy.latent_formats
        import comfy.model_management
        import comfy.model_patcher
        import comfy.sd
        import comfy.supported_models
        import comfy.utils
    except ImportError as error:
        if os.environ.get("HIRESDIFF_REQUIRE_COMFYUI") == "1":
            raise
        pytest.skip(f"ComfyUI is not importable (set HIRESDIFF_COMFYUI to a checkout): {error}")
    finally:
        sys.argv = argv
    return sys.modules["comfy"]


def _unet_configs(family: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(diffusers UNet config, ComfyUI ``unet_config``) of the tiny twin of ``family``."""
    common = {"use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
              "in_channels": 4, "out_channels": 4, "num_res_blocks": [1, 1], "channel_mult": [1, 2],
              "transformer_depth_middle": 1, "use_temporal_resblock": False,
              "use_temporal_attention": False}  # fmt: skip
    if family == "sd":
        diffusers = {"block_out_channels": (32, 64), "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
                     "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"), "cross_attention_dim": 32,
                     "attention_head_dim": 8}  # fmt: skip
        comfy_cfg = {**common, "adm_in_channels": None, "model_channels": 32, "transformer_depth": [1, 0],
                     "transformer_depth_output": [1, 1, 0, 0], "use_linear_in_transformer": False,
                     "context_dim": 32}  # fmt: skip
    else:  # SDXL: size conditioning through 256-wide sinusoidal embeddings, 64-channel heads
        adm = SDXL_POOLED + 6 * 256
        diffusers = {"block_out_channels": (64, 128), "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
                     "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"), "cross_attention_dim": 64,
                     "attention_head_dim": (1, 2), "use_linear_projection": True, "addition_embed_type": "text_time",
                     "addition_time_embed_dim": 256, "projection_class_embeddings_input_dim": adm}  # fmt: skip
        comfy_cfg = {**common, "num_classes": "sequential", "adm_in_channels": adm, "model_channels": 64,
                     "transformer_depth": [0, 1], "transformer_depth_output": [0, 0, 1, 1],
                     "use_linear_in_transformer": True, "context_dim": 64}  # fmt: skip
    diffusers = {**diffusers, "sample_size": LATENT, "in_channels": 4, "out_channels": 4, "layers_per_block": 1,
                 "norm_num_groups": 32}  # fmt: skip
    return diffusers, comfy_cfg


def twin(family: str, seed: int = 0) -> SimpleNamespace:
    """The twins of ``family`` (``sd`` or ``sdxl``): ``unet`` (diffusers), ``model`` (ComfyUI ``BaseModel``),
    ``patcher`` (its ``ModelPatcher``, on the CPU), ``context``/``pooled`` sizes of their conditioning."""
    c = comfy()
    from diffusers import UNet2DConditionModel

    d_cfg, c_cfg = _unet_configs(family)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**d_cfg).eval()
    with torch.no_grad():  # random weights large enough that every block matters
        for p in unet.parameters():
            p.normal_(0.0, 0.05)
    config = (c.supported_models.SD15 if family == "sd" else c.supported_models.SDXL)(c_cfg)
    model = config.get_model({})
    names = c.utils.unet_to_diffusers(c_cfg)
    weights = unet.state_dict()
    assert set(weights) <= set(names), sorted(set(weights) - set(names))[:3]
    model.diffusion_model.load_state_dict({names[k]: v for k, v in weights.items()}, strict=True)
    cpu = torch.device("cpu")
    patcher = c.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)
    context = int(c_cfg["context_dim"])
    return SimpleNamespace(unet=unet, model=model, patcher=patcher, context=context, family=family)


def sd_vae(scaling_factor: float, seed: int = 0, flux: bool = False) -> tuple[Any, Any]:
    """An SD VAE with random weights as (diffusers ``AutoencoderKL``, ComfyUI ``VAE``) — ComfyUI's VAE has the
    real channel widths (128 … 512), so this one is full width; ``scaling_factor``: the latent format's.
    ``flux``: FLUX.1's VAE instead (16 latent channels, no quant convs, FLUX's shift factor)."""
    c = comfy()
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    kind: dict[str, Any] = {"latent_channels": 4}
    if flux:
        shift = float(c.latent_formats.Flux().shift_factor)
        kind = {"latent_channels": 16, "use_quant_conv": False, "use_post_quant_conv": False, "shift_factor": shift}
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        norm_num_groups=32,
        sample_size=NATIVE,
        scaling_factor=scaling_factor,
        **kind,
    ).eval()
    return vae, c.sd.VAE(sd={k: v.clone() for k, v in vae.state_dict().items()})


def flux_twin(guidance: bool = True, seed: int = 0) -> SimpleNamespace:
    """The FLUX twins (module docstring): ``transformer`` (diffusers), ``patcher`` (ComfyUI's ``ModelPatcher`` of
    the model its loader detects: ``Flux`` — dev — with a guidance embedding, ``FluxSchnell`` without), ``model``;
    float32 on the CPU."""
    c = comfy()
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=128,
        num_attention_heads=1,
        joint_attention_dim=FLUX_TEXT,
        pooled_projection_dim=FLUX_POOLED,
        guidance_embeds=guidance,
        axes_dims_rope=(16, 56, 56),
    ).eval()
    with torch.no_grad():  # random weights large enough that every block matters; RMS norms about 1
        for name, p in transformer.named_parameters():
            p.normal_(1.0 if name.endswith(("norm_q.weight", "norm_k.weight")) or "norm_added" in name else 0.0, 0.05)
    weights = {k: v.clone() for k, v in transformer.state_dict().items()}
    patcher = c.sd.load_diffusion_model_state_dict(weights, model_options={"dtype": torch.float32})
    assert patcher is not None, "ComfyUI did not recognise the FLUX twin"
    return SimpleNamespace(transformer=transformer, model=patcher.model, patcher=patcher, family="flux")


def _hint_names(net: Any) -> dict[str, str]:
    """diffusers ControlNet names → ComfyUI's (``cldm``) for the parts a UNet has not: the condition embedding
    (``input_hint_block``: convolutions at even indices, SiLU between), the zero convolutions of the down
    blocks (``zero_convs.i.0``) and of the middle block (``middle_block_out.0``)."""
    embedding = net.controlnet_cond_embedding
    convs = ["conv_in", *(f"blocks.{i}" for i in range(len(embedding.blocks))), "conv_out"]
    names = {f"controlnet_cond_embedding.{c}": f"input_hint_block.{2 * i}" for i, c in enumerate(convs)}
    names.update({f"controlnet_down_blocks.{i}": f"zero_convs.{i}.0" for i in range(len(net.controlnet_down_blocks))})
    names["controlnet_mid_block"] = "middle_block_out.0"
    return {f"{d}.{p}": f"{c}.{p}" for d, c in names.items() for p in ("weight", "bias")}


def controlnet_twin(tw: SimpleNamespace, seed: int = 1) -> SimpleNamespace:
    """A ControlNet of the twin ``tw``'s UNet, built twice with the same seeded weights: ``net`` (diffusers
    ``ControlNetModel``) and ``comfy`` (ComfyUI's ``ControlNet`` over its ``cldm`` network, as its ControlNet Loader
    makes one). The zero convolutions get random weights too, so the residuals matter."""
    c = comfy()
    from diffusers import ControlNetModel

    cldm, control, ops = (importlib.import_module(f"comfy.{m}") for m in ("cldm.cldm", "controlnet", "ops"))

    net = ControlNetModel.from_unet(tw.unet).eval()
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0.0, 0.05)
    _, c_cfg = _unet_configs(tw.family)
    config = dict((c.supported_models.SD15 if tw.family == "sd" else c.supported_models.SDXL)(c_cfg).unet_config)
    config.pop("out_channels")
    cpu = torch.device("cpu")
    model = cldm.ControlNet(
        hint_channels=3, **config, device=cpu, dtype=torch.float32, operations=ops.disable_weight_init
    )
    names = {**c.utils.unet_to_diffusers(c_cfg), **_hint_names(net)}
    weights = net.state_dict()
    assert set(weights) <= set(names), sorted(set(weights) - set(names))[:3]
    model.load_state_dict({names[k]: v for k, v in weights.items()}, strict=True)
    return SimpleNamespace(net=net, comfy=control.ControlNet(model, load_device=cpu))
