"""Tests of the offline tokenizer, the built-in random models and model resolution / loading (CPU, offline)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # before anything from the hub stack is imported

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors.torch import save_file

from hiresdiff.errors import HiresError
from hiresdiff.models.loading import ModelSpec, load_pipeline, resolve_model
from hiresdiff.models.tiny import BUILTIN_MODELS, build_builtin, build_builtin_unet
from hiresdiff.models.tokenizer import BYTE_VOCAB_SIZE, byte_level_clip_tokenizer, bytes_to_unicode


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def tiny_sd() -> StableDiffusionPipeline:
    pipe = build_builtin("tiny-sd")
    assert isinstance(pipe, StableDiffusionPipeline)
    return pipe


@pytest.fixture(scope="module")
def tiny_sdxl() -> StableDiffusionXLPipeline:
    pipe = build_builtin("tiny-sdxl")
    assert isinstance(pipe, StableDiffusionXLPipeline)
    return pipe


def _state_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ------------------------------------------------------------------------------------------- tokenizer


def test_bytes_to_unicode_is_a_printable_bijection() -> None:
    mapping = bytes_to_unicode()
    assert sorted(mapping) == list(range(256))
    assert len(set(mapping.values())) == 256
    assert all(not c.isspace() and c.isprintable() for c in mapping.values())
    assert mapping[ord("a")] == "a" and mapping[ord(" ")] == "Ġ"


def test_byte_level_tokenizer_round_trip_truncation_and_padding() -> None:
    tok = byte_level_clip_tokenizer()
    assert len(tok) == BYTE_VOCAB_SIZE == 514
    assert tok.model_max_length == 77
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 1)

    ids = tok("a photo of a cat").input_ids
    assert ids[0] == 0 and ids[-1] == 1
    assert all(0 <= i < BYTE_VOCAB_SIZE for i in ids)
    assert len(ids) == 2 + len("aphotoofacat")  # one token per byte, no merges
    assert tok.decode(ids, skip_special_tokens=True) == "a photo of a cat"

    unicode_ids = tok("héllo wörld").input_ids
    assert all(0 <= i < BYTE_VOCAB_SIZE for i in unicode_ids)
    assert tok.decode(unicode_ids, skip_special_tokens=True) == "héllo wörld"

    long = tok("word " * 100, truncation=True, max_length=tok.model_max_length).input_ids
    assert len(long) == 77 and long[0] == 0 and long[-1] == 1

    padded = tok(["a cat", "a dog on a sofa"], padding="max_length", truncation=True, return_tensors="pt")
    assert padded.input_ids.shape == (2, 77)
    n = len(tok("a cat").input_ids)
    assert padded.input_ids[0, n:].eq(1).all() and padded.attention_mask[0, n:].eq(0).all()
    assert padded.attention_mask[0, :n].eq(1).all()


# -------------------------------------------------------------------------------------- tiny builtins


def test_builtin_registry() -> None:
    assert set(BUILTIN_MODELS) == {"tiny-sd", "tiny-sdxl", "random-sd15", "random-sdxl", "tiny-flux", "random-flux"}
    assert {n: (i.family, i.native_size, i.vae_scale_factor) for n, i in BUILTIN_MODELS.items()} == {
        "tiny-sd": ("sd", 128, 8),
        "tiny-sdxl": ("sdxl", 256, 8),
        "random-sd15": ("sd", 512, 8),
        "random-sdxl": ("sdxl", 1024, 8),
        "tiny-flux": ("flux", 256, 8),
        "random-flux": ("flux", 1024, 8),
    }
    with pytest.raises(HiresError, match="tiny-sd"):
        build_builtin("tiny-foo")


@pytest.mark.parametrize("name", ["tiny-sd", "tiny-sdxl"])
def test_tiny_structure(name: str, tiny_sd: StableDiffusionPipeline, tiny_sdxl: StableDiffusionXLPipeline) -> None:
    pipe = tiny_sd if name == "tiny-sd" else tiny_sdxl
    info = BUILTIN_MODELS[name]
    assert pipe.vae_scale_factor == 8 == 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == info.native_size
    assert pipe.vae.encoder.mid_block.attentions[0] is not None
    # Cross-attention at two resolutions of the UNet.
    attn_levels = [i for i, block in enumerate(pipe.unet.down_blocks) if getattr(block, "has_cross_attention", False)]
    assert len(attn_levels) == 2
    cross = [k for k in pipe.unet.attn_processors if k.endswith("attn2.processor")]
    assert cross
    sched = pipe.scheduler.config
    assert type(pipe.scheduler).__name__ == "EulerDiscreteScheduler"
    assert (sched.beta_schedule, sched.timestep_spacing, sched.steps_offset, sched.prediction_type) == (
        "scaled_linear",
        "leading",
        1,
        "epsilon",
    )
    assert pipe.text_encoder.config.vocab_size >= BYTE_VOCAB_SIZE
    assert pipe.text_encoder.config.eos_token_id == pipe.tokenizer.eos_token_id


def test_tiny_sdxl_mirrors_sdxl_conditioning(tiny_sdxl: StableDiffusionXLPipeline) -> None:
    unet, te1, te2 = tiny_sdxl.unet.config, tiny_sdxl.text_encoder.config, tiny_sdxl.text_encoder_2.config
    assert list(unet.down_block_types) == ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]
    assert unet.addition_embed_type == "text_time"
    assert unet.cross_attention_dim == te1.hidden_size + te2.hidden_size
    assert unet.projection_class_embeddings_input_dim == 6 * unet.addition_time_embed_dim + te2.projection_dim
    assert tiny_sdxl.vae.config.force_upcast is False
    assert tiny_sdxl.vae.config.scaling_factor == pytest.approx(0.13025)


@pytest.mark.parametrize("name", ["tiny-sd", "tiny-sdxl"])
def test_tiny_unet_forward_non_square(
    name: str, tiny_sd: StableDiffusionPipeline, tiny_sdxl: StableDiffusionXLPipeline
) -> None:
    pipe = tiny_sd if name == "tiny-sd" else tiny_sdxl
    unet = pipe.unet
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 24, 40, generator=gen)
    context = torch.randn(2, 77, unet.config.cross_attention_dim, generator=gen)
    kwargs = {}
    if name == "tiny-sdxl":
        pooled = pipe.text_encoder_2.config.projection_dim
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(2, pooled), "time_ids": torch.randn(2, 6)}
    with torch.inference_mode():
        out = unet(x, torch.tensor([500, 20]), context, **kwargs).sample
    assert out.shape == x.shape
    assert torch.isfinite(out).all() and out.std() > 0


@pytest.mark.parametrize("name", ["tiny-sd", "tiny-sdxl"])
def test_tiny_weights_deterministic_and_rng_untouched(name: str) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = build_builtin(name)
    after = torch.rand(3)
    b = build_builtin(name)
    assert torch.equal(expected, after), "building must not consume the caller's random state"
    for component in ("unet", "vae", "text_encoder", "text_encoder_2"):
        module = getattr(a, component, None)
        if module is not None:
            assert _state_equal(module, getattr(b, component)), component
    assert _state_equal(build_builtin_unet(name), a.unet)


def _weights_digest(name: str) -> str:
    import hashlib

    pipe = build_builtin(name)
    digest = hashlib.sha256()
    for component in ("unet", "vae", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, component, None)
        for key, tensor in (module.state_dict() if module is not None else {}).items():
            digest.update(key.encode())
            digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def test_tiny_weights_identical_in_a_fresh_process() -> None:
    import subprocess
    import sys

    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); "
        "from test_models_loading import _weights_digest as d; print(d('tiny-sd'), d('tiny-sdxl'))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(Path(__file__).parent)],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=120,
    )
    assert result.stdout.split() == [_weights_digest("tiny-sd"), _weights_digest("tiny-sdxl")]


def test_tiny_dtype_is_cast_of_float32(tiny_sd: StableDiffusionPipeline) -> None:
    half = build_builtin("tiny-sd", torch.float16)
    assert all(p.dtype == torch.float16 for p in half.unet.parameters())
    assert all(p.dtype == torch.float16 for p in half.text_encoder.parameters())
    assert torch.equal(half.unet.conv_in.weight, tiny_sd.unet.conv_in.weight.half())


def test_tiny_sdxl_encode_prompt_dims(tiny_sdxl: StableDiffusionXLPipeline) -> None:
    embeds, negative, pooled, negative_pooled = tiny_sdxl.encode_prompt(
        "a photo of a cat",
        device=torch.device("cpu"),
        num_images_per_prompt=2,
        do_classifier_free_guidance=True,
        negative_prompt="blurry",
    )
    dim = tiny_sdxl.unet.config.cross_attention_dim
    assert embeds.shape == negative.shape == (2, 77, dim)
    proj = tiny_sdxl.text_encoder_2.config.projection_dim
    assert pooled.shape == negative_pooled.shape == (2, proj)
    assert not torch.equal(embeds, negative)


@pytest.mark.parametrize("name", ["tiny-sd", "tiny-sdxl"])
def test_tiny_pipeline_end_to_end(
    name: str, tiny_sd: StableDiffusionPipeline, tiny_sdxl: StableDiffusionXLPipeline
) -> None:
    pipe = tiny_sd if name == "tiny-sd" else tiny_sdxl
    out = pipe(
        "a cat", height=64, width=96, num_inference_steps=2, output_type="latent", generator=torch.manual_seed(0)
    )
    latents = out.images
    assert latents.shape == (1, 4, 8, 12)
    assert torch.isfinite(latents).all()


# ------------------------------------------------------------------------------------- full-size on meta


def test_random_full_size_parameter_counts_on_meta() -> None:
    start = time.perf_counter()
    sd15 = build_builtin("random-sd15", torch.float16, device="meta")
    sdxl_unet = build_builtin_unet("random-sdxl", torch.float16, device="meta")
    if time.perf_counter() - start > 20:
        pytest.skip("building the full-size architectures on meta took more than 20 s")
    assert isinstance(sd15, StableDiffusionPipeline)
    assert sd15.unet.device.type == "meta" and sd15.unet.dtype == torch.float16
    sd15_count = sum(p.numel() for p in sd15.unet.parameters())
    sdxl_count = sum(p.numel() for p in sdxl_unet.parameters())
    assert sd15_count == pytest.approx(0.86e9, rel=0.01)
    assert sdxl_count == pytest.approx(2.567e9, rel=0.01)
    assert sum(p.numel() for p in sd15.text_encoder.parameters()) == pytest.approx(123.06e6, rel=0.01)
    assert sd15.vae_scale_factor == 8 and sd15.unet.config.sample_size == 64
    assert torch.get_default_dtype() == torch.float32


# -------------------------------------------------------------------------------------- resolve / load


def test_resolve_builtin() -> None:
    assert resolve_model("tiny-sdxl") == ModelSpec("tiny-sdxl", "builtin", "sdxl", 256, 8)
    pipe = load_pipeline(resolve_model("tiny-sd"))
    assert isinstance(pipe, StableDiffusionPipeline)


@pytest.fixture(scope="module")
def tiny_sd_folder(tmp_path_factory: pytest.TempPathFactory, tiny_sd: StableDiffusionPipeline) -> Path:
    folder = tmp_path_factory.mktemp("saved") / "tiny-sd"
    tiny_sd.save_pretrained(folder)
    return folder


def test_folder_round_trip(tiny_sd_folder: Path, tiny_sd: StableDiffusionPipeline) -> None:
    spec = resolve_model(str(tiny_sd_folder))
    assert (spec.source, spec.family, spec.native_size, spec.vae_scale_factor) == ("folder", "sd", 128, 8)
    assert spec.path == str(tiny_sd_folder.resolve())
    pipe = load_pipeline(spec)
    assert isinstance(pipe, StableDiffusionPipeline)
    assert _state_equal(pipe.unet, tiny_sd.unet)
    assert _state_equal(pipe.text_encoder, tiny_sd.text_encoder)
    assert pipe.tokenizer("a photo of a cat").input_ids == tiny_sd.tokenizer("a photo of a cat").input_ids
    assert pipe.tokenizer.model_max_length == 77


def test_hub_id_from_offline_cache(
    tmp_path: Path, tiny_sd_folder: Path, tiny_sd: StableDiffusionPipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    import huggingface_hub.constants

    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--someone--tiny-sd"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    shutil.copytree(tiny_sd_folder, repo / "snapshots" / revision)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))

    spec = resolve_model("someone/tiny-sd")
    assert (spec.source, spec.family, spec.native_size, spec.path) == ("hub", "sd", 128, None)
    pipe = load_pipeline(spec)
    assert _state_equal(pipe.unet, tiny_sd.unet)


def _write_safetensors(path: Path, keys: list[str]) -> Path:
    save_file({key: torch.zeros(2) for key in keys}, str(path))
    return path


@pytest.mark.parametrize(
    ("keys", "family", "native"),
    [
        (["model.diffusion_model.input_blocks.0.0.weight", "cond_stage_model.transformer.x"], "sd", 512),
        (["model.diffusion_model.input_blocks.0.0.weight", "cond_stage_model.model.token_embedding.weight"], "sd", 768),
        (
            ["model.diffusion_model.x", "conditioner.embedders.0.transformer.x", "conditioner.embedders.1.model.x"],
            "sdxl",
            1024,
        ),
    ],
)
def test_single_file_family_from_keys(tmp_path: Path, keys: list[str], family: str, native: int) -> None:
    path = _write_safetensors(tmp_path / "model.safetensors", keys)
    spec = resolve_model(str(path))
    assert (spec.source, spec.family, spec.native_size, spec.vae_scale_factor) == ("single_file", family, native, 8)


@pytest.mark.parametrize("zip_format", [True, False])
def test_pickle_checkpoint_needs_allow_pickle_and_is_never_unpickled(tmp_path: Path, zip_format: bool) -> None:
    path = tmp_path / "model.ckpt"
    state = {
        "state_dict": {"model.diffusion_model.x": torch.zeros(1), "conditioner.embedders.1.model.y": torch.zeros(1)}
    }
    torch.save(state, path, _use_new_zipfile_serialization=zip_format)
    with pytest.raises(HiresError, match="--allow-pickle"):
        resolve_model(str(path))
    spec = resolve_model(str(path), allow_pickle=True)
    assert (spec.family, spec.native_size) == ("sdxl", 1024)
    with pytest.raises(HiresError, match="--allow-pickle"):
        load_pipeline(spec)


def test_single_file_load_offline_is_one_line_error(tmp_path: Path) -> None:
    keys = ["model.diffusion_model.x", "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias"]
    spec = resolve_model(str(_write_safetensors(tmp_path / "xl.safetensors", keys)))
    with pytest.raises(HiresError, match="offline") as info:
        load_pipeline(spec)
    assert "\n" not in str(info.value)


def _error_cases(tmp_path: Path) -> dict[str, tuple[str, str]]:
    """name -> (reference, regex the one-line message must match)."""
    pickle_file = tmp_path / "weights.bin"
    torch.save({"model.diffusion_model.x": torch.zeros(1)}, pickle_file)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\xff" * 8 + b"not a safetensors file at all")
    truncated = tmp_path / "short.safetensors"
    truncated.write_bytes(b"\x01\x02")
    not_sd = _write_safetensors(tmp_path / "other.safetensors", ["encoder.layers.0.weight"])
    no_index = tmp_path / "no_index"
    (no_index / "unet").mkdir(parents=True)
    (no_index / "unet" / "config.json").write_text("{}")
    wrong_class = tmp_path / "flux_folder"
    wrong_class.mkdir()
    (wrong_class / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    incomplete = tmp_path / "incomplete"
    incomplete.mkdir()
    (incomplete / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return {
        "pickle": (str(pickle_file), "pickled weights can execute code; pass --allow-pickle"),
        "garbage safetensors": (str(garbage), "not a valid safetensors file"),
        "truncated safetensors": (str(truncated), "not a valid safetensors file"),
        "not an SD checkpoint": (str(not_sd), "does not look like a Stable Diffusion"),
        "missing path": (str(tmp_path / "nope" / "model.safetensors"), "does not exist"),
        "missing relative folder": ("./no/such/folder", "does not exist"),
        "folder without model_index": (str(no_index), "no model_index.json"),
        "unsupported pipeline": (str(wrong_class), "StableDiffusion3Pipeline.*StableDiffusionXLPipeline, FluxPipeline"),
        "incomplete folder": (str(incomplete), "lacks unet/config.json"),
        "uncached hub id offline": ("hiresdiff-tests/not-a-cached-model", "not in the local cache.*HF_HUB_OFFLINE"),
        "unknown builtin": ("tiny-foo", "unknown model 'tiny-foo'.*tiny-sd"),
        "empty": ("  ", "empty model reference"),
    }


def test_resolve_errors_are_one_line_hires_errors(tmp_path: Path) -> None:
    for name, (ref, pattern) in _error_cases(tmp_path).items():
        with pytest.raises(HiresError, match=pattern) as info:
            resolve_model(ref)
        message = str(info.value)
        assert "\n" not in message and message, name


def test_pickled_folder_weights_need_allow_pickle(tmp_path: Path, tiny_sd: StableDiffusionPipeline) -> None:
    tiny_sd.save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "unet" / "diffusion_pytorch_model.bin").is_file()
    spec = resolve_model(str(tmp_path))
    with pytest.raises(HiresError, match="--allow-pickle") as info:
        load_pipeline(spec)
    assert "\n" not in str(info.value)
    pipe = load_pipeline(spec, allow_pickle=True)
    assert _state_equal(pipe.unet, tiny_sd.unet)


def test_hub_network_error_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    def unreachable(*args: object, **kwargs: object) -> str:
        raise OSError("Name or service not known\nsecond line of detail")

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", unreachable)
    with pytest.raises(HiresError, match=r"cannot fetch model_index\.json of hub model 'someone/model'") as info:
        resolve_model("someone/model")
    assert "\n" not in str(info.value) and "second line" not in str(info.value)
