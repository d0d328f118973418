"""DiffuseHigh (SPEC-baselines-progressive §1): wavelet op, sharpening, guided step, AP-LDM equivalence, plan, CLI."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from hiresdiff import HiresPipeline
from hiresdiff.cli import main
from hiresdiff.config import GenerationSettings
from hiresdiff.errors import HiresError, HiresWarning
from hiresdiff.images import read_png_settings
from hiresdiff.methods.apldm import refine
from hiresdiff.methods.diffusehigh import WaveletGuidance, guidance_image, stage
from hiresdiff.methods.specs.diffusehigh import DiffuseHighParams, stage_guidance, stage_sizes
from hiresdiff.ops.resample import upsample_pixels
from hiresdiff.ops.schedule import start_index
from hiresdiff.ops.sharpen import draw_sigma, sharpen
from hiresdiff.ops.wavelet import dwt2, idwt2, low_band_size, swap_low
from hiresdiff.pipeline import build_request
from hiresdiff.sampler import Run

SHAPES = [(64, 64), (37, 50), (128, 96), (5, 3)]


def _image(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ------------------------------------------------------------------------------------------ wavelet op


@pytest.mark.parametrize("wavelet", ["db4", "haar"])
@pytest.mark.parametrize("shape", SHAPES)
def test_dwt_matches_pywavelets(shape: tuple[int, int], wavelet: str) -> None:
    pywt = pytest.importorskip("pywt")
    x = _image((2, 3, *shape))
    ll, bands = dwt2(x, wavelet)
    ca, details = pywt.dwt2(x.numpy(), wavelet, mode="symmetric")
    for ours, theirs in zip((ll, *bands), (ca, *details), strict=True):
        assert torch.allclose(ours, torch.from_numpy(theirs), atol=1e-12)
    back = pywt.idwt2((ca, details), wavelet, mode="symmetric")[..., : shape[0], : shape[1]]
    assert torch.allclose(idwt2(ll, bands, shape, wavelet), torch.from_numpy(back), atol=1e-12)


@pytest.mark.parametrize("wavelet", ["db4", "haar"])
@pytest.mark.parametrize("shape", SHAPES)
def test_perfect_reconstruction_and_band_sizes(shape: tuple[int, int], wavelet: str) -> None:
    x = _image((1, 2, *shape), seed=1)
    ll, bands = dwt2(x, wavelet)
    expected = (low_band_size(shape[0], wavelet), low_band_size(shape[1], wavelet))
    assert all(tuple(b.shape[-2:]) == expected for b in (ll, *bands))
    assert torch.allclose(idwt2(ll, bands, shape, wavelet), x, atol=1e-12)
    assert low_band_size(512) == 259 and low_band_size(512, "haar") == 256  # ⌊(N + 7)/2⌋ for db4 (SPEC §1.6)


def test_haar_low_band_is_twice_the_block_mean() -> None:
    x = _image((1, 3, 8, 10), seed=2)
    ll, _ = dwt2(x, "haar")
    assert torch.allclose(ll, 2 * F.avg_pool2d(x, 2), atol=1e-12)


def test_low_band_swap_properties() -> None:
    """The swap is ``x + P_LL(ref − x)``; idempotent wherever the transform is orthogonal: everywhere for Haar on
    even sides, away from the symmetric border for db4 (its 8 taps make the border coefficients redundant)."""
    x, ref = _image((2, 3, 40, 36), seed=3), _image((2, 3, 40, 36), seed=4)
    for wavelet, margin in (("haar", 0), ("db4", 8)):
        ref_low = dwt2(ref, wavelet)[0]
        swapped = swap_low(x, ref_low, wavelet)
        twice = swap_low(swapped, ref_low, wavelet)
        inner = (slice(None), slice(None), slice(margin, 40 - margin), slice(margin, 36 - margin))
        assert torch.allclose(twice[inner], swapped[inner], atol=1e-12)
        assert torch.allclose(swap_low(x, dwt2(x, wavelet)[0], wavelet), x, atol=1e-12)  # ref = x: the identity
        low_part = idwt2(
            dwt2(ref - x, wavelet)[0], tuple(torch.zeros_like(b) for b in dwt2(x, wavelet)[1]), (40, 36), wavelet
        )
        assert torch.allclose(swapped, x + low_part, atol=1e-12)
        # affine commuting: swapping in [0, 1] then mapping to [−1, 1] = swapping in [−1, 1] (SPEC §1.6)
        u, v = torch.sigmoid(x), torch.sigmoid(ref)
        in_unit = 2 * swap_low(u, dwt2(v, wavelet)[0], wavelet) - 1
        assert torch.allclose(swap_low(2 * u - 1, dwt2(2 * v - 1, wavelet)[0], wavelet), in_unit, atol=1e-12)
    haar_low = dwt2(swap_low(x, dwt2(ref, "haar")[0], "haar"), "haar")
    assert torch.allclose(haar_low[0], dwt2(ref, "haar")[0], atol=1e-12)  # low band from the reference …
    for ours, theirs in zip(haar_low[1], dwt2(x, "haar")[1], strict=True):  # … high bands from x
        assert torch.allclose(ours, theirs, atol=1e-12)


# ------------------------------------------------------------------------------------------ sharpening


def test_sharpen_identity_fixed_point_and_formula() -> None:
    x = _image((2, 3, 9, 7), seed=5)
    assert torch.equal(sharpen(x, [0.5, 1.5], 0.0), x)
    flat = torch.full((2, 3, 9, 7), 0.3, dtype=torch.float64)
    assert torch.allclose(sharpen(flat, [0.1, 2.0], 1.0), flat, atol=1e-12)
    # the 3 × 3 Gaussian with reflect padding, written out: (1 + α)·x − α·blur(x)
    sigma, alpha = 0.8, 0.7
    g = torch.exp(-torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64) / (2 * sigma**2))
    kernel = torch.outer(g, g) / g.sum() ** 2
    padded = F.pad(x[:1], (1, 1, 1, 1), mode="reflect")
    blurred = F.conv2d(padded.reshape(3, 1, 11, 9), kernel.view(1, 1, 3, 3)).reshape(1, 3, 9, 7)
    assert torch.allclose(sharpen(x[:1], [sigma], alpha), (1 + alpha) * x[:1] - alpha * blurred, atol=1e-12)


def test_sigma_comes_from_the_generator() -> None:
    draws = [draw_sigma(torch.Generator().manual_seed(7), 0.1, 2.0) for _ in range(2)]
    assert draws[0] == draws[1] and 0.1 <= draws[0] < 2.0
    assert draw_sigma(torch.Generator().manual_seed(8), 0.1, 2.0) != draws[0]


# ------------------------------------------------------------------------------------------ params and plan


def test_stage_sizes_and_official_schedule(tiny_sdxl_pipe: Any) -> None:
    p = DiffuseHighParams()
    assert stage_sizes(p, 4096, 4096, 1024, 8) == [(1024, 1024), (2048, 2048), (3072, 3072), (4096, 4096)]
    assert stage_sizes(p, 2048, 4096, 1024, 8) == [(512, 1024), (1024, 2048), (1536, 3072), (2048, 4096)]
    assert stage_sizes(p, 1024, 1024, 1024, 8) == [(1024, 1024)]
    custom = DiffuseHighParams(stages=(1536, 2048))
    assert stage_sizes(custom, 2048, 2048, 1024, 8) == [(1024, 1024), (1536, 1536), (2048, 2048)]
    assert p.guided_steps(50) == 5 and DiffuseHighParams(dwt_steps=7).guided_steps(50) == 7
    assert stage_guidance(p, "sdxl", 5.0) == 10.0 and stage_guidance(p, "flux", 3.5) == 3.5
    # N = 50 on the tiny Euler model (leading spacing, offset 1): stages start at index 35, t = 281; guided 281…201
    sched = tiny_sdxl_pipe.scheduler
    sched.set_timesteps(50)
    first = start_index(50, p.restart)
    assert first == 35 and int(sched.timesteps[first]) == 281
    assert [int(t) for t in sched.timesteps[first : first + p.guided_steps(50)]] == [281, 261, 241, 221, 201]


@pytest.mark.parametrize(
    ("values", "words"),
    [
        ({"wavelet": "db5"}, "unknown wavelet"),
        ({"upsample": "nearest"}, "unknown upsample"),
        ({"sharpen_sigma": "2,1"}, "must not exceed"),
        ({"sharpen_sigma": "1"}, "range low,high"),
        ({"restart": "0"}, "restart"),
        ({"dwt_steps": "-1"}, "dwt_steps"),
        ({"stages": "768,512"}, "ascend"),
        ({"stages": "256,512"}, "above the base canvas"),
        ({"stages": "512,1024"}, "last of stages"),
        ({"size_conditioning": "target"}, "unknown size_conditioning"),
    ],
)
def test_bad_params_are_one_line(values: dict[str, str], words: str) -> None:
    from hiresdiff.pipeline import check_for_model

    with pytest.raises(HiresError, match=words) as err:
        check_for_model(build_request("a", "diffusehigh", 512, 512, **values), 256, 8)
    assert "\n" not in str(err.value)


def test_presets_and_defaults() -> None:
    req = build_request("a", "diffusehigh", 512, 512)
    assert req.settings.guidance == 5.0 and req.settings.negative_prompt == [
        "blurry, ugly, duplicate, poorly drawn, deformed, mosaic"
    ]
    official = build_request("a", "diffusehigh", 512, 512, preset="official")
    assert official.params == req.params and official.settings == req.settings
    paper = build_request("a", "diffusehigh", 512, 512, preset="paper")
    assert paper.settings.guidance == 7.5 and paper.settings.scheduler == "ddim"
    assert paper.params.upsample == "bilinear" and not paper.params.sharpen and paper.params.renoise


# ------------------------------------------------------------------------------------------ the model parts


def _run(hp: HiresPipeline, steps: int, seed: int = 0, **kw: Any) -> Run:
    ad = hp.adapter
    settings = GenerationSettings(prompt=["a cat"], width=512, height=512, steps=steps, previews=False, **kw)
    embeds = ad.encode_prompt(settings.prompt, None, settings.cfg)
    return Run(ad, settings, embeds, [0], [torch.Generator().manual_seed(seed)], progress=False)


def test_guided_step_is_the_official_euler_step(sdxl: HiresPipeline) -> None:
    """x_{t'} = x + (x − x̂0')/σ·(σ' − σ) with x̂0' the wavelet-edited x̂0 (``edm_scheduler_step``, s_churn 0)."""
    run = _run(sdxl, 50)
    timesteps = run.begin(35)
    t, sched = timesteps[0], run.scheduler
    x = _image((1, 4, 32, 32), seed=9).float() * 3
    pred = _image((1, 4, 32, 32), seed=10).float()
    ref_low = dwt2(_image((1, 3, 256, 256), seed=11).float().tanh())[0]
    hook = WaveletGuidance(run, ref_low, range(35, 40), "db4", renoise=False)
    hook.at_step(35, t)
    x_in = run.adapter.scale_input(x, t)
    edited = hook.on_prediction(t, x_in, pred)
    assert hook.x0 is not None and not torch.allclose(edited, pred)
    sigma, following = float(sched.sigmas[35]), float(sched.sigmas[36])
    stepped = sched.step(edited, t, x, return_dict=False)[0]
    expected = x + (x - hook.x0) / sigma * (following - sigma)
    assert torch.allclose(stepped, expected, atol=1e-5 * float(expected.abs().max()))
    hook.at_step(40, timesteps[5])  # past the guided steps: the prediction is untouched
    assert torch.equal(hook.on_prediction(timesteps[5], x_in, pred), pred)


def test_renoise_noises_the_edited_x0_to_the_next_timestep(sdxl: HiresPipeline) -> None:
    """After the scheduler's step of a guided step: ``add_noise(x̂0', ε_new, t_next)`` (Euler: x̂0' + σ'·ε_new)."""
    run = _run(sdxl, 10)
    timesteps = run.begin(7)
    hook = WaveletGuidance(run, torch.zeros(1, 3, 131, 131), range(7, 8), "db4", renoise=True)
    hook.at_step(7, timesteps[0])
    hook.x0 = _image((1, 4, 32, 32), seed=12).float()
    x = run.scheduler.step(torch.zeros(1, 4, 32, 32), timesteps[0], torch.zeros(1, 4, 32, 32), return_dict=False)[0]
    noise = torch.randn((1, 4, 32, 32), generator=torch.Generator().manual_seed(0))
    sigma_next = float(run.scheduler.sigmas[8])
    assert torch.allclose(hook.after_step(timesteps[0], x), hook.x0 + sigma_next * noise, atol=1e-5)
    hook.at_step(9, timesteps[2])
    hook.x0 = torch.ones(1, 4, 32, 32)
    assert torch.equal(hook.after_step(timesteps[2], x), hook.x0)  # after the last step: x̂0' itself


def test_stage_without_guidance_and_sharpening_is_an_apldm_substage(sdxl: HiresPipeline) -> None:
    """Same guidance image (AP-LDM's chain: unclamped decode → bicubic → clamp), K_g = 0, no sharpening, the
    stage's own size conditioning and the run's guidance: the stage is AP-LDM's ``refine`` bit for bit."""
    z = _image((1, 4, 32, 32), seed=13).float()
    size, fraction = (512, 512), 0.5
    apldm = refine(_run(sdxl, 4), z, size, fraction, "apldm", None)
    run = _run(sdxl, 4)
    g = upsample_pixels(run.decode_inner(z, clamp=False), size)
    params = DiffuseHighParams(restart=fraction, dwt_steps=0, sharpen=False, stage_guidance=run.settings.guidance)
    assert torch.equal(stage(run, params, g, size, size, "diffusehigh"), apldm)
    guided = stage(_run(sdxl, 4), DiffuseHighParams(restart=fraction, dwt_steps=1), g, size, size, "guided")
    assert not torch.allclose(guided, apldm)


def test_guidance_image_is_unclamped_and_sharpened_per_image(sdxl: HiresPipeline) -> None:
    run = _run(sdxl, 4)
    image = torch.tensor([[-1.0, -1.0, 1.0, 1.0]]).expand(1, 3, 4, 4).contiguous()
    plain = guidance_image(run, DiffuseHighParams(sharpen=False), image, (8, 8))
    assert plain.max() > 1.0 and plain.min() < -1.0  # bicubic overshoot is kept (no clamp)
    sharp = guidance_image(_run(sdxl, 4), DiffuseHighParams(), image, (8, 8))
    sigma = draw_sigma(torch.Generator().manual_seed(0), 0.1, 2.0)
    assert torch.allclose(sharp, sharpen(plain, [sigma], 1.0))


def test_same_seed_same_image_and_guidance_matters(sdxl: HiresPipeline) -> None:
    kw = {"steps": 4, "seed": 3, "progress": False, "previews": False}
    a = sdxl("a cat", "diffusehigh", 512, 512, **kw).latents
    assert torch.equal(a, sdxl("a cat", "diffusehigh", 512, 512, **kw).latents)
    off = sdxl("a cat", "diffusehigh", 512, 512, dwt_steps=0, **kw).latents
    assert a.shape == (1, 4, 64, 64) and not torch.allclose(a, off)


def test_flux_runs_with_an_untuned_notice(tiny_flux: Any) -> None:
    hp = HiresPipeline.from_pipe(tiny_flux, "tiny-flux")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = hp("a cat", "diffusehigh", 512, 512, steps=4, seed=0, progress=False, previews=False)
    assert torch.isfinite(res.latents).all() and res.images[0].size == (512, 512)
    notices = [w for w in caught if issubclass(w.category, HiresWarning) and "diffusehigh" in str(w.message)]
    assert len(notices) == 1 and "experimental" in str(notices[0].message)


# ------------------------------------------------------------------------------------------ command line, cost


def test_cli_runs_round_trips_and_takes_images_and_presets(tmp_path: Path) -> None:
    base = ["generate", "x", "--method", "diffusehigh", "--width", "512", "--height", "512", "--steps", "4"]
    assert main([*base, "--model", "tiny-sdxl", "--set", "wavelet=haar", "--quiet", "--out", str(tmp_path / "a")]) == 0
    first = tmp_path / "a" / "000-diffusehigh-seed0.png"
    record = read_png_settings(first)
    assert record["method"] == "diffusehigh" and record["params"]["wavelet"] == "haar"
    assert record["params"]["sharpen_sigma"] == [0.1, 2.0] and record["guidance"] == 5.0
    assert main(["generate", "--from-png", str(first), "--quiet", "--out", str(tmp_path / "b")]) == 0
    again = tmp_path / "b" / "000-diffusehigh-seed0.png"
    assert Image.open(first).tobytes() == Image.open(again).tobytes()
    small = tmp_path / "small.png"
    Image.open(first).resize((256, 256)).save(small)
    sd = [*base, "--model", "tiny-sd", "--preset", "official", "--image", str(small), "--strength", "0.5"]
    assert main([*sd, "--quiet", "--out", str(tmp_path / "c")]) == 0
    assert Image.open(tmp_path / "c" / "000-diffusehigh-seed0.png").size == (512, 512)
    assert main([*base, "--model", "tiny-sdxl", "--preset", "paper", "--quiet", "--out", str(tmp_path / "d")]) == 0


def test_cli_bad_param_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["generate", "x", "--model", "tiny-sdxl", "--method", "diffusehigh", "--set", "wavelet=db5"]
    assert main([*argv, "--width", "512", "--height", "512"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hiresdiff: error:") and err.strip().count("\n") == 0 and "wavelet" in err


def test_cost_replay_equals_the_full_trace() -> None:
    from hiresdiff.cost.model import model_cost

    fast = model_cost("diffusehigh", "tiny-sdxl", 512, 512, steps=12)
    full = model_cost("diffusehigh", "tiny-sdxl", 512, 512, steps=12, exact=True)
    assert fast.to_dict() == full.to_dict() and fast.peaks == full.peaks
    plain = model_cost("diffusehigh", "tiny-sdxl", 512, 512, steps=12, dwt_steps=0)
    assert plain.to_dict() != full.to_dict()  # the guided steps' VAE passes are counted
