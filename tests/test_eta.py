"""DDIM η (issue 23 item 3): a validated setting, passed to ``scheduler.step`` with noise from each image's generator,
refused in one line before any model work for schedulers without it, recorded in the PNG and round-tripped."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch

from hiresdiff import HiresPipeline
from hiresdiff.cli import main
from hiresdiff.config import GenerationSettings
from hiresdiff.errors import HiresError
from hiresdiff.from_png import read_request
from hiresdiff.images import read_png_settings
from hiresdiff.pipeline import build_request
from hiresdiff.schedulers import ETA_SCHEDULERS, SCHEDULER_CLASSES, scheduler_class

#: a cheap DDIM run on tiny-sd (at its native size), 3 steps
RUN = {"steps": 3, "scheduler": "ddim", "max_batch": 4, "previews": False, "progress": False}


def test_the_eta_table_matches_every_step_signature():
    """``ETA_SCHEDULERS`` decides before loading; it must name exactly the classes whose ``step`` takes ``eta``."""
    takes = {n for n in SCHEDULER_CLASSES if "eta" in inspect.signature(scheduler_class(n).step).parameters}
    assert takes == set(ETA_SCHEDULERS) == {"ddim"}


@pytest.mark.parametrize(
    ("value", "message"),
    [(-0.5, "eta must be ≥ 0"), (float("nan"), "eta must be a finite number"), (True, "eta must be a number")],
)
def test_eta_is_checked_like_every_setting(value, message):
    with pytest.raises(HiresError, match=message):
        GenerationSettings(prompt="a", width=64, height=64, scheduler="ddim", eta=value)
    assert GenerationSettings(prompt="a", width=64, height=64, scheduler="ddim", eta=np.float32(1.0)).eta == 1.0


@pytest.mark.parametrize("scheduler", ["euler", "dpmpp-2m", "unipc"])
def test_eta_without_a_ddim_scheduler_is_one_line(scheduler):
    with pytest.raises(HiresError) as info:
        build_request("a fox", "direct", 512, 512, scheduler=scheduler, eta=1.0)
    message = str(info.value)
    assert "\n" not in message and f"the {scheduler} scheduler has no η" in message and "--scheduler ddim" in message
    build_request("a fox", "direct", 512, 512, scheduler=scheduler, eta=0.0)  # η = 0 is every scheduler's default


def test_cli_refuses_eta_with_euler_before_loading(capsys, monkeypatch):
    import hiresdiff.models.loading as loading

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(loading, "load_pipeline", no_loading)
    code = main(["generate", "a fox", "--model", "tiny-sd", "--steps", "2", "--eta", "1", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0
    assert err.startswith("hiresdiff: error: ") and "euler scheduler has no η" in err


def test_model_default_scheduler_is_asked_before_loading_when_its_class_is_known():
    from hiresdiff.pipeline import check_steps

    settings = GenerationSettings(prompt="a", width=64, height=64, scheduler="model-default", eta=1.0)
    check_steps(settings, "sdxl", {"_class_name": "DDIMScheduler"})
    with pytest.raises(HiresError, match="the model's EulerDiscreteScheduler has no η"):
        check_steps(settings, "sdxl", {"_class_name": "EulerDiscreteScheduler"})
    with pytest.raises(HiresError, match="FlowMatchEulerDiscreteScheduler has no η"):
        check_steps(settings, "flux", {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0})


def _unet_calls(hp: HiresPipeline) -> list[int]:
    calls: list[int] = []
    hp.adapter.unet.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    return calls


def test_model_default_scheduler_without_eta_is_refused_before_model_work(tiny_sd_pipe):
    """``model-default`` names no class before loading; the loaded model's Euler is refused before any model call."""
    hp = HiresPipeline.from_pipe(tiny_sd_pipe, "tiny-sd")
    calls = _unet_calls(hp)
    with pytest.raises(HiresError, match="the model's EulerDiscreteScheduler has no η"):
        hp("a fox", "direct", 128, 128, **{**RUN, "scheduler": "model-default"}, eta=1.0)
    assert calls == []


@pytest.fixture(scope="module")
def hp(tiny_sd_pipe) -> HiresPipeline:
    return HiresPipeline.from_pipe(tiny_sd_pipe, "tiny-sd")


def test_eta_changes_ddim_and_is_reproducible_from_a_seed(hp):
    side = hp.native_size
    plain = hp("a fox", "direct", side, side, seed=3, **RUN).latents
    once = hp("a fox", "direct", side, side, seed=3, eta=1.0, **RUN).latents
    again = hp("a fox", "direct", side, side, seed=3, eta=1.0, **RUN).latents
    other_seed = hp("a fox", "direct", side, side, seed=4, eta=1.0, **RUN).latents
    assert torch.equal(once, again)
    # η = 1 adds σ_t-scaled noise at every step: far more than rounding
    assert (once - plain).abs().max() > 0.05
    assert not torch.equal(once, other_seed)


def test_eta_reaches_the_scheduler_step(hp, monkeypatch):
    """The sampler passes η and a per-step noise draw to diffusers' DDIM step (not a silently ignored keyword)."""
    from diffusers import DDIMScheduler

    seen: list[tuple[float, bool]] = []
    original = DDIMScheduler.step

    def step(self, *args, eta=0.0, variance_noise=None, **kwargs):
        seen.append((eta, variance_noise is not None))
        return original(self, *args, eta=eta, variance_noise=variance_noise, **kwargs)

    monkeypatch.setattr(DDIMScheduler, "step", step)
    hp("a fox", "direct", 128, 128, seed=0, eta=0.5, **RUN)
    assert seen == [(0.5, True)] * RUN["steps"]


def test_batch_image_equals_the_same_image_alone(hp):
    """Image 1 of a batch (seed + 1) with η = 1 is image 1 generated alone: each image's step noise comes from its
    own generator. Batched and single UNet calls round differently (README: up to ±1 in 8-bit values on a small
    fraction of pixels), so the images are compared within that tolerance."""
    side = hp.native_size
    batch = hp(["a fox", "a lighthouse"], "direct", side, side, seed=7, eta=1.0, **RUN)
    alone = hp("a lighthouse", "direct", side, side, seed=8, eta=1.0, **RUN)
    a, b = (np.asarray(img).astype(int) for img in (batch.images[1], alone.images[0]))
    diff = np.abs(a - b)
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01
    torch.testing.assert_close(batch.latents[1:], alone.latents, rtol=0, atol=1e-3)


def test_eta_is_recorded_and_round_trips_through_the_png(tmp_path):
    argv = ["generate", "a koi pond", "--model", "tiny-sd", "--steps", "2", "--max-batch", "4", "--quiet"]
    out = tmp_path / "eta"
    assert main([*argv, "--no-previews", "--scheduler", "ddim", "--eta", "1", "--out", str(out)]) == 0
    png = next(out.glob("000-*.png"))
    assert read_png_settings(png)["eta"] == 1.0
    again = read_request(str(png)).kwargs
    assert again["eta"] == 1.0 and again["scheduler"] == "ddim"
    assert main(["generate", "--from-png", str(png), "--quiet", "--no-previews", "--out", str(tmp_path / "re")]) == 0
    assert (tmp_path / "re" / png.name).read_bytes() == png.read_bytes()


def test_png_without_eta_means_zero(hp, tmp_path):
    """PNGs written before the setting existed have no ``eta`` field: they regenerate with η = 0."""
    from PIL import Image

    from hiresdiff.images import save_png

    req = build_request("a fox", "direct", 512, 512, steps=2, scheduler="ddim")
    record = {k: v for k, v in hp._metadata(req, 0, 0).items() if k != "eta"}
    png = save_png(Image.new("RGB", (8, 8)), tmp_path / "old.png", record)
    kwargs = read_request(str(png)).kwargs
    assert "eta" not in kwargs
    settings = build_request(kwargs.pop("prompt"), "direct", 512, 512, steps=2, scheduler="ddim").settings
    assert settings.eta == 0.0
