"""FouriScale (SPEC-baselines-unet §2.4 exact tests) on the tiny models, the CLI and the cost model."""

from __future__ import annotations

from typing import Any, ClassVar

import pytest
import torch

from hiresdiff.cli import main
from hiresdiff.errors import HiresError
from hiresdiff.methods.specs.fouriscale import FouriScaleParams, base_and_dilation, switch_steps
from hiresdiff.models.adapter import ModelAdapter, Request
from hiresdiff.models.guidance import CFG, COND, FOURISCALE, UNCOND, WEAK
from hiresdiff.patches.clock import PatchClock
from hiresdiff.patches.fouriscale import (
    FouriScaleLayers,
    LowPass,
    QKShareProcessor,
    conv_layers,
    fouriscale_patches,
    layer_bases,
)
from hiresdiff.patches.processors import self_attention_qkv
from hiresdiff.patches.tables import FOURISCALE_MODELS
from test_hidiffusion import forbid_weights

KW: dict[str, Any] = {"steps": 4, "progress": False, "previews": False}
XL, SD = FOURISCALE_MODELS["sdxl"], FOURISCALE_MODELS["sd15"]


def layers_for(d0: int, arch: Any = XL, start: int = 20, stop: int = 35, **kw: Any) -> FouriScaleLayers:
    floor, divisor = arch.mask_floor, arch.weak_dilation_divisor
    base_of = kw.pop("base_of", lambda h, w: (h / 2, w / 2))
    return FouriScaleLayers(d0, start, stop, True, floor, divisor, arch.weak_scale_at_least_one, base_of, **kw)


# ------------------------------------------------------------------------------------------------ torch-free plan


def test_official_switch_steps_and_their_fractions() -> None:
    p = FouriScaleParams()
    assert switch_steps(p, "sdxl", 1024, 2048, 2048, 50) == (20, 35)
    assert switch_steps(p, "sdxl", 1024, 4096, 2048, 50) == (20, 35)
    assert switch_steps(p, "sd15", 512, 1024, 1024, 50) == (10, 30)
    assert switch_steps(p, "sd21", 512, 1280, 1280, 50) == (10, 30)
    assert switch_steps(p, "sd15", 512, 2048, 2048, 50) == (20, 35)
    assert switch_steps(p, "sdxl", 1024, 2048, 2048, 30) == (12, 21)
    assert switch_steps(p, "sd15", 128, 256, 256, 50) == (10, 30)  # the tiny SD at 2× takes the 2× configuration
    assert switch_steps(FouriScaleParams(start_fraction=0.1, stop_fraction=0.5), "sdxl", 1024, 2048, 2048, 20) == (
        2,
        10,
    )


def test_base_sizes_and_d0() -> None:
    """(d) SDXL buckets (SPEC §2.2 results), SD native bases, explicit bases, the tiny SDXL's scaled buckets."""
    assert base_and_dilation(XL, None, 1024, 2048, 2048) == ((1024, 1024), 2)
    assert base_and_dilation(XL, None, 1024, 2560, 2560) == ((896, 1088), 3)
    assert base_and_dilation(XL, None, 1024, 2048, 4096) == ((704, 1408), 3)
    assert base_and_dilation(XL, None, 1024, 1536, 1536) == ((832, 1152), 2)
    assert base_and_dilation(XL, None, 256, 512, 512) == ((256, 256), 2)
    assert base_and_dilation(SD, None, 512, 1280, 1280) == ((512, 512), 3)
    assert base_and_dilation(SD, None, 512, 1024, 2048) == ((512, 512), 4)
    assert base_and_dilation(SD, (512.0, 512.0), 128, 512, 512) == ((512, 512), 1)
    with pytest.raises(HiresError, match="no FouriScale base size fits"):
        base_and_dilation(XL, None, 256, 256, 1536)


def test_layer_bases_follow_the_official_rules() -> None:
    # SD: native latent / 2^ℓ at the conv input's level, also at sides that are not multiples (ceil downsampling)
    assert layer_bases(SD, (512, 512), 1280, 8)(40, 40) == (16.0, 16.0)
    sd = layer_bases(SD, (512, 512), 1200, 8)  # latent 150 → 75 → 38 → 19
    assert sd(38, 38) == (16.0, 16.0) and sd(19, 19) == (8.0, 8.0)
    # SDXL: base · h_feat / H
    xl = layer_bases(XL, (896, 1088), 2560, 8)
    assert xl(80, 80) == (28.0, 34.0)


def test_dilation_schedule_and_branch_settings() -> None:
    """(h) d₀ = 4, start 20, stop 35: conv dilation 4 for i ≤ 24, 3 for 25–29, 2 for 30–34, plain from 35; the weak
    row (SDXL) ⌈max(d/1.5, 1)⌉ with the weak mask; the strided conv's scale d/2; upsamplers unfiltered."""
    xl = layers_for(4)
    dil = {i: xl.setting(i, COND, 1, True) for i in range(40)}
    assert [dil[i].dilation for i in range(35)] == [4] * 25 + [3] * 5 + [2] * 5  # type: ignore[union-attr]
    assert all(dil[i] is None for i in range(35, 40))
    assert xl.setting(0, UNCOND, 1, True) == LowPass(4, 4.0, False)
    assert xl.setting(0, WEAK, 1, True) == LowPass(3, 4.0, True)
    assert xl.setting(30, WEAK, 1, True) == LowPass(2, 1.0 + 3 * 5 / 15, True)
    assert xl.setting(0, COND, 1, False) == LowPass(4, None, False)
    sd = layers_for(2, SD)
    assert sd.setting(0, COND, 2, True) == LowPass(2, 1.0, False)  # ds: s = max(d/σ, 1)
    assert sd.setting(0, WEAK, 2, True) == LowPass(2, 1.0, True)  # SD: same dilation, weak scale ≥ 1
    assert layers_for(1).setting(0, COND, 1, True) is None  # d₀ = 1: plain
    assert FouriScaleLayers(4, 20, 35, False, 0.6, 1.5, False, xl.base_of).setting(34, COND, 1, True).dilation == 4  # type: ignore[union-attr]


def test_lowpass_uses_the_strong_and_weak_masks() -> None:
    """The filter of a layer is the separable mask of its padded size: s = 1 is the identity; the weak mask keeps
    more than the strong one (SDXL floor 0.6)."""
    x = torch.randn(2, 3, 12, 10, generator=torch.Generator().manual_seed(0))
    xl = layers_for(2, base_of=lambda h, w: (8.0, 8.0))  # padded to 16 × 16
    assert torch.equal(xl.lowpass(x, LowPass(2, None, False)), x)
    assert torch.allclose(xl.lowpass(x, LowPass(1, 1.0, False)), x, atol=1e-6)
    strong, weak = xl.lowpass(x, LowPass(2, 2.0, False)), xl.lowpass(x, LowPass(2, 2.0, True))
    assert strong.shape == weak.shape == x.shape
    assert (strong - x).norm() > (weak - x).norm() > 0
    chunked = layers_for(2, base_of=lambda h, w: (8.0, 8.0), max_elements=256).lowpass(x, LowPass(2, 2.0, False))
    assert torch.allclose(chunked, strong, atol=1e-6)


def test_sd_layers_align_onto_the_tiny_unet(tiny_sd_pipe: Any) -> None:
    """The SD table (4 levels) keeps its deepest levels on the 2-level tiny SD UNet; upsamplers it lacks drop."""
    filtered, dilate_only = conv_layers(SD, "sd15", tiny_sd_pipe.unet)
    assert filtered == ["down0.res", "ds0", "down1.res", "mid", "up1.res", "up0.res"]
    assert dilate_only == ["us1"]


@pytest.mark.parametrize(
    "bad",
    [
        {"start_fraction": 1.5},
        {"stop_fraction": -0.1},
        {"start_fraction": 0.8, "stop_fraction": 0.5},
        {"guidance_variant": "weak"},
        {"amp_guidance": 0.0},
        {"mask_floor": 2.0},
        {"weak_dilation_divisor": 0.5},
        {"base_size": (256.0, 256.0, 1.0)},
    ],
)
def test_bad_parameters_are_one_line_errors(bad: dict[str, Any]) -> None:
    with pytest.raises(HiresError) as err:
        FouriScaleParams(**bad)
    assert "\n" not in str(err.value)


def test_checks_before_model_work(sdxl: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Guidance ≤ 1 with the FouriScale rule, a base off the latent grid and an aspect no SDXL bucket fits are
    refused before any UNet call."""
    calls: list[int] = []
    monkeypatch.setattr(ModelAdapter, "predict", lambda *a, **k: calls.append(1))
    for kw, words in (
        ({"guidance": 1.0}, "guidance must be > 1"),
        ({"base_size": (100.0,)}, "not a positive multiple of the latent grid"),
        ({"stop_fraction": 2.0}, "in [0, 1]"),
    ):
        with pytest.raises(HiresError, match=words.replace("[", r"\[").replace("]", r"\]")) as err:
            sdxl("x", "fouriscale", 512, 512, **KW, **kw)
        assert "\n" not in str(err.value)
    with pytest.raises(HiresError, match="no FouriScale base size fits"):
        sdxl("x", "fouriscale", 256, 1536, **KW)
    assert calls == []


def test_cli_refuses_a_size_no_bucket_fits_before_any_weights(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """An aspect no SDXL bucket fits, and a start after the official stop, are refused from the model's facts
    (:meth:`FouriScaleParams.check_model`) in one line, with every weight loader made to fail."""
    import hiresdiff

    forbid_weights(monkeypatch)
    argv = ["generate", "x", "--model", "tiny-sdxl", "--method", "fouriscale", "--steps", "2", "--quiet"]
    assert main([*argv, "--width", "256", "--height", "1536"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hiresdiff: error:") and err.strip().count("\n") == 0
    assert "no FouriScale base size fits 1536×256" in err
    with pytest.raises(HiresError, match="must not exceed") as info:  # official stop at 512²: int(N·35/50)
        hiresdiff.generate("x", "fouriscale", "tiny-sdxl", 512, 512, steps=2, start_fraction=0.9)
    assert "\n" not in str(info.value)
    with pytest.raises(AssertionError, match="weights loaded"):  # a base size given: the checks pass, weights load
        hiresdiff.generate("x", "fouriscale", "tiny-sdxl", 256, 1536, steps=2, base_size=(256.0,))


def test_image_input_is_conditioned_on_the_base_size(sdxl: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """SPEC §2.2: the SDXL size conditioning is the base size (256² on tiny-sdxl at 512²), for SDEdit of an input
    picture as for a generation from noise."""
    from PIL import Image

    from hiresdiff.sampler import Run

    sizes: list[tuple[int, int]] = []
    own = Run.denoiser

    def spy(self: Run, size: tuple[int, int], **overrides: Any) -> Any:
        sizes.append(tuple(size))
        return own(self, size, **overrides)

    monkeypatch.setattr(Run, "denoiser", spy)
    noise = sdxl("a cat", "fouriscale", 512, 512, seed=1, **KW)
    picture = Image.new("RGB", (256, 256), (200, 120, 40))
    edit = sdxl("a cat", "fouriscale", 512, 512, image=picture, strength=0.5, seed=1, **KW)
    assert sizes == [(256, 256), (256, 256)]
    assert torch.isfinite(noise.latents).all() and torch.isfinite(edit.latents).all()
    sizes.clear()
    target = sdxl("a cat", "fouriscale", 512, 512, image=picture, strength=0.5, seed=1, base_size=(512.0,), **KW)
    assert sizes == [(512, 512)]  # d₀ = 1: the base is the target, so is the conditioning
    assert not torch.allclose(target.latents, edit.latents, atol=1e-4)


# ------------------------------------------------------------------------------------------------ model tests


def test_d0_one_is_direct_sampling(sdxl: Any, sd: Any) -> None:
    """(e) a base size equal to the target (d₀ = 1): every layer plain, the weak row equals cond ⇒ direct with
    CFG (3 rows per call instead of 2: CPU kernels round differently)."""
    for hp, side in ((sdxl, 512), (sd, 256)):
        kw = {**KW, "seed": 3}
        fs = hp("a cat", "fouriscale", side, side, base_size=(float(side),), **kw).latents
        direct = hp("a cat", "direct", side, side, **kw).latents
        assert torch.allclose(fs, direct, atol=1e-4)
        assert not torch.allclose(hp("a cat", "fouriscale", side, side, **kw).latents, direct, atol=1e-2)


def test_weak_equal_to_cond_makes_the_rule_cfg(sdxl: Any) -> None:
    """(f) with the weak row given the cond row's mask and dilation, the Q/K swap is a no-op and the 3-row
    FouriScale prediction equals the 2-row CFG one."""
    ad = sdxl.adapter
    embeds = ad.encode_prompt(["a red fox", "a harbour"], ["blurry", ""], True)
    x = torch.randn(2, 4, 64, 64, generator=torch.Generator().manual_seed(1))
    layers = layers_for(2, start=2, stop=4, base_of=layer_bases(XL, (256, 256), 512, 8))
    strong_only = layers.setting
    layers.setting = lambda i, b, st, f: strong_only(i, COND if b == WEAK else b, st, f)  # type: ignore[method-assign]
    filtered, dilate_only = conv_layers(XL, "sdxl", ad.unet)
    clock = PatchClock()
    with fouriscale_patches(ad, clock, layers, filtered, dilate_only):
        clock.at_step(0, torch.tensor(0))
        preds = {}
        for rule in (FOURISCALE, CFG):
            req = Request(x, [0, 1], [(0, 0)] * 2, embeds, 5.0, (256, 256), [0, 1], rule=rule)
            preds[rule.name] = ad.predict([req], torch.tensor(500), 12)[0]
    assert torch.allclose(preds["fouriscale"], preds["cfg"], atol=1e-5)


class RecordingQK(QKShareProcessor):
    """Keeps the attention probabilities of every row with the shared Q/K, and those of the row's own Q/K."""

    records: ClassVar[list[tuple[torch.Tensor, torch.Tensor]]] = []

    @staticmethod
    def projections(attn: Any, hidden_states: torch.Tensor, pairs: Any) -> tuple[torch.Tensor, ...]:
        q, k, v = QKShareProcessor.projections(attn, hidden_states, pairs)
        own_q, own_k, _ = self_attention_qkv(attn, hidden_states)
        scale = q.shape[-1] ** -0.5
        shared = (q @ k.transpose(-1, -2) * scale).softmax(-1)
        own = (own_q @ own_k.transpose(-1, -2) * scale).softmax(-1)
        RecordingQK.records.append((shared, own))
        return q, k, v


def test_qk_swap_reproduces_the_cond_attention_probabilities(
    tiny_sdxl_pipe: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """(g) in every self-attention the weak row's attention probabilities are the cond row's, exactly; its own
    queries and keys would give others; uncond and cond keep their own."""
    import hiresdiff.patches.fouriscale as fs

    monkeypatch.setattr(fs, "QKShareProcessor", RecordingQK)
    RecordingQK.records = []
    ad = ModelAdapter(tiny_sdxl_pipe)
    unet = tiny_sdxl_pipe.unet
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 32, 32, generator=g)
    ctx = torch.randn(3, 5, unet.config.cross_attention_dim, generator=g)
    added = {"text_embeds": torch.randn(3, 32, generator=g), "time_ids": torch.full((3, 6), 256.0)}
    clock = PatchClock()
    with torch.no_grad(), fouriscale_patches(ad, clock, layers_for(1), [], []):
        ad.call_info = [(0, UNCOND), (0, COND), (0, WEAK)]
        unet(x, torch.tensor(500), encoder_hidden_states=ctx, added_cond_kwargs=added)
    attn1 = [n for n in unet.attn_processors if n.endswith("attn1.processor")]
    assert len(RecordingQK.records) == len(attn1) > 0
    for shared, own in RecordingQK.records:
        assert torch.equal(shared[2], shared[1]) and torch.equal(shared[:2], own[:2])
        assert not torch.allclose(own[2], own[1], atol=1e-3)
    assert not any(isinstance(p, QKShareProcessor) for p in unet.attn_processors.values())  # restored


def test_chunking_does_not_change_the_images(sdxl: Any) -> None:
    """(i) two images at max_batch 3 (one view's three rows per call), 2 and 1 (``uncond`` alone, then ``cond`` and
    ``weak`` together: the weak row still takes the cond row's Q/K) and 12 (one call) give the same images."""
    kw = {**KW, "steps": 5, "seed": 5}
    a = sdxl(["a cat", "a dog"], "fouriscale", 512, 512, max_batch=3, **kw).latents
    b = sdxl(["a cat", "a dog"], "fouriscale", 512, 512, max_batch=12, **kw).latents
    assert torch.allclose(a, b, atol=1e-4)
    assert torch.equal(a, sdxl(["a cat", "a dog"], "fouriscale", 512, 512, max_batch=3, **kw).latents)
    for split in (1, 2):
        assert torch.allclose(
            a, sdxl(["a cat", "a dog"], "fouriscale", 512, 512, max_batch=split, **kw).latents, atol=1e-4
        )
    # the weak row without the cond row's Q/K is another image: the split kept the pair together
    cfg = sdxl(["a cat", "a dog"], "fouriscale", 512, 512, max_batch=3, guidance_variant="cfg", **kw).latents
    assert not torch.allclose(a, cfg, atol=1e-3)


def test_variants_amp_and_freeu_change_the_image(sd: Any) -> None:
    kw = {**KW, "seed": 2, "start_fraction": 0.25, "stop_fraction": 0.75}  # amplified step 0, ramp at steps 1–2
    base = sd("a cat", "fouriscale", 256, 256, **kw).latents
    for extra in ({"guidance_variant": "cfg"}, {"amp_guidance": 2.4}, {"freeu": True}, {"progressive": False}):
        other = sd("a cat", "fouriscale", 256, 256, **kw, **extra).latents
        assert torch.isfinite(other).all() and not torch.allclose(base, other, atol=1e-4), extra
    assert torch.isfinite(sd("a cat", "fouriscale", 256, 256, guidance=1.0, guidance_variant="cfg", **kw).latents).all()


def test_cost_replay_equals_the_full_trace_and_counts_the_weak_rows() -> None:
    from hiresdiff.cost.model import model_cost

    fast = model_cost("fouriscale", "random-sdxl", 2048, 2048, steps=10)
    full = model_cost("fouriscale", "random-sdxl", 2048, 2048, steps=10, exact=True)
    assert fast.to_dict() == full.to_dict() and fast.peaks == full.peaks
    assert fast.denoiser_samples == 7 * 3 + 3 * 2  # the weak row for i < stop = int(0.7·N), CFG after
    tiny = model_cost("fouriscale", "tiny-sdxl", 512, 512, steps=7, base_size=(512.0,))  # d₀ = 1: all plain
    assert (
        tiny.to_dict()
        == model_cost("fouriscale", "tiny-sdxl", 512, 512, steps=7, base_size=(512.0,), exact=True).to_dict()
    )


# ------------------------------------------------------------------------------------------------ command line


def test_cli_flux_is_refused_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "x", "--model", "tiny-flux", "--method", "fouriscale", "--steps", "2", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and err.startswith("hiresdiff: error:") and "fouriscale" in err


@pytest.mark.parametrize(("model", "preset"), [("tiny-sdxl", "official"), ("tiny-sd", "official-sd")])
def test_cli_official_preset_ddim_image_and_from_png(tmp_path: Any, model: str, preset: str) -> None:
    """``--preset``, ``--from-png`` (the same picture again), ``--scheduler ddim`` with ``--image``."""
    from PIL import Image

    out = {k: str(tmp_path / k) for k in "abc"}
    size = ["--width", "512", "--height", "512", "--steps", "4", "--quiet"]
    argv = ["generate", "x", "--model", model, "--method", "fouriscale", *size]
    assert main([*argv, "--preset", preset, "--out", out["a"]]) == 0
    (first,) = sorted((tmp_path / "a").glob("*.png"))
    assert main(["generate", "--from-png", str(first), "--out", out["b"], "--quiet"]) == 0
    (again,) = sorted((tmp_path / "b").glob("*.png"))
    assert Image.open(first).tobytes() == Image.open(again).tobytes()
    small = tmp_path / "small.png"
    Image.open(first).resize((256, 256)).save(small)
    picture = ["--scheduler", "ddim", "--image", str(small), "--set", "base_size=256,256"]
    assert main([*argv, *picture, "--out", out["c"]]) == 0
    assert len(list((tmp_path / "c").glob("*.png"))) == 1


def test_cli_cost_reports_flops(capsys: pytest.CaptureFixture[str]) -> None:
    """The weak row makes 3 rows per call for i < stop (10 steps: 7 × 3 + 3 × 2 samples)."""
    size = ["--width", "4096", "--height", "4096", "--steps", "10"]
    assert main(["cost", "--method", "fouriscale", "--model", "random-sdxl", *size]) == 0
    out = capsys.readouterr().out
    assert "TFLOP" in out and "samples: 27" in out
