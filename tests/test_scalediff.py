"""ScaleDiff on UNet models (SPEC §6): NPA geometry/equivalence/locality, LFM, structure guidance, end to end."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from hiresdiff import HiresPipeline
from hiresdiff.methods.scalediff import StructureGuidance
from hiresdiff.models.adapter import ModelAdapter
from hiresdiff.ops.frequency import frequency_mix, high_pass, low_pass
from hiresdiff.ops.npa import npa_attention, npa_supported, window_starts
from hiresdiff.patches.attention import neighborhood_attention
from hiresdiff.sampler import Run
from hiresdiff.schedulers import make_scheduler
from hiresdiff.stages import doubling_phases

npa_ops = importlib.import_module("hiresdiff.ops.npa")
attention_mod = importlib.import_module("hiresdiff.patches.attention")
sampler_mod = importlib.import_module("hiresdiff.sampler")


def qkv(b: int, h: int, gh: int, gw: int, d: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, h, gh * gw, d, generator=g) for _ in range(3))


def test_window_geometry_and_clamping() -> None:
    starts, count, length = window_starts(32, 16)
    assert (count, length) == (4, 16) and starts.tolist() == [0, 4, 12, 16]
    starts, count, length = window_starts(32, 16, shift=3)
    assert (count, length) == (5, 16) and starts.tolist() == [0, 1, 9, 16, 16]
    starts, count, length = window_starts(8, 16)
    assert (count, length) == (1, 8) and starts.tolist() == [0]


def test_supported_grids() -> None:
    assert npa_supported((32, 48), 16) and npa_supported((16, 16), 16)
    assert not npa_supported((20, 32), 16)  # 20 is not a multiple of 8
    assert not npa_supported((8, 32), 16)  # smaller than the native grid


@pytest.mark.parametrize(
    ("grid", "native", "shift"), [((8, 12), 12, (0, 0)), ((8, 12), 16, (3, 5)), ((6, 6), 6, (1, 2))]
)
def test_window_covering_the_map_is_full_attention(grid: tuple[int, int], native: int, shift: tuple[int, int]) -> None:
    q, k, v = qkv(2, 3, *grid, 4)
    full = F.scaled_dot_product_attention(q, k, v)
    assert (npa_attention(q, k, v, grid, native, shift) - full).abs().max().item() <= 1e-5


def test_locality_outside_the_window_does_not_matter() -> None:
    gh, gw, native = 16, 24, 8  # patches 4×4, windows 8×8
    q, k, v = qkv(1, 2, gh, gw, 4)
    out = npa_attention(q, k, v, (gh, gw), native).view(1, 2, gh, gw, 4)
    # patch (0, 0) covers rows/cols 0-3; its window is rows/cols 0-7 (clamped at the border)
    k2, v2 = k.clone().view(1, 2, gh, gw, 4), v.clone().view(1, 2, gh, gw, 4)
    k2[:, :, 8:, :] += 3.0
    v2[:, :, :, 8:] -= 2.0
    out2 = npa_attention(q, k2.view_as(k), v2.view_as(v), (gh, gw), native).view(1, 2, gh, gw, 4)
    assert torch.equal(out[:, :, :4, :4], out2[:, :, :4, :4])
    k3 = k.clone().view(1, 2, gh, gw, 4)
    k3[:, :, 7, 7] += 3.0  # inside the window of patch (0, 0)
    out3 = npa_attention(q, k3.view_as(k), v, (gh, gw), native).view(1, 2, gh, gw, 4)
    assert not torch.allclose(out[:, :, :4, :4], out3[:, :, :4, :4])


def test_unet_with_npa_at_native_size_equals_full_attention(tiny_sdxl_pipe) -> None:
    ad = ModelAdapter(tiny_sdxl_pipe)
    n = ad.native_latent
    x = torch.randn(2, 4, n, n, generator=torch.Generator().manual_seed(0))
    text = torch.randn(2, 77, tiny_sdxl_pipe.unet.config.cross_attention_dim)
    added = {"text_embeds": torch.randn(2, 32), "time_ids": torch.tensor([[256.0, 256, 0, 0, 256, 256]] * 2)}
    with torch.no_grad():
        full = ad.unet(x, 500, encoder_hidden_states=text, added_cond_kwargs=added).sample
        calls = []
        real = attention_mod.npa_attention

        def spy(*args, **kwargs):
            calls.append(args[3])
            return real(*args, **kwargs)

        attention_mod.npa_attention = spy
        try:
            with neighborhood_attention(ad, (n, n)):
                npa = ad.unet(x, 500, encoder_hidden_states=text, added_cond_kwargs=added).sample
        finally:
            attention_mod.npa_attention = real
    assert calls, "NPA was not used"
    assert (npa - full).abs().max().item() <= 1e-5


def test_npa_installed_only_inside_and_falls_back(tiny_sdxl_pipe) -> None:
    ad = ModelAdapter(tiny_sdxl_pipe)
    before = dict(ad.unet.attn_processors)
    with neighborhood_attention(ad, (40, 64)):  # 40 latent: level-1 grid 20 is not a multiple of 8 → fallback
        inside = ad.unet.attn_processors
        procs = [p for name, p in inside.items() if name.endswith("attn1.processor")]
        assert all(type(p).__name__ == "NPAProcessor" for p in procs)
        x = torch.randn(1, 4, 40, 64)
        text = torch.randn(1, 77, tiny_sdxl_pipe.unet.config.cross_attention_dim)
        added = {"text_embeds": torch.randn(1, 32), "time_ids": torch.tensor([[320.0, 512, 0, 0, 320, 512]])}
        with torch.no_grad():
            ad.unet(x, 10, encoder_hidden_states=text, added_cond_kwargs=added)
    after = ad.unet.attn_processors
    assert all(after[name] is before[name] for name in before)


def test_npa_flops_at_4x_are_below_full_attention() -> None:
    """SDXL's 32×32 attention level at 4×: 128×128 queries; NPA needs 1/16 of the full attention FLOPs."""
    g, side, heads, d = 32, 128, 20, 64
    with torch.device("meta"):
        q = k = v = torch.empty(1, heads, side * side, d)
        with FlopCounterMode(display=False) as full:
            F.scaled_dot_product_attention(q, k, v)
        with FlopCounterMode(display=False) as npa:
            npa_attention(q, k, v, (side, side), g)
    assert full.get_total_flops() == 4 * (side * side) ** 2 * d * heads
    assert npa.get_total_flops() == full.get_total_flops() // 16


def test_low_high_split_and_mix() -> None:
    x = torch.randn(2, 4, 32, 48, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(low_pass(x, 1 / 8) + high_pass(x, 1 / 8), x, atol=1e-6)
    const = torch.full((1, 4, 32, 32), 0.7)
    assert torch.allclose(low_pass(const, 1 / 8), const, atol=1e-6)
    y = torch.randn_like(x)
    assert torch.allclose(frequency_mix(x, y, 0.25), x - low_pass(x, 0.25) + low_pass(y, 0.25), atol=1e-6)
    with pytest.raises(ValueError):
        low_pass(x, 0.0)


def test_low_pass_size_truncates_like_the_official() -> None:
    # 28 × 20 at f = 1/8: int(3.5) = 3 and int(2.5) = 2 cells (round() would give 4 and 2)
    x = torch.randn(1, 4, 28, 20, generator=torch.Generator().manual_seed(2))
    down = F.interpolate(x, size=(3, 2), mode="bilinear", align_corners=False, antialias=True)
    expected = F.interpolate(down, size=(28, 20), mode="bilinear", align_corners=False)
    torch.testing.assert_close(low_pass(x, 1 / 8), expected, rtol=0, atol=1e-6)


def test_stages_reference_from_plain_bicubic_pixel_upsample(tiny_sdxl_pipe, monkeypatch) -> None:
    """Z_RU: unclamped decode → plain bicubic upsample → clamp → encode; restart at ⌊N·(1 − ρ)⌋ in exact arithmetic."""
    hp = HiresPipeline.from_pipe(tiny_sdxl_pipe, "tiny-sdxl")
    sizes, starts = [], []
    real_upsample, real_begin = sampler_mod.upsample_pixels, Run.begin

    def upsample(img, size):
        sizes.append(size)
        return real_upsample(img, size)

    def begin(self, start_index=0):
        starts.append(start_index)
        return real_begin(self, start_index)

    monkeypatch.setattr(sampler_mod, "upsample_pixels", upsample)
    monkeypatch.setattr(Run, "begin", begin)
    kw = {"progress": False, "previews": False, "max_batch": 8}  # explicit: no auto estimate runs the stages too
    hp("a", "scalediff", 1024, 768, steps=50, restart_ratio=0.34, **kw)
    assert sizes == [(384, 512), (768, 1024)]
    assert starts == [0, 33, 33]  # ⌊50·0.66⌋ = 33; floats give 32


@pytest.mark.parametrize("scheduler", ["euler", "ddim"])
def test_structure_guidance_moves_low_x0_by_gamma(tiny_sdxl_pipe, scheduler: str) -> None:
    ad = ModelAdapter(tiny_sdxl_pipe)
    ad.scheduler = make_scheduler(scheduler, tiny_sdxl_pipe.scheduler.config)
    ad.set_timesteps(10)
    timesteps = ad.scheduler.timesteps
    tau, t = timesteps[4], timesteps[7]
    gen = torch.Generator().manual_seed(3)
    ref, x, pred = (torch.randn(1, 4, 32, 32, generator=gen) for _ in range(3))
    run = Run.__new__(Run)
    run.adapter = ad
    hook = StructureGuidance(run, ref, 1 / 8, tau)
    x_in = ad.scale_input(x, t)
    out = hook.on_prediction(t, x_in, pred)
    x0, x0_new = ad.to_x0(pred, x_in, t), ad.to_x0(out, x_in, t)
    gamma = ad.structure_gamma(t, tau)
    from hiresdiff.models.parametrization import alpha_bar

    expected_gamma = (1 - alpha_bar(ad.scheduler, t)) / (1 - alpha_bar(ad.scheduler, tau))
    assert gamma == pytest.approx(expected_gamma) and 0 < gamma < 1
    assert torch.allclose(x0_new - x0, gamma * (low_pass(ref, 1 / 8) - low_pass(x0, 1 / 8)), atol=1e-4)
    assert ad.structure_gamma(tau, tau) == pytest.approx(1.0)


def test_doubling_stages() -> None:
    assert [(p.height, p.width) for p in doubling_phases(4096, 4096, 1024, 8)] == [
        (1024, 1024),
        (2048, 2048),
        (4096, 4096),
    ]
    assert [(p.height, p.width) for p in doubling_phases(2048, 3072, 1024, 8)] == [
        (680, 1024),
        (1368, 2048),
        (2048, 3072),
    ]


@pytest.mark.parametrize("fixture", ["tiny_sdxl_pipe", "tiny_sd_pipe"])
def test_scalediff_end_to_end_non_square(fixture: str, request: pytest.FixtureRequest) -> None:
    pipe = request.getfixturevalue(fixture)
    hp = HiresPipeline.from_pipe(pipe, fixture)
    n = hp.native_size
    before = dict(pipe.unet.attn_processors)
    res = hp("a cat", "scalediff", 3 * n, 2 * n, steps=5, progress=False, seed=4, query_shift=True)
    assert res.images[0].size == (3 * n, 2 * n)
    assert [p[0].size[::-1] for p in res.previews] == [(p.height, p.width) for p in doubling_phases(2 * n, 3 * n, n, 8)]
    assert all(pipe.unet.attn_processors[k] is v for k, v in before.items())
    assert torch.isfinite(res.latents).all()


def test_batch_of_two_prompts_equals_single_runs(tiny_sdxl_pipe) -> None:
    hp = HiresPipeline.from_pipe(tiny_sdxl_pipe, "tiny-sdxl")
    kw = {"steps": 4, "progress": False, "previews": False}
    both = hp(["a red fox", "a blue whale"], "scalediff", 512, 512, seed=9, **kw).latents
    first = hp("a red fox", "scalediff", 512, 512, seed=9, **kw).latents
    second = hp("a blue whale", "scalediff", 512, 512, seed=10, **kw).latents
    assert torch.allclose(both[0], first[0], atol=1e-4) and torch.allclose(both[1], second[0], atol=1e-4)
    assert not torch.allclose(first, second)


def test_components_switch_off(tiny_sdxl_pipe) -> None:
    hp = HiresPipeline.from_pipe(tiny_sdxl_pipe, "tiny-sdxl")
    kw = {"steps": 4, "progress": False, "previews": False, "seed": 1}
    full = hp("a", "scalediff", 512, 512, **kw).latents
    for switch in ("lfm", "structure_guidance", "npa"):
        other = hp("a", "scalediff", 512, 512, **{switch: False}, **kw).latents
        assert not torch.allclose(full, other), switch
