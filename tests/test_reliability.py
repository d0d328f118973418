"""Doomed runs stop before model work; faults while writing lose nothing (issue: reliability)."""

from __future__ import annotations

import errno
import shutil
import time
from pathlib import Path

import pytest

import hiresdiff.images as images_mod
import hiresdiff.pipeline as pipeline_mod
from hiresdiff.cli import main
from hiresdiff.images import read_png_settings
from hiresdiff.sampler import Run

TINY = ["generate", "a red fox", "--model", "tiny-sdxl", "--steps", "2", "--quiet"]


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if any model would be built."""
    monkeypatch.setattr(pipeline_mod.HiresPipeline, "from_model", lambda *a, **k: pytest.fail("a model was loaded"))
    pipeline_mod._CACHE.clear()


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("hiresdiff: ") and "\n" not in err and "Traceback" not in err, err
    return err


def _leftovers(folder: Path) -> list[str]:
    """Files a run left behind that are not complete PNGs (temporary or empty files)."""
    return sorted(p.name for p in folder.rglob("*") if p.is_file() and (p.suffix != ".png" or p.stat().st_size == 0))


def test_out_that_is_a_file_stops_first(tmp_path, capsys, no_model):
    target = tmp_path / "taken"
    target.write_text("a file in the way")
    assert main([*TINY, "--out", str(target)]) == 2
    assert "exists and is not a folder" in _error(capsys)


@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES])
def test_unwritable_out_stops_before_model_work(tmp_path, capsys, monkeypatch, no_model, code):
    real = Path.write_bytes

    def write_bytes(self, data):
        if self.name.startswith(".hiresdiff-write-probe"):
            raise OSError(code, {errno.EROFS: "Read-only file system", errno.EACCES: "Permission denied"}[code])
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", write_bytes)
    begin = time.perf_counter()
    assert main([*TINY, "--out", str(tmp_path / "ro")]) == 2
    err = _error(capsys)
    assert "cannot write to --out" in err and ("Read-only" in err or "Permission denied" in err)
    assert time.perf_counter() - begin < 5


def test_full_disk_is_refused_with_the_space_needed(tmp_path, capsys, monkeypatch, no_model):
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=100_000))
    assert main([*TINY, "--width", "1024", "--height", "1024", "--out", str(tmp_path / "o")]) == 2
    err = _error(capsys)
    assert "MiB free but this run writes up to" in err


def test_absurd_sizes_stop_at_once(tmp_path, capsys, no_model):
    begin = time.perf_counter()
    assert main([*TINY, "--width", "100000", "--height", "100000", "--out", str(tmp_path)]) == 2
    assert "above the limit of 4,194,304" in _error(capsys)  # (8 × 256)² on tiny-sdxl
    assert main([*TINY, "--width", "1024", "--height", "512", "--max-pixels", "100000", "--out", str(tmp_path)]) == 2
    assert "--max-pixels" in _error(capsys)
    assert time.perf_counter() - begin < 5


def test_dry_run_prints_the_plan_and_loads_nothing(tmp_path, capsys, no_model):
    out = tmp_path / "dry"
    assert main([*TINY, "--width", "768", "--height", "512", "--dry-run", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "plan: demofusion 512×768, 3 stage(s) (168×256 → 344×512 → 512×768), 2 steps, 1 image(s)" in printed
    assert "cost model (tiny-sdxl)" in printed and "native-size denoiser samples per step" in printed
    assert not out.exists()  # nothing written, not even the folder


def test_plan_line_before_work(tmp_path, capsys):
    assert main(["generate", "a", "--model", "tiny-sdxl", "--steps", "1", "--no-previews", "--out", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert "plan: demofusion 512×512, 2 stage(s) (256×256 → 512×512), 1 steps, 1 image(s)" in err


def test_ctrl_c_while_denoising_exits_130_and_writes_nothing(tmp_path, capsys, monkeypatch):
    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(Run, "denoise", interrupted)
    out = tmp_path / "o"
    assert main([*TINY, "--out", str(out)]) == 130
    assert _error(capsys) == "hiresdiff: interrupted"
    assert not out.exists() or list(out.iterdir()) == []


def _fail_on_second_write(monkeypatch, exc: BaseException) -> list[str]:
    """Make the second PNG write fail after its temporary file was opened and partly written."""
    calls: list[str] = []
    real = images_mod.os.fsync

    def fsync(fd):
        calls.append("fsync")
        if len(calls) == 2:
            raise exc
        return real(fd)

    monkeypatch.setattr(images_mod.os, "fsync", fsync)
    return calls


def test_full_disk_while_writing_keeps_earlier_images_and_no_partial_file(tmp_path, capsys, monkeypatch):
    _fail_on_second_write(monkeypatch, OSError(errno.ENOSPC, "No space left on device"))
    out = tmp_path / "o"
    assert main([*TINY, "--batch", "2", "--no-previews", "--out", str(out)]) == 2
    err = _error(capsys)
    assert "No space left on device" in err and "1 file(s) written before it are complete" in err
    assert [p.name for p in out.iterdir()] == ["000-demofusion-seed0.png"]
    assert read_png_settings(out / "000-demofusion-seed0.png")["seed"] == 0  # complete and readable
    assert _leftovers(out) == []


def test_ctrl_c_while_writing_says_what_was_finished(tmp_path, capsys, monkeypatch):
    _fail_on_second_write(monkeypatch, KeyboardInterrupt())
    out = tmp_path / "o"
    assert main([*TINY, "--out", str(out)]) == 130  # final image, then its phase-1 preview
    assert _error(capsys) == "hiresdiff: interrupted; 1 file(s) written before it are complete"
    assert [p.name for p in out.iterdir()] == ["000-demofusion-seed0.png"] and _leftovers(out) == []
    again = tmp_path / "o"  # a second run starts clean
    assert main([*TINY, "--out", str(again)]) == 0 and _leftovers(again) == []


def test_bench_dataset_and_eval_outputs_are_checked_first(tmp_path, capsys, monkeypatch, no_model):
    blocked = tmp_path / "blocked"
    blocked.write_text("a file")
    bench = ["bench", "--model", "tiny-sd", "--methods", "direct", "--prompts", "builtin:smoke", "--steps", "1"]
    assert main([*bench, "--out", str(blocked)]) == 2
    assert "--out" in _error(capsys)
    src = tmp_path / "src"
    src.mkdir()
    assert main(["dataset", str(src), str(blocked), "--min-side", "64", "--size", "64"]) == 2
    assert "the dataset folder" in _error(capsys)
    gen = tmp_path / "gen"
    gen.mkdir()
    assert main(["eval", str(gen), "--metrics", "clip", "--json", str(blocked / "x.json")]) == 2
    assert "--json" in _error(capsys)
