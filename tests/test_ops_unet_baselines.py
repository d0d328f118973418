"""Model-free building blocks of ScaleCrafter, FouriScale, HiDiffusion (MSW-MSA) and FreeU
(SPEC-baselines-unet §1.4, §2.4, §3.4 and §0 "FreeU"): each against a direct formula or an invariant."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hiresdiff.errors import HiresError
from hiresdiff.ops.dilation import dilated_split
from hiresdiff.ops.fouriscale import (
    choose_base_size,
    dilation_at,
    fourier_lowpass,
    lowpass_mask_1d,
    padded_size,
    strong_ramp,
    weak_ramp,
)
from hiresdiff.ops.freeu import freeu_backbone, freeu_skip, freeu_stages, up_resnet_channels
from hiresdiff.ops.redilate import progressive_dilation, redilated_conv
from hiresdiff.ops.windows import (
    token_grid,
    window_merge,
    window_partition,
    window_shift,
    window_size,
    windowed,
    windowed_attention,
)
from hiresdiff.patches.tables import SDXL_BASE_BUCKETS


def _conv(stride: int = 1, seed: int = 0) -> nn.Conv2d:
    torch.manual_seed(seed)
    return nn.Conv2d(4, 6, 3, stride=stride, padding=1)


def _randn(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------- ScaleCrafter §1.4


@pytest.mark.parametrize("stride", [1, 2])
def test_redilation_by_one_is_the_original_layer(stride):
    conv, x = _conv(stride), _randn(2, 4, 9, 12)
    assert torch.equal(redilated_conv(conv, x, 1), conv(x))


@pytest.mark.parametrize("d", [2, 3])
def test_integer_redilation_is_dilated_sampling_of_the_layer(d):
    """(b): redilated(x)[..., a::d, b::d] == conv(x[..., a::d, b::d]) — DemoFusion's dilated sampling, one layer."""
    conv, x = _conv(), _randn(2, 4, 6 * d, 4 * d)
    out, x_lattices = dilated_split(redilated_conv(conv, x, d), d), dilated_split(x, d)
    for a in range(d):
        for b in range(d):
            torch.testing.assert_close(out[a, b], conv(x_lattices[a, b]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("factor", [1.5, 2.0, 2.5, 3.3])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("size", [(15, 15), (16, 16), (17, 10), (9, 14)])
def test_redilation_keeps_the_plain_output_size(factor, stride, size):
    """(c): fractional and integer p, odd and even sides, stride 1 and 2 (⌈h/2⌉; the official code gives ⌊h/2⌋)."""
    conv, x = _conv(stride), _randn(1, 4, *size)
    assert redilated_conv(conv, x, factor).shape == conv(x).shape


def test_fractional_redilation_resizes_around_a_dilated_conv():
    """p = 2.5: d = 3 on the input enlarged by f = 1.2 (40 → 48), bilinear back to 40."""
    conv, x = _conv(), _randn(1, 4, 40, 40)
    big = F.interpolate(x, size=(48, 48), mode="bilinear", align_corners=False)
    expected = F.interpolate(F.conv2d(big, conv.weight, conv.bias, 1, 3, 3), size=(40, 40), mode="bilinear")
    torch.testing.assert_close(redilated_conv(conv, x, 2.5), expected, atol=1e-6, rtol=0)


def test_progressive_dilation_schedule():
    """(d): τ = 35: p = 4 → 4/3/2 switching at 9 and 18, p = 3 → 2 at 12; τ = 37: 10 and 19, 13."""
    assert [progressive_dilation(4, i, 35) for i in range(35)] == [4] * 9 + [3] * 9 + [2] * 17
    assert [progressive_dilation(3, i, 35) for i in range(35)] == [3] * 12 + [2] * 23
    assert [progressive_dilation(4, i, 37) for i in range(37)] == [4] * 10 + [3] * 9 + [2] * 18
    assert [progressive_dilation(3, i, 37) for i in range(37)] == [3] * 13 + [2] * 24
    with pytest.raises(ValueError):
        progressive_dilation(4, 35, 35)


# ------------------------------------------------------------------------------------------ FouriScale §2.4


def test_mask_test_vectors():
    """(a): n = 16, s = 2: strong floor 0.6 / 0, weak floor 0.6, in the official [reverse(m), m] layout."""
    strong = lowpass_mask_1d(16, 2, 0.6, strong_ramp(16))
    expected = torch.tensor([1, 1, 1, 1, 1, 1, 0.8, 0.6])
    torch.testing.assert_close(strong, torch.cat([expected.flip(0), expected]), atol=1e-6, rtol=0)
    torch.testing.assert_close(
        lowpass_mask_1d(16, 2, 0.0, strong_ramp(16))[8:], torch.tensor([1, 1, 1, 1, 1, 1, 0.5, 0]), atol=1e-6, rtol=0
    )
    torch.testing.assert_close(
        lowpass_mask_1d(16, 2, 0.6, weak_ramp(16, 2)),
        torch.tensor([0.8, 0.9] + [1] * 12 + [0.9, 0.8]),
        atol=1e-6,
        rtol=0,
    )
    assert torch.equal(lowpass_mask_1d(16, 1.2, 0.6, 0), torch.ones(16))  # R = 0: no filter


def test_weak_ramp_is_computed_in_floats_like_the_official_code():
    """SDXL 2048² step 30 (d = 4/3): R 8 → 7 at n = 64, 16 → 15 at n = 128; 4096² step 24 (d = 3.2): 44 → 43."""
    d = dilation_at(30, 2, 20, 35)
    assert d == pytest.approx(4 / 3)
    assert (weak_ramp(64, d), weak_ramp(128, d)) == (7, 15)
    assert weak_ramp(128, dilation_at(24, 4, 20, 35)) == 43


def test_odd_masks_have_length_n():
    mask = lowpass_mask_1d(15, 2, 0.0, strong_ramp(15))
    assert mask.shape == (15,) and mask[7] == 1  # zero frequency at index ⌊n/2⌋ of the fftshift layout
    torch.testing.assert_close(mask[:14], lowpass_mask_1d(14, 2, 0.0, strong_ramp(14)), atol=1e-6, rtol=0)


@pytest.mark.parametrize("scale, floor", [(1.0, 0.0), (1.0, 0.6), (3.0, 1.0)])
@pytest.mark.parametrize("size, padded", [((16, 16), (16, 16)), ((13, 10), (16, 20)), ((9, 14), (15, 14))])
def test_identity_masks_leave_the_input_unchanged(scale, floor, size, padded):
    """(a): s = 1 or v = 1 → identity, through the pad-then-crop (odd padded sides included)."""
    x = _randn(2, 3, *size)
    mask_h = lowpass_mask_1d(padded[0], scale, floor, strong_ramp(padded[0]))
    mask_w = lowpass_mask_1d(padded[1], scale, floor, strong_ramp(padded[1]))
    torch.testing.assert_close(fourier_lowpass(x, mask_h, mask_w), x, atol=1e-6, rtol=0)


def test_zero_floor_removes_everything_beyond_the_ramp():
    """(b): v = 0 → the output spectrum is zero beyond cutoff + R bins (one more for the dropped imaginary part)."""
    n, s = 32, 2.0
    x = _randn(1, 2, n, n)
    mask = lowpass_mask_1d(n, s, 0.0, strong_ramp(n))
    spectrum = torch.fft.fft2(fourier_lowpass(x, mask, mask)).abs()
    freqs = torch.fft.fftfreq(n, 1 / n).abs()
    limit = n // 2 / s + 1 + strong_ramp(n) + 1
    beyond = (freqs[:, None] > limit) | (freqs[None, :] > limit)
    assert beyond.any() and spectrum[..., beyond].max() < 1e-4
    assert spectrum[..., ~beyond].max() > 1  # the pass band survives


def _dft_lowpass(x: torch.Tensor, mask_h: torch.Tensor, mask_w: torch.Tensor) -> torch.Tensor:
    """Direct formula in float64: explicit DFT matrices with frequencies in fftshift order, no FFT."""
    h, w = x.shape[-2:]
    xp = F.pad(x.double(), (0, len(mask_w) - w, 0, len(mask_h) - h))

    def dft(n: int) -> torch.Tensor:
        freqs = torch.arange(n, dtype=torch.float64) - n // 2
        return torch.exp(-2j * math.pi * torch.outer(freqs, torch.arange(n, dtype=torch.float64)) / n)

    fh, fw = dft(len(mask_h)), dft(len(mask_w))
    spectrum = fh @ xp.to(torch.complex128) @ fw.T * torch.outer(mask_h.double(), mask_w.double())
    y = (fh.conj().T @ spectrum @ fw.conj()).real / (len(mask_h) * len(mask_w))
    return y[..., :h, :w].to(x.dtype)


@pytest.mark.parametrize("size, base", [((20, 20), (8.0, 8.0)), ((13, 22), (8.0, 11.0)), ((11, 9), (5.5, 4.5))])
def test_pad_then_crop_filter_matches_the_direct_formula(size, base):
    """(c): non-multiple and non-square sizes keep their shape and equal an explicit DFT computation."""
    nh, nw = padded_size(*size, *base)
    assert nh >= size[0] and nw >= size[1]
    x = _randn(2, 3, *size)
    mask_h = lowpass_mask_1d(nh, 1.7, 0.6, strong_ramp(nh))
    mask_w = lowpass_mask_1d(nw, 1.7, 0.6, weak_ramp(nw, 1.7))
    out = fourier_lowpass(x, mask_h, mask_w)
    assert out.shape == x.shape
    torch.testing.assert_close(out, _dft_lowpass(x, mask_h, mask_w), atol=1e-5, rtol=0)


def test_lowpass_chunking_and_dtype():
    x = _randn(2, 5, 12, 12)
    mask = lowpass_mask_1d(16, 2, 0.0, strong_ramp(16))
    whole = fourier_lowpass(x, mask, mask)
    torch.testing.assert_close(fourier_lowpass(x, mask, mask, max_elements=1), whole, atol=1e-6, rtol=0)
    torch.testing.assert_close(fourier_lowpass(x, mask, mask, max_elements=2 * 16 * 16 * 2), whole, atol=1e-6, rtol=0)
    half = fourier_lowpass(x.bfloat16(), mask, mask)
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), whole, atol=0.05, rtol=0.02)


def test_padded_size_follows_the_base_multiple():
    assert padded_size(160, 160, 64, 64) == (192, 192)  # SD 1280²: d = 3 fits exactly
    assert padded_size(128, 256, 64, 64) == (256, 256)  # SD 1024×2048: padded to 256²


@pytest.mark.parametrize(
    "size, base, d0",
    [
        ((2048, 2048), (1024, 1024), 2),
        ((3072, 3072), (1024, 1024), 3),
        ((4096, 4096), (1024, 1024), 4),
        ((2560, 2560), (896, 1088), 3),
        ((2048, 4096), (704, 1408), 3),
        ((1536, 1536), (832, 1152), 2),
    ],
)
def test_sdxl_base_size(size, base, d0):
    """(d): the base-size results of SPEC §2.2."""
    assert choose_base_size(*size, SDXL_BASE_BUCKETS) == (base, d0)


def test_base_size_without_a_fitting_bucket_is_refused():
    with pytest.raises(HiresError, match="base_size"):
        choose_base_size(1024, 1024, [(512, 2048)])


def test_dilation_schedule_table():
    """(h): d₀ = 4, (start, stop) = (20, 35): conv dilation 4 for i ≤ 24, 3 for 25–29, 2 for 30–34, plain after."""
    conv = [math.ceil(d) if (d := dilation_at(i, 4, 20, 35)) is not None else None for i in range(40)]
    assert conv == [4] * 25 + [3] * 5 + [2] * 5 + [None] * 5
    assert dilation_at(20, 4, 20, 35) == 4 and dilation_at(34, 4, 20, 35) == pytest.approx(1.2)
    assert [dilation_at(i, 3, 20, 35, progressive=False) for i in (0, 25, 34, 35)] == [3, 3, 3, None]


# ------------------------------------------------------------------------------------------------ MSW-MSA §3.4


def test_token_grid_recovery():
    assert token_grid(128 * 128, (256, 256)) == (128, 128)  # SDXL 2048², level 1
    assert token_grid(25 * 19, (100, 75)) == (25, 19)  # odd latent, level 2 (⌈⌈100/2⌉/2⌉, ⌈⌈75/2⌉/2⌉)
    assert token_grid(32 * 64, (128, 256)) == (32, 64)
    assert window_size((128, 128)) == (64, 64)
    assert [window_shift((64, 64), k) for k in range(4)] == [(0, 0), (16, 16), (32, 32), (48, 48)]
    with pytest.raises(HiresError):
        token_grid(100, (64, 64))


@pytest.mark.parametrize("grid", [(8, 8), (6, 10), (10, 6), (12, 20)])
def test_partition_then_merge_is_identity(grid):
    """(b) for every shift."""
    x = _randn(3, grid[0] * grid[1], 5)
    window = window_size(grid)
    for k in range(4):
        shift = window_shift(window, k)
        parts = window_partition(x, grid, shift)
        assert parts.shape == (12, window[0] * window[1], 5)
        assert torch.equal(window_merge(parts, grid, shift), x)


def _same_window_mask(grid: tuple[int, int], shift: tuple[int, int]) -> torch.Tensor:
    """(N, N) mask: tokens i and j are in the same cyclic window of the 2 × 2 partition shifted by ``shift``."""
    window = window_size(grid)
    rows = torch.arange(grid[0]).repeat_interleave(grid[1])
    cols = torch.arange(grid[1]).repeat(grid[0])
    wid = ((rows - shift[0]) % grid[0]) // window[0] * 2 + ((cols - shift[1]) % grid[1]) // window[1]
    return wid[:, None] == wid[None, :]


@pytest.mark.parametrize("grid", [(8, 8), (10, 6), (6, 18), (12, 20)])
def test_windowed_attention_is_full_attention_masked_to_cyclic_windows(grid):
    """(a): all four shifts, even grids with even and odd windows, non-square (≤ 1e-5)."""
    n = grid[0] * grid[1]
    q, k, v = (_randn(2, 3, n, 8, seed=s) for s in range(3))
    for shift_index in range(4):
        mask = _same_window_mask(grid, window_shift(window_size(grid), shift_index))
        expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        torch.testing.assert_close(windowed_attention(q, k, v, grid, shift_index), expected, atol=1e-5, rtol=0)


def test_odd_grids_attend_on_the_bicubic_resize():
    """Odd grid (7, 9): attend on (8, 10) with 4 × 5 windows, then resize back, as the official code does."""
    grid, even = (7, 9), (8, 10)
    q, k, v = (_randn(1, 2, 63, 4, seed=s) for s in range(3))

    def resize(t: torch.Tensor, src: tuple[int, int], dst: tuple[int, int]) -> torch.Tensor:
        img = t.reshape(2, *src, 4).permute(0, 3, 1, 2)
        return (
            F.interpolate(img, size=dst, mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(1, 2, -1, 4)
        )

    mask = _same_window_mask(even, window_shift((4, 5), 1))
    attended = F.scaled_dot_product_attention(*(resize(t, grid, even) for t in (q, k, v)), attn_mask=mask)
    out = windowed_attention(q, k, v, grid, 1)
    assert out.shape == q.shape
    torch.testing.assert_close(out, resize(attended, even, grid), atol=1e-5, rtol=0)


def test_windowing_commutes_with_token_wise_maps():
    """A processor may window q/k/v instead of the block input: token-wise affine maps commute with the windows."""
    torch.manual_seed(0)
    linear, grid = nn.Linear(6, 4), (8, 12)
    x = _randn(2, 96, 6)
    for k in range(4):
        torch.testing.assert_close(windowed(linear, (x,), grid, k), linear(x), atol=1e-6, rtol=0)


# --------------------------------------------------------------------------------------------------- FreeU


def test_freeu_backbone_scales_the_first_half_of_the_channels():
    h = _randn(2, 7, 4, 4)
    out = freeu_backbone(h, 1.3)
    torch.testing.assert_close(out[:, :3], h[:, :3] * 1.3)
    assert torch.equal(out[:, 3:], h[:, 3:])


@pytest.mark.parametrize("size", [(8, 8), (7, 10)])
def test_freeu_skip_filter_matches_the_direct_formula(size):
    """Scaling the fftshift-centred 2 × 2 square = scaling frequencies {−1, 0}² of the plain spectrum."""
    x = _randn(2, 3, *size)
    spectrum = torch.fft.fft2(x.double())
    low = torch.zeros(size, dtype=torch.bool)
    for u in (0, -1):
        for v in (0, -1):
            low[u % size[0], v % size[1]] = True
    expected = x.double() + (0.4 - 1) * torch.fft.ifft2(spectrum * low).real
    torch.testing.assert_close(freeu_skip(x, 0.4), expected.float(), atol=1e-5, rtol=0)


def test_freeu_matches_diffusers_apply_freeu():
    from diffusers.utils.torch_utils import apply_freeu

    h, s = _randn(1, 8, 8, 8, seed=3), _randn(1, 6, 8, 8, seed=4)
    factors = {"b1": 1.1, "b2": 1.2, "s1": 0.6, "s2": 0.4}
    for index, (b, sf) in enumerate([(1.1, 0.6), (1.2, 0.4)]):
        ref_h, ref_s = apply_freeu(index, h.clone(), s.clone(), **factors)
        torch.testing.assert_close(freeu_backbone(h, b), ref_h)
        torch.testing.assert_close(freeu_skip(s, sf), ref_s, atol=1e-6, rtol=0)


@pytest.fixture(scope="module")
def unets():
    """The tiny SD/SDXL UNets and the full-size SD 1.5/SDXL UNets on the meta device (shapes only)."""
    from hiresdiff.models.tiny import build_builtin_unet

    return {name: build_builtin_unet(name, device="cpu" if name.startswith("tiny") else "meta") for name in _LAYOUTS}


_LAYOUTS = ("tiny-sd", "tiny-sdxl", "random-sd15", "random-sdxl")


def _layout(unet: nn.Module) -> list[list[tuple[int, int]]]:
    return up_resnet_channels(unet.config.block_out_channels, unet.config.layers_per_block)


@pytest.mark.parametrize("name", _LAYOUTS)
def test_up_resnet_channels_match_the_built_unet(unets, name):
    unet = unets[name]
    layout = _layout(unet)
    assert [len(block.resnets) for block in unet.up_blocks] == [len(r) for r in layout]
    for block, resnets in zip(unet.up_blocks, layout, strict=True):
        assert [r.conv1.in_channels for r in block.resnets] == [backbone + skip for backbone, skip in resnets]


def test_freeu_rules_on_full_size_layouts(unets):
    """The rules differ on 2 SDXL and 7 SD 1.5 up-block resnets; the level rule is the official 1280/640 rule."""
    for name, differing in (("random-sdxl", 2), ("random-sd15", 7)):
        layout = _layout(unets[name])
        by_channels, by_index = freeu_stages(layout, "channels"), freeu_stages(layout, "diffusers")
        keys = set(by_channels) | set(by_index)
        assert sum(by_channels.get(key) != by_index.get(key) for key in keys) == differing
        literal = {
            (b, j): {1280: 1, 640: 2}[c] for b, r in enumerate(layout) for j, (c, _) in enumerate(r) if c in (1280, 640)
        }
        assert by_channels == literal
    sdxl = _layout(unets["random-sdxl"])
    by_channels, by_index = freeu_stages(sdxl, "channels"), freeu_stages(sdxl, "diffusers")
    assert by_index == {(0, 0): 1, (0, 1): 1, (0, 2): 1, (1, 0): 2, (1, 1): 2, (1, 2): 2}
    assert {k for k in set(by_channels) | set(by_index) if by_channels.get(k) != by_index.get(k)} == {(1, 0), (2, 0)}


@pytest.mark.parametrize("name", ["tiny-sd", "tiny-sdxl"])
def test_freeu_channel_rule_fires_on_tiny_unets(unets, name):
    stages = freeu_stages(_layout(unets[name]), "channels")
    assert set(stages.values()) == {1, 2}
    assert all(stage == 1 for (block, _), stage in stages.items() if block == 0)  # the deepest up block is stage 1
    assert set(freeu_stages(_layout(unets[name]), "diffusers").values()) == {1, 2}
    with pytest.raises(ValueError):
        freeu_stages(_layout(unets[name]), "other")  # type: ignore[arg-type]
