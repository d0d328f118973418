"""AP-LDM (SPEC §5): PFSA, attentive-guidance schedule and hook, sub-stage plan, pixel-space path, end to end."""

from __future__ import annotations

import importlib
import math

import pytest
import torch
import torch.nn.functional as F

from hiresdiff import HiresPipeline
from hiresdiff.errors import HiresError
from hiresdiff.hooks import AttentiveGuidance, attentive_guidance
from hiresdiff.methods.apldm import APLDMParams, stage_one_conditioning, start_index
from hiresdiff.ops.pfsa import pfsa
from hiresdiff.ops.resample import upsample_pixels
from hiresdiff.ops.schedule import attentive_lambdas, steps_of_fraction
from hiresdiff.pipeline import build_request
from hiresdiff.sampler import Run
from hiresdiff.stages import area_steps, native_area_canvas

pfsa_mod = importlib.import_module("hiresdiff.ops.pfsa")
sampler_mod = importlib.import_module("hiresdiff.sampler")


def direct_pfsa(z: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    b, c, h, w = z.shape
    tokens = z.double().reshape(b, c, h * w).transpose(1, 2)
    scale = 1 / math.sqrt(c) if scale is None else scale
    attn = torch.softmax(tokens @ tokens.transpose(1, 2) * scale, dim=-1)
    return (attn @ tokens).transpose(1, 2).reshape(b, c, h, w).float()


@pytest.mark.parametrize("shape", [(1, 4, 8, 8), (2, 4, 13, 7), (2, 16, 5, 9)])
def test_pfsa_equals_direct_formula(shape: tuple[int, ...]) -> None:
    z = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 2
    assert torch.allclose(pfsa(z), direct_pfsa(z), atol=1e-5)
    assert torch.allclose(pfsa(z, chunk_size=7), pfsa(z, chunk_size=10_000), atol=1e-6)
    assert torch.allclose(
        pfsa(z, scale=0.1),
        direct_pfsa(z * math.sqrt(0.1 * math.sqrt(shape[1]))) * 0 + pfsa(z, scale=0.1, chunk_size=3),
        atol=1e-6,
    )


def test_pfsa_is_memory_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[int, int]] = []
    real = F.scaled_dot_product_attention

    def spy(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kw: float) -> torch.Tensor:
        seen.append((q.shape[1], k.shape[1]))
        return real(q, k, v, **kw)

    monkeypatch.setattr(pfsa_mod.F, "scaled_dot_product_attention", spy)
    out = pfsa(torch.randn(1, 4, 128, 128))
    assert out.shape == (1, 4, 128, 128)
    assert len(seen) == 128 * 128 // pfsa_mod.DEFAULT_CHUNK
    assert max(q for q, _ in seen) * 128 * 128 < (128 * 128) ** 2  # never the full (hw)² matrix


def test_lambda_schedules() -> None:
    lam, k = 0.004, 47
    cos = attentive_lambdas(lam, k, 3.0, "cosine")
    assert cos[0] == pytest.approx(lam) and cos[-1] == pytest.approx(0.0, abs=1e-15)
    assert cos[23] == pytest.approx(lam * 0.5**3)
    for i in (5, 30):
        assert cos[i] == pytest.approx(lam * ((1 + math.cos(math.pi * i / 46)) / 2) ** 3)
    lin = attentive_lambdas(lam, k, 3.0, "linear")
    assert lin[0] == pytest.approx(lam) and lin[-1] == 0.0 and lin[23] == pytest.approx(lam / 2)
    assert attentive_lambdas(lam, k, 3.0, "none") == [lam] * k
    assert attentive_lambdas(lam, 1) == [lam] and attentive_lambdas(lam, 0) == []


def test_attentive_guidance_hook_applies_after_delay() -> None:
    x = torch.randn(1, 4, 6, 6)
    hook = AttentiveGuidance([0.5, 0.25], delay=2)
    t = torch.tensor(0)
    assert torch.equal(hook.after_step(t, x), x) and torch.equal(hook.after_step(t, x), x)
    assert torch.allclose(hook.after_step(t, x), x + 0.5 * (pfsa(x) - x))
    assert torch.allclose(hook.after_step(t, x), x + 0.25 * (pfsa(x) - x))
    assert torch.equal(hook.after_step(t, x), x)


def test_attentive_guidance_from_settings() -> None:
    req = build_request("a", "apldm", 2048, 2048, steps=50)
    hook = attentive_guidance(req.settings)
    assert hook is not None and hook.delay == 3 and len(hook.lambdas) == 47
    assert hook.lambdas[0] == pytest.approx(0.004)
    off = build_request("a", "demofusion", 2048, 2048)
    assert attentive_guidance(off.settings) is None
    on = build_request("a", "demofusion", 2048, 2048, ag_lambda="0.01", ag_decay="linear")
    assert attentive_guidance(on.settings).lambdas[0] == pytest.approx(0.01)  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("height", "width", "fractions", "base", "sizes"),
    [
        (2048, 2048, (0.2,), (1024, 1024), [(2048, 2048)]),
        (3072, 3072, (0.2,), (1024, 1024), [(3072, 3072)]),
        (4096, 4096, (0.1, 0.2), (1024, 1024), [(2984, 2984), (4096, 4096)]),
        (2048, 3072, (0.1, 0.2), (840, 1256), [(1568, 2344), (2048, 3072)]),
    ],
)
def test_substage_plan(
    height: int, width: int, fractions: tuple[float, ...], base: tuple[int, int], sizes: list
) -> None:
    params = APLDMParams(progressive=None if (height, width) != (2048, 3072) else fractions)
    assert params.fractions(height, width) == fractions
    assert native_area_canvas(height, width, 1024, 8) == base
    assert area_steps(height, width, base, len(fractions), 8) == sizes


def test_start_step_per_substage() -> None:
    assert start_index(50, 0.2) == 40 and start_index(50, 0.1) == 45 and start_index(50, 1.0) == 0
    assert start_index(30, 0.3) == 21


@pytest.mark.parametrize(
    ("p", "index"), [(0.34, 33), (0.56, 22), (0.68, 16), (0.78, 11), (0.8, 10), (0.9, 5), (0.92, 4)]
)
def test_start_index_is_exact_where_floats_are_one_step_early(p: float, index: int) -> None:
    assert math.floor(50 * (1.0 - p)) == index - 1  # the float product lands just below the integer
    assert start_index(50, p) == index  # ⌊N·(1 − p)⌋ of the decimal the user typed


def test_steps_of_fraction_rounds_half_up_exactly() -> None:
    assert [steps_of_fraction(n, 0.6) for n in (50, 20, 10, 4, 2, 1)] == [30, 12, 6, 2, 1, 1]
    assert steps_of_fraction(5, 0.5) == 3 and steps_of_fraction(7, 0.5) == 4  # 2.5 → 3, 3.5 → 4 (not banker's)


def _keys_cubic(d: float, a: float = -0.75) -> float:
    d = abs(d)
    if d <= 1:
        return (a + 2) * d**3 - (a + 3) * d**2 + 1
    return a * d**3 - 5 * a * d**2 + 8 * a * d - 4 * a if d < 2 else 0.0


def test_pixel_upsample_is_plain_bicubic_then_clamp() -> None:
    x = torch.randn(1, 1, 1, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 0.3
    out = upsample_pixels(x, (1, 16))
    for i in range(4, 12):  # interior outputs: Keys' cubic with a = −0.75 at src = (i + ½)/2 − ½
        src = (i + 0.5) / 2 - 0.5
        base = math.floor(src)
        value = sum(_keys_cubic(src - k) * float(x[0, 0, 0, k]) for k in range(base - 1, base + 3))
        assert float(out[0, 0, 0, i]) == pytest.approx(value, abs=1e-12)
    aa = F.interpolate(x, size=(1, 16), mode="bicubic", align_corners=False, antialias=True)
    assert (aa - out).abs().max() > 1e-3  # antialias=True enlarges with the a = −0.5 kernel
    # the clamp comes after the upsample: overshoot near a clipped edge differs from clamping first
    step = torch.tensor([[[[-1.4, -1.4, -1.4, 1.6, 1.6, 1.6]]]], dtype=torch.float64)
    after = upsample_pixels(step, (1, 12))
    before = F.interpolate(step.clamp(-1, 1), size=(1, 12), mode="bicubic", align_corners=False).clamp(-1, 1)
    assert after.abs().max() <= 1 and not torch.allclose(after, before)


def test_pixel_space_path_and_start_timesteps(tiny_sdxl_pipe, monkeypatch: pytest.MonkeyPatch) -> None:
    """decode (unclamped) → bicubic upsample → clamp → encode, then denoising from ⌊N(1 − p)⌋ (t = 181 at p = 0.2,
    81 at p = 0.1)."""
    calls: list[str] = []
    hp = HiresPipeline.from_pipe(tiny_sdxl_pipe, "tiny-sdxl")
    ad = hp.adapter
    real_decode, real_encode, real_upsample = ad.decode, ad.encode, sampler_mod.upsample_pixels
    real_denoise = Run.denoise
    firsts: list[int] = []
    raw: list[torch.Tensor] = []

    def decode(z: torch.Tensor, area: int | None, *, clamp: bool = True) -> torch.Tensor:
        calls.append(f"decode {tuple(z.shape[-2:])} clamp={clamp}")
        return real_decode(z, area, clamp=clamp)

    def encode(img: torch.Tensor, area: int | None) -> torch.Tensor:
        calls.append(f"encode {tuple(img.shape[-2:])}")
        assert img.abs().max() <= 1.0
        return real_encode(img, area)

    def upsample(img: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        calls.append(f"upsample {size}")
        raw.append(img)
        return real_upsample(img, size)

    def denoise(self: Run, x: torch.Tensor, timesteps: torch.Tensor, *a: object, **kw: object) -> torch.Tensor:
        firsts.append(int(timesteps[0]))
        calls.append(f"denoise {tuple(x.shape[-2:])}")
        return real_denoise(self, x, timesteps, *a, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(ad, "decode", decode)
    monkeypatch.setattr(ad, "encode", encode)
    monkeypatch.setattr(sampler_mod, "upsample_pixels", upsample)
    monkeypatch.setattr(Run, "denoise", denoise)
    res = hp(
        "a cat", "apldm", 640, 384, steps=50, scheduler="ddim", progress=False, progressive="0.1,0.2", previews=False
    )
    assert firsts == [981, 81, 181]
    base = native_area_canvas(384, 640, 256, 8)
    mid = area_steps(384, 640, base, 2, 8)[0]
    assert calls[0] == f"denoise {(base[0] // 8, base[1] // 8)}"
    assert calls[1:5] == [
        f"decode {(base[0] // 8, base[1] // 8)} clamp=False",
        f"upsample {mid}",
        f"encode {mid}",
        f"denoise {(mid[0] // 8, mid[1] // 8)}",
    ]
    assert calls[5:8] == [
        f"decode {(mid[0] // 8, mid[1] // 8)} clamp=False",
        "upsample (384, 640)",
        "encode (384, 640)",
    ]
    assert calls[8:] == ["denoise (48, 80)", "decode (48, 80) clamp=True"]  # the last sub-stage, the final image
    assert res.images[0].size == (640, 384)


def test_target_equal_to_the_base_canvas_runs_no_substage(tiny_sdxl_pipe) -> None:
    """At the base canvas AP-LDM is stage 1 alone (attentive guidance on the native canvas), as the official."""
    hp = HiresPipeline.from_pipe(tiny_sdxl_pipe, "tiny-sdxl")
    kw = {"steps": 6, "progress": False, "seed": 3}
    res = hp("a cat", "apldm", 256, 256, **kw)
    assert len(res.previews) == 1  # the final image only: no decoded stage-1 preview, no sub-stage
    guided_direct = hp("a cat", "direct", 256, 256, ag_lambda=0.004, **kw)
    assert torch.equal(res.latents, guided_direct.latents)


@pytest.mark.parametrize("fixture", ["tiny_sdxl_pipe", "tiny_sd_pipe"])
def test_apldm_end_to_end(fixture: str, request: pytest.FixtureRequest) -> None:
    pipe = request.getfixturevalue(fixture)
    hp = HiresPipeline.from_pipe(pipe, fixture)
    n = hp.native_size
    res = hp(["a", "b"], "apldm", 3 * n, 2 * n, steps=6, progress=False, seed=1)
    assert [im.size for im in res.images] == [(3 * n, 2 * n)] * 2
    assert len(res.previews) == 2  # stage 1 + one sub-stage
    assert res.previews[0][0].size == native_area_canvas(2 * n, 3 * n, n, 8)[::-1]
    assert res.metadata[0]["method"] == "apldm"
    again = hp(["a", "b"], "apldm", 3 * n, 2 * n, steps=6, progress=False, seed=1, ag_lambda=0.0)
    assert not torch.equal(res.latents, again.latents)  # attentive guidance changed stage 1


@pytest.mark.parametrize(
    ("height", "width", "native", "expected"),
    [
        (512, 768, 256, (209, 313)),  # the official's int(n·√(H/W)), int(n/√(H/W)); the canvas is 208×312
        (768, 512, 256, (313, 209)),
        (2048, 3072, 1024, (836, 1254)),
        (4096, 4096, 1024, (1024, 1024)),
    ],
)
def test_stage_one_conditioning_is_the_official_unrounded_size(
    height: int, width: int, native: int, expected: tuple[int, int]
) -> None:
    assert stage_one_conditioning(height, width, native) == expected


def test_stage_one_unet_sees_the_official_size_conditioning(tiny_sdxl_pipe, monkeypatch: pytest.MonkeyPatch) -> None:
    """512×768 on tiny-sdxl (n = 256): stage 1 samples a 208×312 canvas conditioned on 209×313 (original and target
    size, both guidance halves), the sub-stage its own 512×768 (kmittle/AP-LDM ``pipeline_apldm_sdxl.py``)."""
    hp = HiresPipeline.from_pipe(tiny_sdxl_pipe, "tiny-sdxl")
    ad = hp.adapter
    real = ad._time_ids
    seen: list[tuple[tuple[int, int], tuple[int, ...]]] = []

    def time_ids(views: list[tuple[tuple[int, int], tuple[int, int]]]) -> torch.Tensor:
        ids = real(views)
        seen.extend((size, tuple(int(v) for v in row)) for (size, _), row in zip(views, ids, strict=True))
        return ids

    monkeypatch.setattr(ad, "_time_ids", time_ids)
    hp("a cat", "apldm", 768, 512, steps=2, progress=False, previews=False)
    assert native_area_canvas(512, 768, 256, 8) == (208, 312)
    stage_one = [ids for size, ids in seen if size != (512, 768)]
    assert stage_one and set(stage_one) == {(209, 313, 0, 0, 209, 313)}
    assert (512, 768) in {size for size, _ in seen}


def test_attentive_guidance_in_other_methods_phase_one(tiny_sdxl_pipe) -> None:
    hp = HiresPipeline.from_pipe(tiny_sdxl_pipe, "tiny-sdxl")
    kw = {"steps": 5, "progress": False, "seed": 2, "previews": False}
    plain = hp("a", "direct", 256, 256, **kw).latents
    guided = hp("a", "direct", 256, 256, ag_lambda=0.05, ag_delay=1, **kw).latents
    assert not torch.allclose(plain, guided)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"progressive": ()}, "at least one fraction"),
        ({"progressive": "0.0"}, "must be in (0, 1]"),
        ({"progressive": "0.2,1.5"}, "must be in (0, 1]"),
        ({"progressive": (-0.1,)}, "must be in (0, 1]"),
        ({"ag_lambda": -0.1}, "ag_lambda must be ≥ 0"),
        ({"ag_decay": "exp"}, "unknown ag_decay 'exp'"),
        ({"ag_delay": -1}, "ag_delay must be ≥ 0"),
    ],
)
def test_bad_apldm_input(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(HiresError) as info:
        build_request("a", "apldm", 2048, 2048, **overrides)
    assert message in str(info.value) and "\n" not in str(info.value)
