"""Sampler, strategies and pipeline on the tiny offline models (SPEC §0, §0.1, §1, §2).

Every check compares against an independent computation: per-view scheduler stepping, closed-form noising and
x̂0 formulas, separate runs, or a deliberately broken variant that must fail the same bound.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import hiresdiff.models.adapter as adapter_module
from hiresdiff import HiresPipeline
from hiresdiff.config import GenerationSettings
from hiresdiff.methods.demofusion import SkipResidual
from hiresdiff.models.adapter import ModelAdapter
from hiresdiff.ops.dilation import dilated_merge, dilated_split
from hiresdiff.ops.geometry import view_starts
from hiresdiff.ops.stats import scalar_stats
from hiresdiff.ops.tiling import tiled_apply
from hiresdiff.sampler import Run
from hiresdiff.schedulers import SCHEDULERS, make_scheduler
from hiresdiff.stages import progressive_phases
from hiresdiff.strategies import Blend, Denoiser, DilatedSampling, LocalViews

STEPS = 3


# ------------------------------------------------------------------------------------------------ helpers


def _adapter(pipe, scheduler: str, **overrides) -> ModelAdapter:
    ad = ModelAdapter(pipe)
    ad.scheduler = make_scheduler(scheduler, {**pipe.scheduler.config, **overrides})
    return ad


def _at_step(sched, k: int, steps: int = 4) -> torch.Tensor:
    """Prepare ``sched`` at step index ``k`` of ``steps`` (begin index set, as Run.begin does) → timestep."""
    sched.set_timesteps(steps)
    if hasattr(sched, "set_begin_index"):
        sched.set_begin_index(k)
    return sched.timesteps[k]


def _denoiser(ad: ModelAdapter, size: tuple[int, int], batch: int = 1) -> Denoiser:
    prompts = ["a red house", "a blue car"][:batch]
    embeds = ad.encode_prompt(prompts, None, True)
    return Denoiser(ad, embeds, list(range(batch)), 7.5, size, 64)


def _step(sched, pred: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """One step on a copy of ``sched`` (so every view sees the same scheduler state)."""
    return copy.deepcopy(sched).step(pred, t, x, return_dict=False)[0]


def _per_view_step(sched, views, preds: torch.Tensor, t, x: torch.Tensor, j: int) -> torch.Tensor:
    """Reference implementations: step each view on its own, average the stepped views by coverage."""
    b, _, h, w = x.shape
    assert b == 1
    xp = F.pad(x, (j, j, j, j))
    value, count = torch.zeros_like(xp), torch.zeros_like(xp[:, :1])
    for k, v in enumerate(views):
        sl = (slice(None), slice(None), slice(v.top + j, v.top + j + v.height), slice(v.left + j, v.left + j + v.width))
        value[sl] += _step(sched, preds[k : k + 1], t, xp[sl])
        count[sl] += 1
    assert bool((count[:, :, j : j + h, j : j + w] > 0).all())
    return (value / count)[:, :, j : j + h, j : j + w]


SCHED_CASES = [
    pytest.param("euler", {}, id="euler"),
    pytest.param("ddim", {}, id="ddim"),
]


# --------------------------------------------------------------------------------- §0.1 fused prediction


@pytest.mark.parametrize("jitter", [False, True], ids=["fixed", "jitter"])
@pytest.mark.parametrize(("name", "overrides"), SCHED_CASES)
def test_fused_step_equals_per_view_stepping(tiny_sdxl_pipe, name, overrides, jitter):
    ad = _adapter(tiny_sdxl_pipe, name, **overrides)
    sched = ad.scheduler
    t = _at_step(sched, 2)
    x = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(0)) * 3.0  # 2× native latent canvas
    x_in = sched.scale_model_input(x, t)  # also initialises Euler's step index for both paths
    strategy = LocalViews(32, 16, jitter, [torch.Generator().manual_seed(1)], 8)
    den = _denoiser(ad, (512, 512))
    requests, assemble = strategy.gather(x_in, t, den)
    preds = den.predict(requests, t)
    views = strategy.last_views[0]
    assert len(views) == 9
    assert strategy.max_jitter == (4 if jitter else 0)

    fused = _step(sched, assemble(preds), t, x)
    per_view = _per_view_step(sched, views, preds[0], t, x, strategy.max_jitter)
    assert fused.dtype == torch.float32
    assert (fused - per_view).abs().max().item() <= 1e-5


@pytest.mark.parametrize(("name", "overrides"), SCHED_CASES)
def test_fused_blend_equals_separate_local_and_global_stepping(tiny_sdxl_pipe, name, overrides):
    """DemoFusion's official structure: step every local view and every dilated sample, blend the x_{t−1}."""
    ad = _adapter(tiny_sdxl_pipe, name, **overrides)
    sched = ad.scheduler
    t = _at_step(sched, 1)
    x = torch.randn(1, 4, 48, 64, generator=torch.Generator().manual_seed(3)) * 3.0
    x_in = sched.scale_model_input(x, t)
    c = (0.5 * (1 + math.cos(math.pi * (1000 - float(t)) / 1000))) ** 1.0
    local = LocalViews(32, 16, True, [torch.Generator().manual_seed(2)], 8)
    strategy = Blend(local, DilatedSampling(2, 0.8, 1.0), lambda tt: c)
    den = _denoiser(ad, (384, 512))
    requests, assemble = strategy.gather(x_in, t, den)
    assert len(requests) == 2
    preds = den.predict(requests, t)
    fused = _step(sched, assemble(preds), t, x)

    x_local = _per_view_step(sched, local.last_views[0], preds[0], t, x, local.max_jitter)
    lattice = dilated_split(x, 2)  # the step uses the un-blurred canvas; the model saw the blurred one
    stepped = torch.stack(
        [
            torch.stack([_step(sched, preds[1][(i * 2 + j) : (i * 2 + j) + 1], t, lattice[i, j]) for j in range(2)])
            for i in range(2)
        ]
    )
    x_global = dilated_merge(stepped, 48, 64)
    expected = (1 - c) * x_local + c * x_global
    assert (fused - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize("name", ["ddim", "ddpm"])
def test_make_scheduler_never_clips_latent_x0(tiny_sdxl_pipe, name):
    assert make_scheduler(name, tiny_sdxl_pipe.scheduler.config).config.clip_sample is False


# ------------------------------------------------------------------------------ prediction ↔ x̂0 (adapter)


def _abar(sched, name: str, k: int, t: torch.Tensor) -> float:
    """ᾱ from first principles: Euler 1/(1+σ_k²), DDIM alphas_cumprod[t]."""
    if name == "euler":
        return 1.0 / (1.0 + float(sched.sigmas[k]) ** 2)
    return float(sched.alphas_cumprod[int(t)])


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("name", ["euler", "ddim"])
@pytest.mark.parametrize("k", [0, 2])
def test_to_x0_recovers_x0_and_from_x0_inverts(tiny_sdxl_pipe, name, prediction_type, k):
    ad = _adapter(tiny_sdxl_pipe, name, prediction_type=prediction_type, clip_sample=False)
    assert ad.prediction_type == prediction_type
    sched = ad.scheduler
    sched.set_timesteps(4)
    t = sched.timesteps[k]
    g = torch.Generator().manual_seed(k)
    x0 = torch.randn(2, 4, 8, 8, generator=g) * 2
    eps = torch.randn(2, 4, 8, 8, generator=g)
    x_t = sched.add_noise(x0, eps, t.reshape(1).expand(2))
    x_in = sched.scale_model_input(x_t, t)
    abar = _abar(sched, name, k, t)
    assert 0.0 < abar < 1.0
    a, s = math.sqrt(abar), math.sqrt(1 - abar)
    torch.testing.assert_close(x_in, a * x0 + s * eps, rtol=0, atol=1e-4)  # the VP model input
    pred = eps if prediction_type == "epsilon" else a * eps - s * x0
    x0_hat = ad.to_x0(pred, x_in, t)
    torch.testing.assert_close(x0_hat, x0, rtol=0, atol=1e-4)
    torch.testing.assert_close(ad.from_x0(x0_hat, x_in, t), pred, rtol=0, atol=1e-4)
    # an arbitrary prediction: to_x0 agrees with the scheduler's own x̂0, and from_x0 ∘ to_x0 = identity
    other = torch.randn(2, 4, 8, 8, generator=g)
    x0_other = ad.to_x0(other, x_in, t)
    torch.testing.assert_close(ad.from_x0(x0_other, x_in, t), other, rtol=0, atol=1e-4)
    own = copy.deepcopy(sched).step(other, t, x_t).pred_original_sample
    torch.testing.assert_close(x0_other, own, rtol=0, atol=1e-4)


# ------------------------------------------------------------------------------------- skip residual (§2.3.1)


def _run(ad: ModelAdapter, steps: int = 4) -> Run:
    settings = GenerationSettings(prompt=["a"], width=512, height=512, steps=steps)
    return Run(ad, settings, embeds=None, rows=[0], generators=[torch.Generator().manual_seed(0)], progress=False)


@pytest.mark.parametrize("name", ["euler", "ddim"])
@pytest.mark.parametrize("k", [0, 1, 3])
@pytest.mark.parametrize("alpha1", [3.0, 1.0])
def test_skip_residual_formula(tiny_sdxl_pipe, name, k, alpha1):
    ad = _adapter(tiny_sdxl_pipe, name)
    run = _run(ad)
    timesteps = run.begin(k)
    t = timesteps[0]
    sched = ad.scheduler
    assert float(t) == float(sched.timesteps[k])
    g = torch.Generator().manual_seed(10 + k)
    x, z, eps = (torch.randn(2, 4, 6, 5, generator=g) for _ in range(3))
    out = SkipResidual(run, z, eps, alpha1).before_step(t, x)
    c1 = (0.5 * (1 + math.cos(math.pi * (1000 - float(t)) / 1000))) ** alpha1
    if name == "euler":
        noised = z + float(sched.sigmas[k]) * eps
    else:
        abar = float(sched.alphas_cumprod[int(t)])
        noised = math.sqrt(abar) * z + math.sqrt(1 - abar) * eps
    torch.testing.assert_close(out, (1 - c1) * x + c1 * noised, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------- dilated sampling, blending


@pytest.mark.parametrize(("h", "w"), [(64, 64), (13, 10)])
def test_dilated_sampling_request_and_identity(tiny_sdxl_pipe, h, w):
    ad = _adapter(tiny_sdxl_pipe, "euler")
    den = _denoiser(ad, (8 * h, 8 * w), batch=2)
    d, b = 2, 2
    x_in = torch.randn(b, 4, h, w, generator=torch.Generator().manual_seed(h))
    x_in[1] = x_in[1] * 0.3 + 1.5
    t = torch.tensor(601.0)
    strategy = DilatedSampling(d, 0.8, 1.0)
    blurred = strategy.blurred(x_in, t)
    hp, wp = -(-h // d) * d, -(-w // d) * d
    assert tuple(blurred.shape) == (b, 4, hp, wp)  # the padded canvas
    # official DemoFusion construction: zero-pad top/left to multiples of d, blur the padded canvas (kernel 2d−1,
    # σ·c3, c3 = 0.99·cf^α3 + 0.01, zero border), renormalise to the padded canvas's scalar statistics
    padded = F.pad(x_in, (wp - w, 0, hp - h, 0))
    mu, sd = scalar_stats(padded)
    torch.testing.assert_close(scalar_stats(blurred)[0], mu, rtol=0, atol=1e-5)
    torch.testing.assert_close(scalar_stats(blurred)[1], sd, rtol=0, atol=1e-5)
    c3 = 0.99 * (0.5 * (1 + math.cos(math.pi * (1000 - 601) / 1000))) + 0.01
    k = 2 * d - 1
    g1 = torch.exp(-((torch.arange(k, dtype=torch.float64) - (k - 1) / 2) ** 2) / (2 * (0.8 * c3) ** 2))
    g1 = g1 / g1.sum()
    kernel = torch.outer(g1, g1).float().view(1, 1, k, k).repeat(4, 1, 1, 1)
    raw = F.conv2d(padded, kernel, padding=k // 2, groups=4)
    expected = (raw - scalar_stats(raw)[0]) / scalar_stats(raw)[1] * sd + mu
    torch.testing.assert_close(blurred, expected, rtol=0, atol=1e-5)
    assert (blurred[..., hp - h :, wp - w :] - x_in).abs().max() > 1e-3  # it really blurs

    requests, assemble = strategy.gather(x_in, t, den)
    assert len(requests) == 1
    req = requests[0]
    hd, wd = -(-h // d), -(-w // d)
    assert tuple(req.x.shape) == (d * d * b, 4, hd, wd)
    assert req.rows == [0, 1] * (d * d)
    assert req.crops == [(0, 0)] * (d * d * b)
    lattice = dilated_split(blurred, d)
    for i in range(d):
        for j in range(d):
            for s in range(b):
                torch.testing.assert_close(req.x[(i * d + j) * b + s], lattice[i, j, s], rtol=0, atol=0)
    # feeding each sample back as its own prediction reassembles the blurred canvas, padding cropped
    assert torch.equal(assemble([req.x.clone()]), blurred[..., hp - h :, wp - w :])
    # d = 1: no blur, one sample per canvas sample
    assert torch.equal(DilatedSampling(1, 0.8, 1.0).blurred(x_in, t), x_in)


def test_local_views_request_and_identity(tiny_sdxl_pipe):
    ad = _adapter(tiny_sdxl_pipe, "euler")
    den = _denoiser(ad, (384, 512), batch=2)
    x_in = torch.randn(2, 4, 48, 64, generator=torch.Generator().manual_seed(1))
    t = torch.tensor(501.0)
    for jitter in (False, True):
        strategy = LocalViews(32, 16, jitter, [torch.Generator().manual_seed(s) for s in (1, 2)], 8)
        requests, assemble = strategy.gather(x_in, t, den)
        req = requests[0]
        n = len(view_starts(48, 32, 16)) * len(view_starts(64, 32, 16))
        assert n == 6
        assert tuple(req.x.shape) == (2 * n, 4, 32, 32)
        assert req.rows == [0] * n + [1] * n
        views = strategy.last_views[0] + strategy.last_views[1]
        assert req.crops == [(max(0, v.top) * 8, max(0, v.left) * 8) for v in views]
        if not jitter:
            assert req.crops[:n] == [(0, 0), (0, 128), (0, 256), (128, 0), (128, 128), (128, 256)]
        else:
            assert strategy.last_views[0] != strategy.last_views[1]  # one generator per sample
        # a uniform average of views cut from x_in gives x_in back (predictions on the padding discarded)
        torch.testing.assert_close(assemble([req.x.clone()]), x_in, rtol=0, atol=1e-6)


def test_blend_weight_extremes(tiny_sdxl_pipe):
    ad = _adapter(tiny_sdxl_pipe, "euler")
    den = _denoiser(ad, (512, 512))
    x_in = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(4))
    t = torch.tensor(761.0)
    local = LocalViews(32, 16, False, [torch.Generator().manual_seed(0)], 8)
    dilated = DilatedSampling(2, 0.8, 1.0)

    def predict(strategy):
        requests, assemble = strategy.gather(x_in, t, den)
        return assemble(den.predict(requests, t)), len(requests)

    p_local, _ = predict(local)
    p_global, _ = predict(dilated)
    p0, n0 = predict(Blend(local, dilated, lambda tt: 0.0))
    assert n0 == 1  # weight 0 skips the global requests
    torch.testing.assert_close(p0, p_local, rtol=0, atol=1e-5)
    p1, n1 = predict(Blend(local, dilated, lambda tt: 1.0))
    assert n1 == 2
    torch.testing.assert_close(p1, p_global, rtol=0, atol=1e-5)
    p3, _ = predict(Blend(local, dilated, lambda tt: 0.3))
    torch.testing.assert_close(p3, 0.7 * p_local + 0.3 * p_global, rtol=0, atol=1e-5)
    assert (p_local - p_global).abs().max() > 1e-2  # the two paths really differ


# ----------------------------------------------------------------------------------- whole-pipeline behaviour


def test_determinism_same_seed_same_bytes(sdxl):
    kw = {"steps": STEPS, "progress": False}
    a = sdxl("a lighthouse", "demofusion", 512, 384, seed=7, **kw)
    torch.manual_seed(123)  # the global RNG must not matter
    b = sdxl("a lighthouse", "demofusion", 512, 384, seed=7, **kw)
    c = sdxl("a lighthouse", "demofusion", 512, 384, seed=8, **kw)
    assert a.images[0].tobytes() == b.images[0].tobytes()
    assert torch.equal(a.latents, b.latents)
    assert a.images[0].tobytes() != c.images[0].tobytes()
    assert a.metadata[0]["seed"] == 7


def test_non_square_non_integer_scale(sdxl):
    width, height = 640, 384  # native 256 → scale 2.5, three phases
    phases = progressive_phases(height, width, 256, 8)
    assert len(phases) == 3
    r = sdxl("a lighthouse", "demofusion", width, height, steps=STEPS, progress=False, seed=1)
    assert r.images[0].size == (width, height)
    assert len(r.previews) == len(phases)
    assert [p[0].size for p in r.previews] == [(ph.width, ph.height) for ph in phases]
    assert tuple(r.latents.shape) == (1, 4, height // 8, width // 8)
    assert bool(torch.isfinite(r.latents).all())


@pytest.mark.parametrize("method", ["demofusion", "multidiffusion"])
def test_batch_equals_separate_runs(sdxl, method):
    kw = {"steps": STEPS, "progress": False}
    both = sdxl(["a", "b"], method, 512, 384, seed=5, **kw)
    first = sdxl("a", method, 512, 384, seed=5, **kw)
    second = sdxl("b", method, 512, 384, seed=6, **kw)
    assert [m["seed"] for m in both.metadata] == [5, 6]
    assert len(both.images) == 2
    torch.testing.assert_close(both.latents[0], first.latents[0], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(both.latents[1], second.latents[0], rtol=1e-5, atol=1e-4)
    assert (both.latents[0] - both.latents[1]).abs().max() > 1e-2


def test_demofusion_final_latent_has_anchor_stats(sdxl, monkeypatch):
    captured = []
    original = Run.sample_canvas

    def spy(self, *args, **kwargs):
        z = original(self, *args, **kwargs)
        captured.append(z.clone())
        return z

    monkeypatch.setattr(Run, "sample_canvas", spy)
    r = sdxl(["a", "b"], "demofusion", 512, 512, steps=2, progress=False, seed=3)
    assert len(captured) == 1 and tuple(captured[0].shape) == (2, 4, 32, 32)
    mu_a, sd_a = scalar_stats(captured[0])
    mu, sd = scalar_stats(r.latents)
    torch.testing.assert_close(mu, mu_a, rtol=0, atol=1e-4)
    torch.testing.assert_close(sd, sd_a, rtol=0, atol=1e-4)


def test_sdxl_size_conditioning_is_final_target(sdxl, monkeypatch):
    seen: list[tuple[tuple[int, int], list[tuple[int, int]]]] = []
    original = sdxl.adapter._time_ids

    def spy(views):
        seen.extend((tuple(size), [crop]) for size, crop in views)
        return original(views)

    monkeypatch.setattr(sdxl.adapter, "_time_ids", spy)
    sdxl("a", "demofusion", 640, 384, steps=2, progress=False, seed=2)
    assert seen
    assert {size for size, _ in seen} == {(384, 640)}  # every phase, every view
    crops = [c for _, cs in seen for c in cs]
    assert all(top % 8 == 0 and left % 8 == 0 and 0 <= top < 384 and 0 <= left < 640 for top, left in crops)
    assert any(c != (0, 0) for c in crops)  # local views carry their corner


@pytest.mark.parametrize(("start_step", "expected"), [(0, 3 * STEPS), (1, STEPS + 2 * (STEPS - 1))])
def test_one_scheduler_step_per_timestep(sdxl, monkeypatch, start_step, expected):
    calls = []
    cls = SCHEDULERS["euler"][0]
    original = cls.step

    def spy(self, *args, **kwargs):
        calls.append(float(args[1]))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, "step", spy)
    sdxl("a", "demofusion", 640, 384, steps=STEPS, progress=False, seed=2, start_step=start_step)
    # three phases, one step per timestep; later phases start at step index start_step
    assert len(calls) == expected
    full = calls[:STEPS]
    assert calls[STEPS:] == (full[start_step:]) * 2


def test_tiny_sdxl_timesteps_leading_spacing(tiny_sdxl_pipe):
    run = _run(ModelAdapter(tiny_sdxl_pipe), steps=50)
    timesteps = run.begin(0)
    assert [int(t) for t in timesteps] == [981 - 20 * k for k in range(50)]
    assert [int(t) for t in run.begin(20)] == [981 - 20 * k for k in range(20, 50)]
    assert int(run.begin(20)[0]) == 581


def test_model_default_scheduler_after_other_scheduler(tiny_sdxl_pipe):
    kw = {"steps": 2, "progress": False, "seed": 1, "scheduler": "model-default"}
    fresh = HiresPipeline.from_pipe(tiny_sdxl_pipe, "tiny-sdxl")("a", "multidiffusion", 512, 384, **kw)
    used = HiresPipeline.from_pipe(tiny_sdxl_pipe, "tiny-sdxl")
    used("a", "multidiffusion", 512, 384, **{**kw, "scheduler": "ddim"})
    again = used("a", "multidiffusion", 512, 384, **kw)
    assert type(used.adapter.scheduler) is type(tiny_sdxl_pipe.scheduler)
    torch.testing.assert_close(again.latents, fresh.latents, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------ tiled decoding


def _decode_inputs(ad: ModelAdapter, monkeypatch) -> list[tuple[int, int]]:
    shapes: list[tuple[int, int]] = []
    original = ad.vae.decode

    def spy(z, *args, **kwargs):
        shapes.append(tuple(z.shape[-2:]))
        return original(z, *args, **kwargs)

    monkeypatch.setattr(ad.vae, "decode", spy)
    return shapes


def test_tiled_decode_geometry_and_threshold(tiny_sdxl_pipe, monkeypatch):
    ad = ModelAdapter(tiny_sdxl_pipe)
    shapes = _decode_inputs(ad, monkeypatch)
    z = torch.randn(1, 4, 48, 64, generator=torch.Generator().manual_seed(0))
    ad.decode(z, 384 * 512)  # not above the area: one call
    assert shapes == [(48, 64)]
    shapes.clear()
    ad.decode(z, 384 * 512 - 1)
    core, margin = 32 // 4, 3 * 32 // 8  # SPEC §2.4: cores w/4, context 3w/8 (w = native latent side 32)

    def spans(side):
        return [min(side, s + core + margin) - max(0, s - margin) for s in view_starts(side, core, core)]

    assert shapes == [(hh, ww) for hh in spans(48) for ww in spans(64)]


def test_tiled_decode_close_to_full(tiny_sdxl_pipe, monkeypatch):
    """The tiny VAE has GroupNorm and mid-block attention (global), so tiling is close but not exact.

    Observed on these latents (CPU, float32): max |Δ| ≈ 0.22, mean |Δ| ≈ 0.012 (images in [−1, 1]). A tiler that
    misplaces the tiles by one latent cell gives mean ≈ 0.33 / max 2.0, one without context margin mean ≈ 0.11 /
    max ≈ 1.86, so the bounds below (mean ≤ 0.025, max ≤ 0.5) separate a working tiler from broken ones.
    """
    ad = ModelAdapter(tiny_sdxl_pipe)
    z = torch.randn(1, 4, 48, 64, generator=torch.Generator().manual_seed(0)) * 3
    full = ad.decode(z, None)
    tiled = ad.decode(z, 0)
    assert full.shape == tiled.shape == (1, 3, 384, 512)
    diff = (full - tiled).abs()
    assert diff.mean().item() <= 0.025
    assert diff.max().item() <= 0.5

    def shifted(x, fn, core, margin, scale):
        return torch.roll(tiled_apply(x, fn, core, margin, scale), shifts=8, dims=-1)

    def no_margin(x, fn, core, margin, scale):
        return tiled_apply(x, fn, core, 0, scale)

    for broken in (shifted, no_margin):
        monkeypatch.setattr(adapter_module, "tiled_apply", broken)
        bad = (full - ad.decode(z, 0)).abs()
        assert bad.mean().item() > 0.025 or bad.max().item() > 0.5


# ------------------------------------------------------------------------------------- schedulers, SD family


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_every_scheduler_runs_demofusion(sd, name):
    r = sd("a house", "demofusion", 256, 256, steps=STEPS, progress=False, seed=4, scheduler=name)
    assert r.images[0].size == (256, 256)
    assert len(r.previews) == 2
    assert bool(torch.isfinite(r.latents).all())
    assert r.latents.abs().max() > 0
    assert r.metadata[0]["scheduler"] == name


@pytest.mark.parametrize("name", ["euler-a", "ddpm"])
def test_stochastic_schedulers_use_only_the_generator(sd, name):
    kw = {"steps": STEPS, "progress": False, "seed": 9, "scheduler": name}
    torch.manual_seed(0)
    a = sd("a house", "demofusion", 256, 256, **kw)
    torch.manual_seed(1)
    b = sd("a house", "demofusion", 256, 256, **kw)
    assert torch.equal(a.latents, b.latents)


@pytest.mark.parametrize(
    ("method", "previews"), [("direct", 1), ("resize", 2), ("multidiffusion", 1), ("demofusion", 2)]
)
def test_sd_runs_all_methods(sd, method, previews):
    assert sd.adapter.family == "sd"
    r = sd("a house", method, 256, 192, steps=STEPS, progress=False, seed=1)
    assert r.images[0].size == (256, 192)
    assert len(r.previews) == previews
    assert r.previews[-1][0].size == (256, 192)
    if method == "resize":
        assert r.latents is None
        assert r.previews[0][0].size == (128, 96)  # native long side, aspect kept
    else:
        assert tuple(r.latents.shape) == (1, 4, 24, 32)
        assert bool(torch.isfinite(r.latents).all())


def test_denoiser_placement_is_read_once_per_run_and_follows_a_cast(tiny_sd_pipe, monkeypatch):
    """``ModelMixin.dtype`` walks every parameter: the adapter reads it once per generation, not per UNet call."""
    from hiresdiff.pipeline import HiresPipeline

    hp = HiresPipeline.from_pipe(tiny_sd_pipe, "tiny-sd")
    reads = []
    cls = type(tiny_sd_pipe.unet)
    original = cls.dtype.fget
    monkeypatch.setattr(cls, "dtype", property(lambda m: reads.append(1) or original(m)))
    res = hp("a cat", "multidiffusion", 256, 256, steps=3, progress=False, previews=False, max_batch=2)
    assert len(reads) == 1 and res.latents.dtype == torch.float32  # 3 steps × 9 views in 2-sample calls
    hp("a cat", "direct", 128, 128, steps=2, progress=False, previews=False)
    assert len(reads) == 2  # each run reads it again (the pipeline may have been moved or cast in between)
    tiny_sd_pipe.unet.to(torch.float64)
    try:
        assert hp.adapter.dtype == torch.float32  # cached until the next run refreshes it
        hp.adapter.refresh_placement()
        assert hp.adapter.dtype == torch.float64
    finally:
        tiny_sd_pipe.unet.to(torch.float32)
        hp.adapter.refresh_placement()
