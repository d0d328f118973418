"""LoRA support: cheap file checks, exact application at a scale, and exact removal afterwards (CPU, offline).

The LoRA files are made here from the tiny built-in UNets with PEFT (random, non-zero LoRA matrices) and saved
with diffusers' own ``save_lora_weights``, so they have the layout real LoRA files have.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

os.environ["HF_HUB_OFFLINE"] = "1"  # before anything from the hub stack is imported

import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from safetensors.torch import save_file

from hiresdiff.errors import HiresError
from hiresdiff.models.lora import LoraSpec, applied_loras, parse_lora_arg, resolve_lora
from hiresdiff.models.tiny import build_builtin, build_builtin_denoiser
from hiresdiff.models.tiny_addons import LORA_TARGETS

peft = pytest.importorskip("peft")

TARGETS = list(LORA_TARGETS)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, make_lora) -> dict[str, Path]:
    """Two different SDXL LoRAs (seeds 1 and 2) and one SD LoRA."""
    root = tmp_path_factory.mktemp("loras")
    made = {}
    for key, family, seed in (("a", "tiny-sdxl", 1), ("b", "tiny-sdxl", 2), ("sd", "tiny-sd", 3)):
        (root / key).mkdir()
        made[key] = make_lora(family, seed, root / key)
    return made


@pytest.fixture(scope="module")
def pipe() -> StableDiffusionXLPipeline:
    """This module's own tiny SDXL pipeline (tests change it and check that it comes back exactly)."""
    return build_builtin("tiny-sdxl")


@pytest.fixture(scope="module")
def unet_inputs() -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    return {
        "sample": torch.randn(1, 4, 16, 16, generator=g),
        "timestep": torch.tensor(500),
        "encoder_hidden_states": torch.randn(1, 7, 64, generator=g),
        "added_cond_kwargs": {
            "text_embeds": torch.randn(1, 32, generator=g),
            "time_ids": torch.tensor([[128.0, 128.0, 0.0, 0.0, 128.0, 128.0]]),
        },
    }


def _out(pipe: Any, inputs: dict[str, Any]) -> torch.Tensor:
    with torch.no_grad():
        return pipe.unet(**inputs, return_dict=False)[0]


class _State:
    """State dict (cloned), parameter gradient flags and module types of a UNet, to compare with later."""

    def __init__(self, unet: torch.nn.Module) -> None:
        self.tensors = {k: v.detach().clone() for k, v in unet.state_dict().items()}
        self.grads = {k: p.requires_grad for k, p in unet.named_parameters()}
        self.types = [(name, type(m)) for name, m in unet.named_modules()]
        self.attrs = {k for k in vars(unet) if "peft" in k}

    def assert_same(self, unet: torch.nn.Module) -> None:
        now = unet.state_dict()
        assert list(now) == list(self.tensors)
        assert all(torch.equal(now[k], self.tensors[k]) for k in now)
        assert {k: p.requires_grad for k, p in unet.named_parameters()} == self.grads
        assert [(name, type(m)) for name, m in unet.named_modules()] == self.types
        assert {k for k in vars(unet) if "peft" in k} == self.attrs


@pytest.fixture()
def base(pipe: StableDiffusionXLPipeline, unet_inputs: dict[str, Any]) -> Iterator[torch.Tensor]:
    """The UNet output without LoRA; after the test the pipeline must be exactly as before."""
    state = _State(pipe.unet)
    out = _out(pipe, unet_inputs)
    yield out
    state.assert_same(pipe.unet)
    assert torch.equal(_out(pipe, unet_inputs), out)


def _error(call: Any, *args: Any, **kwargs: Any) -> str:
    """The message of the HiresError that ``call`` raises, checked to be one line."""
    with pytest.raises(HiresError) as info:
        call(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def _apply(pipe: Any, loras: list[LoraSpec]) -> None:
    """Enter and leave :func:`applied_loras` (for tests of failures on entry)."""
    with applied_loras(pipe, loras):
        pass


# ----------------------------------------------------------------------------------------- applying


def test_scale_zero_is_exactly_no_lora_and_scale_one_changes_the_output(pipe, unet_inputs, files, base) -> None:
    with applied_loras(pipe, [resolve_lora(files["a"], 0.0)]):
        assert torch.equal(_out(pipe, unet_inputs), base)
    with applied_loras(pipe, [resolve_lora(files["a"], 1.0)]):
        one = _out(pipe, unet_inputs)
    with applied_loras(pipe, [resolve_lora(files["a"], -0.5)]):
        negative = _out(pipe, unet_inputs)
    assert not torch.allclose(one, base, atol=1e-4)
    assert not torch.allclose(negative, base, atol=1e-4) and not torch.allclose(negative, one, atol=1e-4)


def test_two_loras_combine_and_both_at_zero_are_no_lora(pipe, unet_inputs, files, base) -> None:
    a, b = resolve_lora(files["a"]), resolve_lora(files["b"])
    outs = {}
    for key, loras in {"a": [a], "b": [b], "ab": [a, b]}.items():
        with applied_loras(pipe, loras):
            assert pipe.get_active_adapters() == [f"hiresdiff_{i}" for i in range(len(loras))]
            outs[key] = _out(pipe, unet_inputs)
    assert not torch.allclose(outs["a"], outs["b"], atol=1e-4)
    assert not torch.allclose(outs["ab"], outs["a"], atol=1e-4)
    assert not torch.allclose(outs["ab"], outs["b"], atol=1e-4)
    zero = [resolve_lora(files["a"], 0.0), resolve_lora(files["b"], 0.0)]
    with applied_loras(pipe, zero):
        assert torch.equal(_out(pipe, unet_inputs), base)


def test_pipeline_is_restored_exactly_also_after_an_exception(pipe, unet_inputs, files, base) -> None:
    state = _State(pipe.unet)
    loras = [resolve_lora(files["a"], 0.7), resolve_lora(files["b"], 0.3)]
    with applied_loras(pipe, loras):
        assert any("lora" in type(m).__module__ for m in pipe.unet.modules())
    state.assert_same(pipe.unet)
    assert pipe.get_list_adapters() == {}
    with pytest.raises(KeyError, match="boom"), applied_loras(pipe, loras):
        raise KeyError("boom")
    state.assert_same(pipe.unet)
    assert torch.equal(_out(pipe, unet_inputs), base)


def test_empty_list_is_a_no_op_and_text_encoders_are_untouched(pipe, files, base) -> None:
    with applied_loras(pipe, []):
        assert not hasattr(pipe.unet, "peft_config")
    encoders = [_State(pipe.text_encoder), _State(pipe.text_encoder_2)]
    with applied_loras(pipe, [resolve_lora(files["a"])]):
        pass
    encoders[0].assert_same(pipe.text_encoder)
    encoders[1].assert_same(pipe.text_encoder_2)


def test_user_adapter_is_kept_with_its_scale(pipe, unet_inputs, files, base) -> None:
    """An adapter the user loaded before stays loaded and active at its scale; only hiresdiff's go."""
    grads = [(p, p.requires_grad) for p in pipe.unet.parameters()]
    pipe.load_lora_weights(str(files["b"].parent), weight_name=files["b"].name, adapter_name="mine")
    try:
        pipe.set_adapters(["mine"], adapter_weights=[0.6])
        state, mine = _State(pipe.unet), _out(pipe, unet_inputs)
        with applied_loras(pipe, [resolve_lora(files["a"])]):
            assert pipe.get_active_adapters() == ["hiresdiff_0"]
            assert not torch.equal(_out(pipe, unet_inputs), mine)
        assert pipe.get_list_adapters()["unet"] == ["mine"] and pipe.get_active_adapters() == ["mine"]
        state.assert_same(pipe.unet)
        assert torch.equal(_out(pipe, unet_inputs), mine)
    finally:
        pipe.unload_lora_weights()
        # diffusers' own load freezes the base weights, and its unload leaves them frozen and a None flag behind
        for param, flag in grads:
            param.requires_grad_(flag)
        vars(pipe.unet).pop("_hf_peft_config_loaded", None)


def test_pickled_lora_loads_like_the_safetensors_one(pipe, unet_inputs, files, tmp_path, base) -> None:
    from safetensors.torch import load_file

    pickled = tmp_path / "a.bin"
    torch.save(load_file(files["a"]), pickled)
    with applied_loras(pipe, [resolve_lora(files["a"])]):
        expected = _out(pipe, unet_inputs)
    with applied_loras(pipe, [resolve_lora(pickled, allow_pickle=True)]):
        assert torch.equal(_out(pipe, unet_inputs), expected)


def test_lora_of_another_model_is_one_line_and_leaves_the_pipeline_as_it_was(pipe, files, tmp_path, base) -> None:
    message = _error(_apply, pipe, [resolve_lora(files["sd"])])
    assert "pytorch_lora_weights.safetensors" in message and "does not fit this StableDiffusionXLPipeline" in message
    assert "size mismatch" in message
    # tensor names that match no layer at all
    nowhere = tmp_path / "nowhere.safetensors"
    save_file(
        {"unet.nowhere.lora.down.weight": torch.ones(4, 8), "unet.nowhere.lora.up.weight": torch.ones(8, 4)}, nowhere
    )
    assert "nowhere.safetensors" in _error(_apply, pipe, [resolve_lora(nowhere)])
    # a good LoRA with extra tensors for a layer the model lacks: diffusers only warns, hiresdiff refuses
    from safetensors.torch import load_file

    extra = tmp_path / "extra.safetensors"
    tensors = load_file(files["a"])
    tensors.update(
        {"unet.nowhere.to_q.lora.down.weight": torch.ones(4, 8), "unet.nowhere.to_q.lora.up.weight": torch.ones(8, 4)}
    )
    save_file(tensors, extra)
    assert "unexpected keys" in _error(_apply, pipe, [resolve_lora(extra)])
    # a failure on the second LoRA also removes the first
    _error(_apply, pipe, [resolve_lora(files["a"]), resolve_lora(files["sd"])])
    assert pipe.get_list_adapters() == {}


def test_pipeline_without_lora_support_and_nested_use(pipe, files, base) -> None:
    spec = resolve_lora(files["a"])
    assert "cannot load LoRA weights" in _error(_apply, SimpleNamespace(), [spec])
    with applied_loras(pipe, [spec]):
        assert "already has LoRA adapter 'hiresdiff_0'" in _error(_apply, pipe, [spec])


# ------------------------------------------------------------------------------------- spec and parsing


def test_spec_hash_name_and_metadata(files) -> None:
    spec = resolve_lora(files["a"], 0.75)
    assert isinstance(spec, LoraSpec)
    assert spec.sha256 == hashlib.sha256(files["a"].read_bytes()).hexdigest()
    assert spec.path == str(files["a"].resolve()) and os.path.isabs(spec.path)
    assert spec.name == "pytorch_lora_weights.safetensors"
    assert spec.metadata() == {"name": spec.name, "path": spec.path, "sha256": spec.sha256, "scale": 0.75}


def test_resolve_accepts_relative_paths_and_any_finite_sign(files, monkeypatch) -> None:
    monkeypatch.chdir(files["a"].parent)
    spec = resolve_lora("pytorch_lora_weights.safetensors", -1)
    assert spec.path == str(files["a"].resolve()) and spec.scale == -1.0


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("style.safetensors", ("style.safetensors", 1.0)),
        ("style.safetensors:0.5", ("style.safetensors", 0.5)),
        ("style.safetensors:-1", ("style.safetensors", -1.0)),
        ("/loras/a:b.safetensors", ("/loras/a:b.safetensors", 1.0)),
        ("C:\\l.safetensors", ("C:\\l.safetensors", 1.0)),
        ("C:\\l.safetensors:0.8", ("C:\\l.safetensors", 0.8)),
    ],
)
def test_parse_lora_arg(text: str, expected: tuple[str, float]) -> None:
    assert parse_lora_arg(text) == expected


@pytest.mark.parametrize("text", ["x.safetensors:abc", "x.safetensors:", ":0.5"])
def test_parse_lora_arg_errors(text: str) -> None:
    assert _error(parse_lora_arg, text).startswith("--lora expects FILE[:SCALE]")


def test_resolve_lora_bad_inputs(files, tmp_path) -> None:
    good = files["a"]
    assert "does not exist" in _error(resolve_lora, tmp_path / "missing.safetensors")
    assert "not a regular file" in _error(resolve_lora, tmp_path)
    ckpt = tmp_path / "style.ckpt"
    ckpt.write_bytes(b"\x80\x02}q\x00.")
    assert "pass --allow-pickle" in _error(resolve_lora, ckpt)
    assert resolve_lora(ckpt, allow_pickle=True).path == str(ckpt.resolve())
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(os.urandom(256))
    assert "not a valid safetensors file" in _error(resolve_lora, corrupt)
    plain = tmp_path / "model.safetensors"
    save_file({"model.diffusion_model.out.weight": torch.zeros(2)}, plain)
    assert "holds no LoRA weights" in _error(resolve_lora, plain)
    for scale in (float("nan"), float("inf"), -float("inf")):
        assert "not finite" in _error(resolve_lora, good, scale)
    other = tmp_path / "style.onnx"
    other.write_bytes(b"x")
    assert "unsupported LoRA file" in _error(resolve_lora, other)


def test_lora_keys_are_recognised_in_other_layouts(tmp_path) -> None:
    for i, key in enumerate(["unet.x.lora_A.weight", "lora_unet_down_blocks_0.lora_down.weight", "a.lora.up.weight"]):
        file = tmp_path / f"{i}.safetensors"
        save_file({key: torch.zeros(1)}, file)
        assert resolve_lora(file).scale == 1.0


# ------------------------------------------------------------------------------------------------- FLUX


def test_flux_lora_applies_and_unloads_and_a_unet_lora_changes_nothing(files, tmp_path) -> None:
    from diffusers import FluxPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    source = build_builtin_denoiser("tiny-flux")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(4)
        source.add_adapter(peft.LoraConfig(r=4, lora_alpha=4, target_modules=TARGETS, init_lora_weights=False))
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(source))
    FluxPipeline.save_lora_weights(str(tmp_path), transformer_lora_layers=layers, safe_serialization=True)
    flux_lora = tmp_path / "pytorch_lora_weights.safetensors"

    pipe = build_builtin("tiny-flux")
    g = torch.Generator().manual_seed(0)
    inputs = {
        "hidden_states": torch.randn(1, 16, 64, generator=g),
        "encoder_hidden_states": torch.randn(1, 8, 32, generator=g),
        "pooled_projections": torch.randn(1, 32, generator=g),
        "timestep": torch.tensor([0.5]),
        "img_ids": torch.zeros(16, 3),
        "txt_ids": torch.zeros(8, 3),
        "guidance": torch.tensor([3.5]),
        "return_dict": False,
    }

    def out() -> torch.Tensor:
        with torch.no_grad():
            return pipe.transformer(**inputs)[0]

    state, base = _State(pipe.transformer), out()
    with applied_loras(pipe, [resolve_lora(flux_lora, 0.0)]):
        assert torch.equal(out(), base)
    with applied_loras(pipe, [resolve_lora(flux_lora)]):
        assert not torch.allclose(out(), base, atol=1e-4)
    state.assert_same(pipe.transformer)
    # diffusers' FLUX loader silently skips the UNet tensors of an SDXL LoRA; hiresdiff notices nothing changed
    message = _error(_apply, pipe, [resolve_lora(files["a"])])
    assert "changed no layer of this FluxPipeline" in message
    state.assert_same(pipe.transformer)
    assert torch.equal(out(), base)
