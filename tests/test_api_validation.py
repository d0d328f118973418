"""Every bad request to the Python API and the command line is one ``HiresError`` line before any weights load.

Issue 21, classes 2 (refusals that need only the model's config or family: method families, ControlNet/LoRA of
another family, step limits of the scheduler, generators), 4 (types of the API's arguments: numpy numbers are
numbers, booleans and wrong types are refused naming the field) and 5 (text that is not UTF-8). A spy replaces every
weight loader (pipeline, built-in models, ControlNet, LoRA) so a refusal that came after loading would fail the test.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import hiresdiff
from hiresdiff import pipeline as pipeline_module
from hiresdiff.cli import main
from hiresdiff.errors import HiresError
from hiresdiff.extras import prepare_extras
from hiresdiff.models import loading, tiny
from hiresdiff.pipeline import ModelFacts, build_request, validate_request

BASE: dict[str, Any] = {"prompt": "a cat", "model": "tiny-sdxl", "width": 512, "height": 512, "steps": 2}


@pytest.fixture(autouse=True)
def no_weights(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The spy: every weight loader fails the test if called (the refusal must come first)."""
    calls: list[str] = []

    def forbidden(name: str) -> Any:
        def spy(*args: object, **kwargs: object) -> None:
            calls.append(name)
            raise AssertionError(f"{name} ran before the request was refused")

        return spy

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(loading, "load_pipeline", forbidden("load_pipeline"))
    monkeypatch.setattr(tiny, "build_builtin", forbidden("build_builtin"))
    monkeypatch.setattr(pipeline_module, "load_controlnet", forbidden("load_controlnet"))
    monkeypatch.setattr(pipeline_module, "applied_loras", forbidden("applied_loras"))
    pipeline_module._CACHE.clear()
    return calls


def _refused(no_weights: list[str], **overrides: Any) -> str:
    """The one-line message ``generate`` refuses ``BASE | overrides`` with (no loader called)."""
    with pytest.raises(HiresError) as info:
        hiresdiff.generate(**{**BASE, **overrides})
    text = str(info.value)
    assert "\n" not in text and text.strip() == text and text
    assert no_weights == []
    return text


# ------------------------------------------------------------------ class 2: refused from configs, before weights


def _safetensors(path: Path, keys: list[str]) -> Path:
    save_file({key: torch.zeros(1) for key in keys}, str(path))
    return path


def _controlnet(folder: Path, **config: Any) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"_class_name": "ControlNetModel", **config}))
    _safetensors(folder / "diffusion_pytorch_model.safetensors", ["w"])
    return folder


def _sdxl_folder(folder: Path, *, timesteps: int, cross: int = 64) -> Path:
    """A diffusers SDXL folder of configs only (256 px native): resolving reads configs, loading would fail."""
    files = {
        "model_index.json": {"_class_name": "StableDiffusionXLPipeline"},
        "unet/config.json": {"sample_size": 32, "cross_attention_dim": cross},
        "vae/config.json": {"block_out_channels": [8, 8, 8, 8]},
        "scheduler/scheduler_config.json": {
            "_class_name": "EulerDiscreteScheduler",
            "num_train_timesteps": timesteps,
            "timestep_spacing": "leading",
            "steps_offset": 1,
        },
    }
    for name, config in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(json.dumps(config))
    return folder


@pytest.fixture
def picture(tmp_path: Path) -> Path:
    path = tmp_path / "in.png"
    Image.new("RGB", (256, 256), (120, 80, 40)).save(path)
    return path


UNET_LORA = ["unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight"]
SDXL_LORA = [*UNET_LORA, "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight"]
FLUX_LORA = ["transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight"]
KOHYA_FLUX_LORA = ["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"]


def test_method_a_family_cannot_run_is_refused_before_weights(no_weights: list[str]) -> None:
    base = {"model": "tiny-flux", "width": 512, "height": 512}
    assert "runs on SD 1.x/2.x, SDXL models, not FLUX" in _refused(no_weights, **base, method="accdiffusion")
    assert "accdiffusion" in _refused(no_weights, **base, method="accdiffusion", window_interaction=False)
    assert "sas=True cannot run on FLUX" in _refused(no_weights, **base, method="apt")
    assert "--set sas=false" in _refused(no_weights, **base, method="apt", preset="apt")
    text = _refused(no_weights, **base, method="apt", sas=False, host="accdiffusion")
    assert "host=accdiffusion cannot run on FLUX" in text
    # the families are declared on the method (``hiresdiff methods`` can show them)
    assert hiresdiff.METHODS["accdiffusion"].families == ("sd", "sdxl")
    assert "flux" in hiresdiff.METHODS["scalediff"].families


def test_controlnet_of_another_family_or_not_a_controlnet_is_refused_before_weights(
    no_weights: list[str], tmp_path: Path, picture: Path
) -> None:
    sd_net = _controlnet(tmp_path / "sd", cross_attention_dim=32)
    sdxl_net = _controlnet(tmp_path / "sdxl", cross_attention_dim=64, addition_embed_type="text_time")
    unet = _controlnet(tmp_path / "unet", cross_attention_dim=64)
    (unet / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    folder = _sdxl_folder(tmp_path / "model", timesteps=1000, cross=2048)
    with_image = {"image": str(picture), "width": 512, "height": 512}
    assert "SD 1.x/2.x ControlNet; the model is SDXL" in _refused(no_weights, **with_image, controlnet=str(sd_net))
    text = _refused(no_weights, **with_image, model="tiny-sd", controlnet=str(sdxl_net))
    assert "SDXL ControlNet; the model is SD 1.x/2.x" in text
    assert "FLUX" in _refused(no_weights, **with_image, model="tiny-flux", controlnet=str(sdxl_net))
    assert "is a UNet2DConditionModel model, not a ControlNetModel" in _refused(
        no_weights, **with_image, controlnet=str(unet)
    )
    text = _refused(no_weights, **with_image, model=str(folder), controlnet=str(sdxl_net))
    assert "text embeddings of width 64, the model's are 2048" in text
    assert "is a file" in _refused(no_weights, **with_image, controlnet=str(picture))


def test_lora_of_another_family_is_refused_before_weights(no_weights: list[str], tmp_path: Path) -> None:
    flux = _safetensors(tmp_path / "flux.safetensors", FLUX_LORA)
    kohya_flux = _safetensors(tmp_path / "kohya_flux.safetensors", KOHYA_FLUX_LORA)
    sdxl = _safetensors(tmp_path / "sdxl.safetensors", SDXL_LORA)
    unet = _safetensors(tmp_path / "unet.safetensors", UNET_LORA)
    assert "made for FLUX models" in _refused(no_weights, loras=[str(flux)])
    assert "made for FLUX models" in _refused(no_weights, loras=[(str(kohya_flux), 0.5)])
    assert "made for SDXL models" in _refused(no_weights, model="tiny-sd", width=256, height=256, loras=[str(sdxl)])
    flux_model = {"model": "tiny-flux", "width": 512, "height": 512}
    assert "made for SD/SDXL UNet models" in _refused(no_weights, **flux_model, loras=[f"{unet}:0.8"])
    assert "made for SDXL models" in _refused(no_weights, **flux_model, loras=[str(sdxl)])


def test_lora_names_that_say_nothing_and_fitting_loras_pass(tmp_path: Path) -> None:
    from hiresdiff.models.lora import lora_target

    assert lora_target(UNET_LORA) == "unet" and lora_target(SDXL_LORA) == "sdxl"
    assert lora_target(FLUX_LORA) == lora_target(KOHYA_FLUX_LORA) == "flux"
    assert lora_target(["some.lora_A.weight"]) is None
    unknown = _safetensors(tmp_path / "x.safetensors", ["some.lora_A.weight"])
    unet = _safetensors(tmp_path / "u.safetensors", UNET_LORA)
    for family in ("sd", "sdxl"):
        extras, _, _ = prepare_extras(native=256, grid=8, family=family, loras=[str(unknown), str(unet)])
        assert [spec.made_for for spec in extras.loras] == [None, "unet"]


def test_steps_the_scheduler_cannot_run_are_refused_before_weights(no_weights: list[str], tmp_path: Path) -> None:
    assert "above the 1000 timesteps the model's scheduler has" in _refused(no_weights, steps=1001)
    assert "above the limit of 10,000" in _refused(no_weights, steps=1_000_000)
    assert "above the limit" in _refused(no_weights, model="nobody-xyz/not-cached", steps=10**9)  # before the hub
    for name in ("dpmpp-2m", "unipc"):  # "leading" spacing: all 1000 steps land on one timestep
        assert f"collapses the {name} schedule" in _refused(no_weights, steps=1000, scheduler=name)
    assert "above the 1000" in _refused(no_weights, model="tiny-flux", steps=1001)
    folder = _sdxl_folder(tmp_path / "model", timesteps=500)
    assert "above the 500 timesteps" in _refused(no_weights, model=str(folder), steps=501)
    assert "above the 500 timesteps" in _refused(no_weights, model=str(folder), steps=600, scheduler="ddim")


def test_steps_up_to_the_schedule_pass_validation() -> None:
    facts = ModelFacts(256, 8, "sdxl", {})
    for steps, scheduler in ((1000, "euler"), (1000, "ddim"), (999, "dpmpp-2m"), (1, "unipc")):
        req = validate_request("a", "direct", 512, 512, facts, steps=steps, scheduler=scheduler)
        assert req.settings.steps == steps


def test_generators_of_the_wrong_count_or_type_are_refused_before_weights(no_weights: list[str]) -> None:
    gen = torch.Generator().manual_seed(0)
    assert "got 2 generators for 1 images" in _refused(no_weights, generator=[gen, gen])
    assert "got 1 generators for 4 images" in _refused(
        no_weights, prompt=["a", "b"], num_images_per_prompt=2, generator=[gen]
    )
    assert "generator must be a torch.Generator" in _refused(no_weights, generator=7)
    assert "got [" in _refused(no_weights, generator=[gen, "seed"], prompt=["a", "b"])
    assert "generator must be" in _refused(no_weights, generator=np.random.default_rng(0))


def test_devices_that_cannot_run_are_refused_before_weights(no_weights: list[str]) -> None:
    assert "device 'meta' cannot run a generation" in _refused(no_weights, device="meta")
    assert "device must be a string" in _refused(no_weights, device=0)
    assert "unknown device 'gpu'" in _refused(no_weights, device="gpu")
    if not torch.cuda.is_available():
        assert "CUDA is not available" in _refused(no_weights, device="cuda:1")


# ------------------------------------------------------------------ class 4: types of the API's arguments

TYPE_CASES: list[tuple[str, dict[str, Any], str]] = [
    ("steps bool", {"steps": True}, "steps must be an integer, got True (bool)"),
    ("steps fraction", {"steps": 2.5}, "steps must be an integer, got 2.5 (float)"),
    ("steps list", {"steps": [2]}, "steps must be an integer, got [2] (list)"),
    ("width bool", {"width": True}, "width must be an integer, got True (bool)"),
    ("height string", {"height": "tall"}, "height must be an integer, got 'tall' (str)"),
    ("guidance bool", {"guidance": False}, "guidance must be a number, got False (bool)"),
    ("guidance dict", {"guidance": {}}, "guidance must be a number, got {} (dict)"),
    ("seed numpy bool", {"seed": np.bool_(True)}, "seed must be an integer"),
    ("decode_tile_area wrong type", {"decode_tile_area": [1]}, "decode_tile_area must be an integer"),
    ("previews int", {"previews": 1}, "previews must be true or false, got 1 (int)"),
    ("scheduler not a string", {"scheduler": 3}, "scheduler must be a string, got 3 (int)"),
    ("method parameter bool", {"sigma": True}, "sigma must be a number, got True (bool)"),
    ("method parameter int for bool", {"jitter": 0}, "jitter must be true or false, got 0 (int)"),
    ("method parameter list", {"window": [256]}, "window must be an integer"),
    ("method name not a string", {"method": ["demofusion"]}, "method must be a method name"),
    ("preset not a string", {"method": "apt", "preset": 1}, "preset must be a preset name"),
    ("negative prompt int", {"negative_prompt": 3}, "negative prompt must be a string or a list of strings"),
    ("negative prompt items", {"negative_prompt": ["ok", 4], "prompt": ["a", "b"]}, "negative prompt 2 must be"),
    ("prompt dict", {"prompt": {"a": 1}}, "prompt must be a string or a list of strings, got {'a': 1} (dict)"),
    ("image number", {"image": 3}, "image must be an image file path or a PIL image, got 3 (int)"),
    ("image tensor", {"image": torch.zeros(3)}, "image must be an image file path or a PIL image"),
    ("controlnet number", {"controlnet": 5}, "controlnet must be a ControlNet folder or hub id"),
    ("loras number", {"loras": 5}, "loras must be a list of LoRA files"),
    ("loras bad item", {"loras": [("a.safetensors", 1, 2)]}, "got the item ('a.safetensors', 1, 2) (tuple)"),
    ("lora scale bool", {"loras": [("a.safetensors", True)]}, "scale of LoRA 'a.safetensors' must be a number"),
    ("scale string", {"image": "x.png", "scale": "big"}, "scale must be a number, got 'big' (str)"),
    ("fit number", {"fit": 1}, "fit must be a string"),
    ("control_scale bool", {"control_scale": True}, "control_scale must be a number"),
    ("dtype number", {"dtype": 16}, "unknown dtype 16"),
    ("model not a string", {"model": 1}, "model must be a name, path or hub id"),
    ("progress string", {"progress": "no"}, "progress must be true or false"),
    ("callback not callable", {"callback": 3}, "callback must be a function or None, got 3 (int)"),
    ("allow_pickle string", {"allow_pickle": "yes"}, "allow_pickle must be true or false"),
    ("paper string", {"paper": "yes"}, "paper must be true or false"),
]


@pytest.mark.parametrize(("case", "overrides", "message"), TYPE_CASES, ids=[c[0] for c in TYPE_CASES])
def test_wrong_types_are_one_line_naming_the_field(
    no_weights: list[str], case: str, overrides: dict[str, Any], message: str
) -> None:
    assert message in _refused(no_weights, **overrides)


def test_numpy_numbers_are_numbers_and_become_plain_python() -> None:
    facts = ModelFacts(256, 8, "sdxl", {})
    req = validate_request(
        "a",
        "demofusion",
        np.int64(512),
        np.int32(384),
        facts,
        steps=np.int16(3),
        guidance=np.float32(5.5),
        seed=np.uint64(7),
        decode_tile_area=np.int64(0),
        previews=np.bool_(False),
        sigma=np.float64(0.5),
        window=np.int64(256),
        jitter=np.bool_(True),
        start_step=2.0,  # an integral float is an integer
    )
    s, p = req.settings, req.params
    values = [s.width, s.height, s.steps, s.guidance, s.seed, s.decode_tile_area, s.previews, p.sigma, p.window]
    assert values == [512, 384, 3, 5.5, 7, 0, False, 0.5, 256]
    assert [type(v) for v in values] == [int, int, int, float, int, int, bool, float, int]
    assert type(p.jitter) is bool and type(p.start_step) is int
    json.dumps({"settings": dataclasses.asdict(s), "params": dataclasses.asdict(p)})  # plain JSON
    apldm = build_request("a", "apldm", 512, 512, progressive=np.array([0.1, 0.2]), steps=20).params
    assert apldm.progressive == (0.1, 0.2) and all(type(v) is float for v in apldm.progressive)
    assert build_request("a", "apldm", 512, 512, progressive=0.3, steps=20).params.progressive == (0.3,)


def test_one_lora_string_is_one_lora_not_its_characters(tmp_path: Path) -> None:
    file = _safetensors(tmp_path / "style.safetensors", UNET_LORA)
    for given in (str(file), f"{file}:0.5", file):
        extras, _, _ = prepare_extras(native=256, grid=8, family="sdxl", loras=given)  # type: ignore[arg-type]
        assert len(extras.loras) == 1 and extras.loras[0].path == str(file.resolve())
    extras, _, _ = prepare_extras(native=256, grid=8, family="sdxl", loras=[(file, np.float32(0.25))])  # type: ignore[list-item]
    assert extras.loras[0].scale == 0.25 and type(extras.loras[0].scale) is float


# ------------------------------------------------------------------ class 5: text that is not UTF-8

TEXT_CASES: list[tuple[str, dict[str, Any], str]] = [
    ("prompt from a shell variable", {"prompt": "caf\udce9"}, "the prompt is not valid UTF-8 text: byte 0xe9 at"),
    ("second prompt", {"prompt": ["ok", "\udcff\udcfe"]}, "the prompt 2 is not valid UTF-8 text: byte 0xff at"),
    ("prompt bytes", {"prompt": b"caf\xe9 au lait"}, "the prompt is not valid UTF-8 text: byte 0xe9 at byte 4"),
    ("prompt list of bytes", {"prompt": [b"a", b"\xc3("]}, "the prompt 2 is not valid UTF-8 text: byte 0xc3"),
    ("negative prompt", {"negative_prompt": "blurry \udc80"}, "the negative prompt is not valid UTF-8 text: byte 0x80"),
    (
        "negative bytes",
        {"negative_prompt": b"\xff"},
        "the negative prompt is not valid UTF-8 text: byte 0xff at byte 1",
    ),
    ("lone surrogate", {"prompt": "a \ud800 b"}, "code point U+D800 at character 3"),
]


@pytest.mark.parametrize(("case", "overrides", "message"), TEXT_CASES, ids=[c[0] for c in TEXT_CASES])
def test_text_that_is_not_utf8_is_one_line_saying_where(
    no_weights: list[str], case: str, overrides: dict[str, Any], message: str
) -> None:
    assert message in _refused(no_weights, **overrides)


def test_utf8_bytes_are_decoded() -> None:
    s = build_request([b"caf\xc3\xa9", "th\u00e9"], "direct", 512, 512, negative_prompt=b"flou \xc3\xa9").settings
    assert s.prompt == ["café", "thé"] and s.negative_prompt == ["flou é", "flou é"]


# ------------------------------------------------------------------ the command line: exit 2, one line, no file

CLI_CASES: list[tuple[str, list[str], str]] = [
    ("accdiffusion on FLUX", ["--model", "tiny-flux", "--method", "accdiffusion"], "not FLUX"),
    ("apt on FLUX", ["--model", "tiny-flux", "--method", "apt"], "--set sas=false"),
    ("steps above the schedule", ["--steps", "1001"], "above the 1000 timesteps"),
    ("huge step count", ["--steps", "1000000"], "above the limit of 10,000"),
    ("collapsing schedule", ["--steps", "1000", "--scheduler", "unipc"], "collapses the unipc schedule"),
    ("meta device", ["--device", "meta"], "device 'meta' cannot run"),
    ("non-UTF-8 prompt", ["caf\udce9 noir"], "the prompt is not valid UTF-8 text: byte 0xe9 at character 4"),
    ("non-UTF-8 negative", ["--negative", "x\udcff"], "the negative prompt is not valid UTF-8 text: byte 0xff"),
    ("bool method parameter", ["--set", "jitter=2"], "jitter"),
]


@pytest.mark.parametrize(("case", "args", "message"), CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_refuses_in_one_line_with_exit_2_and_writes_nothing(
    no_weights: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str, args: list[str], message: str
) -> None:
    out = tmp_path / "out"
    prompt = [] if args and not args[0].startswith("--") else ["a cat"]
    argv = ["generate", *prompt, *args, "--width", "512", "--height", "512", "--out", str(out), "--quiet"]
    if "--model" not in args:
        argv += ["--model", "tiny-sdxl"]
    if "--steps" not in args:
        argv += ["--steps", "2"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("hiresdiff: error: ") and "\n" not in err and "Traceback" not in err
    assert message in err
    assert not out.exists() or not any(out.iterdir())
    assert no_weights == []
