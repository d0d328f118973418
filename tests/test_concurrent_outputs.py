"""Runs sharing an output folder never overwrite each other: every image claims its own ``NNN-`` index atomically.

The class of bug: two writers compute the same next free index and one image silently replaces the other. Tested
with real processes racing on one folder (library writer and the ``hiresdiff generate`` command), and with the
claim protocol's corner cases (a held claim, a claim left by a killed run, a name taken between check and write).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from hiresdiff.images import read_png_settings, save_png
from hiresdiff.outputs import CLAIM_SUFFIX, NumberedImage, next_free_index, save_numbered


def _writer(out: str, worker: int, barrier: mp.synchronize.Barrier) -> None:
    items = [
        NumberedImage(
            f"m-seed{worker * 10 + i}",
            Image.new("RGB", (8, 8), (worker * 40, i * 100, 0)),
            {"worker": worker, "image": i},
            (("phase1of2", Image.new("RGB", (4, 4), (worker, i, 1))),),
        )
        for i in range(2)
    ]
    barrier.wait()  # every writer starts from the same (empty) folder: the same first free index
    save_numbered(Path(out), items)


def _images(out: Path) -> list[Path]:
    return sorted(p for p in out.glob("[0-9][0-9][0-9]-*.png") if "-phase" not in p.name)


def _check_distinct(out: Path, expected: set[tuple[int, int]], key: str = "worker", sub: str = "image") -> None:
    images = _images(out)
    indices = [p.name[:3] for p in images]
    assert len(images) == len(expected) and len(set(indices)) == len(images), sorted(p.name for p in out.iterdir())
    assert {(read_png_settings(p)[key], read_png_settings(p)[sub]) for p in images} == expected
    for image in images:  # each preview sits under its own image's index and carries the same settings
        previews = list(out.glob(f"{image.stem}-phase*.png"))
        assert all(read_png_settings(p) == read_png_settings(image) for p in previews)
    assert not [p.name for p in out.iterdir() if p.name.endswith((CLAIM_SUFFIX, ".tmp"))]


def test_four_processes_into_one_folder_keep_eight_distinct_images(tmp_path: Path) -> None:
    ctx = mp.get_context("fork")  # the writers only encode PNGs: no torch work after the fork
    barrier = ctx.Barrier(4)
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), w, barrier)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    _check_distinct(tmp_path, {(w, i) for w in range(4) for i in range(2)})
    assert len(list(tmp_path.glob("*-phase1of2.png"))) == 8


def test_concurrent_generate_commands_into_one_folder(tmp_path: Path) -> None:
    """4 real ``hiresdiff generate`` runs × 2 images (with previews) into one ``--out``: 8 images, 8 indices."""
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-m", "hiresdiff.cli", "generate", "a", "--model", "tiny-sdxl", "--steps", "1"]
    procs = [
        subprocess.Popen(
            [*argv, "--batch", "2", "--seed", str(10 * w), "--quiet", "--skip-memory-check", "--out", str(out)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for w in range(4)
    ]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    _check_distinct(out, {(10 * w + i, 1) for w in range(4) for i in range(2)}, key="seed", sub="steps")
    assert len(list(out.glob("*-phase1of2.png"))) == 8


def test_a_held_claim_is_skipped_and_released_claims_leave_nothing(tmp_path: Path) -> None:
    save_png(Image.new("RGB", (2, 2)), tmp_path / "000-a.png")
    (tmp_path / f".001{CLAIM_SUFFIX}").write_text("12345\n")  # a run writing index 1 right now (or a killed one)
    assert next_free_index(tmp_path) == 2
    written = save_numbered(tmp_path, [NumberedImage("b", Image.new("RGB", (2, 2)), {"k": 1})])
    assert [p.name for p in written] == ["002-b.png"]
    assert (tmp_path / f".001{CLAIM_SUFFIX}").exists()  # someone else's claim is not touched
    assert not (tmp_path / f".002{CLAIM_SUFFIX}").exists()


def test_an_index_written_between_look_and_claim_is_not_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another run finishes index 0 after this one computed it as free: the claim sees its PNG and moves on."""
    import hiresdiff.outputs as outputs

    real = outputs.next_free_index
    calls = []

    def stale_look(out: Path) -> int:
        calls.append(out)
        return 0 if len(calls) == 1 else real(out)

    save_png(Image.new("RGB", (2, 2)), tmp_path / "000-other-seed0.png", {"other": True})
    monkeypatch.setattr(outputs, "next_free_index", stale_look)
    written = save_numbered(tmp_path, [NumberedImage("mine-seed0", Image.new("RGB", (2, 2)), {"other": False})])
    assert [p.name for p in written] == ["001-mine-seed0.png"]
    assert read_png_settings(tmp_path / "000-other-seed0.png") == {"other": True}


def test_exclusive_save_never_replaces_a_file(tmp_path: Path) -> None:
    target = tmp_path / "x.png"
    save_png(Image.new("RGB", (2, 2), "red"), target, {"v": 1})
    with pytest.raises(FileExistsError):
        save_png(Image.new("RGB", (2, 2), "blue"), target, {"v": 2}, exclusive=True)
    assert read_png_settings(target) == {"v": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.png"]  # no temporary file left


def test_exclusive_save_without_hard_links(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """File systems without hard links: the exclusive placeholder path keeps the no-overwrite promise."""
    import errno

    import hiresdiff.images as images

    def no_links(src: str, dst: Path) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(images.os, "link", no_links)
    target = tmp_path / "x.png"
    save_png(Image.new("RGB", (2, 2), "red"), target, {"v": 1}, exclusive=True)
    assert read_png_settings(target) == {"v": 1}
    with pytest.raises(FileExistsError):
        save_png(Image.new("RGB", (2, 2), "blue"), target, {"v": 2}, exclusive=True)
    assert read_png_settings(target) == {"v": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.png"]
