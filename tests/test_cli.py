"""The command line end to end on the tiny model: files, settings chunks, --from-png, errors, atomic writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hiresdiff import images as images_mod
from hiresdiff.cli import main
from hiresdiff.images import PNG_KEY, read_png_settings, save_png

TINY = ["--model", "tiny-sdxl", "--quiet"]


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def test_generate_writes_images_previews_and_settings(tmp_path: Path) -> None:
    out = tmp_path / "out"
    argv = ["generate", "a cat", *TINY, "--width", "640", "--height", "384", "--steps", "3", "--seed", "7"]
    assert main([*argv, "--set", "sigma=0.5", "--out", str(out)]) == 0
    final = out / "000-demofusion-seed7.png"
    previews = sorted(out.glob("000-demofusion-seed7-phase*.png"))
    # 640 px on a 256 px model: scale 2.5 → phases of long side 256, 512, 640
    assert [p.name for p in previews] == ["000-demofusion-seed7-phase1of3.png", "000-demofusion-seed7-phase2of3.png"]
    assert [Image.open(p).size for p in previews] == [(256, 152), (512, 304)]
    assert Image.open(final).size == (640, 384)
    meta = read_png_settings(final)
    assert meta["prompt"] == "a cat" and meta["seed"] == 7 and meta["method"] == "demofusion"
    assert meta["params"]["sigma"] == 0.5 and meta["width"] == 640 and meta["steps"] == 3
    assert meta["negative_prompt"] == "blurry, ugly, duplicate, poorly drawn, deformed, mosaic"
    assert not list(out.glob(".*.tmp"))


def test_from_png_regenerates_identical_image(tmp_path: Path) -> None:
    first, again = tmp_path / "a", tmp_path / "b"
    argv = ["generate", "a red fox", *TINY, "--width", "512", "--height", "512", "--steps", "3"]
    assert main([*argv, "--scheduler", "dpmpp-2m", "--seed", "3", "--out", str(first)]) == 0
    src = first / "000-demofusion-seed3.png"
    assert main(["generate", "--from-png", str(src), "--quiet", "--out", str(again)]) == 0
    copy = again / "000-demofusion-seed3.png"
    assert np.array_equal(pixels(src), pixels(copy))
    assert src.read_bytes() == copy.read_bytes()


def test_batch_seeds_and_from_png_of_second_image(tmp_path: Path) -> None:
    out = tmp_path / "out"
    argv = ["generate", "a", "b", *TINY, "--method", "multidiffusion", "--batch", "2", "--steps", "2"]
    assert main([*argv, "--width", "384", "--height", "256", "--seed", "10", "--out", str(out)]) == 0
    finals = sorted(p.name for p in out.glob("*.png"))
    assert finals == [f"{i:03d}-multidiffusion-seed{10 + i}.png" for i in range(4)]
    metas = [read_png_settings(out / f) for f in finals]
    assert [m["prompt"] for m in metas] == ["a", "a", "b", "b"]
    assert pixels(out / finals[0]).tolist() != pixels(out / finals[1]).tolist()
    # image 3 alone from its PNG: same picture (batching only changes float rounding)
    assert main(["generate", "--from-png", str(out / finals[3]), "--quiet", "--out", str(tmp_path / "r")]) == 0
    diff = np.abs(
        pixels(out / finals[3]).astype(int) - pixels(tmp_path / "r" / "000-multidiffusion-seed13.png").astype(int)
    )
    assert diff.max() <= 1


def test_methods_lists_every_method_and_parameter(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["methods"]) == 0
    text = capsys.readouterr().out
    for name in ("direct", "resize", "multidiffusion", "demofusion"):
        assert f"{name}:" in text
    for param in ("--set sigma=0.8", "--set alpha1=3.0", "--set stride=auto", "--set filter=bicubic"):
        assert param in text


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["generate", "x", *TINY, "--width", "500"], "not a multiple of the latent grid"),
        (["generate", "x", *TINY, "--method", "nope"], "unknown method 'nope'"),
        (["generate", "x", *TINY, "--set", "sigma"], "--set expects name=value"),
        (["generate", "x", *TINY, "--set", "sigma=abc"], "sigma='abc': expected float"),
        (["generate", "x", *TINY, "--set", "jitter=maybe"], "jitter='maybe': expected bool"),
        (["generate", *TINY], "give a prompt"),
        (["generate", "--from-png", "/nonexistent.png"], "no such file"),
    ],
)
def test_cli_errors_exit_2_with_one_line(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert main([*argv, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("hiresdiff: error:")
    assert message in err


@pytest.mark.parametrize(
    ("argv", "prog", "message"),
    [
        ([], "hiresdiff", "the following arguments are required: command"),
        (["nope"], "hiresdiff", "argument command: invalid choice: 'nope'"),
        (["generate", "x", "--wdith", "512"], "hiresdiff generate", "unrecognized arguments: --wdith 512"),
        (["generate", "x", "--width", "abc"], "hiresdiff generate", "argument --width: invalid int value: 'abc'"),
        (["generate", "x", "--dtype", "float8"], "hiresdiff generate", "argument --dtype: invalid choice: 'float8'"),
        (["generate", "x", "--seed"], "hiresdiff generate", "argument --seed: expected one argument"),
        (["demo", "--steps", "many"], "hiresdiff demo", "argument --steps: invalid int value: 'many'"),
        (["demo", "--bogus"], "hiresdiff demo", "unrecognized arguments: --bogus"),
        (["make-tiny", "--seed", "x"], "hiresdiff make-tiny", "argument --seed: invalid int value: 'x'"),
        (["methods", "extra"], "hiresdiff methods", "unrecognized arguments: extra"),
        (["cost", "--width", "2k"], "hiresdiff cost", "argument --width: invalid int value: '2k'"),
        (["cost", "--set"], "hiresdiff cost", "argument --set: expected one argument"),
        (["bench", "--dtype", "int8"], "hiresdiff bench", "argument --dtype: invalid choice: 'int8'"),
        (["bench", "--limit", "all"], "hiresdiff bench", "argument --limit: invalid int value: 'all'"),
        (["eval", "imgs", "--batch-size", "big"], "hiresdiff eval", "argument --batch-size: invalid int value"),
        (["eval", "imgs", "--bogus"], "hiresdiff eval", "unrecognized arguments: --bogus"),
        (["dataset", "src", "dst", "--size"], "hiresdiff dataset", "argument --size: expected one argument"),
        (["serve", "--port", "http"], "hiresdiff serve", "argument --port: invalid int value: 'http'"),
        (["serve", "--dtype", "half"], "hiresdiff serve", "argument --dtype: invalid choice: 'half'"),
    ],
)
def test_argument_errors_are_one_line_naming_the_subcommand(
    argv: list[str], prog: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """argparse's usage block is not printed: one ``PROG: error: …`` line with a pointer to ``PROG --help``."""
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    captured = capsys.readouterr()
    err = captured.err
    assert captured.out == "" and err.endswith("\n") and err.count("\n") == 1, err
    assert err.startswith(f"{prog}: error: {message}") and err.rstrip().endswith(f"(see {prog} --help)"), err


def test_from_png_without_settings_and_out_is_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)
    assert main(["generate", "--from-png", str(plain)]) == 2
    assert "carries no hiresdiff settings" in capsys.readouterr().err
    assert main(["generate", "x", *TINY, "--out", str(plain)]) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_entry_point_exits_2_without_traceback(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "hiresdiff.cli", "generate", "x", "--model", "tiny-sdxl", "--steps", "0"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "hiresdiff: error: steps must be a positive integer, got 0" in proc.stderr


def test_png_writes_are_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "img.png"
    save_png(Image.new("RGB", (4, 4), "red"), target, {"a": 1})
    before = target.read_bytes()

    def interrupted(src: str, dst: str) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(images_mod.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_png(Image.new("RGB", (4, 4), "blue"), target, {"a": 2})
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img.png"]
    with Image.open(target) as im:
        assert json.loads(im.text[PNG_KEY]) == {"a": 1}
