"""Built-in Stable Diffusion / SDXL pipelines with random weights, built without any download.

Two kinds of built-in models exist:

* ``tiny-sd`` and ``tiny-sdxl``: miniature models that keep the *structure* of SD 1.x and SDXL (VAE factor 8,
  cross-attention at two resolutions, SDXL's two text encoders and ``text_time`` conditioning) so that every
  code path of hiresdiff runs on a CPU in milliseconds.
* ``random-sd15`` and ``random-sdxl``: the full-size architectures with random weights, for memory and speed
  measurements without the real checkpoints (they can be built on the ``meta`` device to count parameters).

Weights are deterministic: every module is constructed on the CPU inside :func:`torch.random.fork_rng` after
seeding the CPU generator with 0 (what ``torch.manual_seed(0)`` does for the CPU, without reseeding CUDA), so the
same model is rebuilt bit-identically in every process, on every device, without disturbing the caller's random
state. All text encoders use the offline byte-level tokenizer of
:mod:`hiresdiff.models.tokenizer` (ids 0–513; ``eos_token_id`` 1 so that pooled outputs are read at the first
``<|endoftext|>``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from hiresdiff.errors import HiresError
from hiresdiff.models.tokenizer import BOS_TOKEN, EOS_TOKEN, byte_level_clip_tokenizer

_M = TypeVar("_M", bound=torch.nn.Module)

SEED = 0
"""Seed used for every built-in model's weights."""


@dataclass(frozen=True)
class BuiltinInfo:
    """What is known about a built-in model without building it.

    Attributes:
        family: ``"sd"`` (SD 1.x-like, one text encoder) or ``"sdxl"`` (two text encoders, ``text_time``).
        native_size: Training resolution in pixels (UNet ``sample_size`` × ``vae_scale_factor``).
        vae_scale_factor: Pixels per latent cell along each side.
        description: One line for listings.
    """

    family: Literal["sd", "sdxl"]
    native_size: int
    vae_scale_factor: int
    description: str


BUILTIN_MODELS: dict[str, BuiltinInfo] = {
    "tiny-sd": BuiltinInfo("sd", 128, 8, "tiny random SD 1.x-like pipeline for tests (native 128 px)"),
    "tiny-sdxl": BuiltinInfo("sdxl", 256, 8, "tiny random SDXL-like pipeline for tests (native 256 px)"),
    "random-sd15": BuiltinInfo("sd", 512, 8, "full-size SD 1.5 architecture with random weights (0.86 B UNet)"),
    "random-sdxl": BuiltinInfo("sdxl", 1024, 8, "full-size SDXL architecture with random weights (2.57 B UNet)"),
}


def make_scheduler() -> EulerDiscreteScheduler:
    """Return the Euler scheduler every built-in model uses (SDXL's default configuration)."""
    return EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        timestep_spacing="leading",
        steps_offset=1,
        prediction_type="epsilon",
    )


def _clip_text_config(
    *,
    hidden_size: int,
    num_hidden_layers: int,
    num_attention_heads: int,
    intermediate_size: int,
    hidden_act: str,
    projection_dim: int,
    vocab_size: int,
) -> CLIPTextConfig:
    """CLIP text config whose special-token ids match the byte-level tokenizer."""
    vocab = byte_level_clip_tokenizer().get_vocab()
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        projection_dim=projection_dim,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        max_position_embeddings=77,
        hidden_act=hidden_act,
        layer_norm_eps=1e-5,
        bos_token_id=vocab[BOS_TOKEN],
        eos_token_id=vocab[EOS_TOKEN],
        pad_token_id=vocab[EOS_TOKEN],
    )


# ----------------------------------------------------------------------------------------------- configs
# Module configs as plain dicts so they can be inspected (and counted on the meta device) without building.

TINY_SD_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [8, 16, 16, 16],
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "latent_channels": 4,
    "sample_size": 128,
    "scaling_factor": 0.18215,
    "mid_block_add_attention": True,
}

TINY_SD_UNET: dict[str, Any] = {
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [16, 32],
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "cross_attention_dim": 32,
    # diffusers' historical naming: this is the number of heads (head dims 8 and 16).
    "attention_head_dim": 2,
}

TINY_SD_TEXT: dict[str, Any] = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 64,
    "hidden_act": "quick_gelu",
    "projection_dim": 32,
    "vocab_size": 514,
}

TINY_SDXL_VAE: dict[str, Any] = {
    **TINY_SD_VAE,
    "sample_size": 256,
    "scaling_factor": 0.13025,
    "force_upcast": False,
}

TINY_SDXL_TEXT: dict[str, Any] = {**TINY_SD_TEXT}
TINY_SDXL_TEXT_2: dict[str, Any] = {**TINY_SD_TEXT, "hidden_act": "gelu"}

TINY_SDXL_UNET: dict[str, Any] = {
    "sample_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [8, 16, 32],
    "layers_per_block": 1,
    "transformer_layers_per_block": [1, 1, 1],
    "norm_num_groups": 8,
    # Number of heads per block (diffusers' naming): head dim 16 where attention runs.
    "attention_head_dim": [1, 1, 2],
    "use_linear_projection": True,
    "cross_attention_dim": TINY_SDXL_TEXT["hidden_size"] + TINY_SDXL_TEXT_2["hidden_size"],
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 6 * 8 + TINY_SDXL_TEXT_2["projection_dim"],
}

SD15_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "latent_channels": 4,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}

SD15_UNET: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}

CLIP_L_TEXT: dict[str, Any] = {
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
    "vocab_size": 49408,
}

OPENCLIP_BIGG_TEXT: dict[str, Any] = {
    "hidden_size": 1280,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "intermediate_size": 5120,
    "hidden_act": "gelu",
    "projection_dim": 1280,
    "vocab_size": 49408,
}

SDXL_VAE: dict[str, Any] = {
    **SD15_VAE,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
    "force_upcast": True,
}

SDXL_UNET: dict[str, Any] = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [320, 640, 1280],
    "layers_per_block": 2,
    "transformer_layers_per_block": [1, 2, 10],
    "norm_num_groups": 32,
    "attention_head_dim": [5, 10, 20],
    "use_linear_projection": True,
    "cross_attention_dim": CLIP_L_TEXT["hidden_size"] + OPENCLIP_BIGG_TEXT["hidden_size"],
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 6 * 256 + OPENCLIP_BIGG_TEXT["projection_dim"],
}

_CONFIGS: dict[str, dict[str, dict[str, Any]]] = {
    "tiny-sd": {"vae": TINY_SD_VAE, "unet": TINY_SD_UNET, "text": TINY_SD_TEXT},
    "tiny-sdxl": {"vae": TINY_SDXL_VAE, "unet": TINY_SDXL_UNET, "text": TINY_SDXL_TEXT, "text_2": TINY_SDXL_TEXT_2},
    "random-sd15": {"vae": SD15_VAE, "unet": SD15_UNET, "text": CLIP_L_TEXT},
    "random-sdxl": {"vae": SDXL_VAE, "unet": SDXL_UNET, "text": CLIP_L_TEXT, "text_2": OPENCLIP_BIGG_TEXT},
}


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Temporarily make ``dtype`` the default floating dtype, so parameters are created in it directly."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _cast(module: _M, dtype: torch.dtype) -> _M:
    """Cast floating parameters to ``dtype`` (a no-op when they already are).

    Uses :meth:`torch.nn.Module.to` directly: diffusers' ``ModelMixin.to`` logs a misleading "should be kept in
    float32: []" warning on every dtype cast, even for an empty list of such modules.
    """
    if any(p.is_floating_point() and p.dtype != dtype for p in module.parameters()):
        torch.nn.Module.to(module, dtype)
    return module


def _check_name(name: str) -> BuiltinInfo:
    if name not in BUILTIN_MODELS:
        known = ", ".join(BUILTIN_MODELS)
        raise HiresError(f"unknown built-in model {name!r}; built-in models are: {known}")
    return BUILTIN_MODELS[name]


def build_builtin_unet(
    name: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> UNet2DConditionModel:
    """Build only the UNet of built-in model ``name`` (same weights as in :func:`build_builtin`).

    Building on ``device="meta"`` allocates no memory, which makes parameter counting of the full-size
    architectures instant. Other devices get the CPU-initialised weights moved there.
    """
    _check_name(name)
    with _seeded():
        unet = _make_unet(name, dtype, _build_device(device))
    return unet if _build_device(device) == torch.device(device) else unet.to(device)


@contextlib.contextmanager
def _seeded() -> Iterator[None]:
    """Run with the CPU generator seeded to :data:`SEED`, restoring the caller's CPU random state afterwards.

    Only the CPU generator is touched: ``torch.manual_seed`` would also reseed every CUDA generator, which
    ``fork_rng(devices=[])`` does not restore.
    """
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(SEED)
        yield


def _build_device(device: str | torch.device) -> torch.device:
    """Modules are initialised on the CPU (or shape-only on ``meta``) so weights never depend on the device."""
    return torch.device("meta") if torch.device(device).type == "meta" else torch.device("cpu")


def _make_unet(name: str, dtype: torch.dtype, device: str | torch.device) -> UNet2DConditionModel:
    unet_config = _CONFIGS[name]["unet"]
    if name.startswith("tiny-"):
        # Tiny models are built in float32 and cast, so every dtype holds the same (rounded) weights.
        with torch.device(device):
            return _cast(UNet2DConditionModel(**unet_config), dtype).eval()
    with torch.device(device), _default_dtype(dtype):
        return UNet2DConditionModel(**unet_config).eval()


def _make(name: str, kind: str, dtype: torch.dtype, device: str | torch.device) -> Any:
    """Construct one non-UNet component of ``name`` in ``dtype`` on ``device``."""
    config = _CONFIGS[name][kind]
    tiny = name.startswith("tiny-")
    build_dtype = torch.float32 if tiny else dtype
    with torch.device(device), _default_dtype(build_dtype):
        if kind == "vae":
            module: torch.nn.Module = AutoencoderKL(**config)
        elif kind == "text":
            module = CLIPTextModel(_clip_text_config(**config))
        else:
            module = CLIPTextModelWithProjection(_clip_text_config(**config))
    return _cast(module, dtype).eval()


def build_builtin(
    name: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> StableDiffusionPipeline | StableDiffusionXLPipeline:
    """Build the built-in pipeline ``name`` with deterministic random weights, without any download.

    Args:
        name: One of :data:`BUILTIN_MODELS` (``tiny-sd``, ``tiny-sdxl``, ``random-sd15``, ``random-sdxl``).
        dtype: Parameter dtype. Tiny models are built in float32 and cast; full-size ones are created directly in
            ``dtype`` (so a float16 ``random-sdxl`` never holds a float32 copy).
        device: Where the pipeline ends up. Weights are always initialised on the CPU and then moved, so they
            are identical on every device; ``"meta"`` builds shapes only (no memory, no weights).

    Returns:
        A :class:`StableDiffusionPipeline` (family ``sd``) or :class:`StableDiffusionXLPipeline` (``sdxl``)
        with the byte-level tokenizer(s), an Euler scheduler, no safety checker and no watermarker.

    Raises:
        HiresError: ``name`` is not a built-in model.
    """
    info = _check_name(name)
    build_device = _build_device(device)
    with _seeded():
        unet = _make_unet(name, dtype, build_device)
        vae = _make(name, "vae", dtype, build_device)
        text_encoder = _make(name, "text", dtype, build_device)
        text_encoder_2 = _make(name, "text_2", dtype, build_device) if info.family == "sdxl" else None
    pipe = _assemble(info, unet, vae, text_encoder, text_encoder_2)
    return pipe if build_device == torch.device(device) else pipe.to(device)


def _assemble(
    info: BuiltinInfo,
    unet: UNet2DConditionModel,
    vae: AutoencoderKL,
    text_encoder: CLIPTextModel,
    text_encoder_2: CLIPTextModelWithProjection | None,
) -> StableDiffusionPipeline | StableDiffusionXLPipeline:
    """Wrap built modules into the pipeline of ``info.family`` with tokenizers and scheduler."""
    if info.family == "sd":
        return StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=byte_level_clip_tokenizer(),
            unet=unet,
            scheduler=make_scheduler(),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=byte_level_clip_tokenizer(),
        tokenizer_2=byte_level_clip_tokenizer(),
        unet=unet,
        scheduler=make_scheduler(),
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
