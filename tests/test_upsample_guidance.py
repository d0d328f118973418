"""Upsample Guidance (SPEC-baselines-progressive §3.3 tests) and per-request timesteps in the adapters."""

from __future__ import annotations

import dataclasses
import math
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from hiresdiff import HiresPipeline
from hiresdiff.cli import main
from hiresdiff.config import GenerationSettings
from hiresdiff.errors import HiresError, HiresWarning
from hiresdiff.images import read_png_settings
from hiresdiff.methods.specs.upsample_guidance import UpsampleGuidanceParams
from hiresdiff.models.adapter import ModelAdapter, PromptEmbeds, Request
from hiresdiff.models.flux import FluxAdapter
from hiresdiff.models.parametrization import alpha_bar
from hiresdiff.ops.upsample_guidance import (
    epsilon_from,
    flow_low,
    guide_epsilon,
    guide_velocity,
    log_snr,
    low_alpha_bar,
    low_sample,
    pool,
    power,
    prediction_from_epsilon,
    tau_for,
    unpool,
)
from hiresdiff.schedulers import make_scheduler
from hiresdiff.strategies.base import Denoiser
from hiresdiff.strategies.upsample import UpsampleGuidance

KW: dict[str, Any] = {"steps": 4, "seed": 1, "progress": False, "previews": False}


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ------------------------------------------------------------------------------------------ the maths (ops)


@pytest.mark.parametrize("m", [2, 3])
def test_guided_epsilon_has_the_low_band_and_keeps_the_high_band(m: int) -> None:
    """(2) With w = 1: D ε̃ = ε̂_low/m and (I − UD) ε̃ = (I − UD) ε̂."""
    eps, eps_low = _randn(2, 4, 6 * m, 4 * m, seed=1), _randn(2, 4, 6, 4, seed=2)
    guided = guide_epsilon(eps, eps_low, m, 1.0)
    assert torch.allclose(pool(guided, m), eps_low / m, atol=1e-6)
    high = lambda e: e - unpool(pool(e, m), m)  # noqa: E731
    assert torch.allclose(high(guided), high(eps), atol=1e-6)
    assert torch.allclose(pool(unpool(eps_low, m), m), eps_low, rtol=0, atol=1e-15)  # D U = I
    assert torch.equal(guide_epsilon(eps, eps_low, m, 0.0), eps)


@pytest.mark.parametrize("m", [2, 3, 4])
@pytest.mark.parametrize("abar", [0.003, 0.2, 0.9, 0.9999])
def test_power_identity_and_adjusted_snr(m: int, abar: float) -> None:
    """(3) ᾱ_t/P + (1−ᾱ_t)/(m²P) = 1 and SNR(τ) = m²·SNR(t); a pooled VP sample has P's variance."""
    p, low = power(abar, m), low_alpha_bar(abar, m)
    assert abar / p + (1 - abar) / (m**2 * p) == pytest.approx(1.0, abs=1e-12)
    assert low / (1 - low) == pytest.approx(m**2 * abar / (1 - abar), rel=1e-9)
    x0, eps = _randn(2, 1, 8 * m, 8 * m, seed=5), _randn(2, 1, 8 * m, 8 * m, seed=6)
    y = low_sample(math.sqrt(abar) * x0 + math.sqrt(1 - abar) * eps, abar, m)
    noise = pool(eps, m) * m  # D ε·m is standard normal again
    assert torch.allclose(y, math.sqrt(low) * pool(x0, m) + math.sqrt(1 - low) * noise, atol=1e-12)


def test_nearest_tau_on_the_sdxl_table_and_within_one_grid_step(tiny_sdxl_pipe: Any) -> None:
    """(3) τ for m = 2 on SDXL's table (SPEC §3.2: 981 → 853, 801 → 632, 601 → 395, 401 → 205); for every t the
    table's log-SNR at τ ± 1 brackets log m² + log SNR(t); the continuous τ hits it exactly."""
    table = tiny_sdxl_pipe.scheduler.alphas_cumprod
    found = [tau_for(table, float(table[t]), 2, "nearest", t)[0] for t in (981, 801, 601, 401)]
    assert found == [853.0, 632.0, 395.0, 205.0]
    snr = log_snr(table)
    for m in (2, 3):
        for t in range(50, 1000, 37):
            abar = float(table[t])
            target = math.log(m**2) + float(snr[t])
            tau, abar_tau = tau_for(table, abar, m, "nearest", t)
            k = int(tau)
            assert abar_tau == float(table[k]) and k < t
            assert float(snr[min(k + 1, 999)]) <= target + 1e-9 and target <= float(snr[max(k - 1, 0)]) + 1e-9
            cont, abar_cont = tau_for(table, abar, m, "continuous", t)
            assert abs(cont - k) <= 1.0 and abar_cont == pytest.approx(low_alpha_bar(abar, m), rel=1e-12)
            lo = math.floor(cont)
            between = float(snr[lo]) + (cont - lo) * (float(snr[min(lo + 1, 999)]) - float(snr[lo]))
            assert between == pytest.approx(target, abs=1e-9)


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_guidance_commutes_with_cfg(kind: str) -> None:
    """(4) UG per CFG branch (the ports) equals UG after CFG, also through the ε/v conversions (affine in the
    prediction at a fixed input)."""
    m, g, w, abar, abar_low = 2, 7.5, 1.2, 0.3, low_alpha_bar(0.3, 2)
    x = _randn(1, 4, 16, 16, seed=3)
    y = low_sample(x, abar, m)
    u, c, u_low, c_low = (_randn(1, 4, *s, seed=i) for i, s in enumerate([(16, 16), (16, 16), (8, 8), (8, 8)], 4))

    def ug(pred: torch.Tensor, pred_low: torch.Tensor) -> torch.Tensor:
        eps = guide_epsilon(epsilon_from(pred, x, abar, kind), epsilon_from(pred_low, y, abar_low, kind), m, w)
        return prediction_from_epsilon(eps, x, abar, kind)

    cfg = lambda a, b: a + g * (b - a)  # noqa: E731
    assert torch.allclose(ug(cfg(u, c), cfg(u_low, c_low)), cfg(ug(u, u_low), ug(c, c_low)), atol=1e-10)


def test_flow_form_equals_the_epsilon_route_and_is_finite_at_sigma_one() -> None:
    """FLUX: y = D x / c at σ' = (σ/m)/c is a flow sample (signal 1−σ', noise σ'); ṽ from the closed form equals
    the ε route (ε̂ = x + (1−σ)v̂, ṽ = (ε̃ − x)/(1−σ)) for σ < 1 and stays finite at σ = 1."""
    m, w = 2, 1.0
    x0, eps = _randn(1, 16, 16, 16, seed=8), _randn(1, 16, 16, 16, seed=9)
    for sigma in (0.0, 0.3, 0.77, 0.99):
        x = (1 - sigma) * x0 + sigma * eps
        c, s_low = flow_low(sigma, m)
        y = pool(x, m) / c
        assert torch.allclose(y, (1 - s_low) * pool(x0, m) + s_low * pool(eps, m) * m, atol=1e-12)
        v, v_low = _randn(1, 16, 16, 16, seed=10), _randn(1, 16, 8, 8, seed=11)
        e, e_low = x + (1 - sigma) * v, y + (1 - s_low) * v_low
        route = (guide_epsilon(e, e_low, m, w) - x) / (1 - sigma)
        assert torch.allclose(guide_velocity(v, v_low, x, sigma, m, w), route, atol=1e-9)
    v, v_low = _randn(1, 16, 16, 16, seed=12), _randn(1, 16, 8, 8, seed=13)
    assert torch.isfinite(guide_velocity(v, v_low, eps, 1.0, m, w)).all()


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_epsilon_conversions_round_trip(kind: str) -> None:
    x, pred = _randn(1, 4, 8, 8, seed=14), _randn(1, 4, 8, 8, seed=15)
    back = prediction_from_epsilon(epsilon_from(pred, x, 0.37, kind), x, 0.37, kind)
    assert torch.allclose(back, pred, atol=1e-12)
    assert kind != "epsilon" or epsilon_from(pred, x, 0.37, kind) is pred  # ε-models: untouched


# ------------------------------------------------------------------------------------------ the strategy


def _embeds(ad: ModelAdapter, cfg: bool = True) -> PromptEmbeds:
    return ad.encode_prompt(["a cat"], None, cfg)


def _den(ad: ModelAdapter, size: tuple[int, int] = (512, 512), guidance: float = 5.0) -> Denoiser:
    return Denoiser(ad, _embeds(ad, ad.family != "flux"), [0], guidance, size, 8)


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_strategy_is_the_epsilon_formula_for_eps_and_v_models(tiny_sdxl_pipe: Any, kind: str) -> None:
    """(5) The assembler converts both predictions to ε at (x_in, ᾱ_t) and (y, ᾱ_τ), guides, converts back: a
    v-prediction model gives the ε-space result; the low request is y at τ with its own size conditioning."""
    ad = ModelAdapter(tiny_sdxl_pipe)
    ad.scheduler = make_scheduler("euler", {**tiny_sdxl_pipe.scheduler.config, "prediction_type": kind})
    ad.set_timesteps(10)
    t = ad.scheduler.timesteps[2]
    ug = UpsampleGuidance(ad, 2, 1.0, 0.6, (256, 256))
    ug.at_step(2, t)
    x_in = _randn(1, 4, 64, 64, seed=16).float()
    requests, assemble = ug.gather(x_in, t, _den(ad))
    assert len(requests) == 2 and requests[1].size == (256, 256) and requests[0].size == (512, 512)
    abar = alpha_bar(ad.scheduler, t)
    tau, abar_low = tau_for(ad.scheduler.alphas_cumprod, abar, 2, "nearest", float(t))
    assert float(requests[1].timestep) == tau and requests[0].timestep is None
    assert torch.allclose(requests[1].x, low_sample(x_in, abar, 2))
    eps, eps_low = _randn(1, 4, 64, 64, seed=17).float(), _randn(1, 4, 32, 32, seed=18).float()
    preds = [
        prediction_from_epsilon(eps, x_in, abar, kind),
        prediction_from_epsilon(eps_low, requests[1].x, abar_low, kind),
    ]
    got = epsilon_from(assemble(preds), x_in, abar, kind)
    assert torch.allclose(got, guide_epsilon(eps, eps_low, 2, 1.0), atol=1e-5)


def test_gate_follows_eta_and_weight(tiny_sdxl_pipe: Any) -> None:
    ad = ModelAdapter(tiny_sdxl_pipe)
    ad.set_timesteps(10)  # leading, offset 1: 901, 801, …, 1
    ug = UpsampleGuidance(ad, 2, 1.0, 0.6, (256, 256))
    assert [ug.signature_at(i) for i in range(10)] == [True] * 6 + [False] * 4  # t > 400
    assert not any(UpsampleGuidance(ad, 2, 0.0, 0.6, (256, 256)).signature_at(i) for i in range(10))
    assert not any(UpsampleGuidance(ad, 2, 1.0, 0.0, (256, 256)).signature_at(i) for i in range(10))
    assert not any(UpsampleGuidance(ad, 1, 1.0, 0.6, (256, 256)).signature_at(i) for i in range(10))


# ------------------------------------------------------------------------------------------ Request.timestep


@pytest.mark.parametrize("model", ["sdxl", "flux"])
def test_a_request_timestep_equals_a_separate_predict(tiny_sdxl_pipe: Any, tiny_flux: Any, model: str) -> None:
    """(6) One predict mixing requests at t and at τ (same and other sizes) equals separate predicts at t and at τ,
    bit for bit; an explicit timestep equal to t runs in the same calls as none."""
    ad = ModelAdapter(tiny_sdxl_pipe) if model == "sdxl" else FluxAdapter(tiny_flux)
    ad.set_timesteps(4)
    t, tau = ad.scheduler.timesteps[1], ad.scheduler.timesteps[3]
    den = _den(ad)
    big, small = _randn(1, ad.latent_channels, 32, 32, seed=19).float(), _randn(1, ad.latent_channels, 16, 16).float()
    other = _randn(1, ad.latent_channels, 32, 32, seed=20).float()
    mixed = [den.request(big, [0]), dataclasses.replace(den.request(small, [0]), timestep=tau)]
    mixed.append(dataclasses.replace(den.request(other, [0]), timestep=tau))
    calls: list[tuple[int, ...]] = []
    module = ad.denoiser_module
    hook = module.register_forward_pre_hook(
        lambda mod, args, kwargs: calls.append(_call_shape(args, kwargs)), with_kwargs=True
    )
    try:
        together = ad.predict(mixed, t, 8)
        assert len(calls) == 3  # (big, t), (small, τ), (other, τ): a timestep splits equal sizes
        alone_t = ad.predict([den.request(big, [0])], t, 8)
        alone_tau = ad.predict([den.request(small, [0]), den.request(other, [0])], tau, 8)
        calls.clear()
        explicit = ad.predict([dataclasses.replace(den.request(big, [0]), timestep=t), den.request(other, [0])], t, 8)
        assert len(calls) == 1  # the explicit t batches with the step's own
        implicit = ad.predict([den.request(big, [0]), den.request(other, [0])], t, 8)
    finally:
        hook.remove()
    assert torch.equal(together[0], alone_t[0])
    assert torch.equal(together[1], alone_tau[0]) and torch.equal(together[2], alone_tau[1])
    assert all(torch.equal(a, b) for a, b in zip(explicit, implicit, strict=True))


def _call_shape(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[int, ...]:
    x = args[0] if args else kwargs["hidden_states"]
    return tuple(x.shape)


def test_explicit_step_timesteps_leave_existing_methods_bit_for_bit(sdxl: HiresPipeline, monkeypatch: Any) -> None:
    """Every request given ``timestep=t`` explicitly: demofusion's calls and image are those without (the
    batching key of a request at the step's own timestep is the same)."""
    kw = {**KW, "steps": 3}
    calls: list[tuple[int, ...]] = []
    hook = sdxl.adapter.unet.register_forward_pre_hook(
        lambda mod, args, kwargs: calls.append(_call_shape(args, kwargs)), with_kwargs=True
    )
    try:
        plain = sdxl("a cat", "demofusion", 512, 512, **kw).latents
        plain_calls, calls[:] = list(calls), []
        real = Denoiser.predict

        def explicit(self: Denoiser, requests: list[Request], t: torch.Tensor) -> list[torch.Tensor]:
            mapped = self.timestep_map(t) if self.timestep_map is not None else t
            return real(self, [dataclasses.replace(r, timestep=mapped.clone()) for r in requests], t)

        monkeypatch.setattr(Denoiser, "predict", explicit)
        again = sdxl("a cat", "demofusion", 512, 512, **kw).latents
    finally:
        hook.remove()
    assert calls == plain_calls and torch.equal(again, plain)


# ------------------------------------------------------------------------------------------ the method


def test_zero_weight_or_eta_is_direct_bit_for_bit_without_a_low_request(sdxl: HiresPipeline) -> None:
    """(1) w = 0 or η = 0: the image of ``direct``, and no model call at the low size."""
    calls: list[tuple[int, ...]] = []
    hook = sdxl.adapter.unet.register_forward_pre_hook(
        lambda mod, args, kwargs: calls.append(_call_shape(args, kwargs)), with_kwargs=True
    )
    try:
        direct = sdxl("a cat", "direct", 512, 512, **KW).latents
        for off in ({"weight": 0.0}, {"ug_eta": 0.0}):
            calls.clear()
            ug = sdxl("a cat", "upsample-guidance", 512, 512, **KW, **off).latents
            assert torch.equal(ug, direct) and {c[-2:] for c in calls} == {(64, 64)}
        calls.clear()
        guided = sdxl("a cat", "upsample-guidance", 512, 512, **KW).latents
    finally:
        hook.remove()
    assert not torch.equal(guided, direct) and torch.isfinite(guided).all()
    assert sum(c[-2:] == (32, 32) for c in calls) == 2  # 4 steps at 751, 501, 251, 1: two have t > 400


def test_v_prediction_model_runs(tiny_sd_pipe: Any) -> None:
    """(5) end to end on a v-prediction tiny SD model (DDIM: integer timesteps, VP latents)."""
    from diffusers import DDIMScheduler

    original = tiny_sd_pipe.scheduler
    tiny_sd_pipe.scheduler = DDIMScheduler.from_config({**original.config, "prediction_type": "v_prediction"})
    try:
        hp = HiresPipeline.from_pipe(tiny_sd_pipe, "tiny-sd")
        kw = {**KW, "scheduler": "model-default"}
        ug = hp("a cat", "upsample-guidance", 256, 256, **kw).latents
        direct = hp("a cat", "upsample-guidance", 256, 256, weight=0.0, **kw).latents
    finally:
        tiny_sd_pipe.scheduler = original
    assert torch.isfinite(ug).all() and not torch.equal(ug, direct)


def test_flux_is_experimental_and_zero_weight_is_direct(tiny_flux: Any) -> None:
    hp = HiresPipeline.from_pipe(tiny_flux, "tiny-flux")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ug = hp("a cat", "upsample-guidance", 512, 512, **KW)
    notices = [w for w in caught if issubclass(w.category, HiresWarning) and "upsample-guidance" in str(w.message)]
    assert len(notices) == 1 and "experimental" in str(notices[0].message)
    assert torch.isfinite(ug.latents).all() and ug.images[0].size == (512, 512)
    direct = hp("a cat", "direct", 512, 512, **KW).latents
    assert torch.equal(hp("a cat", "upsample-guidance", 512, 512, weight=0.0, **KW).latents, direct)
    assert not torch.equal(ug.latents, direct)


@pytest.mark.parametrize(
    ("size", "params", "words"),
    [
        ((600, 600), {}, ["2.34×", "512×512 or 768×768", "scale_factor"]),
        ((512, 520), {}, ["scale factor 2", "multiples of 16 px", "512×512"]),
        ((1024, 600), {}, ["short side 2.34×", "880×512 or 1320×768"]),
        ((512, 512), {"scale_factor": 3}, ["scale factor 3", "multiples of 24 px"]),
    ],
)
def test_size_validation_names_sizes_that_work(size: tuple[int, int], params: dict[str, Any], words: list[str]) -> None:
    """(7) A target that is no whole multiple, or whose sides the factor does not divide on the grid: one line."""
    settings = GenerationSettings(prompt="x", height=size[0], width=size[1])
    with pytest.raises(HiresError) as err:
        UpsampleGuidanceParams(**params).check(settings, 256, 8)
    message = str(err.value)
    assert "\n" not in message and all(w in message for w in words), message
    for h, w in ((768, 512), (512, 1024)):  # the short side decides m = 2 by default
        UpsampleGuidanceParams().check(GenerationSettings(prompt="x", height=h, width=w), 256, 8)
    assert UpsampleGuidanceParams().factor(768, 512, 256) == 2 == UpsampleGuidanceParams().factor(512, 1024, 256)


@pytest.mark.parametrize(
    "bad", [{"scale_factor": 2.5}, {"scale_factor": 0}, {"ug_eta": 1.5}, {"weight": -1.0}, {"tau": "exact"}]
)
def test_bad_parameters_are_one_line_errors(bad: dict[str, Any]) -> None:
    with pytest.raises(HiresError) as err:
        UpsampleGuidanceParams(**bad)
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------------------------------ command line, cost


def test_cli_runs_round_trips_and_takes_images_and_presets(tmp_path: Path) -> None:
    base = ["generate", "x", "--method", "upsample-guidance", "--width", "512", "--height", "512", "--steps", "4"]
    assert (
        main([*base, "--model", "tiny-sdxl", "--set", "tau=continuous", "--quiet", "--out", str(tmp_path / "a")]) == 0
    )
    first = tmp_path / "a" / "000-upsample-guidance-seed0.png"
    record = read_png_settings(first)
    assert record["method"] == "upsample-guidance" and record["params"]["tau"] == "continuous"
    assert main(["generate", "--from-png", str(first), "--quiet", "--out", str(tmp_path / "b")]) == 0
    again = tmp_path / "b" / "000-upsample-guidance-seed0.png"
    assert Image.open(first).tobytes() == Image.open(again).tobytes()
    small = tmp_path / "small.png"
    Image.open(first).resize((128, 128)).save(small)
    sd = ["generate", "x", "--method", "upsample-guidance", "--steps", "4", "--model", "tiny-sd", "--quiet"]
    assert main([*sd, "--width", "256", "--height", "256", "--out", str(tmp_path / "c")]) == 0
    assert main([*sd, "--image", str(small), "--scale", "2", "--strength", "0.6", "--out", str(tmp_path / "d")]) == 0
    assert Image.open(tmp_path / "d" / "000-upsample-guidance-seed0.png").size == (256, 256)
    assert main([*sd, "--preset", "ug-sd15", "--width", "384", "--height", "384", "--out", str(tmp_path / "e")]) == 0


def test_cli_non_integer_scale_is_one_line_before_model_work(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from hiresdiff import pipeline
    from hiresdiff.models import loading

    def spy(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("weights loaded before the size was checked")

    monkeypatch.setattr(loading, "load_pipeline", spy)
    monkeypatch.setattr(pipeline, "_CACHE", {})
    argv = ["generate", "x", "--model", "tiny-sdxl", "--method", "upsample-guidance", "--steps", "4"]
    assert main([*argv, "--width", "600", "--height", "600"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hiresdiff: error:") and err.strip().count("\n") == 0 and "512×512" in err


def test_cost_replay_equals_the_full_trace(monkeypatch: pytest.MonkeyPatch) -> None:
    """The replay settles on guided steps (t = 853 … 427 of 7), runs the step where the low request stops (285),
    and equals the full trace (``tests/test_cost.py``'s replay check)."""
    import contextlib

    import hiresdiff.cost.model as model_mod
    from hiresdiff.cost.model import model_cost
    from hiresdiff.cost.replay import replaying

    used = []

    @contextlib.contextmanager
    def spy(*args: Any) -> Any:
        with replaying(*args) as replay:
            used.append(replay)
            yield replay

    monkeypatch.setattr(model_mod, "replaying", spy)
    fast = model_cost("upsample-guidance", "tiny-sdxl", 512, 512, steps=7)
    full = model_cost("upsample-guidance", "tiny-sdxl", 512, 512, steps=7, exact=True)
    assert len(used) == 1 and used[0].replayed > 0
    assert fast.to_dict() == full.to_dict() and fast.peaks == full.peaks
    plain = model_cost("direct", "tiny-sdxl", 512, 512, steps=7)
    assert full.denoiser_flops > plain.denoiser_flops  # the low-resolution calls are counted


def test_hidiffusion_switch_is_refused_in_one_line() -> None:
    """HiDiffusion's patches are sized for one canvas per call; UG's calls run at two sizes."""
    from hiresdiff.pipeline import build_request

    with pytest.raises(HiresError) as err:
        build_request("x", "upsample-guidance", 512, 512, hidiffusion=True)
    assert "\n" not in str(err.value) and "hidiffusion=true" in str(err.value)
