"""Built-in Stable Diffusion / SDXL / FLUX pipelines with random weights, built without any download.

Two kinds of built-in models exist:

* ``tiny-sd``, ``tiny-sdxl`` and ``tiny-flux``: miniature models that keep the *structure* of SD 1.x, SDXL and
  FLUX.1-dev (VAE factor 8, cross-attention at two resolutions, SDXL's two text encoders and ``text_time``
  conditioning; FLUX's 16-channel VAE with shift factor, 2×2-packed tokens, double- and single-stream blocks,
  CLIP pooled + T5 sequence conditioning, guidance embedding and flow-matching scheduler with dynamic shift) so
  that every code path of hiresdiff runs on a CPU in milliseconds.
* ``random-sd15``, ``random-sdxl`` and ``random-flux``: the full-size architectures with random weights, for
  memory and speed measurements without the real checkpoints (they can be built on the ``meta`` device to count
  parameters).

Weights are deterministic: every module is constructed on the CPU inside :func:`torch.random.fork_rng` after
seeding the CPU generator with 0 (what ``torch.manual_seed(0)`` does for the CPU, without reseeding CUDA), so the
same model is rebuilt bit-identically in every process, on every device, without disturbing the caller's random
state. All CLIP text encoders use the offline byte-level tokenizer of
:mod:`hiresdiff.models.tokenizer` (ids 0–513; ``eos_token_id`` 1 so that pooled outputs are read at the first
``<|endoftext|>``); FLUX's T5 encoder uses its offline character-level T5 tokenizer.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any, TypeVar

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from hiresdiff.errors import HiresError, require
from hiresdiff.models.builtins import BUILTIN_MODELS, BuiltinInfo
from hiresdiff.models.tokenizer import (
    BOS_TOKEN,
    EOS_TOKEN,
    T5_VOCAB_SIZE,
    byte_level_clip_tokenizer,
    char_level_t5_tokenizer,
)

_M = TypeVar("_M", bound=torch.nn.Module)

SEED = 0
"""Seed used for every built-in model's weights."""


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


#: FLUX.1-dev's scheduler configuration (flow matching, resolution-dependent shift μ between base and max shift)
FLUX_DEV_SCHEDULER: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}


def make_flux_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """Return the flow-matching Euler scheduler with FLUX.1-dev's configuration (:data:`FLUX_DEV_SCHEDULER`)."""
    return FlowMatchEulerDiscreteScheduler(**FLUX_DEV_SCHEDULER)


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


def _t5_config(**config: Any) -> T5Config:
    """T5 encoder config whose special-token ids match the character-level T5 tokenizer (pad 0, ``</s>`` 1)."""
    return T5Config(
        **config,
        is_encoder_decoder=False,
        use_cache=False,
        dropout_rate=0.0,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
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

TINY_FLUX_TEXT: dict[str, Any] = {**TINY_SD_TEXT}

TINY_FLUX_T5: dict[str, Any] = {
    "vocab_size": T5_VOCAB_SIZE,
    "d_model": 32,
    "d_kv": 16,
    "d_ff": 64,
    "num_layers": 2,
    "num_heads": 2,
    "relative_attention_num_buckets": 8,
    "relative_attention_max_distance": 32,
    "feed_forward_proj": "gated-gelu",
    "layer_norm_epsilon": 1e-6,
}

#: T5 sequence length of tiny-flux (FLUX.1 pads its T5 prompt to 512 tokens)
TINY_FLUX_T5_TOKENS = 32

TINY_FLUX_VAE: dict[str, Any] = {
    **TINY_SD_VAE,
    "latent_channels": 16,
    "sample_size": 256,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "force_upcast": False,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}

TINY_FLUX_TRANSFORMER: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 4 * TINY_FLUX_VAE["latent_channels"],
    "num_layers": 1,
    "num_single_layers": 1,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": TINY_FLUX_T5["d_model"],
    "pooled_projection_dim": TINY_FLUX_TEXT["hidden_size"],
    "guidance_embeds": True,
    # RoPE over (text/unused, row, column); the axes must sum to the head dimension.
    "axes_dims_rope": [4, 6, 6],
}

T5_XXL: dict[str, Any] = {
    "vocab_size": 32128,
    "d_model": 4096,
    "d_kv": 64,
    "d_ff": 10240,
    "num_layers": 24,
    "num_heads": 64,
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "feed_forward_proj": "gated-gelu",
    "layer_norm_epsilon": 1e-6,
}

#: T5 sequence length of FLUX.1 (``max_sequence_length`` of diffusers' FluxPipeline)
FLUX_T5_TOKENS = 512

FLUX_VAE: dict[str, Any] = {
    **SD15_VAE,
    "latent_channels": 16,
    "sample_size": 1024,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "force_upcast": True,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}

FLUX_DEV_TRANSFORMER: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": T5_XXL["d_model"],
    "pooled_projection_dim": CLIP_L_TEXT["hidden_size"],
    "guidance_embeds": True,
    "axes_dims_rope": [16, 56, 56],
}

_CONFIGS: dict[str, dict[str, dict[str, Any]]] = {
    "tiny-sd": {"vae": TINY_SD_VAE, "unet": TINY_SD_UNET, "text": TINY_SD_TEXT},
    "tiny-sdxl": {"vae": TINY_SDXL_VAE, "unet": TINY_SDXL_UNET, "text": TINY_SDXL_TEXT, "text_2": TINY_SDXL_TEXT_2},
    "random-sd15": {"vae": SD15_VAE, "unet": SD15_UNET, "text": CLIP_L_TEXT},
    "random-sdxl": {"vae": SDXL_VAE, "unet": SDXL_UNET, "text": CLIP_L_TEXT, "text_2": OPENCLIP_BIGG_TEXT},
    "tiny-flux": {
        "vae": TINY_FLUX_VAE,
        "transformer": TINY_FLUX_TRANSFORMER,
        "text": TINY_FLUX_TEXT,
        "t5": TINY_FLUX_T5,
    },
    "random-flux": {"vae": FLUX_VAE, "transformer": FLUX_DEV_TRANSFORMER, "text": CLIP_L_TEXT, "t5": T5_XXL},
}
#: T5 tokens per prompt of the FLUX built-ins
_T5_TOKENS = {"tiny-flux": TINY_FLUX_T5_TOKENS, "random-flux": FLUX_T5_TOKENS}


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

    Raises:
        HiresError: ``name`` is unknown or a FLUX model (use :func:`build_builtin_denoiser`).
    """
    if _check_name(name).family == "flux":
        raise HiresError(f"built-in model {name!r} has a transformer, not a UNet; use build_builtin_denoiser")
    return build_builtin_denoiser(name, dtype, device)


def build_builtin_denoiser(
    name: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> UNet2DConditionModel | FluxTransformer2DModel:
    """Build only the denoiser (UNet, or FLUX transformer) of built-in ``name``, with the weights of
    :func:`build_builtin`; ``device="meta"`` builds shapes only."""
    _check_name(name)
    build_device = _build_device(name, device)
    with _seeded(build_device):
        model = _make_denoiser(name, dtype, build_device)
    return model if build_device == torch.device(device) else model.to(device)


@contextlib.contextmanager
def _seeded(build: torch.device | None = None) -> Iterator[None]:
    """Run with the generator of the ``build`` device seeded to :data:`SEED` (the CPU's, or one CUDA device's),
    restoring the caller's random state afterwards.

    Only that generator is touched: ``torch.manual_seed`` would also reseed every CUDA generator, which
    ``fork_rng(devices=[])`` does not restore.
    """
    index = None
    if build is not None and build.type == "cuda":
        index = build.index if build.index is not None else torch.cuda.current_device()
    with torch.random.fork_rng(devices=[index] if index is not None else []):
        torch.random.default_generator.manual_seed(SEED)
        if index is not None:
            torch.cuda.default_generators[index].manual_seed(SEED)
        yield


#: ``random-*`` models only: initialise the weights on this device (``cuda``, ``cuda:N``) instead of the CPU. A
#: full-size SDXL takes about 80 s to initialise on a 16-core CPU in float16 (a lent GPU's minutes) and seconds on
#: the GPU; its values then come from that device's generator, seeded alike (the same on every such build, not
#: those of a CPU build). For measurements of time and memory, which do not depend on the values.
INIT_DEVICE_ENV = "HIRESDIFF_RANDOM_INIT_DEVICE"


def _build_device(name: str, device: str | torch.device) -> torch.device:
    """Modules are initialised on the CPU (or shape-only on ``meta``) so weights never depend on the device; a
    ``random-*`` model on the device :data:`INIT_DEVICE_ENV` names, where it is set."""
    if torch.device(device).type == "meta":
        return torch.device("meta")
    chosen = os.environ.get(INIT_DEVICE_ENV, "").strip() if name.startswith("random-") else ""
    if not chosen:
        return torch.device("cpu")
    try:
        build = torch.device(chosen)
    except (RuntimeError, ValueError):
        raise HiresError(f"{INIT_DEVICE_ENV}={chosen!r} is no device; use cuda, cuda:N or cpu") from None
    ok = build.type == "cpu" or (build.type == "cuda" and torch.cuda.is_available())
    require(ok, f"{INIT_DEVICE_ENV}={chosen!r}: weights are initialised on the CPU or an available CUDA device")
    return build


def _make_denoiser(
    name: str, dtype: torch.dtype, device: str | torch.device
) -> UNet2DConditionModel | FluxTransformer2DModel:
    configs = _CONFIGS[name]
    cls: type[torch.nn.Module] = UNet2DConditionModel if "unet" in configs else FluxTransformer2DModel
    config = configs["unet"] if "unet" in configs else configs["transformer"]
    if name.startswith("tiny-"):
        # Tiny models are built in float32 and cast, so every dtype holds the same (rounded) weights.
        with torch.device(device):
            return _cast(cls(**config), dtype).eval()
    with torch.device(device), _default_dtype(dtype):
        return cls(**config).eval()


def _make(name: str, kind: str, dtype: torch.dtype, device: str | torch.device) -> Any:
    """Construct one non-UNet component of ``name`` in ``dtype`` on ``device``."""
    config = _CONFIGS[name][kind]
    tiny = name.startswith("tiny-")
    build_dtype = torch.float32 if tiny else dtype
    with torch.device(device), _default_dtype(build_dtype):
        if kind == "vae":
            module: torch.nn.Module = AutoencoderKL(**config)
        elif kind == "t5":
            module = T5EncoderModel(_t5_config(**config))
        elif kind == "text":
            module = CLIPTextModel(_clip_text_config(**config))
        else:
            module = CLIPTextModelWithProjection(_clip_text_config(**config))
    return _cast(module, dtype).eval()


def build_builtin(
    name: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> StableDiffusionPipeline | StableDiffusionXLPipeline | FluxPipeline:
    """Build the built-in pipeline ``name`` with deterministic random weights, without any download.

    Args:
        name: One of :data:`BUILTIN_MODELS` (``tiny-sd``, ``tiny-sdxl``, ``tiny-flux``, ``random-sd15``,
            ``random-sdxl``, ``random-flux``).
        dtype: Parameter dtype. Tiny models are built in float32 and cast; full-size ones are created directly in
            ``dtype`` (so a float16 ``random-sdxl`` never holds a float32 copy).
        device: Where the pipeline ends up. Weights are initialised on the CPU and then moved, so they are
            identical on every device (``random-*`` models: on the device :data:`INIT_DEVICE_ENV` names, where
            set); ``"meta"`` builds shapes only (no memory, no weights).

    Returns:
        A :class:`StableDiffusionPipeline` (family ``sd``) or :class:`StableDiffusionXLPipeline` (``sdxl``)
        with the byte-level tokenizer(s), an Euler scheduler, no safety checker and no watermarker; or a
        :class:`FluxPipeline` (``flux``) with the byte-level CLIP and character-level T5 tokenizers, FLUX.1-dev's
        flow-matching scheduler and ``default_sample_size`` set to the model's native latent side.

    Raises:
        HiresError: ``name`` is not a built-in model.
    """
    info = _check_name(name)
    build_device = _build_device(name, device)
    if info.family == "flux":
        with _seeded(build_device):
            transformer = _make_denoiser(name, dtype, build_device)
            vae = _make(name, "vae", dtype, build_device)
            text_encoder = _make(name, "text", dtype, build_device)
            t5 = _make(name, "t5", dtype, build_device)
        flux = _assemble_flux(name, info, transformer, vae, text_encoder, t5)
        return flux if build_device == torch.device(device) else flux.to(device)
    with _seeded(build_device):
        unet = _make_denoiser(name, dtype, build_device)
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


def _assemble_flux(
    name: str,
    info: BuiltinInfo,
    transformer: FluxTransformer2DModel,
    vae: AutoencoderKL,
    text_encoder: CLIPTextModel,
    text_encoder_2: T5EncoderModel,
) -> FluxPipeline:
    """Wrap built FLUX modules into a :class:`FluxPipeline` whose ``default_sample_size`` gives the native size.

    diffusers' FluxPipeline hard-codes ``default_sample_size = 128`` (1024 px, FLUX.1's native size) in
    ``__init__``; tiny models set their own (it is not saved with the pipeline: loading a saved folder reads the
    native size from the VAE config's ``sample_size`` instead, see :mod:`hiresdiff.models.loading`).
    """
    pipe = FluxPipeline(
        scheduler=make_flux_scheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=byte_level_clip_tokenizer(),
        text_encoder_2=text_encoder_2,
        tokenizer_2=char_level_t5_tokenizer(_T5_TOKENS[name]),
        transformer=transformer,
    )
    pipe.default_sample_size = info.native_size // info.vae_scale_factor
    return pipe
