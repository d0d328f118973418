"""hiresdiff dataset: size filter, centre crop, resize, captions CSV, resuming, captioner errors."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hiresdiff.cli import main
from hiresdiff.errors import HiresError
from hiresdiff.evaluation import build_reference_set
from hiresdiff.evaluation.dataset import output_names


def bands(width: int, height: int) -> Image.Image:
    """Red left of x = (w − h) / 2, blue right of x = (w + h) / 2, green in between (the centre square)."""
    arr = np.zeros((height, width, 3), dtype=np.uint8)
    left, right = (width - height) // 2, (width + height) // 2
    arr[:, :left, 0] = 255
    arr[:, left:right, 1] = 255
    arr[:, right:, 2] = 255
    return Image.fromarray(arr)


@pytest.fixture()
def src(tmp_path: Path) -> Path:
    root = tmp_path / "src"
    (root / "sub").mkdir(parents=True)
    bands(100, 60).save(root / "a_big.png")
    bands(90, 64).transpose(Image.Transpose.ROTATE_90).save(root / "sub" / "b.jpg", quality=100, subsampling=0)
    Image.new("RGB", (40, 40), "white").save(root / "small.png")
    Image.new("RGB", (50, 50), "gray").save(root / "c.png")
    Image.new("RGB", (50, 50), "gray").save(root / "c.jpg")
    (root / "notes.txt").write_text("not an image")
    return root


def read_captions(path: Path) -> list[tuple[str, str]]:
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["file", "prompt"]
    return [(a, b) for a, b in rows[1:]]


class FakeCaptioner:
    """Captions an image by its size; records every call."""

    def __init__(self, fail_after: int | None = None) -> None:
        self.calls: list[tuple[int, int]] = []
        self.fail_after = fail_after

    def __call__(self, images: Sequence[Image.Image]) -> list[str]:
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise KeyboardInterrupt
        self.calls += [im.size for im in images]
        return [f"a {im.size[0]}x{im.size[1]} picture" for im in images]


def test_output_names_are_flat_and_unique(tmp_path: Path) -> None:
    files = [tmp_path / "a.png", tmp_path / "a.jpg", tmp_path / "x" / "y.webp"]
    assert output_names(tmp_path, files) == {files[0]: "a-png.png", files[1]: "a-jpg.png", files[2]: "x__y.png"}


def test_filter_crop_resize_and_captions_from_csv(src: Path, tmp_path: Path) -> None:
    captions = tmp_path / "captions.csv"
    captions.write_text('file,prompt\na_big.png,"a green, wide field"\nsub/b.jpg,a tall one\nc,grey\n')
    out = tmp_path / "out"
    report = build_reference_set(src, out, min_side=48, size=32, captions=captions, progress=False)
    names = ["a_big.png", "c-jpg.png", "c-png.png", "sub__b.png"]
    assert sorted(p.name for p in out.glob("*.png")) == names
    assert [p.name for p in report.written] == sorted(names)
    assert (report.existing, report.too_small, report.captioned) == (0, 1, 0)
    for name in names:
        assert Image.open(out / name).size == (32, 32)
    for name, tolerance in (("a_big.png", 0), ("sub__b.png", 8)):  # the centre square is the green band (JPEG: ±8)
        arr = np.asarray(Image.open(out / name)).astype(int)
        assert arr[..., 1].min() >= 255 - tolerance and arr[..., [0, 2]].max() <= tolerance, name
    assert read_captions(out / "captions.csv") == [
        ("a_big.png", "a green, wide field"),
        ("c-jpg.png", "grey"),
        ("c-png.png", "grey"),
        ("sub__b.png", "a tall one"),
    ]
    assert not list(out.glob(".*.tmp"))


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    shown = np.zeros((60, 100, 3), dtype=np.uint8)
    shown[:30] = 255  # displayed upright: white top half, black bottom half
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    (tmp_path / "src").mkdir()
    Image.fromarray(shown).transpose(Image.Transpose.ROTATE_90).save(tmp_path / "src" / "photo.jpg", exif=exif)
    build_reference_set(tmp_path / "src", tmp_path / "out", min_side=60, size=32, progress=False)
    arr = np.asarray(Image.open(tmp_path / "out" / "photo.png")).astype(int)
    assert arr[:12].min() > 200 and arr[-12:].max() < 50


def test_rerun_skips_existing_outputs_and_reuses_captions(src: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = FakeCaptioner()
    build_reference_set(src, out, min_side=48, size=32, captioner=first, progress=False)
    assert first.calls == [(32, 32)] * 4  # the written (cropped, resized) images are captioned
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = FakeCaptioner(fail_after=0)  # would interrupt if called
    report = build_reference_set(src, out, min_side=48, size=32, captioner=again, progress=False)
    assert (report.written, report.existing, report.captioned) == ([], 4, 0)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.suffix == ".png"} == {
        k: v for k, v in stamps.items() if k.endswith(".png")
    }
    assert read_captions(out / "captions.csv") == [
        (n, "a 32x32 picture") for n in sorted(stamps) if n != "captions.csv"
    ]


def test_interrupted_run_keeps_finished_work_and_resumes(src: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        build_reference_set(src, out, min_side=48, size=32, captioner=FakeCaptioner(fail_after=2), progress=False)
    assert [name for name, _ in read_captions(out / "captions.csv")] == ["a_big.png", "c-jpg.png"]
    resumed = FakeCaptioner()
    report = build_reference_set(src, out, min_side=48, size=32, captioner=resumed, progress=False)
    assert len(resumed.calls) == 2 and report.captioned == 2 and len(report.written) == 1
    assert len(read_captions(out / "captions.csv")) == 4


def test_limit_and_output_inside_source(src: Path) -> None:
    out = src / "reference"
    report = build_reference_set(src, out, min_side=48, size=32, limit=2, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["a_big.png", "c-jpg.png"]  # no captions asked for: no CSV
    assert report.captions is None
    again = build_reference_set(src, out, min_side=32, size=32, progress=False)  # outputs are not inputs
    assert again.existing == 2 and sorted(p.name for p in again.written) == ["c-png.png", "small.png", "sub__b.png"]


def test_caption_missing_from_csv_without_captioner(src: Path, tmp_path: Path) -> None:
    captions = tmp_path / "captions.csv"
    captions.write_text("file,prompt\na_big.png,field\n")
    with pytest.raises(HiresError, match=r"no caption for c\.jpg"):
        build_reference_set(src, tmp_path / "out", min_side=48, size=32, captions=captions, progress=False)
    assert not (tmp_path / "out").exists()
    captions.write_text("name,text\na_big.png,field\n")
    with pytest.raises(HiresError, match="needs 'file' and 'prompt' columns"):
        build_reference_set(src, tmp_path / "out", min_side=48, size=32, captions=captions, progress=False)


def test_missing_captioner_offline_is_one_line(
    src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    out = tmp_path / "out"
    assert main(["dataset", str(src), str(out), "--min-side", "48", "--size", "32", "--captioner", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("hiresdiff: error: offline"), err
    assert "'Salesforce/blip-image-captioning-large'" in err[0] and str(tmp_path / "hf") in err[0]
    assert not out.exists()


@pytest.fixture(scope="module")
def tiny_blip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random BLIP captioning model and processor saved to a folder (no downloads)."""
    import torch
    from transformers import BertTokenizerFast, BlipConfig, BlipForConditionalGeneration, BlipProcessor
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "a", "photo", "of", "red", "green", "sky"]
    tokenizer = BertTokenizerFast(vocab={w: i for i, w in enumerate(words)}, bos_token="[DEC]", model_max_length=64)
    processor = BlipProcessor(
        image_processor=BlipImageProcessorPil(size={"height": 32, "width": 32}), tokenizer=tokenizer
    )
    layers = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    special = {"pad_token_id": 0, "bos_token_id": 5, "sep_token_id": 3, "eos_token_id": 3}
    config = BlipConfig(
        text_config={**layers, **special, "vocab_size": len(words), "max_position_embeddings": 64},
        vision_config={**layers, "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("blip")
    BlipForConditionalGeneration(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def test_captioner_model_from_local_folder(src: Path, tmp_path: Path, tiny_blip: Path) -> None:
    from hiresdiff.evaluation.captioner import load_captioner

    out = tmp_path / "out"
    assert main(["dataset", str(src), str(out), "--min-side", "48", "--size", "32", "--captioner", str(tiny_blip)]) == 0
    rows = read_captions(out / "captions.csv")
    captioner = load_captioner(str(tiny_blip), "cpu")
    expected = captioner([Image.open(out / name).convert("RGB") for name, _ in rows])
    assert [prompt for _, prompt in rows] == expected and all(expected)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["{src}", "{out}", "--min-side", "32", "--size", "64"], "--size 64 exceeds --min-side 32"),
        (["{tmp}/nowhere", "{out}"], "SRC_DIR"),
        (["{src}", "{src}/notes.txt"], "exists and is not a folder"),
        (["{src}/sub", "{out}", "--limit", "0"], "--limit must be at least 1"),
        (["{src}", "{out}", "--captions", "{tmp}/none.csv"], "is not a file"),
    ],
)
def test_cli_errors(
    src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    paths = {"src": str(src), "out": str(tmp_path / "out"), "tmp": str(tmp_path)}
    assert main(["dataset", *(a.format(**paths) for a in args)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_cli_builds_set(src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert main(["dataset", str(src), str(out), "--min-side", "60", "--size", "48", "--quiet"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["a_big.png", "sub__b.png"]
    assert "2 images written, 0 already there, 3 too small" in capsys.readouterr().out


def test_corrupt_images_are_skipped_counted_and_named(src: Path, tmp_path: Path, capsys) -> None:
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)  # a header and nothing else
    good = src / "truncated.png"
    bands(80, 80).save(good)
    good.write_bytes(good.read_bytes()[:120])  # a readable header, broken pixel data
    out = tmp_path / "out"
    assert main(["dataset", str(src), str(out), "--min-side", "60", "--size", "48", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["a_big.png", "sub__b.png"]
    assert "2 unreadable" in printed and "broken.png" in printed and "truncated.png" in printed


def test_a_run_that_keeps_no_image_is_an_error(tmp_path: Path, capsys) -> None:
    folder = tmp_path / "small"
    folder.mkdir()
    bands(20, 20).save(folder / "tiny.png")
    (folder / "bad.png").write_bytes(b"not an image")
    assert main(["dataset", str(folder), str(tmp_path / "out"), "--min-side", "60", "--size", "48"]) == 2
    err = capsys.readouterr().err
    assert "no image of SRC_DIR" in err and "1 below --min-side 60, 1 unreadable" in err
