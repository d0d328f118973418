"""Decoding a user's own image and sizing its upscale: exact pixels, viewer orientation, one-line errors."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from hiresdiff import inputs
from hiresdiff.errors import HiresError
from hiresdiff.inputs import (
    FIT_MODES,
    SourceImage,
    check_aspect,
    check_min_size,
    fit_to_aspect,
    load_source_image,
    target_size,
)
from hiresdiff.ops.resample import resize_pixels


def one_line_error(match: str, func, *args, **kwargs) -> str:
    """Call ``func`` expecting a HiresError whose single-line message contains ``match``."""
    with pytest.raises(HiresError) as info:
        func(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    assert match in message, message
    return message


def save(image: Image.Image, path: Path, **kwargs: object) -> Path:
    image.save(path, **kwargs)
    return path


def expected(values: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 values → the (1, 3, H, W) pixels load_source_image must give."""
    return torch.from_numpy(values.astype(np.float32)).permute(2, 0, 1).unsqueeze(0) / 127.5 - 1


def composite(c: int, a: int) -> int:
    return round((c * a + 255 * (255 - a)) / 255)


RGB = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255]], [[0, 0, 0], [255, 255, 255], [12, 130, 201]]], np.uint8)


# --- decoding -------------------------------------------------------------------------------------------------------


def test_rgb_round_trip_exact_and_sha256(tmp_path: Path) -> None:
    path = save(Image.fromarray(RGB), tmp_path / "pic.png")
    src = load_source_image(path)
    assert isinstance(src, SourceImage)
    assert src.pixels.dtype == torch.float32 and src.pixels.shape == (1, 3, 2, 3)
    assert torch.equal(src.pixels, expected(RGB))
    assert (src.height, src.width) == (2, 3)
    assert src.name == "pic.png"
    assert src.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert src.notes == ()
    assert src.metadata() == {"name": "pic.png", "width": 3, "height": 2, "sha256": src.sha256, "notes": []}
    assert load_source_image(str(path)).sha256 == src.sha256


def test_rgba_composited_on_white(tmp_path: Path) -> None:
    rgba = np.zeros((1, 3, 4), np.uint8)
    rgba[0, 0] = [10, 20, 30, 0]  # fully transparent → white
    rgba[0, 1] = [200, 100, 0, 128]  # half transparent
    rgba[0, 2] = [5, 6, 7, 255]  # opaque: unchanged
    src = load_source_image(save(Image.fromarray(rgba, "RGBA"), tmp_path / "a.png"))
    want = np.array([[[255, 255, 255], [composite(200, 128), composite(100, 128), composite(0, 128)], [5, 6, 7]]])
    assert torch.equal(src.pixels, expected(want))
    assert src.pixels[0, :, 0, 0].eq(1.0).all()
    assert "alpha composited on white" in src.notes


def test_opaque_rgba_has_no_alpha_note(tmp_path: Path) -> None:
    rgba = np.concatenate([RGB, np.full((2, 3, 1), 255, np.uint8)], axis=-1)
    src = load_source_image(save(Image.fromarray(rgba, "RGBA"), tmp_path / "o.png"))
    assert torch.equal(src.pixels, expected(RGB))
    assert src.notes == ()


def test_la_composited(tmp_path: Path) -> None:
    la = np.array([[[100, 0], [100, 128], [100, 255]]], np.uint8)
    src = load_source_image(save(Image.fromarray(la, "LA"), tmp_path / "la.png"))
    grey = [255, composite(100, 128), 100]
    assert torch.equal(src.pixels, expected(np.array([[[g] * 3 for g in grey]])))
    assert "alpha composited on white" in src.notes


def test_premultiplied_rgba_composited() -> None:
    # premultiplied colour 100 at alpha 128 → 100 + 255·(1 − 128/255)
    img = Image.frombytes("RGBa", (2, 1), bytes([100, 50, 0, 128, 9, 8, 7, 255]))
    src = load_source_image(img)
    flat = [round(c + 255 * 127 / 255) for c in (100, 50, 0)]
    assert torch.equal(src.pixels, expected(np.array([[flat, [9, 8, 7]]], np.uint8)))
    assert "alpha composited on white" in src.notes


def test_palette_with_transparency(tmp_path: Path) -> None:
    img = Image.new("P", (2, 1))
    img.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    img.putpixel((0, 0), 0)
    img.putpixel((1, 0), 1)
    src = load_source_image(save(img, tmp_path / "p.png", transparency=0))
    assert torch.equal(src.pixels, expected(np.array([[[255, 255, 255], [0, 0, 255]]])))
    assert "palette converted" in src.notes and "alpha composited on white" in src.notes


def test_palette_without_transparency(tmp_path: Path) -> None:
    img = Image.new("P", (2, 1))
    img.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    img.putpixel((1, 0), 1)
    src = load_source_image(save(img, tmp_path / "p.png"))
    assert torch.equal(src.pixels, expected(np.array([[[255, 0, 0], [0, 0, 255]]])))
    assert src.notes == ("palette converted",)


def test_sixteen_bit_scaled(tmp_path: Path) -> None:
    values = np.array([[0, 257 * 3, 257 * 128, 65535]], np.uint16)
    img = Image.fromarray(values)
    assert img.mode == "I;16"
    path = save(img, tmp_path / "g16.png")
    with Image.open(path) as check:
        assert check.mode.startswith("I")
    src = load_source_image(path)
    grey = np.array([[[k] * 3 for k in (0, 3, 128, 255)]], np.uint8)
    assert torch.equal(src.pixels, expected(grey))
    assert "16-bit scaled to 8-bit" in src.notes


def test_mode_i_small_values_kept() -> None:
    img = Image.fromarray(np.array([[0, 7, 255]], np.int32), "I")
    src = load_source_image(img)
    assert torch.equal(src.pixels, expected(np.array([[[k] * 3 for k in (0, 7, 255)]], np.uint8)))
    assert "16-bit scaled to 8-bit" not in src.notes


def test_float_mode_clipped() -> None:
    img = Image.fromarray(np.array([[-5.0, 100.4, 300.0]], np.float32), "F")
    src = load_source_image(img)
    assert torch.equal(src.pixels, expected(np.array([[[k] * 3 for k in (0, 100, 255)]], np.uint8)))


def test_cmyk_jpeg(tmp_path: Path) -> None:
    path = save(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), tmp_path / "c.jpg", quality=95)
    with Image.open(path) as check:
        assert check.mode == "CMYK"
    src = load_source_image(path)
    assert src.pixels.shape == (1, 3, 16, 16)
    red = ((src.pixels[0, :, 8, 8] + 1) * 127.5).tolist()
    assert red[0] > 240 and red[1] < 15 and red[2] < 15
    assert "CMYK converted to RGB" in src.notes


def test_grayscale_three_equal_channels(tmp_path: Path) -> None:
    grey = np.array([[0, 50], [128, 255]], np.uint8)
    src = load_source_image(save(Image.fromarray(grey, "L"), tmp_path / "l.png"))
    assert torch.equal(src.pixels, expected(np.repeat(grey[..., None], 3, axis=-1)))
    assert src.notes == ()


def test_exif_orientation_six(tmp_path: Path) -> None:
    # stored 16 high × 32 wide, top-left 8×8 block red; orientation 6 = rotate 90° clockwise to display
    stored = np.full((16, 32, 3), 128, np.uint8)
    stored[:8, :8] = [255, 0, 0]
    exif = Image.Exif()
    exif[0x0112] = 6
    path = save(Image.fromarray(stored), tmp_path / "rot.jpg", quality=95, exif=exif)
    src = load_source_image(path)
    assert (src.height, src.width) == (32, 16)
    rgb = ((src.pixels[0] + 1) * 127.5).permute(1, 2, 0)
    top_right, top_left = rgb[4, 12], rgb[4, 3]
    assert top_right[0] > 230 and top_right[1] < 30 and top_right[2] < 30
    assert abs(top_left - 128).max() < 10
    assert "EXIF orientation applied" in src.notes


def test_exif_orientation_one_has_no_note(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 1
    src = load_source_image(save(Image.new("RGB", (8, 4)), tmp_path / "up.jpg", exif=exif))
    assert (src.height, src.width) == (4, 8)
    assert "EXIF orientation applied" not in src.notes


def test_animated_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (4, 4), (255, 0, 0)), Image.new("RGB", (4, 4), (0, 0, 255))]
    path = tmp_path / "anim.png"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    src = load_source_image(path)
    assert torch.equal(src.pixels, expected(np.full((4, 4, 3), [255, 0, 0], np.uint8)))


def test_in_memory_image() -> None:
    img = Image.fromarray(RGB)
    first, second = load_source_image(img), load_source_image(img.copy())
    assert first.name == second.name == "<PIL image>"
    assert first.sha256 == second.sha256 and len(first.sha256) == 64
    assert torch.equal(first.pixels, expected(RGB))
    assert load_source_image(img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)).sha256 != first.sha256


# --- decoding errors ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("size", "pixels"), [((12, 10), 120), ((20, 20), 400)], ids=["warning range", "error range"])
def test_decompression_bomb(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, size: tuple[int, int], pixels: int
) -> None:
    path = save(Image.new("RGB", size), tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    message = one_line_error(f"{pixels} pixels", load_source_image, path)
    assert "100" in message and "MAX_IMAGE_PIXELS" in message


def test_truncated_png(tmp_path: Path) -> None:
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    full = save(Image.fromarray(noise), tmp_path / "full.png").read_bytes()
    path = tmp_path / "cut.png"
    path.write_bytes(full[: len(full) // 2])
    message = one_line_error(f"cannot read image '{path}'", load_source_image, path)
    assert "truncated" in message and message.endswith("pass a PNG, JPEG or WebP file")


def test_text_file_named_png(tmp_path: Path) -> None:
    path = tmp_path / "notes.png"
    path.write_text("hello, not an image\n")
    message = one_line_error(f"cannot read image '{path}'", load_source_image, path)
    assert "BytesIO" not in message


def test_folder_and_missing_path(tmp_path: Path) -> None:
    one_line_error("is a folder", load_source_image, tmp_path)
    missing = tmp_path / "nope.png"
    one_line_error(str(missing), load_source_image, missing)


def test_zero_size_image() -> None:
    one_line_error("empty", load_source_image, Image.new("RGB", (0, 0)))


# --- sizes ----------------------------------------------------------------------------------------------------------


def fake_source(height: int, width: int) -> SourceImage:
    return SourceImage(torch.zeros(1, 3, height, width), "x.png", "0" * 64, ())


def test_check_min_size() -> None:
    check_min_size(fake_source(150, 256), 256)
    message = one_line_error("input image 150×200 is smaller than the model's base canvas", check_min_size,
                             fake_source(150, 200), 256)  # fmt: skip
    assert "at least 256 px" in message


def test_target_size_scale() -> None:
    kw = {"target_height": None, "target_width": None, "grid": 8}
    assert target_size(300, 200, scale=2, **kw) == (600, 400)
    assert target_size(300, 200, scale=None, **kw) == (600, 400)  # default scale 2
    assert target_size(301, 203, scale=1.5, **kw) == (448, 304)  # 451.5 → 448, 304.5 → 304


def test_target_size_one_or_both_sides() -> None:
    assert target_size(300, 200, scale=None, target_height=None, target_width=800, grid=8) == (1200, 800)
    assert target_size(300, 200, scale=None, target_height=1000, target_width=None, grid=8) == (1000, 664)
    assert target_size(300, 200, scale=None, target_height=512, target_width=1024, grid=8) == (512, 1024)


@pytest.mark.parametrize("scale", [1, 0.5, -2, math.nan, math.inf])
def test_target_size_bad_scale(scale: float) -> None:
    one_line_error("--scale must be a finite number above 1", target_size, 300, 200, scale=scale, target_height=None,
                   target_width=None, grid=8)  # fmt: skip


def test_target_size_errors() -> None:
    one_line_error("give --scale or --width/--height, not both", target_size, 300, 200, scale=2, target_height=None,
                   target_width=800, grid=8)  # fmt: skip
    one_line_error("the target 296×200 does not enlarge the input 300×200", target_size, 300, 200, scale=None,
                   target_height=296, target_width=200, grid=8)  # fmt: skip
    one_line_error("not a multiple of the latent grid", target_size, 300, 200, scale=None, target_height=None,
                   target_width=801, grid=8)  # fmt: skip


def test_check_aspect() -> None:
    check_aspect(301, 203, (448, 304), 8, None)  # scale rounding
    check_aspect(300, 200, (1000, 664), 8, None)
    for fit in FIT_MODES:
        check_aspect(300, 200, (512, 1024), 8, fit)
    message = one_line_error("the target 512×1024 has another aspect ratio than the input 300×200", check_aspect,
                             300, 200, (512, 1024), 8, None)  # fmt: skip
    assert "--fit crop" in message and "--fit pad" in message
    one_line_error("crop, pad", check_aspect, 300, 200, (600, 400), 8, "stretch")


# --- fitting and resizing -------------------------------------------------------------------------------------------


def ramp(height: int, width: int) -> torch.Tensor:
    return torch.linspace(-1, 1, 3 * height * width).reshape(1, 3, height, width)


def test_fit_to_aspect_unchanged() -> None:
    x = ramp(30, 20)
    assert fit_to_aspect(x, (64, 48), None) is x
    assert fit_to_aspect(x, (600, 400), "crop") is x
    assert fit_to_aspect(x, (600, 400), "pad") is x


def test_fit_to_aspect_crop() -> None:
    x = ramp(30, 20)
    wide = fit_to_aspect(x, (512, 1024), "crop")  # 20 wide → 10 high, rows 10 … 19
    assert torch.equal(wide, x[..., 10:20, :])
    tall = fit_to_aspect(ramp(20, 31), (1024, 512), "crop")  # 20 high → 10 wide, cols 10 … 19 (extra col right)
    assert torch.equal(tall, ramp(20, 31)[..., :, 10:20])


def test_fit_to_aspect_pad() -> None:
    x = ramp(10, 20)
    out = fit_to_aspect(x, (1024, 1024), "pad")  # 10 × 20 → 20 × 20: 5 rows above, 5 below
    assert out.shape == (1, 3, 20, 20)
    assert torch.equal(out[..., 5:15, :], x)
    assert torch.equal(out[..., :5, :], x[..., :1, :].expand(-1, -1, 5, -1))
    assert torch.equal(out[..., 15:, :], x[..., -1:, :].expand(-1, -1, 5, -1))
    odd = fit_to_aspect(ramp(21, 10), (1024, 1024), "pad")  # 11 columns to add: 5 left, 6 right
    assert odd.shape == (1, 3, 21, 21)
    assert torch.equal(odd[..., :, 5:15], ramp(21, 10))
    assert torch.equal(odd[..., :, 15:], ramp(21, 10)[..., :, -1:].expand(-1, -1, -1, 6))


def test_resize_pixels() -> None:
    x = ramp(12, 16)
    up = resize_pixels(x, (24, 32))
    want = F.interpolate(x, size=(24, 32), mode="bicubic", align_corners=False, antialias=False).clamp(-1, 1)
    assert torch.equal(up, want)
    down = resize_pixels(x, (6, 24))  # shrinks one side
    want = F.interpolate(x, size=(6, 24), mode="bicubic", align_corners=False, antialias=True).clamp(-1, 1)
    assert torch.equal(down, want)
    assert up.min() >= -1 and up.max() <= 1


def test_module_constants() -> None:
    assert inputs.FIT_MODES == ("crop", "pad")
