"""APT (SPEC §4): statistical matching, scale-aware scheduling, shortcut sampling, presets, CLI.

Every check compares against an independent computation: closed-form statistics, diffusers' own β schedules,
hand-written DDIM/Euler update formulas with the new ᾱ, linear interpolation of ᾱ, the closed-form count of UNet
samples, or separate runs of the host methods.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler

import hiresdiff.methods.apt as apt_module
from hiresdiff.cli import main
from hiresdiff.config import PAPER_NEGATIVE_PROMPT
from hiresdiff.errors import HiresError
from hiresdiff.images import read_png_settings
from hiresdiff.methods.apt import (
    PRESETS,
    APTParams,
    parse_eta_table,
    scale_aware_scheduler,
    timestep_relabeller,
)
from hiresdiff.models.tiny import make_scheduler as tiny_scheduler
from hiresdiff.ops.matching import statistical_matching
from hiresdiff.ops.sas import DEFAULT_ETA_TABLE, eta_for_scale, sas_betas
from hiresdiff.pipeline import build_request
from hiresdiff.sampler import Run
from hiresdiff.schedulers import make_scheduler
from hiresdiff.stages import progressive_phases

B_START, B_END, T = 0.00085, 0.012, 1000


def _base(name: str):
    """The scheduler ``name`` built from the SDXL-like config of the built-in models (leading, offset 1)."""
    return make_scheduler(name, tiny_scheduler().config)


def _alpha_bar(eta: float) -> torch.Tensor:
    """ᾱ_t = Π (1 − β_s) of the SaS schedule, in float64."""
    return torch.cumprod(1.0 - sas_betas(eta, B_START, B_END, T).double(), dim=0)


def _moments(x: torch.Tensor, per_channel: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased std over (C, H, W) per sample, or over (H, W) per sample and channel (float64)."""
    flat = x.double().flatten(2) if per_channel else x.double().flatten(1)
    return flat.mean(-1), flat.std(-1, unbiased=True)


# ------------------------------------------------------------------------------------------ §4.1 SM


def _latents(h: int, w: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """An upsampled latent Z (B=2, C=4, h, w) with channel offsets and a reference z with different stats."""
    g = torch.Generator().manual_seed(seed)
    big = torch.randn(2, 4, h, w, generator=g) * 2.3 + torch.tensor([0.5, -1.0, 2.0, 0.0]).view(1, 4, 1, 1)
    ref = torch.randn(2, 4, 7, 5, generator=g)
    ref = ref * torch.tensor([1.7, 0.4]).view(2, 1, 1, 1) + torch.tensor([0.3, -1.2]).view(2, 1, 1, 1)
    return big, ref


SM_CASES = [(d, hw) for d in (2, 3, 4) for hw in ((13, 10), (17, 11), (16, 16))]


@pytest.mark.parametrize(("d", "hw"), SM_CASES)
def test_sm_every_lattice_gets_the_reference_statistics(d, hw):
    big, ref = _latents(*hw, seed=d)
    out = statistical_matching(big, ref, d)
    assert out.shape == big.shape
    mu_ref, sd_ref = _moments(ref, per_channel=False)
    assert not torch.allclose(mu_ref[0], mu_ref[1])  # the two samples really have different references
    for i in range(d):
        for j in range(d):
            lattice, original = out[:, :, i::d, j::d], big[:, :, i::d, j::d]
            mu, sd = _moments(lattice, per_channel=False)
            torch.testing.assert_close(mu, mu_ref, atol=2e-5, rtol=0)
            torch.testing.assert_close(sd, sd_ref, atol=2e-5, rtol=2e-5)
            # each lattice is a positive affine map of itself: standardised values are unchanged
            m0, s0 = _moments(original, per_channel=False)
            z_in = (original.double() - m0.view(2, 1, 1, 1)) / s0.view(2, 1, 1, 1)
            z_out = (lattice.double() - mu.view(2, 1, 1, 1)) / sd.view(2, 1, 1, 1)
            torch.testing.assert_close(z_out, z_in, atol=1e-4, rtol=0)


@pytest.mark.parametrize(("d", "hw"), [(2, (13, 10)), (3, (17, 11)), (4, (17, 11))])
def test_sm_per_channel(d, hw):
    big, ref = _latents(*hw, seed=10 + d)
    out = statistical_matching(big, ref, d, per_channel=True)
    mu_ref, sd_ref = _moments(ref, per_channel=True)  # (B, C)
    for i in range(d):
        for j in range(d):
            mu, sd = _moments(out[:, :, i::d, j::d], per_channel=True)
            torch.testing.assert_close(mu, mu_ref, atol=2e-5, rtol=0)
            torch.testing.assert_close(sd, sd_ref, atol=2e-5, rtol=2e-5)
    # the scalar mode does not match per channel (Z has channel offsets): the two modes really differ
    scalar = statistical_matching(big, ref, d)
    mu_scalar, _ = _moments(scalar[:, :, ::d, ::d], per_channel=True)
    assert (mu_scalar - mu_ref).abs().max() > 0.1


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("d", [2, 3, 4])
def test_sm_is_identity_when_lattices_already_match(d, per_channel):
    big, ref = _latents(17, 11, seed=20 + d)
    once = statistical_matching(big, ref, d, per_channel)
    torch.testing.assert_close(statistical_matching(once, ref, d, per_channel), once, atol=1e-5, rtol=1e-5)

    # Z assembled from d² independent lattices, each given the reference statistics by hand
    mu_ref, sd_ref = _moments(ref, per_channel)
    shape = (2, 4, 1, 1) if per_channel else (2, 1, 1, 1)
    built = torch.empty_like(big)
    g = torch.Generator().manual_seed(99)
    for i in range(d):
        for j in range(d):
            hh, ww = len(range(i, 17, d)), len(range(j, 11, d))
            noise = torch.randn(2, 4, hh, ww, generator=g, dtype=torch.float64)
            m, s = _moments(noise, per_channel)
            unit = (noise - m.view(shape)) / s.view(shape)
            built[:, :, i::d, j::d] = (unit * sd_ref.view(shape) + mu_ref.view(shape)).float()
    torch.testing.assert_close(statistical_matching(built, ref, d, per_channel), built, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------ §4.2 SaS


def test_sas_eta_half_is_scaled_linear_and_one_is_linear():
    diffusers_betas = DDIMScheduler(beta_schedule="scaled_linear", beta_start=B_START, beta_end=B_END).betas
    assert (sas_betas(0.5, B_START, B_END, T) - diffusers_betas).abs().max().item() <= 1e-7
    linear = torch.linspace(B_START, B_END, T)
    assert (sas_betas(1.0, B_START, B_END, T) - linear).abs().max().item() <= 1e-7
    assert sas_betas(1.0, B_START, B_END, T).dtype == torch.float32


@pytest.mark.parametrize("eta", [0.7, 2.0, 3.5])
def test_sas_betas_formula(eta):
    betas = sas_betas(eta, B_START, B_END, T)
    for t in (0, 1, 250, 500, 998, 999):
        expected = (B_START**eta + t / (T - 1) * (B_END**eta - B_START**eta)) ** (1 / eta)
        assert betas[t].item() == pytest.approx(expected, rel=1e-6)


def test_sas_noise_level_increases_with_eta():
    levels = [1.0 - _alpha_bar(eta)[500].item() for eta in (0.5, 1.0, 2.0, 3.0, 3.5)]
    assert all(a < b for a, b in itertools.pairwise(levels)), levels


@pytest.mark.parametrize(
    ("scale", "eta"), [(2, 2.0), (2.5, 2.5), (3, 3.0), (3.5, 3.25), (4, 3.5), (6, 3.5), (1.5, None), (1.0, None)]
)
def test_eta_for_scale_defaults(scale, eta):
    assert eta_for_scale(scale) == eta
    assert eta_for_scale(scale, DEFAULT_ETA_TABLE) == eta


def test_parse_eta_table_overrides_only_the_given_scale():
    table = parse_eta_table("4=3.0")
    assert table == {2.0: 2.0, 3.0: 3.0, 4.0: 3.0}
    assert DEFAULT_ETA_TABLE == {2.0: 2.0, 3.0: 3.0, 4.0: 3.5}  # the defaults are not mutated
    assert eta_for_scale(3.5, table) == 3.0 and eta_for_scale(2.5, table) == 2.5 and eta_for_scale(5, table) == 3.0
    assert parse_eta_table("") == DEFAULT_ETA_TABLE
    assert parse_eta_table(" 2=1.5 , 5=4 ") == {2.0: 1.5, 3.0: 3.0, 4.0: 3.5, 5.0: 4.0}
    assert APTParams(sas_eta="4=3.0").eta_table == table


@pytest.mark.parametrize("text", ["4", "4=", "=3", "x=3", "4=y", "4=0", "4=-1", "0=2", "-2=2", "4:3", "4=3=2"])
def test_parse_eta_table_rejects_bad_tables(text):
    with pytest.raises(HiresError) as info:
        parse_eta_table(text)
    assert "\n" not in str(info.value)
    with pytest.raises(HiresError):
        APTParams(sas_eta=text)


@pytest.mark.parametrize("text", ["2=inf", "inf=3", "2=nan", "2=1e300"])
def test_parse_eta_table_rejects_non_finite_values(text):
    with pytest.raises(HiresError):
        parse_eta_table(text)


def test_scale_aware_ddim_uses_the_new_alpha_bar():
    base = _base("ddim")
    new = scale_aware_scheduler(base, 2.0)
    assert type(new) is DDIMScheduler
    assert torch.equal(new.betas, sas_betas(2.0, B_START, B_END, T))
    assert new.config.clip_sample is False and new.config.timestep_spacing == "leading"
    a_new = _alpha_bar(2.0)
    torch.testing.assert_close(new.alphas_cumprod.double(), a_new, rtol=1e-5, atol=1e-7)

    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([581, 581])
    expected = math.sqrt(a_new[581]) * x0 + math.sqrt(1 - a_new[581]) * eps
    noised = new.add_noise(x0, eps, t)
    torch.testing.assert_close(noised, expected.float(), atol=1e-5, rtol=1e-5)
    assert (noised - base.add_noise(x0, eps, t)).abs().max() > 1e-2

    # one DDIM step (η_DDIM = 0) from x_t with a given ε: x_prev = √ᾱ_prev·x̂0 + √(1 − ᾱ_prev)·ε
    for sched in (new, base):
        sched.set_timesteps(50)
    assert torch.equal(new.timesteps, base.timesteps)
    step_t, prev_t = int(new.timesteps[20]), int(new.timesteps[21])
    assert (step_t, prev_t) == (581, 561)
    x_t = torch.randn(1, 4, 8, 8, generator=g) * 1.3
    x0_hat = (x_t.double() - math.sqrt(1 - a_new[step_t]) * eps[:1]) / math.sqrt(a_new[step_t])
    expected = math.sqrt(a_new[prev_t]) * x0_hat + math.sqrt(1 - a_new[prev_t]) * eps[:1]
    stepped = new.step(eps[:1], new.timesteps[20], x_t, eta=0.0).prev_sample
    torch.testing.assert_close(stepped, expected.float(), atol=1e-5, rtol=1e-5)
    assert (stepped - base.step(eps[:1], base.timesteps[20], x_t, eta=0.0).prev_sample).abs().max() > 1e-3
    # the last step goes to ᾱ_0 of the new schedule (set_alpha_to_one=False)
    last = new.step(eps[:1], new.timesteps[-1], x_t, eta=0.0).prev_sample
    x0_hat = (x_t.double() - math.sqrt(1 - a_new[1]) * eps[:1]) / math.sqrt(a_new[1])
    torch.testing.assert_close(last, (math.sqrt(a_new[0]) * x0_hat + math.sqrt(1 - a_new[0]) * eps[:1]).float())


def test_scale_aware_euler_uses_the_new_sigmas():
    base = _base("euler")
    new = scale_aware_scheduler(base, 3.0)
    a_new = _alpha_bar(3.0)
    new.set_timesteps(50)
    ts = new.timesteps.long()
    sigma = ((1 - a_new) / a_new).sqrt()
    torch.testing.assert_close(new.sigmas[:-1].double(), sigma[ts], rtol=1e-5, atol=0)
    assert new.sigmas[-1] == 0

    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    k = 20
    new.set_begin_index(k)
    t = new.timesteps[k]
    assert int(t) == 581
    s, s_next = sigma[ts[k]].item(), sigma[ts[k + 1]].item()
    torch.testing.assert_close(new.add_noise(x0, eps, t.reshape(1)), x0 + s * eps, atol=1e-5, rtol=1e-5)
    x = x0 + s * eps
    torch.testing.assert_close(new.scale_model_input(x, t), x / math.sqrt(s * s + 1), atol=1e-6, rtol=1e-5)
    # Euler (epsilon): x̂0 = x − σ·ε, derivative ε, x_next = x + ε·(σ_next − σ)
    stepped = new.step(eps, t, x, return_dict=False)[0]
    torch.testing.assert_close(stepped, x + eps * (s_next - s), atol=1e-5, rtol=1e-5)
    base.set_timesteps(50)
    assert (base.sigmas[k] - new.sigmas[k]).abs() > 1e-2


@pytest.mark.parametrize("eta", [1.0, 2.0, 3.5])
def test_timestep_relabeller_matches_alpha_bar(eta):
    base = _base("ddim")
    new = scale_aware_scheduler(base, eta)
    relabel = timestep_relabeller(new, base)
    a_orig, a_new = base.alphas_cumprod.double(), new.alphas_cumprod.double()
    clamped = 0
    for t in range(0, T, 7):
        tp = float(relabel(torch.tensor(t)))
        if a_new[t] < a_orig[-1]:
            assert tp == pytest.approx(T - 1)  # beyond the original range: clamped to the last timestep
            clamped += 1
            continue
        lo = min(math.floor(tp), T - 2)
        frac = tp - lo
        interpolated = (1 - frac) * a_orig[lo] + frac * a_orig[lo + 1]
        assert abs(interpolated - a_new[t]) <= 1e-4 * a_new[t], (t, tp)
        assert tp >= t - 1e-3
        if t > 0:
            assert tp > t  # η > 0.5 adds noise faster: the same ᾱ is reached at a later original timestep
    assert clamped < T // 7 // 2  # most of the range is matched, not clamped


# ------------------------------------------------------------------------------------------ runs


def _unet_calls(pipe, monkeypatch) -> list[tuple[int, float]]:
    """(batch, timestep) of every UNet forward call of the test (hook removed by monkeypatch)."""
    calls: list[tuple[int, float]] = []
    original = pipe.unet.forward

    def forward(sample, timestep, *args, **kwargs):
        calls.append((sample.shape[0], float(timestep)))
        return original(sample, timestep, *args, **kwargs)

    monkeypatch.setattr(pipe.unet, "forward", forward)
    return calls


def _distinct_in_order(values: list[float]) -> list[float]:
    out: list[float] = []
    for v in values:
        if not out or out[-1] != v:
            out.append(v)
    return out


@pytest.mark.parametrize("mode", ["betas", "relabel"])
def test_sas_modes_timesteps_seen_by_the_unet(sdxl, tiny_sdxl_pipe, monkeypatch, mode):
    calls = _unet_calls(tiny_sdxl_pipe, monkeypatch)
    kw = {"steps": 3, "shortcut_steps": 2, "scheduler": "ddim", "previews": False, "progress": False}
    sdxl("a cat", "apt", 512, 512, sas_mode=mode, **kw)
    seen = _distinct_in_order([t for _, t in calls])
    # phase 1 (original schedule): DDIM leading, N = 3 → 667, 334, 1; phase 2 (scale 2, η = 2): the last 2 steps
    assert seen[:3] == [667.0, 334.0, 1.0]
    if mode == "betas":
        assert seen[3:] == [334.0, 1.0]
    else:
        base = _base("ddim")
        relabel = timestep_relabeller(scale_aware_scheduler(base, 2.0), base)
        expected = [float(relabel(torch.tensor(334))), float(relabel(torch.tensor(1)))]
        assert seen[3:] == pytest.approx(expected, abs=1e-4)
        assert seen[3] > 334.5 and seen[4] > 1.0 and seen[4] != round(seen[4])


@pytest.mark.parametrize(
    ("scheduler", "preset", "first"),
    [("ddim", "apt", 581), ("euler", "apt", 581), ("ddim", "demofusion", 981)],
)
def test_shortcut_start_and_phase_schedulers(sdxl, monkeypatch, scheduler, preset, first):
    """N = 50, T0 = 30 with leading spacing and offset 1: every later phase starts at t = 581 (SPEC §4.3)."""
    seen, starts = [], []

    def denoise(self, x, timesteps, strategy, den, hooks=(), name="sampling"):
        seen.append((name, timesteps.clone(), self.scheduler, den.timestep_map))
        starts.append((x.clone(), [(h.reference, h.noise) for h in hooks if hasattr(h, "reference")]))
        return x  # no model work: only the phase plan is checked

    monkeypatch.setattr(Run, "denoise", denoise)
    kw = {"steps": 50, "seed": 11, "previews": False, "progress": False}
    sdxl("a cat", "apt", 768, 768, scheduler=scheduler, preset=preset, **kw)
    assert [name.split()[1] for name, *_ in seen] == ["1/3", "2/3", "3/3"]
    full = seen[0][1]
    assert len(full) == 50 and int(full[0]) == 981 and int(full[-1]) == 1
    base_betas = DDIMScheduler(beta_schedule="scaled_linear", beta_start=B_START, beta_end=B_END).betas
    assert (seen[0][2].betas - base_betas).abs().max() <= 1e-7  # phase 1 keeps the original schedule
    for k, (_, timesteps, sched, tmap) in enumerate(seen[1:], start=2):
        assert int(timesteps[0]) == first
        assert torch.equal(timesteps, full[-30:] if preset == "apt" else full)
        assert tmap is None
        if preset == "apt":  # SaS: η(2) = 2, η(3) = 3
            assert torch.equal(sched.betas, sas_betas(float(k), B_START, B_END, T))
        else:
            assert (sched.betas - base_betas).abs().max() <= 1e-7

    # DDIM: phase 2 starts at x = z'_{t0} = √ᾱ_new(t0)·Z + √(1 − ᾱ_new(t0))·ε with Z the upsampled phase-1 latent
    # after SM and ε the phase's noise, both from the seed's generator (the fake denoiser draws nothing)
    if scheduler == "ddim":
        g = torch.Generator().manual_seed(11)
        z1 = torch.randn(1, 4, 32, 32, generator=g)  # phase 1 returned its start: pure noise (init σ = 1)
        eps = torch.randn(1, 4, 64, 64, generator=g)
        z_up = torch.nn.functional.interpolate(z1, size=(64, 64), mode="bicubic", align_corners=False)
        if preset == "apt":
            z_up = statistical_matching(z_up, z1, 2)
        a = (_alpha_bar(2.0) if preset == "apt" else _alpha_bar(0.5))[first].item()
        x_start, residual = starts[1]
        torch.testing.assert_close(starts[0][0], z1)
        torch.testing.assert_close(x_start, math.sqrt(a) * z_up + math.sqrt(1 - a) * eps, atol=1e-4, rtol=1e-4)
        assert len(residual) == 1
        torch.testing.assert_close(residual[0][0], z_up, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(residual[0][1], eps)


def test_model_evaluations_closed_form(sdxl, tiny_sdxl_pipe, monkeypatch):
    """UNet samples at 4× (256 → 1024 px), both guidance halves counted:

    ``2·N + Σ_{k=2..4} steps_k · 2 · ((2k − 1)² + k²)`` — phase 1 is one CFG pair per step; phase k has
    ``(2k − 1)²`` local views (window 32, stride 16 on a 32k latent side) and ``k²`` dilated samples, each a CFG
    pair; ``steps_k = N`` for demofusion and ``T0`` for apt.
    """
    n, t0 = 4, 2
    kw = {"steps": n, "scheduler": "ddim", "previews": False, "progress": False, "max_batch": 64}
    monkeypatch.setattr(Run, "decode", lambda self, z: torch.zeros(z.shape[0], 3, z.shape[2] * 8, z.shape[3] * 8))
    counts = {}
    calls = _unet_calls(tiny_sdxl_pipe, monkeypatch)
    for method, extra in (("demofusion", {}), ("apt", {"preset": "apt", "shortcut_steps": t0})):
        calls.clear()
        sdxl("a cat", method, 1024, 1024, **kw, **extra)
        counts[method] = sum(b for b, _ in calls)

    def closed_form(steps_k: int) -> int:
        return 2 * n + sum(steps_k * 2 * ((2 * k - 1) ** 2 + k**2) for k in range(2, 5))

    assert counts == {"demofusion": closed_form(n), "apt": closed_form(t0)}
    assert counts == {"demofusion": 904, "apt": 456}


# ------------------------------------------------------------------------------------------ presets, CLI


def _preset_kwargs(preset: str, steps: int) -> dict:
    return {"preset": preset, "steps": steps, "progress": False, "seed": 3}  # the shortcut is a fraction of N


@pytest.mark.parametrize("preset", list(PRESETS))
@pytest.mark.parametrize("model", ["sdxl", "sd"])
def test_every_preset_end_to_end(request, model, preset):
    pipe = request.getfixturevalue(model)
    native = pipe.native_size
    height, width = native * 5 // 2, native * 2  # scale 2.5, non-square
    res = pipe(["a cat"], "apt", width, height, **_preset_kwargs(preset, 2))
    phases = progressive_phases(height, width, native, 8)
    assert len(phases) == 3
    assert len(res.previews) == len(phases)
    assert [p[0].size for p in res.previews] == [(ph.width, ph.height) for ph in phases]
    assert res.images[0].size == (width, height)
    assert torch.isfinite(res.latents).all()
    assert res.latents.shape == (1, 4, height // 8, width // 8)
    params = res.metadata[0]["params"]
    for key, value in PRESETS[preset].items():
        assert params[key] == value


def test_cli_preset_and_paper(tmp_path: Path):
    tiny = ["--model", "tiny-sdxl", "--quiet", "--method", "apt"]
    out = tmp_path / "sas"
    argv = ["generate", "a cat", *tiny, "--preset", "apt-sas", "--steps", "4", "--set", "shortcut_steps=2"]
    assert main([*argv, "--out", str(out)]) == 0
    meta = read_png_settings(out / "000-apt-seed0.png")
    assert meta["params"]["sm"] is False and meta["params"]["sas"] is True and meta["params"]["host"] == "demofusion"
    assert meta["params"]["shortcut_steps"] == 2 and meta["steps"] == 4 and meta["scheduler"] == "euler"
    assert (out / "000-apt-seed0-phase1of2.png").is_file()
    again = tmp_path / "again"  # the stored APT parameters regenerate the same image
    assert main(["generate", "--from-png", str(out / "000-apt-seed0.png"), "--quiet", "--out", str(again)]) == 0
    assert (again / "000-apt-seed0.png").read_bytes() == (out / "000-apt-seed0.png").read_bytes()

    out = tmp_path / "paper"
    argv = ["generate", "a cat", *tiny, "--preset", "apt", "--paper", "--steps", "3", "--set", "shortcut_steps=2"]
    assert main([*argv, "--out", str(out)]) == 0
    meta = read_png_settings(out / "000-apt-seed0.png")
    assert meta["scheduler"] == "ddim" and meta["guidance"] == 7.5 and meta["steps"] == 3  # explicit --steps wins
    assert meta["negative_prompt"] == PAPER_NEGATIVE_PROMPT
    assert meta["params"]["sm"] is True and meta["params"]["sas"] is True

    # --paper without a model: a method without a default negative gets the paper's; explicit values win
    req = build_request("a cat", "multidiffusion", 512, 512, paper=True)
    s = req.settings
    assert (s.scheduler, s.steps, s.guidance, s.negative_prompt) == ("ddim", 50, 7.5, [PAPER_NEGATIVE_PROMPT])
    s = build_request("a cat", "apt", 512, 512, paper=True, guidance=5.0, scheduler="euler", preset="apt").settings
    assert (s.scheduler, s.steps, s.guidance) == ("euler", 50, 5.0)
    assert build_request("a cat", "multidiffusion", 512, 512).settings.negative_prompt is None
    assert build_request("a cat", "apt", 512, 512, sas_eta="4=3.0").params.eta_table[4.0] == 3.0


@pytest.mark.parametrize("preset", [None, *PRESETS])
def test_cli_every_preset_runs_at_four_steps_without_extra_flags(tmp_path: Path, preset):
    argv = ["generate", "x", "--model", "tiny-sdxl", "--method", "apt", "--steps", "4", "--quiet", "--no-previews"]
    argv += [] if preset is None else ["--preset", preset]
    assert main([*argv, "--out", str(tmp_path)]) == 0
    params = read_png_settings(tmp_path / "000-apt-seed0.png")["params"]
    assert params["shortcut"] == (PRESETS[preset]["shortcut"] if preset else 0.6) and params["shortcut_steps"] is None


def test_unknown_preset_is_one_line(sdxl, capsys):
    with pytest.raises(HiresError) as info:
        sdxl("a cat", "apt", 512, 512, preset="apt-everything", progress=False)
    text = str(info.value)
    assert "apt-everything" in text and "accdiffusion-apt" in text and "\n" not in text
    assert main(["generate", "a", "--model", "tiny-sdxl", "--method", "apt", "--preset", "nope", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("hiresdiff: error:") and "'nope'" in err and "\n" not in err


def test_shortcut_longer_than_steps_rejected_before_model_work(sdxl, tiny_sdxl_pipe, monkeypatch):
    calls = _unet_calls(tiny_sdxl_pipe, monkeypatch)
    encoded = []
    monkeypatch.setattr(sdxl.adapter, "encode_prompt", lambda *a, **k: encoded.append(a))
    with pytest.raises(HiresError, match="shortcut_steps 5 must not exceed steps 4") as info:
        sdxl("a cat", "apt", 512, 512, steps=4, shortcut_steps=5, progress=False)
    assert "\n" not in str(info.value)
    with pytest.raises(HiresError, match="shortcut_steps"):
        sdxl("a cat", "apt", 512, 512, steps=4, shortcut_steps=0, progress=False)
    for bad in (0.0, 1.5, float("nan")):
        with pytest.raises(HiresError, match="shortcut") as info:
            sdxl("a cat", "apt", 512, 512, steps=4, shortcut=bad, progress=False)
        assert "\n" not in str(info.value)
    assert calls == [] and encoded == []


@pytest.mark.parametrize(
    ("steps", "extra", "t0"),
    [
        (50, {}, 30),  # the paper's 30/50
        (20, {}, 12),
        (4, {}, 2),  # round(2.4)
        (1, {}, 1),  # at least one step
        (20, {"shortcut": 0.25}, 5),
        (20, {"shortcut_steps": 7}, 7),  # the absolute T0 wins over the fraction
        (20, {"shortcut": None}, 20),  # no shortcut: all N steps
        (20, {"preset": "demofusion"}, 20),
        (20, {"preset": "accdiffusion-apt", "content_prompts": False}, 12),  # (the fake denoiser records no maps)
    ],
)
def test_shortcut_is_a_fraction_of_any_step_count(sdxl, monkeypatch, steps, extra, t0):
    lengths = []

    def denoise(self, x, timesteps, strategy, den, hooks=(), name="sampling"):
        lengths.append(len(timesteps))
        return x

    monkeypatch.setattr(Run, "denoise", denoise)
    sdxl("a cat", "apt", 512, 384, steps=steps, scheduler="ddim", previews=False, progress=False, **extra)
    assert lengths == [steps, t0]


# ------------------------------------------------------------------------------------------ switches


def test_sm_and_sas_are_independent_switches(sd, monkeypatch):
    """Same seed: SM only, SaS only and neither give three different results; with both off APT is the host."""
    kw = {"steps": 3, "scheduler": "ddim", "seed": 5, "previews": False, "progress": False}
    matched = []
    original = apt_module.statistical_matching

    def spy(latent, reference, dilation, per_channel=False):
        matched.append((tuple(latent.shape), tuple(reference.shape), dilation))
        return original(latent, reference, dilation, per_channel)

    monkeypatch.setattr(apt_module, "statistical_matching", spy)
    out = {}
    for sm, sas in ((True, False), (False, True), (False, False)):
        matched.clear()
        out[sm, sas] = sd("a cat", "apt", 384, 384, sm=sm, sas=sas, shortcut_steps=2, **kw).latents
        # SM runs once per later phase with the phase's dilation on (upsampled, previous) latents
        assert matched == ([((1, 4, 32, 32), (1, 4, 16, 16), 2), ((1, 4, 48, 48), (1, 4, 32, 32), 3)] if sm else [])
    assert not torch.allclose(out[True, False], out[False, True], atol=1e-3)
    assert not torch.allclose(out[True, False], out[False, False], atol=1e-3)
    assert not torch.allclose(out[False, True], out[False, False], atol=1e-3)

    # both off = DemoFusion started at step N − T0 (bit-identical)
    host = sd("a cat", "demofusion", 384, 384, start_step=1, **kw).latents
    assert torch.equal(out[False, False], host)
    # SaS with η = 0.5 at every scale reproduces the original scaled_linear schedule (up to 1e-7 in β)
    half = sd("a cat", "apt", 384, 384, sm=False, sas=True, sas_eta="2=0.5,3=0.5,4=0.5", shortcut_steps=2, **kw)
    torch.testing.assert_close(half.latents, out[False, False], atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize(("preset", "method"), [("demofusion", "demofusion"), ("accdiffusion", "accdiffusion")])
def test_host_presets_equal_the_host_methods(sd, preset, method):
    kw = {"steps": 2, "scheduler": "ddim", "seed": 9, "previews": False, "progress": False}
    ours = sd(["a red cat", "a dog"], "apt", 256, 320, preset=preset, **kw).latents
    host = sd(["a red cat", "a dog"], method, 256, 320, **kw).latents
    assert torch.equal(ours, host)
