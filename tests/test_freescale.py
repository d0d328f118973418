"""FreeScale (SPEC-baselines-progressive §2): scale fusion, 3-D Gaussian, restrained dilation, stages, CLI, cost."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor2_0
from PIL import Image

from hiresdiff import HiresPipeline
from hiresdiff.cli import main
from hiresdiff.config import GenerationSettings
from hiresdiff.errors import HiresError
from hiresdiff.images import read_png_settings
from hiresdiff.methods.demofusion import SkipResidual
from hiresdiff.methods.freescale import stage
from hiresdiff.methods.specs.freescale import FreeScaleParams, restart_of
from hiresdiff.ops.blur import gaussian_blur, gaussian_blur_axes, gaussian_kernel1d
from hiresdiff.ops.geometry import View
from hiresdiff.ops.scale_fusion import average_windows, fuse, fusion_kernel, fusion_scale, fusion_windows, stack_windows
from hiresdiff.patches.clock import PatchClock
from hiresdiff.patches.context import patched
from hiresdiff.patches.freescale import (
    ScaleFusionProcessor,
    ScaleFusionState,
    restrained_addresses,
    restrained_dilation,
    scale_fusion_installed,
)
from hiresdiff.pipeline import build_request, check_for_model
from hiresdiff.sampler import Run

ATTN1 = "down_blocks.1.attentions.0.transformer_blocks.0.attn1"


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _fusion(hp: HiresPipeline, scale: tuple[int, int], latent_hw: tuple[int, int], seed: int | None = 0, **kw: Any):
    generators = None if seed is None else [torch.Generator().manual_seed(seed)]
    return ScaleFusionState(hp.adapter, latent_hw, scale, generators, **kw)


# ------------------------------------------------------------------------------------------ the ops


@pytest.mark.parametrize("k", [3, 7, 15])
def test_3d_gaussian_is_normalised_and_three_separable_zero_padded_blurs(k: int) -> None:
    """SPEC §2.5 test 3: the kernel sums to 1; the separable blur equals one conv3d with the outer-product kernel
    (zero padding on all three axes); ``hw`` is the 2-D blur of each feature channel."""
    g = gaussian_kernel1d(k, 1.0, dtype=torch.float64)
    kernel = g[:, None, None] * g[None, :, None] * g[None, None, :]
    assert float(kernel.sum()) == pytest.approx(1.0, abs=1e-12)
    x = _randn(2, 9, 11, 6).double()
    direct = F.conv3d(x[:, None], kernel[None, None], padding=k // 2)[:, 0]
    assert torch.allclose(gaussian_blur_axes(x, (1, 2, 3), k, 1.0), direct, atol=1e-12)
    planar = gaussian_blur(x.permute(0, 3, 1, 2), k, 1.0).permute(0, 2, 3, 1)
    assert torch.allclose(gaussian_blur_axes(x, (1, 2), k, 1.0), planar, atol=1e-12)
    assert torch.equal(gaussian_blur_axes(x, (1, 2, 3), 1, 1.0), x)


def test_windows_follow_the_official_geometry() -> None:
    """grid/s windows, stride ½, the MultiDiffusion count with the last clamped, jitter ⅛ window; j = 0 works."""
    views, pad = fusion_windows((128, 128), (2, 2))
    assert pad == (8, 8) and {v.height for v in views} == {64} and sorted({v.top for v in views}) == [0, 32, 64]
    views, pad = fusion_windows((30, 60), (1, 2))
    assert pad == (1, 3) and sorted({v.left for v in views}) == [0, 15, 30] and {v.top for v in views} == {0, 7, 14, 15}
    assert fusion_windows((6, 6), (2, 2))[1] == (0, 0)  # windows of 3 tokens: no jitter, no empty slice
    assert fusion_scale(4096, 2048, 1024) == (4, 2) and fusion_scale(512, 1536, 1024) == (1, 1)
    assert [fusion_kernel((s, 1)) for s in (1, 2, 4, 8)] == [1, 3, 7, 15]


def test_fusion_of_a_single_covering_window_is_the_global_output() -> None:
    """SPEC §2.5 test 2: one window over the whole map, no jitter: L = Gl and G(L) + Gl − G(Gl) = Gl for any k."""
    x = _randn(2, 6, 5, 4, seed=1)
    views = [[View(0, 0, 6, 5)]] * 2
    inner = torch.tanh  # any token-wise map stands for the attention here: the window is the whole map
    local = average_windows(inner(stack_windows(x, views, (0, 0))), views, (6, 5), (0, 0))
    glob = inner(x.reshape(2, 30, 4)).reshape(x.shape)
    assert torch.equal(local, glob)
    for k in (1, 3, 7):
        for axes in ("hwc", "hw"):
            assert torch.equal(fuse(local, glob, k, 1.0, axes), glob)


# ------------------------------------------------------------------------------------------ the processor


def test_scale_one_is_plain_attention_bit_for_bit(sdxl: HiresPipeline) -> None:
    """SPEC §2.5 test 1: at s = 1 the fusion processor is the plain processor, bit for bit (also in a run: a
    target at the native size is the base canvas, and a one-stage run equals ``direct``)."""
    attn = sdxl.adapter.unet.get_submodule(ATTN1)
    x = _randn(2, 16 * 16, attn.to_q.in_features, seed=2)
    plain = AttnProcessor2_0()(attn, x)
    fused = ScaleFusionProcessor(AttnProcessor2_0(), _fusion(sdxl, (1, 1), (32, 32)), level=1)(attn, x)
    assert torch.equal(fused, plain)
    kw = {"steps": 3, "seed": 1, "progress": False, "previews": False, "guidance": 7.5, "negative_prompt": "blur"}
    same = sdxl("a cat", "freescale", 256, 256, **kw).latents
    assert torch.equal(same, sdxl("a cat", "direct", 256, 256, **kw).latents)


@pytest.mark.parametrize(
    ("scale", "latent_hw", "mode", "axes"), [((2, 2), (64, 64), "full", "hwc"), ((1, 2), (32, 80), "dilated", "hw")]
)
def test_batched_windows_equal_per_window_calls_and_the_official_fusion(
    sdxl: HiresPipeline, scale: tuple[int, int], latent_hw: tuple[int, int], mode: str, axes: str
) -> None:
    """SPEC §2.5 test 4: the processor (windows in one call, the fusion as Gl + G(L − Gl)) equals the official
    loop: one call per jittered window on the zero-padded grid, the count-average, G(L) + (Gl − G(Gl)) with both
    blurs, the global branch over all tokens or per dilated sub-lattice."""
    attn, proc = sdxl.adapter.unet.get_submodule(ATTN1), AttnProcessor2_0()
    gh, gw = latent_hw[0] // 2, latent_hw[1] // 2
    x = _randn(2, gh * gw, attn.to_q.in_features, seed=3)
    state = _fusion(sdxl, scale, latent_hw, seed=5, global_mode=mode, blur_axes=axes)
    ours = ScaleFusionProcessor(proc, state, level=1)(attn, x)
    views, pad = _fusion(sdxl, scale, latent_hw, seed=5).views(2, (gh, gw))
    assert views[0] == views[1] and any(v.top < 0 or v.left < 0 for v in views[0])  # jitter crossed the border
    grid = x.view(2, gh, gw, -1)
    padded = F.pad(grid, (0, 0, pad[1], pad[1], pad[0], pad[0]))
    value, count = torch.zeros_like(padded), torch.zeros_like(padded)
    for v in views[0]:
        rows, cols = slice(v.top + pad[0], v.top + pad[0] + v.height), slice(v.left + pad[1], v.left + pad[1] + v.width)
        out = proc(attn, padded[:, rows, cols].reshape(2, -1, grid.shape[-1]))
        value[:, rows, cols] += out.view(2, v.height, v.width, -1)
        count[:, rows, cols] += 1
    crop = (slice(None), slice(pad[0], pad[0] + gh), slice(pad[1], pad[1] + gw))
    local = value[crop] / count[crop]
    if mode == "full":
        glob = proc(attn, x).view(grid.shape)
    else:
        glob = torch.zeros_like(grid)
        for a in range(scale[0]):
            for b in range(scale[1]):
                sub = grid[:, a :: scale[0], b :: scale[1]]
                glob[:, a :: scale[0], b :: scale[1]] = proc(attn, sub.reshape(2, -1, sub.shape[-1])).view(sub.shape)
    dims, k = ((1, 2, 3) if axes == "hwc" else (1, 2)), fusion_kernel(scale)
    official = gaussian_blur_axes(local, dims, k, 1.0) + glob - gaussian_blur_axes(glob, dims, k, 1.0)
    assert torch.allclose(ours, official.reshape(x.shape), atol=1e-5)
    assert not torch.allclose(ours, proc(attn, x), atol=1e-3)


def test_processors_are_restored_on_unet_and_controlnet_also_after_an_error(
    sdxl: HiresPipeline, make_controlnet: Any
) -> None:
    """SPEC §2.5 test 7 (restoration): every attn1 of UNet and ControlNet is wrapped, attn2 is not; all restored."""
    ad = sdxl.adapter
    ad.controlnet = make_controlnet(ad.unet)
    try:
        before = [dict(m.attn_processors) for m in (ad.unet, ad.controlnet)]
        fusion = _fusion(sdxl, (2, 2), (64, 64))
        with pytest.raises(RuntimeError, match="boom"), scale_fusion_installed(ad, fusion):
            for module in (ad.unet, ad.controlnet):
                for name, proc in module.attn_processors.items():
                    assert isinstance(proc, ScaleFusionProcessor) == name.endswith("attn1.processor")
            raise RuntimeError("boom")
        assert [dict(m.attn_processors) for m in (ad.unet, ad.controlnet)] == before
    finally:
        ad.controlnet = None


# ------------------------------------------------------------------------------------------ restrained dilation


def test_restrained_dilation_patch(sdxl: HiresPipeline, sd: HiresPipeline) -> None:
    """SPEC §2.5 test 5: the layer rule; d = 1 patches nothing; d = 2 is ``F.conv2d(dilation=2, padding=2)``
    with every shape kept (the stride-2 downsampler too); forwards restored, also after an exception."""
    unet = sdxl.adapter.unet
    assert restrained_addresses(unet) == ("ds1", "down2.res", "mid")
    assert restrained_addresses(sd.adapter.unet) == ("ds0", "down1.res", "mid")  # SD: the extrapolated rule
    assert restrained_dilation(unet, 1, 35) is None and restrained_dilation(unet, 2, 0) is None
    patch = restrained_dilation(unet, 2, 3)
    assert patch is not None
    clock = PatchClock()
    convs = {
        name: unet.get_submodule(name) for name in ("down_blocks.1.downsamplers.0.conv", "mid_block.resnets.0.conv1")
    }
    inputs = {name: _randn(1, conv.in_channels, 16, 16, seed=4) for name, conv in convs.items()}
    plain = {name: conv(inputs[name]) for name, conv in convs.items()}
    with pytest.raises(RuntimeError, match="boom"), patched(unet, clock, lambda: [], [patch]):
        clock.at_step(2, torch.tensor(0))
        for name, conv in convs.items():
            out = conv(inputs[name])
            want = F.conv2d(inputs[name], conv.weight, conv.bias, conv.stride, padding=2, dilation=2)
            assert torch.equal(out, want) and out.shape == plain[name].shape
        clock.at_step(3, torch.tensor(0))  # past the dilated steps: plain
        assert all(torch.equal(conv(inputs[n]), plain[n]) for n, conv in convs.items())
        raise RuntimeError("boom")
    assert all("forward" not in conv.__dict__ and conv.dilation == (1, 1) for conv in convs.values())


def _run(hp: HiresPipeline, steps: int, seed: int = 0) -> Run:
    ad = hp.adapter
    settings = GenerationSettings(prompt=["a cat"], width=512, height=512, steps=steps, previews=False)
    embeds = ad.encode_prompt(settings.prompt, None, settings.cfg)
    return Run(ad, settings, embeds, [0], [torch.Generator().manual_seed(seed)], progress=False)


def test_dilation_switches_at_35_of_50_and_the_first_skip_residual_is_a_no_op(sdxl: HiresPipeline) -> None:
    """SPEC §2.5 test 6: a 2× stage of N = 50 starts at step 15 (t = 681) and dilates the restrained convs (d = 2)
    exactly at step indices 15 … 34; at its first step the skip residual changes nothing."""
    run, params = _run(sdxl, 50), FreeScaleParams()
    assert params.restart_index(50) == 15 and params.dilated_steps(50) == 35
    conv = sdxl.adapter.unet.get_submodule("mid_block.resnets.0.conv1")
    clock, seen = PatchClock(), []
    original = conv._conv_forward

    def recorded(*args: Any) -> torch.Tensor:
        seen.append((clock.index, conv.dilation))
        return original(*args)

    conv._conv_forward = recorded
    try:
        z_up = _randn(1, 4, 64, 64, seed=6)
        stage(run, params, clock, z_up, (512, 512), (256, 256), "stage")
    finally:
        del conv._conv_forward
    dilated = sorted({i for i, d in seen if d == (2, 2)})
    assert dilated == list(range(15, 35)) and sorted({i for i, d in seen if d == (1, 1)}) == list(range(35, 50))
    timesteps = run.begin(15)
    assert int(timesteps[0]) == 681
    noise = _randn(1, 4, 64, 64, seed=7)
    x = run.add_noise(z_up, noise, timesteps[0])
    assert torch.allclose(SkipResidual(run, z_up, noise, 2.0).before_step(timesteps[0], x), x, atol=1e-6)


# ------------------------------------------------------------------------------------------ params and runs


def test_stages_presets_and_defaults() -> None:
    p = FreeScaleParams()
    assert p.canvases(4096, 4096, 1024, 8) == [(1024, 1024), (2048, 2048), (4096, 4096)]
    assert p.canvases(2048, 4096, 1024, 8) == [(512, 1024), (1024, 2048), (2048, 4096)]
    assert p.canvases(1024, 1024, 1024, 8) == [(1024, 1024)]
    assert FreeScaleParams(stages=(1536, 2048)).canvases(2048, 2048, 1024, 8) == [(1024,) * 2, (1536,) * 2, (2048,) * 2]
    req = build_request("a", "freescale", 512, 512)
    assert req.settings.guidance == 7.5 and not req.params.freeu and req.params.blur_axes == "hwc"
    official = build_request("a", "freescale", 512, 512, preset="official")
    assert official.params.freeu and official.params.freeu_rule == "channels" and official.settings.guidance == 7.5
    assert build_request("a", "freescale", 512, 512, preset="paper").params.blur_axes == "hw"
    image = FreeScaleParams(**restart_of(0.9, req.settings))  # an input picture's strength, in exact decimals
    assert image.restart_fraction == 0.1 and image.restart_index(50) == 5


@pytest.mark.parametrize(
    ("values", "words"),
    [
        ({"global_mode": "window"}, "unknown global_mode"),
        ({"blur_axes": "c"}, "unknown blur_axes"),
        ({"blur_sigma": "0"}, "blur_sigma"),
        ({"restart_fraction": "1"}, "restart_fraction"),
        ({"dilate_until": "1.5"}, "dilate_until"),
        ({"cosine_scale": "-1"}, "cosine_scale"),
        ({"stages": "768,512"}, "ascend"),
        ({"stages": "512,1024"}, "last of stages"),
    ],
)
def test_bad_params_are_one_line(values: dict[str, str], words: str) -> None:
    with pytest.raises(HiresError, match=words) as err:
        check_for_model(build_request("a", "freescale", 512, 512, **values), 256, 8)
    assert "\n" not in str(err.value)


def test_deterministic_batches_equal_single_runs_and_parts_matter(sdxl: HiresPipeline) -> None:
    """SPEC §2.5 test 7 (determinism): same seed, same latents; a batch of two equals the single runs (the jitter
    of each image from its own generator); scale fusion, its variants and the dilation each change the result."""
    kw = {"steps": 4, "progress": False, "previews": False}
    both = sdxl(["a red fox", "a blue whale"], "freescale", 512, 512, seed=9, **kw).latents
    first = sdxl("a red fox", "freescale", 512, 512, seed=9, **kw).latents
    second = sdxl("a blue whale", "freescale", 512, 512, seed=10, **kw).latents
    assert torch.allclose(both[0], first[0], atol=1e-4) and torch.allclose(both[1], second[0], atol=1e-4)
    assert torch.equal(first, sdxl("a red fox", "freescale", 512, 512, seed=9, **kw).latents)
    for change in ({"scale_fusion": False}, {"global_mode": "dilated"}, {"blur_axes": "hw"}, {"dilation": False}):
        other = sdxl("a red fox", "freescale", 512, 512, seed=9, **change, **kw).latents
        assert not torch.allclose(other, first, atol=1e-4), change


def test_runs_with_a_controlnet(sdxl: HiresPipeline, make_controlnet: Any, tiny_sdxl_pipe: Any, tmp_path: Path) -> None:
    """The ControlNet's self-attention gets scale fusion too (its encoder copy sees the whole canvas): the image is
    deterministic, differs from the one without ControlNet and equals it at control scale 0."""
    folder = tmp_path / "tiny-sdxl-controlnet"
    make_controlnet(tiny_sdxl_pipe.unet).save_pretrained(folder)
    cond = tmp_path / "cond.png"
    pixels = torch.rand(256, 256, 3, generator=torch.Generator().manual_seed(0)) * 255
    Image.fromarray(pixels.to(torch.uint8).numpy()).save(cond)
    kw = {"steps": 3, "seed": 4, "progress": False, "previews": False}
    net = {"controlnet": str(folder), "control_image": str(cond)}
    plain = sdxl("a cat", "freescale", 512, 512, **kw).latents
    used = sdxl("a cat", "freescale", 512, 512, control_scale=0.6, **net, **kw).latents
    assert torch.equal(used, sdxl("a cat", "freescale", 512, 512, control_scale=0.6, **net, **kw).latents)
    assert torch.isfinite(used).all() and not torch.allclose(used, plain, atol=1e-4)
    assert torch.equal(sdxl("a cat", "freescale", 512, 512, control_scale=0.0, **net, **kw).latents, plain)


def test_flux_is_refused_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["generate", "x", "--model", "tiny-flux", "--method", "freescale", "--steps", "2", "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("hiresdiff: error:") and err.strip().count("\n") == 0 and "freescale" in err


def test_cli_runs_on_both_models_with_an_image_and_the_official_preset(tmp_path: Path) -> None:
    base = ["generate", "x", "--method", "freescale", "--width", "512", "--height", "512", "--steps", "4", "--quiet"]
    assert main([*base, "--model", "tiny-sdxl", "--set", "blur_axes=hw", "--out", str(tmp_path / "a")]) == 0
    first = tmp_path / "a" / "000-freescale-seed0.png"
    record = read_png_settings(first)
    assert record["method"] == "freescale" and record["params"]["blur_axes"] == "hw" and record["guidance"] == 7.5
    small = tmp_path / "small.png"
    Image.open(first).resize((256, 256)).save(small)
    sd = [*base, "--model", "tiny-sd", "--preset", "official", "--image", str(small), "--strength", "0.6"]
    assert main([*sd, "--out", str(tmp_path / "b")]) == 0
    assert Image.open(tmp_path / "b" / "000-freescale-seed0.png").size == (512, 512)


def test_cost_replay_equals_the_full_trace(monkeypatch: pytest.MonkeyPatch) -> None:
    """The cost model's fast estimate (settled steps booked again, :mod:`hiresdiff.cost.replay`) equals running
    every step and tracing every call (the pattern of ``test_cost.py::test_replayed_steps_equal_the_full_trace``):
    the dilation switch and FreeU are part of each step's state, the scale-fusion processors of the call's key."""
    import hiresdiff.cost.model as model_mod
    from hiresdiff.cost.model import model_cost
    from hiresdiff.cost.replay import replaying

    used = []

    @contextlib.contextmanager
    def spy(*args: Any) -> Iterator[Any]:
        with replaying(*args) as replay:
            used.append(replay)
            yield replay

    monkeypatch.setattr(model_mod, "replaying", spy)
    settings = {"steps": 16, "num_images_per_prompt": 2, "freeu": True}
    fast = model_cost("freescale", "tiny-sdxl", 512, 512, **settings)
    full = model_cost("freescale", "tiny-sdxl", 512, 512, exact=True, **settings)
    assert len(used) == 1 and used[0].replayed > 0  # the fast run skipped steps, the exact one ran them all
    assert fast.to_dict() == full.to_dict()
    assert fast.peaks == full.peaks and fast.canvas_bytes == full.canvas_bytes > 0
