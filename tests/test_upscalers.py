"""SR-model upscaling (``--upscaler``): loading and detection, tiling, pickle and non-SR refusals, the CLI with
``resize``/``apldm``/``scalediff``, the PNG record and ``--from-png``."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from hiresdiff.cli import main
from hiresdiff.errors import HiresError
from hiresdiff.images import PNG_KEY
from hiresdiff.models import upscalers
from hiresdiff.models.rrdbnet import build_rrdbnet, esrgan_state
from hiresdiff.models.upscalers import Upscaler, load_upscaler, resolve_upscaler, upscale

TINY = ["--model", "tiny-sdxl", "--width", "512", "--height", "512", "--steps", "4", "--quiet"]


@pytest.fixture(scope="module")
def sr_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny ×4 ESRGAN of ``make-tiny --upscaler``."""
    out = tmp_path_factory.mktemp("tiny")
    assert main(["make-tiny", "--upscaler", "--out", str(out)]) == 0
    return out / "upscaler.safetensors"


def _spandrel_importable() -> bool:
    try:
        import spandrel  # noqa: F401
    except ImportError:
        return False
    return True


def test_tiny_file_loads_detects_and_scales(sr_file: Path) -> None:
    spec = resolve_upscaler(sr_file)
    assert (spec.arch, spec.scale, spec.name) == ("ESRGAN", 4, "upscaler.safetensors")
    model = load_upscaler(spec)
    g = torch.Generator().manual_seed(0)
    images = torch.rand((2, 3, 24, 40), generator=g) * 2 - 1
    for size in ((48, 80), (96, 160), (72, 120), (200, 300)):  # ×2, ×4 exactly, ×3, two passes then a shrink
        out = upscale(images, model, size)
        assert out.shape == (2, 3, *size) and out.dtype == images.dtype
        assert out.min() >= -1 and out.max() <= 1
    x4 = upscale(images, model, (96, 160))
    assert torch.equal(x4, model((images + 1) / 2) * 2 - 1)  # ×4: one pass, nothing resampled
    assert not torch.allclose(x4[0], x4[1], atol=1e-2)  # the output follows the input
    assert x4.std() > 0.05  # not clamped to one colour


def test_esrgan_layouts_and_spandrel_agree(sr_file: Path) -> None:
    """BSRGAN and original-ESRGAN tensor names build the same network as BasicSR's (spandrel's three layouts);
    where spandrel imports, its network gives the same pixels as hiresdiff's RRDBNet."""
    state = load_file(str(sr_file))
    x = torch.rand((1, 3, 12, 16), generator=torch.Generator().manual_seed(1))
    net = build_rrdbnet(esrgan_state(state))
    want = net(x)
    bsrgan = {}
    for key, value in state.items():
        key = re.sub(r"^body\.(\d+)\.rdb", r"RRDB_trunk.\1.RDB", key)
        for new, old in (("conv_body", "trunk_conv"), ("conv_up", "upconv"), ("conv_hr", "HRconv")):
            key = key.replace(new, old)
        bsrgan[key] = value
    assert torch.equal(build_rrdbnet(esrgan_state(bsrgan))(x), want)
    original = {"model.0.weight": state["conv_first.weight"], "model.0.bias": state["conv_first.bias"]}
    for key, value in state.items():
        if m := re.match(r"body\.(\d+)\.rdb(\d)\.conv(\d)\.(\w+)", key):
            original[f"model.1.sub.{m[1]}.RDB{m[2]}.conv{m[3]}.0.{m[4]}"] = value
    for name, index in (("conv_body", "1.sub.1"), ("conv_up1", 3), ("conv_up2", 6), ("conv_hr", 8), ("conv_last", 10)):
        for p in ("weight", "bias"):
            original[f"model.{index}.{p}"] = state[f"{name}.{p}"]
    assert torch.equal(build_rrdbnet(esrgan_state(original))(x), want)
    if _spandrel_importable():
        import spandrel

        desc = spandrel.ModelLoader().load_from_state_dict(state)
        assert (desc.architecture.name, desc.scale, desc.purpose) == ("ESRGAN", 4, "SR")
        assert torch.equal(desc(x), want.clamp(0, 1))


def test_tiled_equals_untiled(sr_file: Path) -> None:
    model = load_upscaler(resolve_upscaler(sr_file))
    images = torch.rand((2, 3, 40, 56), generator=torch.Generator().manual_seed(2)) * 2 - 1
    whole = upscale(images, model, (160, 224))
    assert torch.equal(upscale(images, model, (160, 224), tile=56), whole)  # the image in one tile: exact
    tiled = upscale(images, model, (160, 224), tile=24, overlap=8, max_batch=3)
    diff = (tiled - whole).abs()
    assert diff.mean() < 5e-3 and diff.max() < 0.1  # tile borders see zero padding, blended over the overlap


def test_tiles_blend_exactly_where_covered_once() -> None:
    """A pixel-local network (nearest ×4): tiled output equals the whole image's exactly where one tile covers a
    pixel (blend weight 1), and to rounding in the overlaps."""
    nearest = torch.nn.Upsample(scale_factor=4, mode="nearest")
    model = Upscaler(torch.nn.Identity(), nearest, 4, "nearest")
    images = torch.rand((1, 3, 100, 100), generator=torch.Generator().manual_seed(3)) * 2 - 1
    whole = upscale(images, model, (400, 400))
    tiled = upscale(images, model, (400, 400), tile=40, overlap=8)  # tiles at 0, 30, 60: overlaps 30–40, 60–70
    assert torch.allclose(tiled, whole, atol=1e-6)
    for lo, hi in ((0, 30), (40, 60), (70, 100)):
        band = slice(4 * lo, 4 * hi)
        assert torch.equal(tiled[..., band, band], whole[..., band, band])


def test_pickled_upscaler_needs_allow_pickle(sr_file: Path, tmp_path: Path) -> None:
    pth = tmp_path / "esrgan.pth"
    torch.save({"params_ema": load_file(str(sr_file))}, pth)  # BasicSR's training-checkpoint wrapping
    with pytest.raises(HiresError, match=r"pickle.*--allow-pickle") as err:
        resolve_upscaler(pth)
    assert "\n" not in str(err.value)
    spec = resolve_upscaler(pth, allow_pickle=True)
    assert (spec.arch, spec.scale) == ("ESRGAN", 4)


@pytest.mark.parametrize("kind", ["lora", "random"])
def test_non_sr_file_refused_before_model_work(
    kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / f"{kind}.safetensors"
    tensors = {"lora_unet_mid.lora_down.weight": torch.zeros(4, 8)} if kind == "lora" else {"w": torch.ones(3, 3)}
    save_file(tensors, str(bad))
    with pytest.raises(HiresError) as err:
        resolve_upscaler(bad)
    assert "not" in str(err.value) and "\n" not in str(err.value)

    def no_model(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded before the upscaler was checked")

    monkeypatch.setattr("hiresdiff.pipeline.HiresPipeline.from_model", no_model)
    argv = ["generate", "x", *TINY, "--method", "resize", "--upscaler", str(bad), "--out", str(tmp_path / "o")]
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hiresdiff: error: upscaler") and bad.name in lines[0]


def test_cli_pickled_upscaler_refused(sr_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pth = tmp_path / "esrgan.pth"
    torch.save(load_file(str(sr_file)), pth)
    assert main(["generate", "x", *TINY, "--method", "resize", "--upscaler", str(pth), "--out", str(tmp_path)]) == 2
    assert "--allow-pickle" in capsys.readouterr().err


def _final(folder: Path) -> Path:
    (png,) = [p for p in folder.glob("*.png") if "phase" not in p.name]
    return png


@pytest.mark.parametrize("method", ["resize", "apldm", "scalediff"])
def test_cli_upscaler_runs_records_and_reproduces(method: str, sr_file: Path, tmp_path: Path) -> None:
    argv = ["generate", "a fox", *TINY, "--method", method, "--no-previews"]
    assert main([*argv, "--upscaler", str(sr_file), "--out", str(tmp_path / "sr")]) == 0
    assert main([*argv, "--out", str(tmp_path / "plain")]) == 0
    png = _final(tmp_path / "sr")
    with Image.open(png) as im:
        assert im.size == (512, 512)
        record = json.loads(im.text[PNG_KEY])["upscaler"]
        pixels = torch.from_numpy(np.asarray(im))
    assert record["name"] == "upscaler.safetensors" and record["sha256"] == resolve_upscaler(sr_file).sha256
    with Image.open(_final(tmp_path / "plain")) as im:
        assert not torch.equal(pixels, torch.from_numpy(np.asarray(im)))  # the SR model did the enlarging
    if method == "apldm":
        assert main(["generate", "--from-png", str(png), "--quiet", "--out", str(tmp_path / "again")]) == 0
        with Image.open(_final(tmp_path / "again")) as im:
            assert torch.equal(pixels, torch.from_numpy(np.asarray(im)))  # bit for bit


def test_from_png_refuses_a_changed_upscaler(sr_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    mine = tmp_path / "up.safetensors"
    mine.write_bytes(sr_file.read_bytes())
    argv = ["generate", "x", *TINY, "--method", "resize", "--steps", "2", "--no-previews", "--upscaler", str(mine)]
    assert main([*argv, "--out", str(tmp_path / "o")]) == 0
    state = load_file(str(mine))
    state["conv_last.bias"] = state["conv_last.bias"] + 0.1
    save_file(state, str(mine))
    upscalers._CACHE.clear()
    assert main(["generate", "--from-png", str(_final(tmp_path / "o")), "--out", str(tmp_path / "again")]) == 2
    assert "is not the file this image was made from" in capsys.readouterr().err


def test_python_api_upscaler_argument(sr_file: Path) -> None:
    from hiresdiff import generate

    with pytest.raises(HiresError, match="upscaler must be an SR model file path, got"):
        generate("x", "resize", model="tiny-sdxl", upscaler=4)
    result = generate("x", "resize", "tiny-sdxl", 256, 256, steps=2, upscaler=sr_file, progress=False)
    assert result.images[0].size == (256, 256) and result.metadata[0]["upscaler"]["path"] == str(sr_file.resolve())


def test_upscaler_on_a_latent_only_method_is_refused_unless_a_picture_is_enlarged(
    sr_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """demofusion grows in latent space: ``--upscaler`` alone would do nothing (one line naming the methods that use
    it, before any model work); with ``--image`` the picture is enlarged through it, so it is taken."""
    argv = ["generate", "x", "--model", "tiny-sdxl", "--method", "demofusion", "--steps", "2", "--quiet"]
    assert main([*argv, "--upscaler", str(sr_file), "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("hiresdiff: error: --upscaler enlarges images in pixel space") and "\n" not in err
    assert "resize, apldm, scalediff, diffusehigh" in err and not (tmp_path / "a").exists()
    picture = tmp_path / "in.png"
    Image.fromarray(np.full((256, 256, 3), 120, np.uint8)).save(picture)
    ok = ["--image", str(picture), "--width", "512", "--height", "512", "--no-previews"]
    assert main([*argv, *ok, "--upscaler", str(sr_file), "--out", str(tmp_path / "b")]) == 0


@pytest.mark.parametrize("method", ["resize", "apldm"])
def test_cost_model_prices_the_sr_network_as_its_own_component(method: str, sr_file: Path) -> None:
    """With ``--upscaler`` the cost model books the SR network's tile calls as the ``upscaler`` component: FLOPs
    equal to the network's own on each tile shape (PyTorch's FLOP counter), its weights and call peak in the
    memory estimate, equal in the fast and the exact estimate; the plan's reports tell the two requests apart."""
    from torch.utils.flop_counter import FlopCounterMode

    from hiresdiff import plan
    from hiresdiff.cost import model_cost
    from hiresdiff.cost.memory import module_bytes
    from hiresdiff.extras import Extras
    from hiresdiff.pipeline import build_request

    spec = resolve_upscaler(sr_file)
    settings = {"steps": 3, "previews": False}
    fast = model_cost(method, "tiny-sdxl", 512, 512, upscaler=spec, **settings)
    exact = model_cost(method, "tiny-sdxl", 512, 512, upscaler=spec, exact=True, **settings)
    plain = model_cost(method, "tiny-sdxl", 512, 512, **settings)
    assert fast.to_dict() == exact.to_dict()
    assert fast.upscaler_calls > 0 and plain.upscaler_calls == 0 and "upscaler" not in plain.peaks
    net = load_upscaler(spec).module
    assert fast.weights_bytes["upscaler"] == module_bytes(net) > 0 and "upscaler" in fast.peaks
    tile = fast.peaks["upscaler"]
    side = int(tile.cells**0.5)
    with torch.device("meta"), FlopCounterMode(display=False) as counter:
        copy.deepcopy(net).to("meta")(torch.zeros(tile.rows, 3, side, side))
    assert fast.upscaler_flops == fast.upscaler_calls * counter.get_total_flops()  # one tile shape per call here
    assert fast.model_flops == pytest.approx(plain.model_flops + fast.upscaler_flops, rel=1e-12)
    with_sr = build_request("x", method, 512, 512, extras=Extras(upscaler=spec), **settings)
    without = build_request("x", method, 512, 512, **settings)
    assert plan.request_cost(with_sr, "tiny-sdxl").upscaler_calls == fast.upscaler_calls
    assert plan.request_cost(without, "tiny-sdxl").upscaler_calls == 0


def test_cost_command_prices_the_upscaler_as_generate_would(sr_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``hiresdiff cost --upscaler FILE`` books the SR network as its own line, with the numbers of the cost model
    for the same request (its ``max_batch`` settled as generate's plan settles it), and says so in its text."""
    from hiresdiff.cli import main
    from hiresdiff.cost import model_cost

    argv = ["cost", "--method", "resize", "--model", "tiny-sdxl", "--width", "512", "--height", "512", "--steps", "3"]
    assert main([*argv, "--upscaler", str(sr_file), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    settled = {"max_batch": data["max_batch"], "previews": True, "steps": 3}
    want = model_cost("resize", "tiny-sdxl", 512, 512, upscaler=resolve_upscaler(sr_file), **settled)
    assert data["upscaler_calls"] == want.upscaler_calls > 0 and data["upscaler_flops"] == want.upscaler_flops
    assert main([*argv, "--upscaler", str(sr_file)]) == 0
    assert re.search(r"upscaler +[\d.,]+ TFLOP +calls: \d+", capsys.readouterr().out)
