"""ControlNet (SD/SDXL) as part of the adapter's batched call: conditions per strategy, scale 0, batch, methods."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import ControlNetModel
from PIL import Image

from hiresdiff import HiresPipeline
from hiresdiff.cli import main
from hiresdiff.control import ControlCondition, resize_control
from hiresdiff.errors import HiresError
from hiresdiff.images import read_png_settings
from hiresdiff.methods import METHODS
from hiresdiff.models.adapter import ModelAdapter
from hiresdiff.models.controlnet import resolve_controlnet
from hiresdiff.ops.geometry import View
from hiresdiff.strategies import Denoiser, DilatedSampling, LocalViews
from hiresdiff.strategies.full import FullCanvas


@pytest.fixture(scope="module")
def sdxl_net(tiny_sdxl_pipe, make_controlnet) -> ControlNetModel:
    return make_controlnet(tiny_sdxl_pipe.unet)


@pytest.fixture(scope="module")
def net_folder(tmp_path_factory, sdxl_net) -> Path:
    folder = tmp_path_factory.mktemp("controlnet") / "tiny-sdxl-controlnet"
    sdxl_net.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def sd_net_folder(tmp_path_factory, tiny_sd_pipe, make_controlnet) -> Path:
    folder = tmp_path_factory.mktemp("controlnet") / "tiny-sd-controlnet"
    make_controlnet(tiny_sd_pipe.unet).save_pretrained(folder)
    return folder


def _picture(path: Path, height: int, width: int, seed: int = 0) -> Path:
    g = torch.Generator().manual_seed(seed)
    arr = (torch.rand(height, width, 3, generator=g) * 255).to(torch.uint8).numpy()
    Image.fromarray(arr).save(path)
    return path


def _positions(height: int, width: int) -> torch.Tensor:
    """A control image whose every pixel is distinct: channel 0 the row, channel 1 the column (in [0, 1])."""
    rows = torch.arange(height).view(-1, 1).expand(height, width) / height
    cols = torch.arange(width).view(1, -1).expand(height, width) / width
    return torch.stack([rows, cols, torch.zeros(height, width)])[None]


def _denoiser(pipe, control: ControlCondition, size: tuple[int, int]) -> Denoiser:
    ad = ModelAdapter(pipe)
    embeds = ad.encode_prompt(["a", "b"], None, False)
    return Denoiser(ad, embeds, [0, 1], 1.0, size, 8, control=control)


# ------------------------------------------------------------------------------------------- conditions


def test_each_local_view_gets_the_crop_under_it(tiny_sdxl_pipe):
    h, w = 48, 64  # latent canvas; pixel canvas 384 × 512
    control = ControlCondition(_positions(384, 512))
    den = _denoiser(tiny_sdxl_pipe, control, (384, 512))
    local = LocalViews(32, 16, True, [torch.Generator().manual_seed(s) for s in (1, 2)], 8)
    requests, _ = local.gather(torch.randn(2, 4, h, w), torch.tensor(501), den)
    req = requests[0]
    views = [v for per_sample in local.last_views for v in per_sample]
    assert req.control is not None and req.control.shape == (len(views), 3, 256, 256)
    j = local.max_jitter
    assert j > 0 and any(v.top < 0 or v.left < 0 or v.top + 32 > h or v.left + 32 > w for v in views)
    padded = torch.nn.functional.pad(_positions(384, 512), (8 * j,) * 4)
    for k, v in enumerate(views):
        top, left = (v.top + j) * 8, (v.left + j) * 8
        assert torch.equal(req.control[k], padded[0, :, top : top + 256, left : left + 256]), v


def test_dilated_samples_and_full_canvas_get_the_whole_image(tiny_sdxl_pipe):
    image = _positions(384, 512)
    control = ControlCondition(image)
    den = _denoiser(tiny_sdxl_pipe, control, (384, 512))
    requests, _ = DilatedSampling(2, 0.8, 1.0).gather(torch.randn(2, 4, 48, 64), torch.tensor(501), den)
    want = resize_control(image, (192, 256))
    assert requests[0].control.shape == (8, 3, 192, 256)
    assert all(torch.equal(c, want[0]) for c in requests[0].control)
    requests, _ = FullCanvas().gather(torch.randn(2, 4, 48, 64), torch.tensor(501), den)
    assert requests[0].control.shape == (2, 3, 384, 512) and torch.equal(requests[0].control[1], image[0])
    assert resize_control(image, (192, 256)).min() >= 0 and resize_control(image, (768, 1024)).max() <= 1
    assert control.at(384, 512) is image  # no resampling at the image's own size


def test_view_crop_geometry_without_jitter():
    control = ControlCondition(_positions(64, 96))
    crops = control.crops((8, 12), [View(0, 4, 8, 8), View(0, 0, 8, 8)], 0)
    assert torch.equal(crops[0], _positions(64, 96)[0, :, :, 32:96])


# ------------------------------------------------------------------------------------------- generation


def _kw(**extra):
    return {"steps": 3, "progress": False, "previews": False, "seed": 5, **extra}


@pytest.mark.parametrize("method", ["direct", "demofusion"])
def test_control_scale_zero_equals_no_controlnet(tiny_sdxl_pipe, net_folder, tmp_path, method):
    hp = HiresPipeline.from_pipe(tiny_sdxl_pipe, "tiny-sdxl")
    cond = _picture(tmp_path / "cond.png", 256, 256)
    plain = hp("a cat", method, 512, 512, **_kw()).latents
    zero = hp("a cat", method, 512, 512, controlnet=str(net_folder), control_image=cond, control_scale=0.0, **_kw())
    assert torch.equal(zero.latents, plain)
    used = hp("a cat", method, 512, 512, controlnet=str(net_folder), control_image=cond, control_scale=0.6, **_kw())
    assert not torch.allclose(used.latents, plain, atol=1e-4)
    meta = used.metadata[0]
    assert meta["controlnet"] == str(net_folder) and meta["control_scale"] == 0.6
    assert meta["control_image"]["name"] == "cond.png" and len(meta["control_image"]["sha256"]) == 64
    assert hp.adapter.controlnet is None  # the ControlNet is active only during the call


def test_controlnet_batch_equals_single_runs(tiny_sdxl_pipe, net_folder, tmp_path):
    hp = HiresPipeline.from_pipe(tiny_sdxl_pipe, "tiny-sdxl")
    extra = {"controlnet": str(net_folder), "control_image": _picture(tmp_path / "c.png", 256, 384)}
    both = hp(["a fox", "a whale"], "demofusion", 768, 512, **_kw(**extra)).latents
    one = hp("a fox", "demofusion", 768, 512, **_kw(**extra)).latents
    two = hp("a whale", "demofusion", 768, 512, **_kw(seed=6, **extra)).latents
    torch.testing.assert_close(both[0], one[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(both[1], two[0], atol=1e-4, rtol=1e-4)


#: accdiffusion-v2 makes its own conditions and needs a canny ControlNet: tests/test_accdiffusion_v2.py
@pytest.mark.parametrize("method", [m for m in METHODS if m != "resize" and not METHODS[m].own_control])
@pytest.mark.parametrize(("fixture", "folder"), [("tiny_sdxl_pipe", "net_folder"), ("tiny_sd_pipe", "sd_net_folder")])
def test_every_method_runs_with_a_controlnet(request, tmp_path, method, fixture, folder):
    pipe = request.getfixturevalue(fixture)
    hp = HiresPipeline.from_pipe(pipe, fixture)
    n = hp.native_size
    cond = _picture(tmp_path / "cond.png", n, n * 3 // 2)
    extra = {"controlnet": str(request.getfixturevalue(folder)), "control_image": cond, "control_scale": 0.7}
    if not METHODS[method].takes_controlnet:  # refused in one line before any denoiser call
        with pytest.raises(HiresError, match="cannot run with a ControlNet yet"):
            hp("a cat", method, 3 * n, 2 * n, **_kw(**extra))
        return
    res = hp("a cat", method, 3 * n, 2 * n, **_kw(**extra))
    assert res.images[0].size == (3 * n, 2 * n) and torch.isfinite(res.latents).all()
    assert all(p is not None for p in pipe.unet.attn_processors.values())


# ------------------------------------------------------------------------------------------- bad input


def test_controlnet_references_are_checked_before_model_work(tmp_path, net_folder, sd_net_folder, tiny_sdxl_pipe):
    def error(**kw) -> str:
        with pytest.raises(HiresError) as info:
            HiresPipeline.from_pipe(tiny_sdxl_pipe, "tiny-sdxl")("a", "direct", 256, 256, **_kw(**kw))
        assert "\n" not in str(info.value)
        return str(info.value)

    cond = _picture(tmp_path / "c.png", 64, 64)
    assert "does not exist" in error(controlnet=str(tmp_path / "nope"), control_image=cond)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no config.json" in error(controlnet=str(empty), control_image=cond)
    unet_folder = tmp_path / "unet"
    unet_folder.mkdir()
    (unet_folder / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    (unet_folder / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    assert "not a ControlNetModel" in error(controlnet=str(unet_folder), control_image=cond)
    assert "is a file" in error(controlnet=str(cond), control_image=cond)
    assert "needs a control image" in error(controlnet=str(net_folder))
    assert "--control-image needs --controlnet" in error(control_image=cond)
    assert "finite number ≥ 0" in error(controlnet=str(net_folder), control_image=cond, control_scale=-1.0)
    assert "SD 1.x/2.x ControlNet" in error(controlnet=str(sd_net_folder), control_image=cond)
    assert resolve_controlnet(str(net_folder)).path == str(net_folder.resolve())


def test_cli_controlnet_tile_upscale(tmp_path, net_folder):
    src = _picture(tmp_path / "in.png", 256, 256)
    out = tmp_path / "out"
    argv = ["generate", "a cat", "--model", "tiny-sdxl", "--method", "demofusion", "--image", str(src)]
    argv += ["--controlnet", str(net_folder), "--control-scale", "0.5", "--steps", "2", "--quiet", "--out", str(out)]
    assert main(argv) == 0
    meta = read_png_settings(out / "000-demofusion-seed0.png")
    assert (meta["width"], meta["height"], meta["controlnet"], meta["control_scale"]) == (
        512,
        512,
        str(net_folder),
        0.5,
    )
    assert "control_image" not in meta and meta["image"]["name"] == "in.png"  # the input is the control image
