"""Upscaling an input picture with every method: where it enters, strength, metadata, --from-png, bad input."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hiresdiff import HiresPipeline
from hiresdiff.cli import main
from hiresdiff.errors import HiresError
from hiresdiff.extras import prepare_extras
from hiresdiff.images import read_png_settings
from hiresdiff.inputs import load_source_image
from hiresdiff.methods import METHODS
from hiresdiff.ops.resample import resize_images, resize_pixels
from hiresdiff.pipeline import build_request
from hiresdiff.sampler import Run
from hiresdiff.stages import progressive_phases, source_phase_index


def picture(path: Path, height: int, width: int, seed: int = 0) -> Path:
    g = torch.Generator().manual_seed(seed)
    arr = (torch.rand(height, width, 3, generator=g) * 255).to(torch.uint8).numpy()
    Image.fromarray(arr).save(path)
    return path


def _kw(**extra):
    return {"steps": 4, "progress": False, "previews": False, "seed": 3, **extra}


@pytest.fixture
def spy(monkeypatch):
    """Names and first timesteps of every denoising stage, and every model-free sampling start."""
    calls: list[tuple[str, int, int]] = []
    real = Run.denoise

    def denoise(self, x, timesteps, *args, **kwargs):
        calls.append((kwargs.get("name", args[3] if len(args) > 3 else ""), len(timesteps), tuple(x.shape[-2:])))
        return real(self, x, timesteps, *args, **kwargs)

    monkeypatch.setattr(Run, "denoise", denoise)
    return calls


# ------------------------------------------------------------------------------------------- where it enters


def test_source_phase_is_the_largest_phase_the_input_covers():
    phases = progressive_phases(1024, 1024, 256, 8)  # 256, 512, 768, 1024
    assert [source_phase_index(phases, side) for side in (256, 300, 512, 700, 768, 1000)] == [0, 0, 1, 1, 2, 2]
    assert source_phase_index(phases, 100) == 0


@pytest.mark.parametrize("method", ["demofusion", "apt"])
def test_progressive_methods_start_after_the_phase_the_input_stands_for(tiny_sdxl_pipe, tmp_path, spy, method):
    hp = HiresPipeline.from_pipe(tiny_sdxl_pipe, "tiny-sdxl")
    src = picture(tmp_path / "in.png", 512, 512)
    res = hp("a cat", method, image=src, **_kw())  # scale 2 → 1024²: phases 256, 512, 768, 1024; input = phase 2
    assert res.images[0].size == (1024, 1024)
    assert [name.split()[:2] for name, *_ in spy] == [["phase", "3/4"], ["phase", "4/4"]]
    steps = [n for _, n, _ in spy]
    assert steps == ([4, 4] if method == "demofusion" else [2, 2])  # APT: T0 = round(0.6·4) = 2


def test_demofusion_anchor_and_phase_latent_come_from_the_encoded_input(tiny_sdxl_pipe, tmp_path, monkeypatch):
    hp = HiresPipeline.from_pipe(tiny_sdxl_pipe, "tiny-sdxl")
    src = picture(tmp_path / "in.png", 256, 256)
    seen = []

    def denoise(self, x, timesteps, *args, **kwargs):
        seen.append(x)
        return torch.linspace(-1, 1, x.numel()).view_as(x)  # a fake phase result with its own statistics

    monkeypatch.setattr(Run, "denoise", denoise)
    res = hp("a cat", "demofusion", image=src, **_kw())  # 512²: phase 1 (256²) is the input, then phase 2
    z = hp.adapter.encode(resize_pixels(load_source_image(src).pixels, (256, 256)), None)
    assert len(seen) == 1 and seen[0].shape == (1, 4, 64, 64)
    # the phase result is renormalised to the anchor: the scalar statistics of the encoded input
    torch.testing.assert_close(res.latents.mean(), z.mean(), atol=1e-5, rtol=0)
    torch.testing.assert_close(res.latents.std(), z.std(), atol=1e-5, rtol=1e-5)


def test_accdiffusion_maps_come_from_passes_on_the_noised_input(tiny_sdxl_pipe, tmp_path, spy, monkeypatch):
    hp = HiresPipeline.from_pipe(tiny_sdxl_pipe, "tiny-sdxl")
    observed = []
    real = Run.observe

    def observe(self, clean, name="observing"):
        observed.append(tuple(clean.shape))
        return real(self, clean, name)

    monkeypatch.setattr(Run, "observe", observe)
    res = hp("a castle on a hill", "accdiffusion", image=picture(tmp_path / "in.png", 256, 256), **_kw())
    assert observed == [(1, 4, 32, 32)]  # the input's phase-1 encoding; no phase-1 sampling
    assert [name.split()[1] for name, *_ in spy] == ["2/2"]
    assert res.images[0].size == (512, 512)


def test_apldm_skips_stage_one_and_refines_the_input_pixels(tiny_sdxl_pipe, tmp_path, spy, monkeypatch):
    hp = HiresPipeline.from_pipe(tiny_sdxl_pipe, "tiny-sdxl")
    ups = []
    real = Run.pixel_upsample

    def pixel_upsample(self, latents, size, pixels=None):
        ups.append((latents is None, None if pixels is None else tuple(pixels.shape)))
        return real(self, latents, size, pixels)

    monkeypatch.setattr(Run, "pixel_upsample", pixel_upsample)
    res = hp("a cat", "apldm", image=picture(tmp_path / "in.png", 256, 384), **_kw(steps=10))
    assert ups == [(True, (1, 3, 256, 384))]
    assert [(name.split()[:2], n) for name, n, _ in spy] == [(["stage", "2.1"], 2)]  # p = 0.2 of 10 steps
    assert res.images[0].size == (768, 512)


def test_scalediff_takes_z_ru_from_the_input_pixels(tiny_sdxl_pipe, tmp_path, spy, monkeypatch):
    hp = HiresPipeline.from_pipe(tiny_sdxl_pipe, "tiny-sdxl")
    ups = []
    real = Run.pixel_upsample

    def pixel_upsample(self, latents, size, pixels=None):
        ups.append(None if pixels is None else tuple(pixels.shape))
        return real(self, latents, size, pixels)

    monkeypatch.setattr(Run, "pixel_upsample", pixel_upsample)
    hp("a cat", "scalediff", image=picture(tmp_path / "in.png", 512, 512), scale=2, **_kw(steps=5))
    # stages 256, 512, 1024: the 512² input is stage 2, stage 3 gets Z_RU from its pixels
    assert ups == [(1, 3, 512, 512)]
    assert [(name.split()[1], n) for name, n, _ in spy] == [("3/3", 2)]  # ρ = 0.4 of 5 steps


@pytest.mark.parametrize(("method", "strength", "steps"), [("direct", None, 5), ("multidiffusion", 0.4, 5)])
def test_sdedit_baselines_start_at_the_strength(tiny_sdxl_pipe, tmp_path, spy, method, strength, steps):
    hp = HiresPipeline.from_pipe(tiny_sdxl_pipe, "tiny-sdxl")
    extra = {} if strength is None else {"strength": strength}
    hp("a cat", method, image=picture(tmp_path / "in.png", 256, 256), **_kw(steps=steps, **extra))
    assert [n for _, n, _ in spy] == [4 if strength is None else 2]  # 0.8 (default) → start 1; 0.4 → start 3


def test_resize_is_the_plain_resample_of_the_input(tiny_sdxl_pipe, tmp_path, monkeypatch):
    hp = HiresPipeline.from_pipe(tiny_sdxl_pipe, "tiny-sdxl")
    monkeypatch.setattr(hp.adapter, "predict", lambda *a, **k: pytest.fail("resize of an input needs no model"))
    src = picture(tmp_path / "in.png", 256, 256)
    res = hp("a cat", "resize", image=src, scale=2.5, **_kw())
    want = resize_images(load_source_image(src).pixels, (640, 640), "bicubic")
    assert res.images[0].size == (640, 640)
    got = torch.from_numpy(np.array(res.images[0])).float()
    expected = ((want[0].permute(1, 2, 0) + 1) * 127.5).round()
    assert (got - expected).abs().max() <= 1


#: accdiffusion-v2 needs a canny ControlNet (its --image run: tests/test_accdiffusion_v2.py)
@pytest.mark.parametrize("method", [m for m, spec in METHODS.items() if not spec.own_control])
@pytest.mark.parametrize("fixture", ["tiny_sdxl_pipe", "tiny_sd_pipe"])
def test_every_method_upscales_an_input(request, tmp_path, method, fixture):
    hp = HiresPipeline.from_pipe(request.getfixturevalue(fixture), fixture)
    n = hp.native_size
    res = hp(["a cat", "a dog"], method, image=picture(tmp_path / "in.png", n, n * 3 // 2), **_kw(steps=3))
    assert [im.size for im in res.images] == [(3 * n, 2 * n)] * 2
    meta = res.metadata[1]
    assert meta["image"]["name"] == "in.png" and (meta["image"]["height"], meta["image"]["width"]) == (n, n * 3 // 2)


def test_fit_crop_and_pad_reach_another_aspect(tiny_sdxl_pipe, tmp_path):
    hp = HiresPipeline.from_pipe(tiny_sdxl_pipe, "tiny-sdxl")
    src = picture(tmp_path / "in.png", 256, 256)
    with pytest.raises(HiresError, match="another aspect ratio"):
        hp("a", "direct", 768, 512, image=src, **_kw())
    for fit in ("crop", "pad"):
        res = hp("a", "direct", 768, 512, image=src, fit=fit, **_kw(steps=2))
        assert res.images[0].size == (768, 512) and res.metadata[0]["fit"] == fit


@pytest.mark.parametrize("method", [m for m, spec in METHODS.items() if spec.takes_controlnet and not spec.own_control])
def test_image_controlnet_tile_and_lora_together(tiny_sdxl_pipe, tmp_path, make_lora, make_controlnet, method):
    net = tmp_path / "controlnet"
    make_controlnet(tiny_sdxl_pipe.unet).save_pretrained(net)
    lora = make_lora("tiny-sdxl", 1, tmp_path / "lora")
    hp = HiresPipeline.from_pipe(tiny_sdxl_pipe, "tiny-sdxl")
    before = {k: v.clone() for k, v in tiny_sdxl_pipe.unet.state_dict().items()}
    src = picture(tmp_path / "in.png", 256, 256)
    extra = {"image": src, "controlnet": str(net), "control_scale": 0.6, "loras": [(str(lora), 0.8)]}
    res = hp("a cat", method, **_kw(steps=3, **extra))
    assert res.images[0].size == (512, 512) and np.isfinite(np.asarray(res.images[0])).all()
    meta = res.metadata[0]
    assert meta["loras"] == [
        {
            "name": lora.name,
            "path": str(lora.resolve()),
            "sha256": hashlib.sha256(lora.read_bytes()).hexdigest(),
            "scale": 0.8,
        }
    ]
    assert meta["controlnet"] == str(net) and meta["image"]["name"] == "in.png"
    after = tiny_sdxl_pipe.unet.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


# ------------------------------------------------------------------------------------------- strength


@pytest.mark.parametrize(
    ("method", "size", "expected"),
    [
        ("demofusion", 512, {"start_step": 30}),
        ("accdiffusion", 512, {"start_step": 30}),
        ("apt", 512, {"shortcut_steps": 20}),
        ("scalediff", 512, {"restart_ratio": 0.4}),
        ("apldm", 512, {"progressive": (0.4,)}),
    ],
)
def test_strength_maps_onto_the_methods_own_start(tmp_path, method, size, expected):
    extras, w, h = prepare_extras(native=256, grid=8, family="sdxl", image=picture(tmp_path / "i.png", 256, 256))
    req = build_request("a", method, w, h, extras=extras, steps=50, strength=0.4)
    for name, value in expected.items():
        assert getattr(req.params, name) == value
    assert req.settings.strength == 0.4


def test_strength_errors(tmp_path):
    extras, w, h = prepare_extras(native=256, grid=8, family="sdxl", image=picture(tmp_path / "i.png", 256, 256))
    cases = [
        ({"method": "demofusion", "strength": 0.5}, None, "needs --image"),
        ({"method": "resize", "strength": 0.5}, extras, "does not denoise an input image"),
        ({"method": "demofusion", "strength": 0.5, "start_step": 3}, extras, "not both"),
        ({"method": "demofusion", "strength": 0.0}, extras, "--strength must be"),
        ({"method": "demofusion", "strength": 1.5}, extras, "(0, 1]"),
    ]
    for kwargs, ex, message in cases:
        method = kwargs.pop("method")
        with pytest.raises(HiresError, match=message.replace("(", r"\(").replace("]", r"\]")) as info:
            build_request("a", method, w, h, extras=ex, **kwargs)
        assert "\n" not in str(info.value)


# ------------------------------------------------------------------------------------------- metadata, CLI


def test_cli_from_png_regenerates_and_refuses_a_changed_input(tmp_path):
    src = picture(tmp_path / "in.png", 256, 256)
    out = tmp_path / "out"
    base = ["--model", "tiny-sdxl", "--quiet", "--steps", "3"]
    argv = ["generate", "a cat", *base, "--method", "demofusion", "--image", str(src), "--strength", "0.5"]
    assert main([*argv, "--out", str(out)]) == 0
    png = out / "000-demofusion-seed0.png"
    meta = read_png_settings(png)
    assert meta["image"] == {
        "name": "in.png",
        "width": 256,
        "height": 256,
        "sha256": hashlib.sha256(src.read_bytes()).hexdigest(),
        "notes": [],
    }
    assert (
        meta["strength"] == 0.5 and meta["params"]["start_step"] == 1 and (meta["width"], meta["height"]) == (512, 512)
    )
    again = tmp_path / "again"
    assert main(["generate", "--from-png", str(png), "--image", str(src), "--quiet", "--out", str(again)]) == 0
    assert (again / png.name).read_bytes() == png.read_bytes()
    assert main(["generate", "--from-png", str(png), "--quiet", "--out", str(again)]) == 2
    other = picture(tmp_path / "other.png", 256, 256, seed=9)
    assert main(["generate", "--from-png", str(png), "--image", str(other), "--quiet", "--out", str(again)]) == 2


BAD_CLI = [
    (["--image", "MISSING"], "no such image file"),
    (["--image", "CORRUPT"], "cannot read image"),
    (["--image", "SMALL"], "smaller than the model's base canvas"),
    (["--image", "OK", "--scale", "1"], "--scale must be a finite number above 1"),
    (["--image", "OK", "--scale", "0.5"], "--scale must be a finite number above 1"),
    (["--image", "OK", "--scale", "2", "--width", "512"], "not both"),
    (["--image", "OK", "--width", "512", "--height", "256"], "another aspect ratio"),
    (["--image", "OK", "--width", "200"], "does not enlarge"),
    (["--scale", "2"], "--scale needs an input image"),
    (["--fit", "crop"], "--fit needs an input image"),
    (["--strength", "0.5"], "needs --image"),
    (["--image", "OK", "--strength", "0"], "--strength must be"),
    (["--image", "OK", "--strength", "2"], "(0, 1]"),
    (["--image", "OK", "--method", "resize", "--strength", "0.3"], "does not denoise"),
    (["--control-image", "OK"], "--control-image needs --controlnet"),
    (["--image", "OK", "--controlnet", "MISSING"], "does not exist"),
    (["--image", "OK", "--control-scale", "0.5"], "--control-scale needs --controlnet"),
    (["--lora", "MISSING"], "MISSING"),
    (["--image", "BOMB"], "decompression"),
]


@pytest.mark.parametrize(("args", "message"), BAD_CLI)
def test_bad_upscale_input_is_one_line_before_model_work(tmp_path, monkeypatch, capsys, args, message):
    import hiresdiff.pipeline as pipeline_mod

    monkeypatch.setattr(pipeline_mod.HiresPipeline, "from_model", lambda *a, **k: pytest.fail("model was loaded"))
    files = {
        "OK": picture(tmp_path / "ok.png", 256, 256),
        "SMALL": picture(tmp_path / "small.png", 100, 80),
        "MISSING": tmp_path / "missing.png",
    }
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(files["OK"].read_bytes()[:200])
    files["CORRUPT"] = corrupt
    bomb = picture(tmp_path / "bomb.png", 256, 256)
    files["BOMB"] = bomb
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000 if "BOMB" in args else Image.MAX_IMAGE_PIXELS)
    argv = ["generate", "a cat", "--model", "tiny-sdxl", "--quiet", "--out", str(tmp_path / "out")]
    argv += [str(files.get(a, a)) for a in args]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("hiresdiff: error:") and "\n" not in err
    assert message.lower() in err.lower(), err
    assert not (tmp_path / "out").exists()


def test_cli_lora_round_trip_and_changed_file(tmp_path, make_lora):
    lora = make_lora("tiny-sdxl", 2, tmp_path / "lora")
    out = tmp_path / "out"
    argv = ["generate", "a cat", "--model", "tiny-sdxl", "--method", "direct", "--width", "256", "--height", "256"]
    argv += ["--steps", "2", "--quiet", "--no-previews"]
    assert main([*argv, "--lora", f"{lora}:0.7", "--out", str(out)]) == 0
    png = out / "000-direct-seed0.png"
    meta = read_png_settings(png)
    assert [(x["name"], x["scale"]) for x in meta["loras"]] == [(lora.name, 0.7)]
    plain = tmp_path / "plain"
    assert main([*argv, "--out", str(plain)]) == 0  # the same run without the LoRA differs
    assert (plain / png.name).read_bytes() != png.read_bytes()
    again = tmp_path / "again"
    assert main(["generate", "--from-png", str(png), "--quiet", "--no-previews", "--out", str(again)]) == 0
    assert (again / png.name).read_bytes() == png.read_bytes()
    lora.write_bytes(lora.read_bytes() + b" ")  # the LoRA file changed since
    assert main(["generate", "--from-png", str(png), "--quiet", "--out", str(again)]) == 2


@pytest.mark.parametrize("method", ["direct", "demofusion", "apldm", "scalediff"])
def test_flux_upscales_an_input(tiny_flux, tmp_path, method):
    hp = HiresPipeline.from_pipe(tiny_flux, "tiny-flux")
    res = hp("a cat", method, image=picture(tmp_path / "in.png", 256, 384), **_kw(steps=3))
    assert res.images[0].size == (768, 512) and res.metadata[0]["image"]["width"] == 384
    with pytest.raises(HiresError, match="FLUX"):
        hp("a cat", method, image=tmp_path / "in.png", controlnet="x/y", **_kw())
