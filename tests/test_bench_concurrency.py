"""Several ``hiresdiff bench`` runs on one ``--out``: per-item claims share the work, each image is made once."""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hiresdiff.bench import claims
from hiresdiff.bench.claims import Claim, Owner, claim, holding
from hiresdiff.cli import main

HOST = socket.gethostname()
GROUP = "direct_256x256"
MADE_BY = {"host": HOST, "process_index": 0, "num_processes": 1}
#: a child bench process: it logs every image it saves, meets the other child before its first image (both hold a
#: claim by then) and takes a little longer per image, so that the two runs overlap
CHILD = """
import os, sys, time
from pathlib import Path
import hiresdiff.bench.runner as runner
from hiresdiff.cli import main

meet, log = Path(sys.argv[1]), Path(sys.argv[2])
real_run, real_save = runner.timed_run, runner.save_png

def timed_run(*args):
    (meet / str(os.getpid())).touch()
    deadline = time.monotonic() + 60
    while len(list(meet.iterdir())) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    result = real_run(*args)
    time.sleep(0.3)
    return result

def save_png(image, path, settings=None):
    with open(log, "a") as f:
        f.write(f"{os.getpid()} {path.parent.name}/{path.stem}\\n")
    return real_save(image, path, settings)

runner.timed_run, runner.save_png = timed_run, save_png
sys.exit(main(sys.argv[3:]))
"""


def bench_args(tmp_path: Path, out: Path, prompts: int = 2) -> list[str]:
    """A tiny benchmark of ``prompts`` × 2 seeds of one group."""
    path = tmp_path / "prompts.txt"
    path.write_text("".join(f"prompt {i}\n" for i in range(prompts)))
    argv = ["bench", "--model", "tiny-sd", "--steps", "2", "--methods", "direct", "--prompts", str(path)]
    return [*argv, "--seeds", "0,1", "--no-flops", "--sheets", "0", "--quiet", "--out", str(out)]


def records(out: Path) -> dict[str, dict]:
    loaded = [json.loads(p.read_text()) for p in out.glob("images/*/p*.json")]
    return {r["id"]: r for r in loaded}


def claim_files(out: Path) -> list[Path]:
    return sorted(out.rglob("*.claim*"))


def write_claim(path: Path, pid: int, host: str = HOST, age_s: float = 0.0) -> bytes:
    """A claim file as another process would leave it, ``age_s`` seconds old."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = json.dumps({"pid": pid, "host": host, "started": time.time() - age_s}).encode()
    path.write_bytes(data)
    if age_s:
        stamp = time.time() - age_s
        os.utime(path, (stamp, stamp))
    return data


def dead_pid() -> int:
    """The pid of a process that has exited (and been waited for)."""
    proc = subprocess.Popen(["sleep", "0"])
    proc.wait()
    return proc.pid


@pytest.fixture
def live_pid() -> Iterator[int]:
    """The pid of a live helper process (killed at the end)."""
    proc = subprocess.Popen(["sleep", "30"])
    yield proc.pid
    proc.kill()
    proc.wait()


def test_two_runs_on_one_out_make_every_item_once(tmp_path: Path) -> None:
    out, meet, log = tmp_path / "bench", tmp_path / "meet", tmp_path / "saved.log"
    meet.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("WORLD_SIZE", None)
    argv = [str(meet), str(log), *bench_args(tmp_path, out, prompts=3)]
    procs = [
        subprocess.Popen([sys.executable, "-c", CHILD, *argv], env=env, cwd=tmp_path, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    errs = [p.communicate(timeout=240)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    saved = [line.split() for line in log.read_text().splitlines()]
    found = records(out)
    assert len(found) == 6 and sorted(item for _, item in saved) == sorted(found)  # no image saved twice
    pids = {p.pid for p in procs}
    assert {int(pid) for pid, _ in saved} == pids  # both runs did part of the work
    assert all(found[item]["made_by"] == {**MADE_BY, "pid": int(pid)} for pid, item in saved)
    assert claim_files(out) == [] and not list(out.rglob("*.tmp"))
    with open(out / "report.csv", newline="") as f:
        (row,) = csv.DictReader(f)
    assert row["images"] == row["planned"] == "6"  # the run finishing last reported every image
    assert {f"pid {pid} on host {HOST}" for pid in pids} == set(row["made_by"].split("; "))
    md = (out / "report.md").read_text()
    assert "- images: 6 of 6" in md and all(f"pid {pid} on host {HOST} (" in md for pid in pids)


def test_stale_claim_of_a_dead_process_is_taken_over(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    write_claim(out / "images" / GROUP / "p0000-s0.claim", dead_pid())
    assert main(bench_args(tmp_path, out)) == 0
    found = records(out)
    assert len(found) == 4 and {r["made_by"]["pid"] for r in found.values()} == {os.getpid()}
    assert found[f"{GROUP}/p0000-s0"]["made_by"] == {**MADE_BY, "pid": os.getpid()}
    assert claim_files(out) == []


def test_live_claim_is_left_to_its_process(
    tmp_path: Path, live_pid: int, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "bench"
    held = out / "images" / GROUP / "p0000-s0.claim"
    data = write_claim(held, live_pid)
    assert main(bench_args(tmp_path, out)) == 0
    err = capsys.readouterr().err
    assert f"hiresdiff bench: 1 item(s) left to another run (pid {live_pid} on host {HOST})\n" in err
    assert sorted(records(out)) == [f"{GROUP}/p0000-s1", f"{GROUP}/p0001-s0", f"{GROUP}/p0001-s1"]
    assert held.read_bytes() == data and claim_files(out) == [held]  # untouched, and ours are gone
    assert "- images: 3 of 4" in (out / "report.md").read_text()
    # a claim of another host is respected too, until it is older than the stale limit
    write_claim(held, live_pid, host="elsewhere")
    assert main(bench_args(tmp_path, out)) == 0
    assert f"1 item(s) left to another run (pid {live_pid} on host elsewhere)" in capsys.readouterr().err
    assert len(records(out)) == 3
    write_claim(held, live_pid, host="elsewhere", age_s=claims.STALE_AFTER_S + 60)
    assert main(bench_args(tmp_path, out)) == 0
    assert len(records(out)) == 4 and claim_files(out) == []
    assert "- images: 4 of 4" in (out / "report.md").read_text()


@pytest.mark.parametrize(
    ("host", "age_s", "taken"),
    [
        ("elsewhere", 0.0, False),
        ("elsewhere", claims.STALE_AFTER_S + 1, True),
        (HOST, 0.0, True),  # the pid is dead
    ],
)
def test_stale_rules(tmp_path: Path, host: str, age_s: float, taken: bool) -> None:
    path = tmp_path / "x.claim"
    write_claim(path, dead_pid(), host=host, age_s=age_s)
    got = claim(path, Owner.this_process(), [])
    assert isinstance(got, Claim) is taken
    if not taken:
        assert got == Owner.from_dict(json.loads(path.read_bytes()))


@pytest.mark.parametrize(("age_s", "taken"), [(0.0, False), (claims.UNREADABLE_AFTER_S + 5, True)])
def test_unreadable_claim_is_stale_only_when_old(tmp_path: Path, age_s: float, taken: bool) -> None:
    path = tmp_path / "x.claim"
    path.write_bytes(b"")  # its process was killed between creating and writing it
    stamp = time.time() - age_s
    os.utime(path, (stamp, stamp))
    got = claim(path, Owner.this_process(), [])
    assert isinstance(got, Claim) is taken
    assert taken or str(got) == "a process still writing its claim"


def test_two_takers_of_one_stale_claim_never_both_win(tmp_path: Path, live_pid: int) -> None:
    path = tmp_path / "x.claim"
    write_claim(path, dead_pid())
    late = claims._read(path)  # a second taker read the stale claim, then the first one took it over
    first = claim(path, Owner(os.getpid(), HOST), [])
    assert isinstance(first, Claim)
    assert late is not None
    claims._take_over(path, late)  # the late takeover moves the fresh claim aside, sees it is not the stale one
    assert path.read_bytes() == first.data and sorted(tmp_path.iterdir()) == [path]
    assert claim(path, Owner(live_pid, HOST), []) == Owner.from_dict(json.loads(first.data))
    first.release()
    assert list(tmp_path.iterdir()) == []


def test_report_claim_waits_for_a_live_holder_then_goes_ahead(
    tmp_path: Path, live_pid: int, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "report.claim"
    data = write_claim(path, live_pid)
    begin = time.monotonic()
    with holding(path, Owner.this_process(), timeout_s=0.3, poll_s=0.05):
        ran = time.monotonic() - begin
    assert ran >= 0.3 and path.read_bytes() == data
    assert f"pid {live_pid} on host {HOST} still holds" in capsys.readouterr().err
    path.unlink()
    with holding(path, Owner.this_process()):
        assert path.is_file()
    assert not path.exists()
