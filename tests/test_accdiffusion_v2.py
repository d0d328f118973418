"""AccDiffusion v2 (SPEC-baselines-progressive §4): the per-request ControlNet weight of the adapter, per-sample
conditions, auto-Canny, the method against AccDiffusion, its refusals, the command line and the cost model."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from hiresdiff import HiresPipeline
from hiresdiff.cli import main
from hiresdiff.control import ControlCondition
from hiresdiff.images import read_png_settings
from hiresdiff.models import loading, tiny
from hiresdiff.models.adapter import ModelAdapter, Request
from hiresdiff.ops.edges import OPENCV_INSTALL, auto_canny, canny_thresholds, edge_maps
from hiresdiff.ops.geometry import View
from hiresdiff.strategies import Denoiser, LocalViews

cv2 = pytest.importorskip("cv2")

PROMPT = "a red fox on a mossy rock"
v2_module = importlib.import_module("hiresdiff.methods.accdiffusion_v2")  # the recipe (the package's name is the spec)


@pytest.fixture(scope="module")
def addons(tmp_path_factory) -> Path:
    """``make-tiny``'s folder: ``controlnet`` (not canny by name) and ``controlnet-canny``."""
    out = tmp_path_factory.mktemp("tiny")
    assert main(["make-tiny", "--model", "tiny-sdxl", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def hp(tiny_sdxl_pipe) -> HiresPipeline:
    return HiresPipeline.from_pipe(tiny_sdxl_pipe, "tiny-sdxl")


def _kw(**extra):
    return {"steps": 2, "progress": False, "seed": 3, **extra}


# ------------------------------------------------------------------------------------ adapter: per-request weight


@pytest.fixture(scope="module")
def adapter(tiny_sdxl_pipe, make_controlnet) -> ModelAdapter:
    ad = ModelAdapter(tiny_sdxl_pipe)
    ad.controlnet = make_controlnet(tiny_sdxl_pipe.unet, 4)
    return ad


def _request(ad: ModelAdapter, n: int, seed: int, weight: float, control: bool = True) -> Request:
    g = torch.Generator().manual_seed(seed)
    embeds = ad.encode_prompt(["a fox", "a whale"], ["blurry", "ugly"], True)
    cond = torch.rand(n, 3, 256, 256, generator=g) if control else None
    x = torch.randn(n, 4, 32, 32, generator=g)
    crops = [(8 * k, 16 * k) for k in range(n)]
    return Request(x, [k % 2 for k in range(n)], crops, embeds, 1.0, (512, 512), control=cond, control_weight=weight)


def test_weight_one_is_todays_call_bit_for_bit(adapter):
    """Requests of the default weight 1 make the ControlNet call of before (scale = the run's, every row)."""
    ad, t = adapter, torch.tensor(601)
    req = _request(ad, 3, 0, 1.0)
    with ad.use_controlnet(ad.controlnet, 0.7):
        got = ad.predict([req], t, 16)[0]
    e = req.embeds  # CFG rows are branch-major: every view's unconditional row, then every conditional one
    pooled = torch.cat([e.pooled_uncond[req.rows], e.pooled_cond[req.rows]])
    context = torch.cat([e.uncond[req.rows], e.cond[req.rows]])
    time_ids = torch.cat([ad._time_ids([(req.size, crop) for crop in req.crops])] * 2)
    added = {"text_embeds": pooled, "time_ids": time_ids}
    x = torch.cat([req.x] * 2)
    with torch.no_grad():
        down, mid = ad.controlnet(
            x, t, context, torch.cat([req.control] * 2), 0.7, added_cond_kwargs=added, return_dict=False
        )
        out = ad.unet(
            x,
            t,
            context,
            added_cond_kwargs=added,
            down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
            return_dict=False,
        )[0].float()
    want = ad.guided(req.guidance_rule, [(req, i) for i in range(3)], out)
    assert torch.equal(got, want)


def test_mixed_weights_in_one_call_equal_separate_calls(adapter):
    """Local views with a condition (weight 0.3), dilated samples without (weight 0) and views of weight 1 share
    one UNet call; each equals its request predicted alone (to 1e-6 of the outputs, as batches of the UNet alone
    do), and weight 0 equals no ControlNet."""
    ad, t = adapter, torch.tensor(601)
    local, dilated, full = _request(ad, 3, 1, 0.3), _request(ad, 4, 2, 0.0, control=False), _request(ad, 2, 3, 1.0)
    calls = []
    hook = ad.controlnet.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[0]))
    try:
        with ad.use_controlnet(ad.controlnet, 1.0):
            together = ad.predict([local, dilated, full], t, 64)
            assert calls == [2 * (3 + 2)]  # one call, the ControlNet on the weighted rows only (both CFG halves)
            alone = [ad.predict([r], t, 64)[0] for r in (local, dilated, full)]
            assert calls[1:] == [6, 4]  # dilated alone: no ControlNet call at all
        plain = ad.predict([dilated], t, 64)[0]
    finally:
        hook.remove()
    for a, b in zip(together, alone, strict=True):  # 1e-5 of the outputs' scale (≈ 3): the UNet's own batch noise
        torch.testing.assert_close(a, b, atol=1e-5 * float(b.abs().max()), rtol=0)  # (2.7e-6 seen on an AMD EPYC)
    assert torch.equal(alone[1], plain)
    with ad.use_controlnet(ad.controlnet, 0.3):  # weight 0.3 at scale 1 = weight 1 at scale 0.3
        scaled = ad.predict([_request(ad, 3, 1, 1.0)], t, 64)[0]
    torch.testing.assert_close(scaled, alone[0], atol=1e-6 * float(scaled.abs().max()), rtol=0)
    with pytest.raises(RuntimeError, match="no ControlNet condition"), ad.use_controlnet(ad.controlnet, 1.0):
        ad.predict([_request(ad, 2, 4, 0.5, control=False)], t, 64)


# ------------------------------------------------------------------------------------ conditions and edges


def test_per_sample_conditions_are_cut_from_the_zero_padded_canvas(tiny_sdxl_pipe):
    """Each local view gets the crop under it of its own sample's image, on the canvas zero-padded like the latent;
    the unclamped resize rings outside [0, 1] as the official bicubic does, the clamped one does not."""
    g = torch.Generator().manual_seed(0)
    edges = (torch.rand(2, 1, 192, 256, generator=g) > 0.8).float().expand(-1, 3, -1, -1)
    control = ControlCondition(edges, 8, clamp=False)
    want = F.interpolate(edges, size=(384, 512), mode="bicubic", align_corners=False)
    assert torch.equal(control.at(384, 512), want) and want.min() < -0.1 and want.max() > 1.1
    clamped = ControlCondition(edges, 8).at(384, 512)
    assert clamped.min() == 0 and clamped.max() == 1
    ad = ModelAdapter(tiny_sdxl_pipe)
    den = Denoiser(ad, ad.encode_prompt(["a", "b"], None, False), [0, 1], 1.0, (384, 512), 8, control=control)
    local = LocalViews(32, 16, True, [torch.Generator().manual_seed(s) for s in (1, 2)], 8)
    req = local.gather(torch.randn(2, 4, 48, 64), torch.tensor(501), den)[0][0]
    j = local.max_jitter
    padded = F.pad(want, (8 * j,) * 4)
    k = 0
    for s, views in enumerate(local.last_views):
        for v in views:
            top, left = (v.top + j) * 8, (v.left + j) * 8
            assert torch.equal(req.control[k], padded[s, :, top : top + 256, left : left + 256]), (s, v)
            k += 1
    one = ControlCondition(edges[:1]).crops((24, 32), [View(0, 0, 8, 8)] * 2, 0, [0, 1])
    assert torch.equal(one[0], one[1])  # one image serves every sample
    weightless = Denoiser(ad, den.embeds, [0, 1], 1.0, (384, 512), 8, control=control, control_weight=0.0)
    assert weightless.request(torch.randn(2, 4, 24, 32), [0, 1]).control is None


def test_auto_canny_thresholds_and_opencv():
    """Thresholds from the median of all RGB values (SPEC example: v = 132, s = 0.3 → (92, 171)); the map is
    cv2.Canny of the 3-channel image, three equal channels in {0, 1}."""
    assert canny_thresholds(132.0, 0.3) == (92, 171)
    assert canny_thresholds(200.0, 0.5) == (100, 255) and canny_thresholds(10.0, 1.5) == (0, 25)
    rows = np.arange(64, dtype=np.uint8)[:, None].repeat(64, 1)
    image = np.zeros((64, 64, 3), dtype=np.uint8)
    image[..., 0] = np.where(rows < 32, 40, 230)  # a horizontal edge in red only
    image[..., 1] = 132
    image[..., 2] = np.where(np.arange(64)[None, :] < 20, 90, 180)  # a vertical edge in blue only
    assert np.median(image) == 132.0
    edges = auto_canny(image, 0.3)
    assert np.array_equal(edges, cv2.Canny(image, 92, 171))
    assert edges[:, 31:33].any() or edges[31:33].any()
    assert edges[30:34].any() and edges[:, 18:22].any()  # both colour edges found (grey would lose neither here)
    maps = edge_maps(torch.from_numpy(image)[None], 0.3)
    assert maps.shape == (1, 3, 64, 64) and set(maps.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(maps[0, 0], torch.from_numpy(edges).float() / 255) and torch.equal(maps[0, 0], maps[0, 2])


# ------------------------------------------------------------------------------------ the method


def test_weight_zero_and_the_quirk_equal_accdiffusion(hp, addons):
    """κ = 0, and the official quirk with content prompts off, are AccDiffusion bit for bit; κ > 0 is not."""
    net = str(addons / "controlnet-canny")
    plain = hp(PROMPT, "accdiffusion", 512, 512, **_kw()).latents
    zero = hp(PROMPT, "accdiffusion-v2", 512, 512, controlnet=net, control_weight=0.0, **_kw()).latents
    assert torch.equal(zero, plain)
    used = hp(PROMPT, "accdiffusion-v2", 512, 512, controlnet=net, **_kw())
    assert not torch.allclose(used.latents, plain, atol=1e-3)
    assert used.metadata[0]["params"]["control_weight"] == 0.3 and used.metadata[0]["controlnet"] == net
    off = {"content_prompts": False}
    plain_off = hp(PROMPT, "accdiffusion", 512, 512, **_kw(**off)).latents
    quirk = {"control_with_content_prompts_only": True, **off}
    assert torch.equal(hp(PROMPT, "accdiffusion-v2", 512, 512, controlnet=net, **_kw(**quirk)).latents, plain_off)


def test_phase_conditions_are_the_previous_phase_edges_on_local_views_only(hp, addons, monkeypatch):
    """No ControlNet in phase 1; phase 2's condition is bicubic(Canny(decoded phase 1)) per sample (unclamped);
    every ControlNet row is a local view's crop of it (both CFG halves alike), never a dilated sample."""
    made, calls, phase = [], [], [1]
    real_init = v2_module.AccDiffusionV2.__init__

    def init(self, *args):
        real_init(self, *args)
        made.append(self)

    monkeypatch.setattr(v2_module.AccDiffusionV2, "__init__", init)

    def record(module, args, kwargs):
        calls.append((phase[0], args[0].shape[0], kwargs["controlnet_cond"].clone()))

    net = hp._controlnet(loading_spec(addons / "controlnet-canny"))
    handle = net.register_forward_pre_hook(record, with_kwargs=True)
    try:
        res = hp(
            [PROMPT, "a lighthouse"],
            "accdiffusion-v2",
            512,
            512,
            controlnet=str(addons / "controlnet-canny"),
            callback=lambda name, step, total: phase.__setitem__(0, phase[0] + (step == total)),
            canny_sigma=0.4,
            **_kw(),
        )
    finally:
        handle.remove()
    (method,) = made
    (condition,) = method.conditions
    assert len(res.previews) == 2  # phase 1, then the final images
    first = torch.stack([torch.from_numpy(np.array(p)) for p in res.previews[0]])  # phase 1 of each sample, 8-bit
    edges = edge_maps(first, 0.4)
    assert torch.equal(condition.image, edges) and not torch.equal(edges[0], edges[1])
    want = F.interpolate(edges, size=(512, 512), mode="bicubic", align_corners=False)
    assert torch.equal(condition.at(512, 512), want) and want.min() < 0
    assert calls and all(k == 2 for k, _, _ in calls)  # the phase each ControlNet call ran in
    views_per_sample, steps = 9, 2  # 64² latent, window 32, stride 16: 3 × 3 views; the dilated samples excluded
    assert sum(rows for _, rows, _ in calls) == steps * 2 * 2 * views_per_sample
    padded = F.pad(want, (32,) * 4)
    for _, rows, cond in calls:
        half = rows // 2
        assert torch.equal(cond[:half], cond[half:])
        for crop in cond[:half]:
            assert any(_is_crop(crop, padded[s]) for s in range(2))


def loading_spec(folder: Path):
    from hiresdiff.models.controlnet import resolve_controlnet

    return resolve_controlnet(str(folder))


def _is_crop(crop: torch.Tensor, canvas: torch.Tensor) -> bool:
    """Whether ``crop`` (3, 256, 256) is ``canvas`` cut at a corner on the 8-px grid."""
    size = crop.shape[-1]
    for top in range(0, canvas.shape[-2] - size + 1, 8):
        for left in range(0, canvas.shape[-1] - size + 1, 8):
            if torch.equal(canvas[:, top : top + size, left : left + size], crop):
                return True
    return False


# ------------------------------------------------------------------------------------ refusals and the CLI


@pytest.fixture
def no_weights(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("weights loaded before the refusal")

    monkeypatch.setattr(loading, "load_pipeline", forbidden)
    monkeypatch.setattr(tiny, "build_builtin", forbidden)


def _cli_error(capsys, argv: list[str], tmp_path: Path) -> str:
    assert main(["generate", PROMPT, "--method", "accdiffusion-v2", *argv, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("hiresdiff: error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_bad_inputs_are_one_line_before_weights(capsys, tmp_path, addons, no_weights, monkeypatch):
    sdxl = ["--model", "tiny-sdxl", "--steps", "2"]
    canny = ["--controlnet", str(addons / "controlnet-canny")]
    assert "--controlnet diffusers/controlnet-canny-sdxl-1.0" in _cli_error(capsys, sdxl, tmp_path)
    err = _cli_error(capsys, [*sdxl, "--controlnet", str(addons / "controlnet")], tmp_path)
    assert "canny" in err and "diffusers/controlnet-canny-sdxl-1.0" in err
    picture = tmp_path / "edges.png"
    Image.new("RGB", (256, 256)).save(picture)
    assert "drop --control-image" in _cli_error(capsys, [*sdxl, *canny, "--control-image", str(picture)], tmp_path)
    assert "SDXL" in _cli_error(capsys, ["--model", "tiny-sd", *canny], tmp_path)  # an SD model: its family
    monkeypatch.setitem(sys.modules, "cv2", None)  # OpenCV missing
    assert OPENCV_INSTALL in _cli_error(capsys, [*sdxl, *canny], tmp_path)


def test_cli_runs_with_and_without_an_input_image_and_from_its_png(tmp_path, addons):
    net = str(addons / "controlnet-canny")
    base = ["generate", PROMPT, "--model", "tiny-sdxl", "--method", "accdiffusion-v2", "--steps", "4", "--quiet"]
    out = tmp_path / "a"
    assert main([*base, "--controlnet", net, "--width", "512", "--height", "512", "--out", str(out)]) == 0
    png = out / "000-accdiffusion-v2-seed0.png"
    meta = read_png_settings(png)
    assert (meta["width"], meta["controlnet"], meta["params"]["canny_sigma"]) == (512, net, 0.3)
    redo = tmp_path / "redo"  # --from-png regenerates it: ControlNet and method parameters round-trip
    assert main(["generate", "--from-png", str(png), "--quiet", "--out", str(redo)]) == 0
    assert np.array_equal(np.array(Image.open(png)), np.array(Image.open(redo / png.name)))
    picture = tmp_path / "in.png"
    Image.open(out / "000-accdiffusion-v2-seed0.png").resize((256, 256)).save(picture)
    again = tmp_path / "b"
    argv = [*base, "--controlnet", net, "--image", str(picture), "--preset", "official", "--out", str(again)]
    assert main(argv) == 0
    meta = read_png_settings(again / "000-accdiffusion-v2-seed0.png")
    assert meta["width"] == 512 and meta["params"]["control_with_content_prompts_only"] is True


def test_replayed_steps_equal_the_full_trace():
    """The cost model's fast estimate (settled steps booked again) equals the full trace, ControlNet included."""
    from hiresdiff.cost.model import model_cost

    fast = model_cost("accdiffusion-v2", "tiny-sdxl", 768, 768, steps=7, controlnet=True)
    full = model_cost("accdiffusion-v2", "tiny-sdxl", 768, 768, steps=7, controlnet=True, exact=True)
    assert fast.to_dict() == full.to_dict() and fast.peaks == full.peaks
    plain = model_cost("accdiffusion", "tiny-sdxl", 768, 768, steps=7)
    assert fast.denoiser_flops == plain.denoiser_flops and 0 < fast.controlnet_calls < fast.denoiser_calls
