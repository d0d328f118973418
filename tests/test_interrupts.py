"""Ctrl-C during ``bench`` and ``eval``: exit 130, no traceback, no partial files, one line on what was finished;
a second bench run resumes (``generate``: tests/test_reliability.py)."""

from __future__ import annotations

import gc
import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import hiresdiff.bench.runner as runner_mod
import hiresdiff.images as images_mod
from hiresdiff.bench import claims
from hiresdiff.cli import main
from hiresdiff.evaluation.extractors import Extractors
from hiresdiff.images import save_png

GROUP = "direct_256x256"
RESUME = "run the same command again to resume"
BENCH_LINE = re.compile(rf"hiresdiff: interrupted; (\d) of 4 item\(s\) finished; {RESUME}")
EVAL_AGAIN = "run the same command again to score"


def bench_args(tmp_path: Path, out: Path) -> list[str]:
    """A tiny benchmark of 2 prompts × 2 seeds (4 items) in one group."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red fox\na lighthouse\n")
    argv = ["bench", "--model", "tiny-sd", "--steps", "2", "--methods", "direct", "--prompts", str(prompts)]
    return [*argv, "--seeds", "0,1", "--no-flops", "--sheets", "0", "--out", str(out)]


def interrupted_line(err: str) -> str:
    """The one ``hiresdiff: interrupted`` line of ``err`` (its last line), with no traceback."""
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert [line for line in lines if "interrupted" in line] == lines[-1:], err
    return lines[-1]


def _orphan(path: Path) -> bool:
    """An item's PNG without its JSON record, or the other way round."""
    partner = {".png": ".json", ".json": ".png"}.get(path.suffix)
    return path.name.startswith("p0") and partner is not None and not path.with_suffix(partner).is_file()


def leftovers(out: Path) -> list[str]:
    """Temporary, empty, claim and orphan files in ``out``."""
    return sorted(
        p.name
        for p in out.rglob("*")
        if p.is_file() and (p.suffix == ".tmp" or ".claim" in p.name or p.stat().st_size == 0 or _orphan(p))
    )


def stamps(out: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in out.glob("images/*/p*")}


def records(out: Path) -> dict[str, dict]:
    return {r["id"]: r for r in (json.loads(p.read_text()) for p in out.glob("images/*/p*.json"))}


def check_resume(tmp_path: Path, out: Path, finished: int, capsys: pytest.CaptureFixture[str]) -> None:
    """Leftovers none, plan intact; a second run makes exactly the missing items and touches no finished one."""
    assert leftovers(out) == []
    plan = (out / "plan.json").read_bytes()
    assert json.loads(plan)["items"] == 4 and len(records(out)) == finished
    before, done = stamps(out), set(records(out))
    capsys.readouterr()
    assert main(bench_args(tmp_path, out)) == 0
    made = re.findall(r"\] (\S+) \d", capsys.readouterr().out)
    every = {f"{GROUP}/p000{p}-s{s}" for p in (0, 1) for s in (0, 1)}
    assert sorted(made) == sorted(every - done) and set(records(out)) == every
    assert all(p.stat().st_mtime_ns == t for p, t in before.items())
    assert (out / "plan.json").read_bytes() == plan and leftovers(out) == []


# ------------------------------------------------------------------------------------------------------ bench


def test_bench_ctrl_c_while_denoising_the_second_item(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real, calls = runner_mod.timed_run, []

    def timed_run(*args: object) -> object:
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(runner_mod, "timed_run", timed_run)
    out = tmp_path / "bench"
    assert main(bench_args(tmp_path, out)) == 130
    line = interrupted_line(capsys.readouterr().err)
    assert line == f"hiresdiff: interrupted; 1 of 4 item(s) finished; {RESUME}"
    assert not (out / "report.md").exists()
    monkeypatch.setattr(runner_mod, "timed_run", real)
    check_resume(tmp_path, out, 1, capsys)


def test_bench_ctrl_c_between_an_image_and_its_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real = images_mod.os.replace

    def replace(src: str, dst: str | Path) -> None:
        if Path(dst).name == "p0000-s1.json":  # the second record: written to its temporary file, not yet in place
            raise KeyboardInterrupt
        real(src, dst)

    monkeypatch.setattr(images_mod.os, "replace", replace)
    out = tmp_path / "bench"
    assert main(bench_args(tmp_path, out)) == 130
    assert BENCH_LINE.fullmatch(interrupted_line(capsys.readouterr().err))[1] == "1"  # type: ignore[index]
    assert sorted(p.name for p in (out / "images" / GROUP).iterdir()) == ["p0000-s0.json", "p0000-s0.png"]
    monkeypatch.setattr(images_mod.os, "replace", real)
    check_resume(tmp_path, out, 1, capsys)


def test_bench_ctrl_c_while_loading_the_model_leaves_no_claim(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def load(*args: object) -> None:
        raise KeyboardInterrupt  # the first item is claimed by then

    monkeypatch.setattr(runner_mod, "load", load)
    out = tmp_path / "bench"
    assert main(bench_args(tmp_path, out)) == 130
    assert interrupted_line(capsys.readouterr().err) == f"hiresdiff: interrupted; 0 of 4 item(s) finished; {RESUME}"
    assert [p.name for p in out.rglob("*") if p.is_file()] == ["plan.json"]
    monkeypatch.undo()
    check_resume(tmp_path, out, 0, capsys)


def test_bench_real_sigint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A real SIGINT to a bench process once its first image is made."""
    out = tmp_path / "bench"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "hiresdiff", *bench_args(tmp_path, out)],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("[1/4]"):
            proc.send_signal(signal.SIGINT)
            break
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    match = BENCH_LINE.fullmatch(interrupted_line(err))
    assert match is not None and 1 <= int(match[1]) < 4, err
    check_resume(tmp_path, out, int(match[1]), capsys)


# ------------------------------------------------------------------------------------------------------- eval


class InterruptedInception(nn.Module):
    """A stand-in for Inception (uint8 images → 4 features, 3 logits) whose second batch is interrupted."""

    def __init__(self) -> None:
        super().__init__()
        self.batches = 0

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.batches += 1
        if self.batches == 2:
            raise KeyboardInterrupt
        f = x.float().mean((2, 3)) / 255
        features = torch.cat([f, f**2], dim=1)[:, :4]
        return features, features[:, :3]


@pytest.fixture
def images(tmp_path: Path) -> Path:
    """Six small hiresdiff PNGs."""
    folder = tmp_path / "gen"
    rng = np.random.default_rng(0)
    for i in range(6):
        arr = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        save_png(Image.fromarray(arr), folder / f"{i:03d}.png", {"prompt": f"photo {i}", "model": "tiny-sd"})
    return folder


@pytest.fixture
def tiny_networks(monkeypatch: pytest.MonkeyPatch) -> InterruptedInception:
    net = InterruptedInception()
    monkeypatch.setattr(
        "hiresdiff.evaluation.evaluator.complete_extractors",
        lambda given, *a, **k: Extractors(inception=net, input_size=16),
    )
    return net


def eval_args(images: Path, json_path: Path) -> list[str]:
    return ["eval", str(images), "--metrics", "is", "--batch-size", "2", "--workers", "2", "--json", str(json_path)]


def no_eval_threads() -> bool:
    gc.collect()
    return not [t for t in threading.enumerate() if t.name.startswith("hiresdiff-eval")]


def test_eval_ctrl_c_after_the_first_batch_writes_nothing(
    tmp_path: Path, images: Path, tiny_networks: InterruptedInception, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "scores" / "metrics.json"
    target.parent.mkdir()
    assert main([*eval_args(images, target), "--quiet"]) == 130
    captured = capsys.readouterr()
    assert interrupted_line(captured.err) == f"hiresdiff: interrupted; nothing written; {EVAL_AGAIN}"
    assert tiny_networks.batches == 2 and captured.out == ""
    assert list(target.parent.iterdir()) == [] and no_eval_threads()


def test_eval_ctrl_c_keeps_an_earlier_json(
    tmp_path: Path, images: Path, tiny_networks: InterruptedInception, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "metrics.json"
    target.write_text('{"metrics": {"is": 1.5}}\n')
    assert main([*eval_args(images, target), "--quiet"]) == 130
    line = interrupted_line(capsys.readouterr().err)
    assert line == f"hiresdiff: interrupted; nothing written; {str(target)!r} is as it was; {EVAL_AGAIN}"
    assert target.read_text() == '{"metrics": {"is": 1.5}}\n' and not list(tmp_path.glob(".*.tmp"))


def test_eval_ctrl_c_while_writing_the_json(
    tmp_path: Path,
    images: Path,
    tiny_networks: InterruptedInception,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    tiny_networks.batches = 10  # no interrupt while scoring
    target = tmp_path / "metrics.json"
    target.write_text("{}\n")
    real = images_mod.os.replace

    def replace(src: str, dst: str | Path) -> None:
        if Path(dst) == target:
            raise KeyboardInterrupt
        real(src, dst)

    monkeypatch.setattr(images_mod.os, "replace", replace)
    assert main([*eval_args(images, target), "--quiet"]) == 130
    captured = capsys.readouterr()
    expected = f"hiresdiff: interrupted; scores printed above, not written; {str(target)!r} is as it was; {EVAL_AGAIN}"
    assert interrupted_line(captured.err) == expected and "is " in captured.out
    assert target.read_text() == "{}\n" and sorted(p.name for p in tmp_path.iterdir()) == ["gen", "metrics.json"]


def test_ctrl_c_while_a_claim_is_made_leaves_no_claim(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGINT right after the claim file is created: held back until the claim is registered, then released."""
    real = claims.os.open

    def opening(*args: object) -> int:
        monkeypatch.setattr(claims.os, "open", real)
        fd = real(*args)  # type: ignore[arg-type]
        signal.raise_signal(signal.SIGINT)
        return fd

    monkeypatch.setattr(claims.os, "open", opening)
    path, held = tmp_path / "x.claim", []
    with pytest.raises(KeyboardInterrupt):
        try:
            claims.claim(path, claims.Owner.this_process(), held)
        finally:
            claims.release(held)
    assert list(tmp_path.iterdir()) == [] and held == []


def test_bench_full_disk_keeps_earlier_items_and_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real = images_mod.os.replace

    def replace(src: str, dst: str | Path) -> None:
        if Path(dst).name == "p0000-s1.png":  # the second item's image: written to its temporary file, not placed
            raise OSError(28, "No space left on device")
        real(src, dst)

    monkeypatch.setattr(images_mod.os, "replace", replace)
    out = tmp_path / "bench"
    assert main(bench_args(tmp_path, out)) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert err.startswith("hiresdiff: ") and "cannot write " in err and "p0000-s1.png" in err
    assert err.endswith(f"No space left on device; 1 of 4 item(s) finished; {RESUME}")
    assert sorted(p.name for p in (out / "images" / GROUP).iterdir()) == ["p0000-s0.json", "p0000-s0.png"]
    monkeypatch.setattr(images_mod.os, "replace", real)
    check_resume(tmp_path, out, 1, capsys)
