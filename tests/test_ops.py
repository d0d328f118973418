"""Pure tensor ops (SPEC §0, §2.2–§2.4) and stage plans (SPEC §2.1), checked against formulas and invariants."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from hiresdiff.errors import HiresError
from hiresdiff.ops import (
    View,
    cosine_factor,
    dilated_merge,
    dilated_split,
    gaussian_blur,
    gaussian_kernel1d,
    jitter_views,
    renormalise,
    scalar_stats,
    tiled_apply,
    view_starts,
    views_for,
)
from hiresdiff.stages import Phase, check_canvas, progressive_phases

# --------------------------------------------------------------------------------------------- cosine factor


def test_cosine_factor_fixed_points():
    assert cosine_factor(1000) == pytest.approx(1.0, abs=1e-15)
    assert cosine_factor(0) == pytest.approx(0.0, abs=1e-15)
    assert cosine_factor(500) == pytest.approx(0.5, abs=1e-15)
    # T is a parameter, not a constant: the midpoint moves with it
    assert cosine_factor(1000, num_train_timesteps=2000) == pytest.approx(0.5, abs=1e-15)
    assert cosine_factor(2000, num_train_timesteps=2000) == pytest.approx(1.0, abs=1e-15)


@pytest.mark.parametrize("t", [1, 21, 250, 333.5, 581, 750, 961, 999])
def test_cosine_factor_formula(t):
    expected = 0.5 * (1.0 + math.cos(math.pi * (1000 - t) / 1000))
    assert cosine_factor(t) == pytest.approx(expected, rel=1e-12, abs=1e-15)
    # accepts a 0-d tensor timestep through float()
    assert cosine_factor(float(torch.tensor(t))) == pytest.approx(expected, rel=1e-6)


def test_cosine_factor_monotone_in_unit_interval():
    values = [cosine_factor(t) for t in range(0, 1001)]
    assert all(b > a for a, b in itertools.pairwise(values))
    assert all(0.0 <= v <= 1.0 for v in values)
    # symmetric around T/2: cf(t) + cf(T − t) = 1
    for t in (0, 13, 250, 499):
        assert cosine_factor(t) + cosine_factor(1000 - t) == pytest.approx(1.0, abs=1e-12)


# ------------------------------------------------------------------------------------------ gaussian blur


@pytest.mark.parametrize("k", [3, 5, 7])
@pytest.mark.parametrize("sigma", [0.3, 0.8, 1.0, 2.5])
def test_gaussian_kernel_formula(k, sigma):
    g = gaussian_kernel1d(k, sigma, dtype=torch.float64)
    assert g.shape == (k,)
    assert g.dtype == torch.float64
    raw = [math.exp(-((i - (k - 1) / 2) ** 2) / (2 * sigma**2)) for i in range(k)]
    expected = torch.tensor([v / sum(raw) for v in raw], dtype=torch.float64)
    torch.testing.assert_close(g, expected, rtol=1e-12, atol=1e-15)
    assert float(g.sum()) == pytest.approx(1.0, abs=1e-12)
    torch.testing.assert_close(g, g.flip(0), rtol=0, atol=0)
    assert int(g.argmax()) == k // 2
    assert gaussian_kernel1d(k, sigma).dtype == torch.float32


def test_gaussian_kernel_size_one():
    torch.testing.assert_close(gaussian_kernel1d(1, 0.8), torch.ones(1))


@pytest.mark.parametrize("size", [0, -1, 2, 4])
def test_gaussian_kernel_bad_size(size):
    with pytest.raises(ValueError, match="odd"):
        gaussian_kernel1d(size, 1.0)
    with pytest.raises(ValueError):
        gaussian_blur(torch.zeros(1, 1, 8, 8), size, 1.0)


@pytest.mark.parametrize("sigma", [0.0, -0.5, float("nan")])
def test_gaussian_kernel_bad_sigma(sigma):
    with pytest.raises(ValueError, match="sigma"):
        gaussian_kernel1d(3, sigma)
    with pytest.raises(ValueError):
        gaussian_blur(torch.zeros(1, 1, 8, 8), 3, sigma)


@pytest.mark.parametrize("k", [3, 5, 7])
def test_blur_of_constant_is_constant_inside_and_falls_off_at_the_zero_border(k):
    x = torch.full((2, 4, 11, 9), 0.0)
    x[0] = 1.75
    x[1] = -3.0
    y = gaussian_blur(x, k, 0.8)
    assert y.shape == x.shape
    r = k // 2
    torch.testing.assert_close(y[..., r:-r, r:-r], x[..., r:-r, r:-r], rtol=0, atol=1e-6)
    # zero border (official DemoFusion gaussian_filter): a corner keeps only the in-canvas part of the kernel
    g = gaussian_kernel1d(k, 0.8, dtype=torch.float64)
    corner = float(g[r:].sum() ** 2)
    expected = torch.tensor(1.75 * corner, dtype=torch.float64)
    torch.testing.assert_close(y[0, 0, 0, 0].double(), expected, atol=1e-6, rtol=0)


def _direct_blur(x: torch.Tensor, k: int, sigma: float, mode: str) -> torch.Tensor:
    """Reference: one 2-D convolution with the outer-product kernel on a padded input, per channel."""
    g = gaussian_kernel1d(k, sigma, dtype=torch.float64)
    kernel2d = torch.outer(g, g)
    b, c, h, w = x.shape
    xp = F.pad(x.double().reshape(b * c, 1, h, w), (k // 2,) * 4, mode=mode)
    return F.conv2d(xp, kernel2d.view(1, 1, k, k)).reshape(b, c, h, w)


@pytest.mark.parametrize(
    ("k", "sigma", "h", "w"), [(3, 0.8, 13, 10), (5, 0.5, 13, 10), (7, 1.3, 13, 10), (5, 0.8, 2, 9)]
)
def test_blur_equals_direct_2d_conv_with_zero_border(k, sigma, h, w):
    x = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = gaussian_blur(x, k, sigma)
    torch.testing.assert_close(y, _direct_blur(x, k, sigma, "constant"), rtol=0, atol=1e-12)
    # the border is zero (official DemoFusion), not reflected or replicated
    assert (y - _direct_blur(x, k, sigma, "replicate")).abs().max() > 1e-3


def test_blur_kernel_one_is_identity():
    x = torch.randn(2, 4, 7, 5)
    assert torch.equal(gaussian_blur(x, 1, 0.8), x)


# --------------------------------------------------------------------------------------------- statistics


def test_scalar_stats_formula():
    x = torch.randn(3, 4, 5, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 2 + 1
    mu, sd = scalar_stats(x)
    assert mu.shape == sd.shape == (3, 1, 1, 1)
    for b in range(3):
        assert float(mu[b]) == pytest.approx(float(x[b].mean()), abs=1e-12)
        assert float(sd[b]) == pytest.approx(float(x[b].std(unbiased=True)), abs=1e-12)


def test_renormalise_gives_exact_target_stats_per_sample():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 9, 7, generator=g, dtype=torch.float64)
    x[0] = x[0] * 5 + 3
    x[1] = x[1] * 0.1 - 2
    mean = torch.tensor([0.3, -2.0], dtype=torch.float64).view(2, 1, 1, 1)
    std = torch.tensor([1.5, 0.2], dtype=torch.float64).view(2, 1, 1, 1)
    y = renormalise(x, mean, std)
    mu, sd = scalar_stats(y)
    torch.testing.assert_close(mu, mean, rtol=0, atol=1e-12)
    torch.testing.assert_close(sd, std, rtol=0, atol=1e-12)
    # an affine map per sample: the standardised values are unchanged
    z_x = (x - scalar_stats(x)[0]) / scalar_stats(x)[1]
    torch.testing.assert_close((y - mean) / std, z_x, rtol=0, atol=1e-10)


def test_renormalise_to_own_stats_is_identity():
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(renormalise(x, *scalar_stats(x)), x, rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------------------------- dilation


@pytest.mark.parametrize("d", [2, 3])
@pytest.mark.parametrize(("h", "w"), [(51, 80), (84, 58)])
def test_dilated_split_to_a_multiple_pads_top_left_and_round_trips(d, h, w):
    """FLUX packs 2 × 2 cells: every sub-lattice side must be even (``multiple=2``)."""
    x = torch.randn(1, 2, h, w, generator=torch.Generator().manual_seed(h + w + d))
    s = dilated_split(x, d, multiple=2)
    assert s.shape[-2] % 2 == 0 and s.shape[-1] % 2 == 0
    assert s.shape[-2] * d - h < 2 * d and s.shape[-1] * d - w < 2 * d  # the least padding that works
    ph, pw = s.shape[-2] * d - h, s.shape[-1] * d - w
    xp = F.pad(x, (pw, 0, ph, 0))
    assert torch.equal(s[1, 0], xp[:, :, 1::d, 0::d])
    assert torch.equal(dilated_merge(s, h, w, multiple=2), x)


@pytest.mark.parametrize("d", [1, 2, 3, 4])
@pytest.mark.parametrize(("h", "w"), [(13, 10), (7, 9), (8, 8), (1, 5)])
def test_dilated_split_merge(d, h, w):
    b, c = 2, 3
    x = torch.randn(b, c, h, w, generator=torch.Generator().manual_seed(h * 100 + w * 10 + d))
    s = dilated_split(x, d)
    hd, wd = -(-h // d), -(-w // d)
    assert s.shape == (d, d, b, c, hd, wd)
    ph, pw = hd * d - h, wd * d - w
    xp = F.pad(x, (pw, 0, ph, 0))  # zeros on top/left only
    assert xp.shape[-2:] == (hd * d, wd * d)
    for i in range(d):
        for j in range(d):
            assert torch.equal(s[i, j], xp[:, :, i::d, j::d])
    merged = dilated_merge(s, h, w)
    assert merged.shape == x.shape
    assert torch.equal(merged, x)
    # merge scatters an arbitrary lattice back: split(merge(r)) == r except on the (cropped) padding
    r = torch.randn_like(s)
    mask = dilated_split(torch.ones(b, c, h, w), d)
    assert torch.equal(dilated_split(dilated_merge(r, h, w), d), r * mask)
    assert int(mask.sum()) == b * c * h * w


def test_dilated_merge_rejects_non_square_lattice():
    with pytest.raises(ValueError):
        dilated_merge(torch.zeros(2, 3, 1, 4, 5, 5), 10, 10)


# ------------------------------------------------------------------------------------------ view geometry


@pytest.mark.parametrize("s", [2, 3, 4])
@pytest.mark.parametrize("w", [16, 32, 128])
def test_integer_scale_view_count(s, w):
    side = s * w
    starts = view_starts(side, w, w // 2)
    assert starts == [k * w // 2 for k in range(2 * s - 1)]
    views = views_for(side, side, w, w // 2)
    assert len(views) == (2 * s - 1) ** 2
    assert all(v.height == v.width == w for v in views)


def test_view_starts_non_divisible_example():
    assert view_starts(200, 128, 64) == [0, 64, 72]
    assert view_starts(128, 128, 64) == [0]
    assert view_starts(100, 128, 64) == [0]
    assert view_starts(129, 128, 64) == [0, 1]


def _check_cover(side: int, window: int, stride: int) -> None:
    starts = view_starts(side, window, stride)
    if side <= window:
        assert starts == [0]
        return
    assert len(starts) == math.ceil((side - window) / stride) + 1
    assert starts[0] == 0
    assert starts[-1] + window == side  # the last view ends exactly at the border
    assert all(0 < b - a <= stride for a, b in itertools.pairwise(starts))
    assert all(s + window <= side for s in starts)
    covered = torch.zeros(side, dtype=torch.int64)
    for s in starts:
        covered[s : s + window] += 1
    assert bool((covered > 0).all())


@pytest.mark.parametrize(("window", "stride"), [(16, 8), (16, 4), (16, 12), (32, 16), (128, 64), (10, 3)])
def test_view_starts_cover_every_cell(window, stride):
    for side in range(1, 5 * window + 7):
        _check_cover(side, window, stride)


def test_views_for_cover_2d():
    for h, w in [(40, 24), (33, 17), (16, 50), (10, 10), (64, 64)]:
        views = views_for(h, w, 16, 8)
        cover = torch.zeros(h, w, dtype=torch.int64)
        for v in views:
            assert v.top >= 0 and v.top + v.height <= h
            assert v.left >= 0 and v.left + v.width <= w
            assert (v.height, v.width) == (min(16, h), min(16, w))
            cover[v.top : v.top + v.height, v.left : v.left + v.width] += 1
        assert bool((cover > 0).all())
        assert len(views) == len(view_starts(h, 16, 8)) * len(view_starts(w, 16, 8))
    # row-major order
    views = views_for(24, 24, 16, 8)
    assert [(v.top, v.left) for v in views] == [(t, left) for t in (0, 8) for left in (0, 8)]


@pytest.mark.parametrize(("window", "stride"), [(0, 4), (16, 0), (-16, 8)])
def test_view_starts_rejects_non_positive(window, stride):
    with pytest.raises(ValueError):
        view_starts(64, window, stride)


# ------------------------------------------------------------------------------------------------ jitter


def _shifts(base: list[View], moved: list[View]) -> list[tuple[int, int]]:
    assert len(base) == len(moved)
    out = []
    for b, m in zip(base, moved, strict=True):
        assert (m.height, m.width) == (b.height, b.width)
        assert isinstance(m.top, int) and isinstance(m.left, int)
        out.append((m.top - b.top, m.left - b.left))
    return out


def _role(start: int, size: int, side: int) -> str:
    if start == 0 and start + size == side:
        return "lone"
    if start == 0:
        return "first"
    if start + size == side:
        return "last"
    return "middle"


def test_jitter_bounds_and_full_range():
    window, stride = 32, 16
    j = (window - stride) // 4
    assert j == 4
    height, width = 80, 32  # rows: 4 views (first, 2 middle, last); columns: one lone view
    base = views_for(height, width, window, stride)
    g = torch.Generator().manual_seed(0)
    bounds = {"first": (-j, 0), "last": (0, j), "middle": (-j, j), "lone": (0, 0)}
    seen: dict[str, set[int]] = {k: set() for k in bounds}
    for _ in range(500):
        moved = jitter_views(base, height, width, j, g)
        for v, (dh, dw) in zip(base, _shifts(base, moved), strict=True):
            for role, delta in ((_role(v.top, v.height, height), dh), (_role(v.left, v.width, width), dw)):
                lo, hi = bounds[role]
                assert lo <= delta <= hi, (role, delta)
                seen[role].add(delta)
    for role, (lo, hi) in bounds.items():
        assert seen[role] == set(range(lo, hi + 1)), role  # the whole range is reached


def test_jitter_both_axes_middle_views():
    window, stride, j = 16, 8, 2
    side = 48  # starts 0, 8, 16, 24, 32
    base = views_for(side, side, window, stride)
    g = torch.Generator().manual_seed(11)
    seen = set()
    for _ in range(300):
        for v, (dh, dw) in zip(base, _shifts(base, jitter_views(base, side, side, j, g)), strict=True):
            for start, delta in ((v.top, dh), (v.left, dw)):
                role = _role(start, window, side)
                lo, hi = {"first": (-j, 0), "last": (0, j), "middle": (-j, j)}[role]
                assert lo <= delta <= hi
                if role == "middle":
                    seen.add(delta)
    assert seen == set(range(-j, j + 1))


def test_jitter_lone_view_never_moves():
    base = views_for(20, 30, 32, 16)
    assert base == [View(0, 0, 20, 30)]
    g = torch.Generator().manual_seed(5)
    for _ in range(50):
        assert jitter_views(base, 20, 30, 4, g) == base


def test_jitter_reproducible_from_generator():
    base = views_for(96, 64, 32, 16)
    a = jitter_views(base, 96, 64, 4, torch.Generator().manual_seed(42))
    b = jitter_views(base, 96, 64, 4, torch.Generator().manual_seed(42))
    c = jitter_views(base, 96, 64, 4, torch.Generator().manual_seed(43))
    assert a == b
    assert a != c
    # the generator advances: consecutive draws differ
    g = torch.Generator().manual_seed(42)
    first, second = jitter_views(base, 96, 64, 4, g), jitter_views(base, 96, 64, 4, g)
    assert first == a and second != first
    # global RNG is not used
    torch.manual_seed(0)
    x1 = jitter_views(base, 96, 64, 4, torch.Generator().manual_seed(7))
    torch.manual_seed(1)
    x2 = jitter_views(base, 96, 64, 4, torch.Generator().manual_seed(7))
    assert x1 == x2


def test_jitter_zero_is_identity():
    base = views_for(96, 64, 32, 16)
    assert jitter_views(base, 96, 64, 0, torch.Generator().manual_seed(0)) == base


# ------------------------------------------------------------------------------------------------- tiling


def _local_op(upsample: int = 8):
    conv = torch.nn.Conv2d(3, 2, 3, padding=1)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=torch.Generator().manual_seed(9)))
        conv.bias.copy_(torch.randn(conv.bias.shape, generator=torch.Generator().manual_seed(10)))
    calls = []

    @torch.no_grad()
    def fn(x: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(x.shape[-2:]))
        return conv(F.interpolate(x, scale_factor=upsample, mode="nearest"))

    return fn, calls


@pytest.mark.parametrize(("h", "w"), [(13, 10), (9, 17), (8, 8), (5, 21)])
def test_tiled_apply_equals_full_for_local_operator(h, w):
    x = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(h * w))
    fn, calls = _local_op()
    full = fn(x)
    calls.clear()
    tiled = tiled_apply(x, fn, core=4, margin=2, scale=8.0)
    assert tiled.shape == full.shape == (2, 2, 8 * h, 8 * w)
    torch.testing.assert_close(tiled, full, rtol=0, atol=1e-5)
    assert len(calls) == len(view_starts(h, 4, 4)) * len(view_starts(w, 4, 4)) > 1
    assert all(ch <= 4 + 2 * 2 and cw <= 4 + 2 * 2 for ch, cw in calls)
    # without context the 3×3 conv sees the tile border: the result is not the full one
    assert (tiled_apply(x, fn, core=4, margin=0, scale=8.0) - full).abs().max() > 1e-3


def test_tiled_apply_downscale_for_local_operator():
    conv = torch.nn.Conv2d(3, 4, 3, padding=1)

    @torch.no_grad()
    def enc(x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(conv(x), 8)

    x = torch.randn(1, 3, 13 * 8, 10 * 8, generator=torch.Generator().manual_seed(4))
    full = enc(x)
    tiled = tiled_apply(x, enc, core=32, margin=16, scale=1 / 8)
    assert tiled.shape == full.shape == (1, 4, 13, 10)
    torch.testing.assert_close(tiled, full, rtol=0, atol=1e-5)


def test_tiled_apply_single_tile_when_core_covers():
    x = torch.randn(1, 3, 6, 7)
    fn, calls = _local_op()
    full = fn(x)
    calls.clear()
    out = tiled_apply(x, fn, core=8, margin=3, scale=8.0)
    assert calls == [(6, 7)]
    torch.testing.assert_close(out, full, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------- stages


def _sizes(phases: list[Phase]) -> list[tuple[int, int]]:
    return [(p.height, p.width) for p in phases]


def test_progressive_phases_square():
    assert _sizes(progressive_phases(2048, 2048, 1024, 8)) == [(1024, 1024), (2048, 2048)]
    assert _sizes(progressive_phases(1024, 1024, 1024, 8)) == [(1024, 1024)]
    assert _sizes(progressive_phases(4096, 4096, 1024, 8)) == [(k * 1024, k * 1024) for k in (1, 2, 3, 4)]


@pytest.mark.parametrize(("h", "w"), [(2048, 3072), (3072, 2048)])
def test_progressive_phases_keep_aspect(h, w):
    phases = progressive_phases(h, w, 1024, 8)
    assert [max(p.height, p.width) for p in phases] == [1024, 2048, 3072]
    assert _sizes(phases)[-1] == (h, w)
    for p in phases:
        assert p.height % 8 == 0 and p.width % 8 == 0
        long = max(p.height, p.width)
        short = min(p.height, p.width)
        assert abs(short - long * min(h, w) / max(h, w)) <= 4  # nearest grid point
        assert (p.height >= p.width) == (h >= w)
        assert p.native == 1024
    expected_short = [680, 1368, 2048]  # round(2/3·1024/8)·8, round(2/3·2048/8)·8, exact
    assert [min(p.height, p.width) for p in phases] == expected_short


def test_progressive_phases_non_integer_scale():
    phases = progressive_phases(2560, 2560, 1024, 8)
    assert _sizes(phases) == [(1024, 1024), (2048, 2048), (2560, 2560)]
    assert phases[-1].scale == pytest.approx(2.5)
    assert [p.dilation for p in phases] == [1, 2, 3]
    # tiny-sdxl style: 384 × 640 at native 256 → scale 2.5
    assert _sizes(progressive_phases(384, 640, 256, 8)) == [(152, 256), (304, 512), (384, 640)]


def test_phase_dilation_is_ceil_scale():
    for long in (1024, 1032, 1536, 2048, 2056, 3000, 3072, 4096, 4104):
        p = Phase(long, 512, 1024)
        assert p.dilation == math.ceil(long / 1024)
        assert p.scale == pytest.approx(long / 1024)
    assert Phase(1024, 2560, 1024).dilation == 3


def test_check_canvas_errors():
    check_canvas(2048, 2048, 1024, 8)
    check_canvas(1024, 512, 1024, 8)
    check_canvas(640, 384, 256, 8)
    with pytest.raises(HiresError, match="multiple of the latent grid"):
        check_canvas(2048, 2044, 1024, 8)
    with pytest.raises(HiresError, match="height 1028"):
        check_canvas(1028, 2048, 1024, 8)
    with pytest.raises(HiresError, match="below the model's native size"):
        check_canvas(1016, 1016, 1024, 8)
    with pytest.raises(HiresError, match="too extreme"):
        check_canvas(64, 4096, 1024, 8)
    with pytest.raises(ValueError):  # HiresError is a ValueError
        check_canvas(8, 8, 1024, 8)
    for bad in ((2048, 2044), (1016, 1016), (64, 4096)):
        try:
            check_canvas(*bad, 1024, 8)
        except HiresError as exc:
            assert "\n" not in str(exc)
