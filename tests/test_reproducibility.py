"""What a PNG says is what it was: every pixel-changing field round-trips through the metadata; outputs are never
overwritten; file modes follow the umask; API inputs of the wrong type are one-line errors."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import pytest

from hiresdiff import HiresPipeline
from hiresdiff.cli import main
from hiresdiff.config import GenerationSettings
from hiresdiff.errors import HiresError
from hiresdiff.from_png import read_request
from hiresdiff.images import read_png_settings, save_png
from hiresdiff.methods import METHODS
from hiresdiff.pipeline import build_request

#: changed values for fields whose generic alternative would not fit (None defaults, names, grids)
ALTERNATIVES: dict[str, Any] = {
    "window": 128,
    "stride": 64,
    "restart_ratio": 0.5,
    "lfm_factor": 0.25,
    "progressive": (0.3,),
    "shortcut": 0.5,
    "shortcut_steps": 2,
    "filter": "lanczos",
    "host": "accdiffusion",
    "sas_mode": "relabel",
    "sas_eta": "2=2.5",
    "start_step": 1,
    "prompt_threshold": 0.5,
    "scheduler": "ddim",
    "negative_prompt": "blurry",
    "ag_decay": "linear",
    "seed": 5,
    "freeu_rule": "diffusers",
    "t1_ratio": 0.5,
    "t2_ratio": 0.1,
    "aggressive": False,
    "shift": "cycle",
    "start_fraction": 0.2,
    "stop_fraction": 0.6,
    "mask_floor": 0.3,
    "weak_dilation_divisor": 2.0,
    "guidance_variant": "cfg",
    "base_size": (256.0, 256.0),
    "table": "mid=2",
    "light_table": "mid=1.5",
    "global_mode": "dilated",
    "blur_axes": "hw",
    "dilate_fraction": 0.5,
    "ndcfg_fraction": 0.4,
    "dwt_steps": 2,
    "wavelet": "haar",
    "sharpen_sigma": (0.5, 1.0),
    "stage_guidance": 8.0,
    "upsample": "bilinear",
    "stages": (512.0, 768.0),
    "size_conditioning": "stage",
    "scale_factor": 2,
    "tau": "continuous",
    "low_size_cond": "target",
}
#: settings that change pixels (the others place or batch the work: max_batch, low_vram, previews, …)
PIXEL_SETTINGS = (
    "steps",
    "guidance",
    "scheduler",
    "negative_prompt",
    "seed",
    "ag_lambda",
    "ag_delay",
    "ag_exponent",
    "hidiffusion",
)


#: alternatives of fields whose name another method uses with another type
METHOD_ALTERNATIVES: dict[tuple[str, str], Any] = {("scalecrafter", "progressive"): False}


def _alternative(name: str, default: Any, method: str = "") -> Any:
    if (method, name) in METHOD_ALTERNATIVES:
        return METHOD_ALTERNATIVES[method, name]
    if isinstance(default, bool):  # before the names: a switch may share its name with another method's field
        return not default
    if name in ALTERNATIVES:
        return ALTERNATIVES[name]
    if isinstance(default, int):
        return default + 1
    if isinstance(default, float):
        return default * 0.5 if default else 0.25
    raise AssertionError(f"no alternative value for {name}={default!r}: add one to ALTERNATIVES")


def _cases() -> list[tuple[str, str]]:
    methods = [m for m in METHODS.values() if not m.own_control]  # accdiffusion-v2: tests/test_accdiffusion_v2.py
    out = [(m.name, f.name) for m in methods for f in dataclasses.fields(m.params)]
    return out + [("demofusion", name) for name in PIXEL_SETTINGS]


@pytest.mark.parametrize(("method", "name"), _cases())
def test_every_pixel_changing_field_round_trips_through_the_png(tiny_sdxl_pipe, tmp_path, method, name):
    """Change the field → the metadata differs from the default's → ``--from-png`` rebuilds exactly that request."""
    hp = HiresPipeline.from_pipe(tiny_sdxl_pipe, "tiny-sdxl")
    base = {"steps": 6, "seed": 0}
    fields = {f.name: f.default for f in dataclasses.fields(METHODS[method].params)}
    settings = {f.name: f.default for f in dataclasses.fields(GenerationSettings)}
    default = fields[name] if name in fields else {**settings, **base}.get(name)
    changed = {**base, name: _alternative(name, default, method)}
    if name == "window":
        changed["stride"] = 64
    try:
        req = build_request("a red fox", method, 768, 512, **changed)
        plain = build_request("a red fox", method, 768, 512, **base)
    except HiresError as exc:
        pytest.fail(f"{method}.{name}={changed[name]!r} is not a valid alternative: {exc}")
    meta, meta_plain = hp._metadata(req, 0, req.settings.seed), hp._metadata(plain, 0, plain.settings.seed)
    assert meta != meta_plain, f"{method}.{name} does not show in the metadata"
    png = save_png(_blank(), tmp_path / "x.png", meta)
    kwargs = read_request(str(png)).kwargs
    for key in ("model", "dtype", "expected", "loras", "prompt", "method", "width", "height"):
        kwargs.pop(key, None)
    again = build_request("a red fox", method, 768, 512, **kwargs)
    assert dataclasses.asdict(again.settings) == dataclasses.asdict(req.settings)
    assert dataclasses.asdict(again.params) == dataclasses.asdict(req.params)


def _blank() -> Any:
    from PIL import Image

    return Image.new("RGB", (8, 8))


def test_attentive_guidance_image_regenerates_from_its_png(tmp_path):
    argv = ["generate", "a koi pond", "--model", "tiny-sdxl", "--steps", "4", "--quiet", "--no-previews"]
    assert main([*argv, "--set", "ag_lambda=0.05", "--set", "ag_delay=1", "--out", str(tmp_path / "ag")]) == 0
    assert main([*argv, "--out", str(tmp_path / "plain")]) == 0
    png = tmp_path / "ag" / "000-demofusion-seed0.png"
    assert read_png_settings(png)["ag_lambda"] == 0.05
    assert main(["generate", "--from-png", str(png), "--quiet", "--no-previews", "--out", str(tmp_path / "re")]) == 0
    again = (tmp_path / "re" / png.name).read_bytes()
    assert again == png.read_bytes() and again != (tmp_path / "plain" / png.name).read_bytes()


def test_from_png_refuses_flags_it_would_ignore(tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["generate", "a", "--model", "tiny-sdxl", "--steps", "2", "--quiet", "--out", str(out)]) == 0
    png = str(out / "000-demofusion-seed0.png")
    assert (
        main(["generate", "another prompt", "--from-png", png, "--steps", "9", "--seed", "4", "--set", "sigma=1"]) == 2
    )
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and all(flag in err for flag in ("a prompt", "--steps", "--seed", "--params"))


def test_generate_never_overwrites_and_keeps_previews_with_their_image(tmp_path):
    out = tmp_path / "o"
    argv = ["generate", "a", "--model", "tiny-sdxl", "--steps", "1", "--quiet", "--out", str(out)]
    assert main([*argv, "--width", "256", "--height", "256"]) == 0
    first = (out / "000-demofusion-seed0.png").read_bytes()
    assert main(argv) == 0  # 512², two phases
    assert (out / "000-demofusion-seed0.png").read_bytes() == first
    assert sorted(p.name for p in out.iterdir()) == [
        "000-demofusion-seed0.png",
        "001-demofusion-seed0-phase1of2.png",
        "001-demofusion-seed0.png",
    ]


def test_written_files_follow_the_umask(tmp_path):
    out = tmp_path / "o"
    assert main(["generate", "a", "--model", "tiny-sdxl", "--steps", "1", "--quiet", "--out", str(out)]) == 0
    mask = os.umask(0)
    os.umask(mask)
    assert {p.stat().st_mode & 0o777 for p in out.iterdir()} == {0o666 & ~mask}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"width": 0}, "width must be a positive number of pixels, got 0"),
        ({"height": 0}, "height must be a positive number of pixels, got 0"),
        ({"width": True}, "width must be an integer, got True (bool)"),
        ({"prompt": 123}, "the prompt must be a string or a list of strings, got 123 (int)"),
        ({"model": 123}, "model must be a name, path or hub id (a string), got 123 (int)"),
        ({"generator": "seed"}, "generator must be a torch.Generator"),
    ],
)
def test_wrong_api_inputs_are_one_line_errors(kwargs, message):
    import hiresdiff

    call = {"prompt": "a", "method": "direct", "model": "tiny-sdxl", "steps": 1, "progress": False, **kwargs}
    with pytest.raises(HiresError) as info:
        hiresdiff.generate(**call)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_cli_width_zero_is_an_error_not_the_default(capsys):
    assert main(["generate", "a", "--model", "tiny-sdxl", "--width", "0", "--quiet"]) == 2
    assert "width must be a positive number of pixels" in capsys.readouterr().err


def test_methods_listing_shows_the_shared_settings_and_no_none(capsys):
    assert main(["methods"]) == 0
    listing = capsys.readouterr().out
    assert "--set ag_lambda=0.0" in listing and "--set ag_decay=cosine" in listing
    assert "=None" not in listing and "--set ag_lambda=0.004 (this method's default)" in listing


def test_flux_refuses_a_negative_prompt(capsys):
    assert main(["generate", "a", "--model", "tiny-flux", "--negative", "blurry", "--quiet"]) == 2
    assert "has no negative prompt" in capsys.readouterr().err


def test_from_png_of_a_batch_image_is_bit_exact(tmp_path):
    """Image 1 of a 2-prompt batch: --from-png regenerates the batch (same calls, same rounding) and keeps it."""
    out = tmp_path / "batch"
    argv = ["generate", "a red fox", "a blue whale", "--model", "tiny-sdxl", "--steps", "3", "--quiet"]
    assert main([*argv, "--out", str(out)]) == 0
    png = out / "001-demofusion-seed1.png"
    meta = read_png_settings(png)
    assert meta["batch"] == {
        "index": 1,
        "prompts": ["a red fox", "a blue whale"],
        "negative_prompts": meta["batch"]["negative_prompts"],
        "images_per_prompt": 1,
        "first_seed": 0,
    }
    again = tmp_path / "again"
    assert main(["generate", "--from-png", str(png), "--quiet", "--out", str(again)]) == 0
    regenerated = sorted(p.name for p in again.iterdir())
    assert regenerated == ["000-demofusion-seed1-phase1of2.png", "000-demofusion-seed1.png"]
    assert (again / "000-demofusion-seed1.png").read_bytes() == png.read_bytes()
    phase = (out / "001-demofusion-seed1-phase1of2.png").read_bytes()
    assert (again / "000-demofusion-seed1-phase1of2.png").read_bytes() == phase


def test_an_over_long_prompt_is_one_warning_line_and_recorded(tmp_path, capsys):
    prompt = " ".join(["castle"] * 60)  # 6 byte-level tokens each on the tiny tokenizer: far over 75
    out = tmp_path / "o"
    argv = ["generate", prompt, "--model", "tiny-sdxl", "--method", "direct", "--width", "256", "--height", "256"]
    assert main([*argv, "--steps", "1", "--quiet", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert err.count("hiresdiff: warning:") == 1 and "token(s) too long" in err
    assert "indexing errors" not in err and "was truncated" not in err  # the libraries' own messages are silenced
    meta = read_png_settings(out / "000-direct-seed0.png")
    assert prompt.startswith(meta["prompt_seen"]) and 0 < len(meta["prompt_seen"]) < len(prompt)
