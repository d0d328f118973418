"""Add-ons on the page and the HTTP API: ControlNets, LoRAs and upscalers a server offers by name
(``hiresdiff serve --controlnet/--lora/--upscaler``), checked before the model loads, chosen by name only."""

from __future__ import annotations

import json
import shlex
import socket
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from hiresdiff.cli import build_parser, main
from hiresdiff.errors import HiresError
from hiresdiff.images import PNG_KEY
from hiresdiff.models.loading import resolve_model
from hiresdiff.pipeline import ModelFacts
from hiresdiff.web.addons import AddOns, named
from hiresdiff.web.api import api_request
from hiresdiff.web.app import Limits, Session, WebApp, command_line

SDXL = ModelFacts.of_spec(resolve_model("tiny-sdxl"))


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny-sdxl ControlNet, a canny-named one, a LoRA, an SR model."""
    from hiresdiff.models.tiny_addons import save_tiny_addons, save_tiny_upscaler

    out = tmp_path_factory.mktemp("addons")
    controlnet, lora, canny = save_tiny_addons("tiny-sdxl", out)
    upscaler = save_tiny_upscaler(out / "x4.safetensors")
    return {"controlnet": controlnet, "canny": canny, "lora": lora, "upscaler": upscaler}


@pytest.fixture(scope="module")
def app(tiny_sdxl_pipe: Any, files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> WebApp:
    from hiresdiff import HiresPipeline

    nets = [str(files["controlnet"]), f"canny={files['canny']}"]
    offer = AddOns.offered(SDXL, nets, [f"detail={files['lora']}"], [str(files["upscaler"])])
    hp = HiresPipeline.from_pipe(tiny_sdxl_pipe, "tiny-sdxl")
    return WebApp(hp, tmp_path_factory.mktemp("web-addons"), Limits(512 * 512, 10), addons=offer)


def _form(**changes: Any) -> dict[str, Any]:
    form = {"prompt": "a red fox", "negative": "", "method": "demofusion", "preset": "", "width": 512, "height": 512,
            "image": None, "scale": 2.0, "strength": 0.0, "steps": 2, "guidance": 7.5, "scheduler": "euler",
            "seed": 0, "random_seed": False, "batch": 1}  # fmt: skip
    return {**form, **changes}


def _values(app: WebApp) -> list[Any]:
    return [s.text_default() if s.kind == "text" else s.default for specs in app.fields.values() for s in specs]


def _picture() -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (512, 512, 3), dtype=np.uint8))


def test_names_are_given_or_taken_from_the_file():
    assert named("--lora", ["detail=/w/lora.safetensors", "/w/x/pytorch_lora_weights.safetensors"]) == {
        "detail": "/w/lora.safetensors",
        "pytorch_lora_weights": "/w/x/pytorch_lora_weights.safetensors",
    }
    assert named("--controlnet", ["/m/controlnet-canny/", "org/cn-depth"]) == {
        "controlnet-canny": "/m/controlnet-canny/",
        "cn-depth": "org/cn-depth",
    }
    assert named("--lora", ["/w/a=b.safetensors"]) == {"a=b": "/w/a=b.safetensors"}  # an '=' in a path is no name
    with pytest.raises(HiresError, match="two add-ons are named 'a'"):
        named("--lora", ["a=/x.safetensors", "/y/a.safetensors"])
    with pytest.raises(HiresError, match="'none' is the page's 'no add-on' entry"):
        named("--upscaler", ["none=/x.pth"])


def test_offered_add_ons_are_checked_against_the_model(files: dict[str, Path]):
    sd = ModelFacts.of_spec(resolve_model("tiny-sd"))
    with pytest.raises(HiresError, match="ControlNet") as err:
        AddOns.offered(sd, controlnets=[str(files["controlnet"])])  # an SDXL ControlNet for an SD model
    assert "\n" not in str(err.value)
    with pytest.raises(HiresError, match="no-such"):
        AddOns.offered(SDXL, loras=["/no-such/file.safetensors"])
    with pytest.raises(HiresError, match=r"ControlNets work with SD 1\.x/2\.x and SDXL"):
        AddOns.offered(ModelFacts.of_spec(resolve_model("tiny-flux")), controlnets=[str(files["controlnet"])])
    assert not AddOns() and AddOns.offered(SDXL, upscalers=[str(files["upscaler"])]).upscalers == {
        "x4": str(files["upscaler"])
    }


def test_the_page_chooses_add_ons_by_name(app: WebApp, files: dict[str, Path]):
    """Names become the server's paths; the request carries them; the command line repeats them."""
    control = _picture()
    choice = {"controlnet": "controlnet", "control_image": control, "control_scale": 0.5, "loras": ["detail"],
              "lora_scale": 0.7, "upscaler": "none"}  # fmt: skip
    req, _, shown = app.request(_form(**choice), _values(app))
    x = req.extras
    assert x.controlnet is not None and Path(x.controlnet.path) == files["controlnet"] and x.control_scale == 0.5
    assert x.control_image is not None and [(Path(lo.path), lo.scale) for lo in x.loras] == [(files["lora"], 0.7)]
    assert x.upscaler is None
    args = build_parser().parse_args(shlex.split(command_line("tiny-sdxl", "demofusion", "x", shown, {}))[1:])
    assert (args.controlnet, args.control_image, args.control_scale) == (str(files["controlnet"]), "CONTROL.png", 0.5)
    assert args.loras == [f"{files['lora']}:0.7"] and args.upscaler is None
    sr, _, shown = app.request(_form(method="resize", upscaler="x4"), _values(app))
    assert sr.extras.upscaler is not None and Path(sr.extras.upscaler.path) == files["upscaler"]
    assert build_parser().parse_args(shlex.split(command_line("m", "resize", "x", shown, {}))[1:]).upscaler == str(
        files["upscaler"]
    )
    plain, _, _ = app.request(_form(controlnet="none", loras=[], upscaler=None), _values(app))
    assert plain.extras.controlnet is None and plain.extras.loras == ()


@pytest.mark.parametrize(
    ("choice", "message"),
    [
        ({"loras": ["nope"]}, "LoRA 'nope' is not offered by this server (offered: detail; hiresdiff serve --lora"),
        ({"controlnet": "/etc/passwd"}, "ControlNet '/etc/passwd' is not offered by this server"),
        ({"upscaler": "x2"}, "upscaler 'x2' is not offered by this server (offered: x4;"),
        ({"control_image": "picture"}, "a control image needs a ControlNet: choose one first"),
        ({"controlnet": "controlnet"}, "--controlnet needs a control image"),
        ({"loras": "detail"}, "loras must be a list of names"),
        ({"control_scale": 0.5}, "a ControlNet scale of 0.5 needs a ControlNet: choose one first"),
        ({"lora_scale": 0.7, "loras": ["none"]}, "a LoRA scale of 0.7 needs a LoRA: choose one first"),
    ],
)
def test_the_page_refuses_what_is_not_offered_in_one_line(app: WebApp, choice: dict[str, Any], message: str):
    updates = list(app.generate(Session(), _form(**choice), _values(app)))
    assert len(updates) == 1 and message in updates[0]["error"] and "\n" not in updates[0]["error"]


def test_a_page_run_with_a_controlnet_and_a_lora_records_them(app: WebApp, files: dict[str, Path]):
    form = _form(controlnet="controlnet", control_image=_picture(), loras=["detail"], lora_scale=0.5)
    updates = list(app.generate(Session(), form, _values(app)))
    assert "error" not in updates[-1] or not updates[-1]["error"], updates[-1].get("error")
    (png,) = sorted(app.out.glob("*.png"))
    with Image.open(png) as im:
        meta = json.loads(im.text[PNG_KEY])
    assert meta["controlnet"] == str(files["controlnet"]) and meta["loras"][0]["scale"] == 0.5
    assert "--controlnet" in updates[-1]["command"] and f"{files['lora']}:0.5" in updates[-1]["command"]


def test_the_api_takes_add_ons_by_name(app: WebApp, files: dict[str, Path]):
    base = ("a fox", "accdiffusion-v2", 512, 512, 2, 7.5, 0, "", "euler", 1, "", None)
    req, _, shown = api_request(app, *base, {"controlnet": "canny", "loras": ["detail"], "lora_scale": 0.25})
    assert Path(req.extras.controlnet.path) == files["canny"] and req.extras.loras[0].scale == 0.25
    assert shown["controlnet"] == str(files["canny"])
    for choice, message in (
        ({"loras": ["other"]}, "LoRA 'other' is not offered"),
        ({"control_scale": "high", "controlnet": "canny"}, "control_scale must be a number"),
        ({"lora_scale": True, "loras": ["detail"]}, "lora_scale must be a number"),
    ):
        with pytest.raises(HiresError, match=message):
            api_request(app, *base, choice)


def test_serve_refuses_a_bad_add_on_before_loading_the_model(monkeypatch, capsys, files: dict[str, Path], tmp_path):
    from hiresdiff import pipeline

    def no_load(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the model loaded before the add-ons were checked")

    monkeypatch.setattr(pipeline.HiresPipeline, "from_model", no_load)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = ["serve", "--model", "tiny-sdxl", "--port", str(port), "--out", str(tmp_path)]
    assert main([*argv, "--model", "tiny-sd", "--controlnet", str(files["controlnet"])]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("hiresdiff: error: ") and "ControlNet" in err and len(err.splitlines()) == 1
    assert main([*argv, "--controlnet", "a=/no/such/folder", "--controlnet", f"a={files['controlnet']}"]) == 2
    assert "two add-ons are named 'a'" in capsys.readouterr().err
