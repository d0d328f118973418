"""ScaleCrafter (SPEC-baselines-unet §1.4 exact tests) on the tiny models, the CLI and the cost model."""

from __future__ import annotations

import copy
import warnings
from typing import Any

import pytest
import torch
from torch import nn

from hiresdiff.cli import main
from hiresdiff.errors import HiresError, HiresWarning
from hiresdiff.methods.specs.scalecrafter import ScaleCrafterParams, config_name, plan
from hiresdiff.models.adapter import ModelAdapter, Request
from hiresdiff.models.guidance import CFG, COND, NDCFG, NO_GUIDANCE, UNCOND, UNCOND_LIGHT, GuidanceRule
from hiresdiff.ops.redilate import redilated_conv
from hiresdiff.patches.clock import PatchClock
from hiresdiff.patches.context import in_steps, patched
from hiresdiff.patches.scalecrafter import RedilatePatch, Redilation, scalecrafter_patches
from hiresdiff.patches.tables import SCALECRAFTER
from test_hidiffusion import forbid_weights
from test_patches import module_state

KW: dict[str, Any] = {"steps": 4, "progress": False, "previews": False}


# ------------------------------------------------------------------------------------------------ tables, params


def test_official_configurations_are_reproduced_at_50_steps() -> None:
    for config in SCALECRAFTER:
        p = plan(ScaleCrafterParams(), config.model, 1024 if config.model == "sdxl" else 512, config.height,
                 config.width, 50)  # fmt: skip
        assert p.config is config and p.notice is None
        assert (p.dilate_steps, p.ndcfg_steps, p.progressive) == (
            config.dilate_tau,
            config.ndcfg_tau,
            config.progressive,
        )
        assert p.strong == dict(config.dilate) and p.light == dict(config.ndcfg)
        # the official tables are written for their architecture's levels and aligned onto the UNet's
        assert p.strong_levels == (3 if config.model == "sdxl" else 4)


def test_other_sizes_take_the_nearest_configuration_with_a_notice() -> None:
    p = plan(ScaleCrafterParams(), "sdxl", 1024, 3072, 3072, 50)
    assert config_name(p.config) == "sdxl:2560x2560" and p.notice is not None and "3072×3072" in p.notice
    assert "\n" not in p.notice
    # a tiny model at twice its native size is the 2× configuration, exactly
    assert plan(ScaleCrafterParams(), "sdxl", 256, 512, 512, 50).notice is None
    # τ = int(N·τ/50) at other step counts (fractions of N, a deliberate difference), overrides and switches
    p = plan(ScaleCrafterParams(), "sdxl", 1024, 4096, 4096, 30)
    assert (p.dilate_steps, p.ndcfg_steps) == (21, 21)
    p = plan(ScaleCrafterParams(dilate_fraction=0.5, ndcfg=False, progressive=False), "sdxl", 1024, 4096, 4096, 30)
    assert (p.dilate_steps, p.ndcfg_steps, p.progressive) == (15, 0, False)


def test_tables_by_name_and_by_the_user() -> None:
    p = plan(ScaleCrafterParams(table="sdxl:4096x4096"), "sdxl", 1024, 2048, 2048, 50)
    assert config_name(p.config) == "sdxl:4096x4096" and p.notice is None and p.ndcfg_steps == 35
    user = ScaleCrafterParams(table="mid=2, up2.res=2.5,us2=3", light_table="mid=1.5", ndcfg_fraction=0.2)
    p = plan(user, "sdxl", 1024, 2048, 2048, 50)
    assert p.strong == {"mid": 2.0, "up2.res": 2.5, "us2": 3.0} and p.strong_levels is None
    assert p.light == {"mid": 1.5} and p.light_levels is None and p.ndcfg_steps == 10
    with pytest.raises(HiresError, match="is for sd15 models"):
        plan(ScaleCrafterParams(table="sd15:1024x1024"), "sdxl", 1024, 2048, 2048, 50)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"table": "mid:2"}, "address=factor"),
        ({"table": "mid=2,conv_in=2"}, "not a conv level address"),
        ({"table": "mid=2,mid=3"}, "given twice"),
        ({"table": "mid=0.5"}, "≥ 1"),
        ({"table": "mid=two"}, "finite number"),
        ({"light_table": "down1=2"}, "not a conv level address"),
        ({"table": "sdxl:3000x3000"}, "not an official ScaleCrafter configuration"),
        ({"dilate_fraction": 1.5}, r"\[0, 1\]"),
        ({"ndcfg_fraction": -0.1}, r"\[0, 1\]"),
    ],
)
def test_bad_parameters_are_one_line_errors(bad: dict[str, Any], message: str) -> None:
    """(g) table validation, before any model work."""
    with pytest.raises(HiresError, match=message) as err:
        ScaleCrafterParams(**bad)
    assert "\n" not in str(err.value)


def test_progressive_schedule_of_the_spec_table() -> None:
    """(d) τ = 35: p = 4 → 4 for i 0–8, 3 for 9–17, 2 for 18–34; p = 3 → 3 for 0–11, 2 after; plain from τ on."""
    r = Redilation({"mid": 4, "up2.res": 3, "us2": 1}, 35, progressive=True)
    assert [r.factor("mid", i) for i in (0, 8, 9, 17, 18, 34, 35)] == [4, 4, 3, 3, 2, 2, None]
    assert [r.factor("up2.res", i) for i in (11, 12, 34)] == [3, 2, 2]
    assert r.factor("us2", 0) is None and r.factor("down0.res", 0) is None  # p = 1 and absent: the plain conv
    assert Redilation({"mid": 2.5}, 30).factor("mid", 29) == 2.5


# ------------------------------------------------------------------------------------------------ the patch itself


@pytest.mark.parametrize("factor", [1.0, 2.0, 2.5, 3.0])
@pytest.mark.parametrize(("address", "side"), [("ds1", 15), ("ds1", 16), ("down1.res", 13), ("us2", 16)])
def test_redilate_patch_is_the_redilated_conv_and_keeps_output_shapes(
    tiny_sdxl_pipe: Any, factor: float, address: str, side: int
) -> None:
    """(a) p = 1 is the original layer bit for bit; (c) fractional p keeps the plain output shape, odd sides and
    stride-2 convs included; the patch equals :func:`hiresdiff.ops.redilate.redilated_conv`."""
    unet = tiny_sdxl_pipe.unet
    name = {"ds1": "down_blocks.1.downsamplers.0.conv", "down1.res": "down_blocks.1.resnets.0.conv1",
            "us2": "up_blocks.0.upsamplers.0.conv"}[address]  # fmt: skip
    conv = unet.get_submodule(name)
    x = torch.randn(2, conv.in_channels, side, side, generator=torch.Generator().manual_seed(1))
    plain = conv(x)
    clock = PatchClock()
    with torch.no_grad(), patched(unet, clock, lambda: [], [RedilatePatch((address,), in_steps(range(1), factor))]):
        clock.at_step(0, torch.tensor(0))
        out = conv(x)
    assert out.shape == plain.shape
    assert torch.equal(out, redilated_conv(conv, x, factor))
    if factor == 1.0:
        assert torch.equal(out, plain)
    else:
        assert not torch.allclose(out, plain)


def test_integer_redilation_is_dilated_sampling_of_the_layer(tiny_sdxl_pipe: Any) -> None:
    """(b) p = d, stride 1, sides divisible by d: every phase (a, b) of the output is the plain conv of that phase."""
    conv = tiny_sdxl_pipe.unet.get_submodule("mid_block.resnets.0.conv1")
    x = torch.randn(1, conv.in_channels, 12, 12, generator=torch.Generator().manual_seed(2))
    clock = PatchClock()
    patch = RedilatePatch(("mid",), in_steps(range(1), 3))
    with torch.no_grad(), patched(tiny_sdxl_pipe.unet, clock, lambda: [], [patch]):
        clock.at_step(0, torch.tensor(0))
        out = conv(x)
    for a in range(3):
        for b in range(3):
            phase = nn.functional.conv2d(x[..., a::3, b::3], conv.weight, conv.bias, padding=1)
            torch.testing.assert_close(out[..., a::3, b::3], phase, rtol=0, atol=1e-5)


def test_peft_lora_convs_are_redilated_and_everything_is_restored(tiny_sdxl_pipe: Any) -> None:
    """(f) the LoRA's ``lora_A`` conv gets the dilation with the base layer (the official code drops conv LoRAs),
    ``lora_B`` stays 1×1; attributes and forwards are back after the block and after an exception."""
    from peft import LoraConfig, inject_adapter_in_model

    model = copy.deepcopy(tiny_sdxl_pipe.unet)
    target = "down_blocks.1.resnets.0.conv1"
    inject_adapter_in_model(LoraConfig(r=2, lora_alpha=2, target_modules=[target], init_lora_weights=False), model)
    wrapper = model.get_submodule(target)
    seen: dict[str, tuple] = {}
    for name in ("base_layer", "lora_A.default", "lora_B.default"):
        part = wrapper.get_submodule(name)
        part.register_forward_pre_hook(lambda m, a, n=name: seen.__setitem__(n, (m.padding, m.dilation, a[0].shape)))
    x = torch.randn(1, wrapper.base_layer.in_channels, 14, 14, generator=torch.Generator().manual_seed(3))
    before = module_state(model)
    clock = PatchClock()
    patch = RedilatePatch(("down1.res",), in_steps(range(1), 2.5))
    with torch.no_grad(), patched(model, clock, lambda: [], [patch]):
        clock.at_step(0, torch.tensor(0))
        out = wrapper(x)
    assert seen["base_layer"][:2] == ((3, 3), (3, 3)) and seen["lora_A.default"][:2] == ((3, 3), (3, 3))
    assert seen["base_layer"][2][-2:] == (17, 17)  # the input resized by f = 3/2.5 (round(16.8))
    assert seen["lora_B.default"][1] == (1, 1) and out.shape[-2:] == (14, 14)
    assert not torch.allclose(out, redilated_conv(wrapper.base_layer, x, 2.5))  # the LoRA contributes
    assert module_state(model) == before
    with pytest.raises(RuntimeError, match="boom"), patched(model, clock, lambda: [], [patch]):
        raise RuntimeError("boom")
    assert module_state(model) == before


# ------------------------------------------------------------------------------------------ noise-damped guidance


def _row(rule: GuidanceRule, pick: str) -> GuidanceRule:
    """``rule``'s rows with the raw output of branch ``pick`` as the prediction."""
    return GuidanceRule(f"{rule.name}:{pick}", rule.branches, lambda out, g: out[pick])


def _predict(ad: ModelAdapter, rule: GuidanceRule, strong: Redilation, light: Redilation, x: torch.Tensor) -> Any:
    embeds = ad.encode_prompt(["a red fox", "a cat"], ["blurry", ""], True)
    clock = PatchClock()
    with torch.no_grad(), scalecrafter_patches(ad, clock, strong, light):
        clock.at_step(0, torch.tensor(600))
        req = Request(x, [0, 1], [(0, 0)] * 2, embeds, 5.0, (512, 512), [0, 1], rule=rule)
        return ad.predict([req], torch.tensor(600), 8)[0]


def test_noise_damped_cfg_is_one_call_of_the_official_two_passes(tiny_sdxl_pipe: Any) -> None:
    """(e) NDCFG's three rows in one call are the official two passes of (uncond, cond) rows: ε_u^A, ε_c^A under D
    (pass A) and ε_u^B under D_nd (pass B), each ≤ 1e-6 (fp32); its prediction is ε_u^B + w·(ε_c^A − ε_u^A); with
    D_nd = D it is CFG. One thread: two threads split a batch's work differently at other batch sizes (a rounding
    difference of ~2e-6 on these outputs of ~2.5)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _check_noise_damped_cfg(ModelAdapter(tiny_sdxl_pipe))
    finally:
        torch.set_num_threads(threads)


def _check_noise_damped_cfg(ad: ModelAdapter) -> None:
    x = torch.randn(2, 4, 32, 40, generator=torch.Generator().manual_seed(4))
    strong = Redilation({"mid": 2.5, "up2.res": 3, "us2": 2, "down2.res": 2}, 10)
    light = Redilation({"mid": 2, "up2.res": 1.5}, 10)
    rows = {k: _predict(ad, _row(NDCFG, k), strong, light, x) for k in NDCFG.names}
    u_a, c_a = (_predict(ad, _row(CFG, k), strong, light, x) for k in (UNCOND, COND))
    u_b = _predict(ad, _row(CFG, UNCOND), light, light, x)  # pass B: every row under D_nd
    for got, want in ((rows[UNCOND], u_a), (rows[COND], c_a), (rows[UNCOND_LIGHT], u_b)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    damped = _predict(ad, NDCFG, strong, light, x)
    torch.testing.assert_close(damped, u_b + 5.0 * (c_a - u_a))
    assert (u_b - u_a).abs().max() > 1e-3  # the light row differs
    same = {k: _predict(ad, _row(NDCFG, k), strong, strong, x) for k in (UNCOND, UNCOND_LIGHT)}
    torch.testing.assert_close(same[UNCOND_LIGHT], same[UNCOND], rtol=0, atol=1e-6)
    torch.testing.assert_close(_predict(ad, NDCFG, strong, strong, x), _predict(ad, CFG, strong, strong, x))
    # outside the steps (i ≥ τ) nothing is patched: the plain UNet
    off = _predict(ad, NO_GUIDANCE, Redilation(strong.table, 0), Redilation(light.table, 0), x)
    assert torch.equal(off, _predict(ad, NO_GUIDANCE, Redilation({}, 0), Redilation({}, 0), x))


class RowLog:
    """Rows of every UNet call."""

    def __init__(self, unet: nn.Module) -> None:
        self.unet, self.rows = unet, []

    def __enter__(self) -> RowLog:
        self.handle = self.unet.register_forward_pre_hook(lambda m, a: self.rows.append(a[0].shape[0]))
        return self

    def __exit__(self, *exc: Any) -> None:
        self.handle.remove()


def test_run_uses_ndcfg_before_tau_and_batching_does_not_change_the_image(sdxl: Any, tiny_sdxl_pipe: Any) -> None:
    """The 4096² configuration at 10 steps: τ_nd = 7 steps of three rows per image, then CFG; two images at
    max_batch 3 (one view per call) and 8 give the same images; the patches are gone afterwards."""
    kw = {**KW, "steps": 10, "seed": 5, "table": "sdxl:4096x4096"}
    before = module_state(tiny_sdxl_pipe.unet)
    with RowLog(tiny_sdxl_pipe.unet) as log:
        a = sdxl(["a cat", "a dog"], "scalecrafter", 512, 512, max_batch=8, **kw).latents
    assert log.rows == [6] * 7 + [4] * 3
    assert module_state(tiny_sdxl_pipe.unet) == before
    b = sdxl(["a cat", "a dog"], "scalecrafter", 512, 512, max_batch=3, **kw).latents
    assert torch.allclose(a, b, atol=1e-3)  # CPU kernels round differently at other batch sizes
    plain = sdxl(["a cat", "a dog"], "direct", 512, 512, max_batch=8, **{**KW, "steps": 10, "seed": 5}).latents
    assert not torch.allclose(a, plain, atol=1e-2)


def test_patches_are_gone_after_an_exception_and_bad_user_tables_stop_before_the_unet(
    sdxl: Any, tiny_sdxl_pipe: Any
) -> None:
    """(f) restore after an exception mid-run; (g) an address this UNet lacks is one line, before any UNet call."""
    before = module_state(tiny_sdxl_pipe.unet)

    def stop(phase: str, step: int, total: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        sdxl("a cat", "scalecrafter", 512, 512, callback=stop, **KW)
    assert module_state(tiny_sdxl_pipe.unet) == before
    with RowLog(tiny_sdxl_pipe.unet) as log, pytest.raises(HiresError, match="ds7") as err:
        sdxl("a cat", "scalecrafter", 512, 512, table="mid=2,ds7=2", **KW)
    assert log.rows == [] and "\n" not in str(err.value)
    assert module_state(tiny_sdxl_pipe.unet) == before


def test_tiny_sd_official_preset_image_input_and_notice(sd: Any) -> None:
    """tiny-sd (2 levels) takes the 4-level SD tables aligned at the deepest level, with one notice line naming
    what it lacks; the official SD preset (DDIM, η = 1, FreeU) and an input picture run."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = sd("a cat", "scalecrafter", 512, 384, preset="official-sd", seed=1, **KW)
    notices = [str(w.message) for w in caught if issubclass(w.category, HiresWarning)]
    assert len(notices) == 1 and "ds1" in notices[0] and "\n" not in notices[0]
    assert torch.isfinite(res.latents).all() and res.images[0].size == (512, 384)
    with pytest.warns(HiresWarning, match="stay plain"):
        no_freeu = sd("a cat", "scalecrafter", 512, 384, preset="official-sd", freeu=False, seed=1, **KW)
    assert not torch.allclose(res.latents, no_freeu.latents, atol=1e-3)  # the preset's FreeU is on
    with pytest.warns(HiresWarning, match="stay plain"):
        up = sd("a cat", "scalecrafter", 512, 512, image=res.images[0].resize((128, 128)), strength=0.5, seed=1, **KW)
    assert up.images[0].size == (512, 512)


def test_with_a_controlnet(sdxl: Any, make_controlnet: Any, tiny_sdxl_pipe: Any, tmp_path: Any) -> None:
    """The ControlNet's residuals reach the re-dilated UNet (its own convs stay plain): the image is deterministic,
    differs from the one without ControlNet, and equals it at control scale 0."""
    from PIL import Image

    folder = tmp_path / "tiny-sdxl-controlnet"
    make_controlnet(tiny_sdxl_pipe.unet).save_pretrained(folder)
    cond = tmp_path / "cond.png"
    g = torch.Generator().manual_seed(0)
    Image.fromarray((torch.rand(256, 256, 3, generator=g) * 255).to(torch.uint8).numpy()).save(cond)
    kw = {**KW, "steps": 3, "seed": 4, "table": "sdxl:4096x4096"}
    net = {"controlnet": str(folder), "control_image": str(cond)}
    plain = sdxl("a cat", "scalecrafter", 512, 512, **kw).latents
    used = sdxl("a cat", "scalecrafter", 512, 512, control_scale=0.6, **net, **kw).latents
    assert torch.equal(used, sdxl("a cat", "scalecrafter", 512, 512, control_scale=0.6, **net, **kw).latents)
    assert torch.isfinite(used).all() and not torch.allclose(used, plain, atol=1e-4)
    assert torch.equal(sdxl("a cat", "scalecrafter", 512, 512, control_scale=0.0, **net, **kw).latents, plain)
    assert sdxl.adapter.controlnet is None  # active only during the call


# ------------------------------------------------------------------------------------------------ CLI and cost


def test_cli_flux_and_a_table_of_another_model_are_refused_before_any_weights(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """FLUX, and an official table of another architecture (resolved from the model's facts), are one line each
    before any weights load."""
    forbid_weights(monkeypatch)
    for model, extra, words in (
        ("tiny-flux", [], "scalecrafter"),
        ("tiny-sdxl", ["--set", "table=sd15:1024x1024"], "is for sd15 models, this is a sdxl model"),
    ):
        argv = ["generate", "x", "--model", model, "--method", "scalecrafter", "--steps", "2", "--quiet", *extra]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("hiresdiff: error:") and err.strip().count("\n") == 0 and words in err


def test_cli_official_preset_from_png_and_image(tmp_path: Any) -> None:
    """``--preset official`` with a named table, ``--from-png`` (the same picture again) and ``--scheduler ddim``
    with ``--image``, in this process (3 steps: re-dilation and noise-damped CFG on 2, plain on the last)."""
    from PIL import Image

    base = ["generate", "x", "--model", "tiny-sdxl", "--method", "scalecrafter", "--width", "512", "--height", "512"]
    a, b, c = (str(tmp_path / k) for k in "abc")
    assert main([*base, "--steps", "3", "--preset", "official", "--set", "table=sdxl:4096x4096", "--out", a]) == 0
    (first,) = sorted((tmp_path / "a").glob("*.png"))
    assert main(["generate", "--from-png", str(first), "--out", b, "--quiet"]) == 0
    (again,) = sorted((tmp_path / "b").glob("*.png"))
    assert Image.open(first).tobytes() == Image.open(again).tobytes()
    small = tmp_path / "small.png"
    Image.open(first).resize((256, 256)).save(small)
    assert main([*base, "--steps", "3", "--scheduler", "ddim", "--image", str(small), "--out", c, "--quiet"]) == 0
    assert len(list((tmp_path / "c").glob("*.png"))) == 1


def test_cost_replay_equals_full_trace() -> None:
    """The rule switch (three rows → two at τ_nd), the progressive factors and fractional re-dilation (p = 2.5:
    the patched convs see a 1.44× larger input) are part of the step state the replay keys on, so the replayed
    estimate equals the full trace."""
    from hiresdiff.cost.model import model_cost

    for model, size, kw in (
        ("tiny-sdxl", 512, {"table": "sdxl:4096x4096"}),
        ("random-sdxl", 2048, {"table": "sdxl:2560x2560"}),
    ):
        fast = model_cost("scalecrafter", model, size, size, steps=8, **kw)
        full = model_cost("scalecrafter", model, size, size, steps=8, exact=True, **kw)
        assert fast.to_dict() == full.to_dict() and fast.peaks == full.peaks
    direct = model_cost("direct", "random-sdxl", 2048, 2048, steps=8)
    assert fast.denoiser_flops > direct.denoiser_flops  # int(8·0.6) = 4 steps with the 1.44× input on mid and up2
    # int(8·0.7) = 5 of 8 steps with three rows instead of two: 16 + 5 UNet samples instead of 16 (integer dilation
    # keeps a conv's FLOPs)
    tiny = model_cost("scalecrafter", "tiny-sdxl", 512, 512, steps=8, table="sdxl:4096x4096").denoiser_flops
    assert tiny == pytest.approx(model_cost("direct", "tiny-sdxl", 512, 512, steps=8).denoiser_flops * 21 / 16)
