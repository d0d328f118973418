"""View-parallel denoising over torch.distributed (gloo, 2 CPU processes): identical latents, balanced calls,
one-line errors for mismatched ranks and a lost peer."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from hiresdiff.parallel import Serial, ViewParallel

#: method → (width, height, extra settings) of the runs compared (small: 2 CPU processes share 2 cores)
CASES = {
    "demofusion": (512, 512, {}),
    "apt": (512, 384, {"preset": "apt"}),
    "accdiffusion": (512, 512, {}),
    "multidiffusion": (512, 384, {}),
    "scalediff": (512, 512, {"query_shift": True}),
}
COMMON = {"steps": 3, "seed": 7, "previews": False, "progress": False, "max_batch": 4}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str, mode: str) -> None:
    import torch.distributed as dist

    from hiresdiff import HiresPipeline
    from hiresdiff.errors import HiresError
    from hiresdiff.models.tiny import build_builtin

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    hp = HiresPipeline.from_pipe(build_builtin("tiny-sdxl"), "tiny-sdxl")
    vp = ViewParallel(rank, world)
    hp.adapter.parallel = vp
    results: dict[str, object] = {}
    try:
        if mode == "methods":
            for method, (w, h, extra) in CASES.items():
                vp.counts.clear()
                latents = hp("a red fox", method, w, h, **COMMON, **extra).latents
                results[method] = (latents, list(vp.counts))
        elif mode == "mismatch":
            try:
                hp("a red fox", "demofusion", 512, 512, **{**COMMON, "seed": 7 + rank})
            except HiresError as exc:
                results["error"] = str(exc)
        elif mode == "lost-peer":
            if rank == 1:
                os._exit(0)  # dies before the first all-reduce
            try:
                hp("a red fox", "demofusion", 512, 512, **COMMON)
            except HiresError as exc:
                results["error"] = str(exc)
        torch.save(results, Path(out) / f"rank{rank}.pt")
    finally:
        if mode != "lost-peer":
            dist.destroy_process_group()


def _spawn(tmp_path: Path, mode: str, world: int = 2) -> list[dict]:
    mp.spawn(_worker, args=(world, _free_port(), str(tmp_path), mode), nprocs=world, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(world) if (tmp_path / f"rank{r}.pt").exists()]


@pytest.fixture(scope="module")
def parallel_runs(tmp_path_factory) -> list[dict]:
    return _spawn(tmp_path_factory.mktemp("parallel"), "methods")


@pytest.mark.parametrize("method", list(CASES))
def test_two_ranks_give_the_single_process_latents(tiny_sdxl_pipe, parallel_runs, method):
    from hiresdiff import HiresPipeline

    w, h, extra = CASES[method]
    hp = HiresPipeline.from_pipe(tiny_sdxl_pipe, "tiny-sdxl")
    assert isinstance(hp.adapter.parallel, Serial)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the workers: CPU kernels reduce in a thread-count dependent order
    try:
        single = hp("a red fox", method, w, h, **COMMON, **extra).latents
    finally:
        torch.set_num_threads(threads)
    for ranks in parallel_runs:
        latents, _ = ranks[method]
        assert (latents - single).abs().max() <= 1e-6, method  # same calls, same batches: the same numbers


@pytest.mark.parametrize("method", ["demofusion", "apt", "accdiffusion", "multidiffusion"])
def test_calls_are_balanced_per_step(parallel_runs, method):
    per_rank = [ranks[method][1] for ranks in parallel_runs]
    assert len(per_rank[0]) == len(per_rank[1]) > 0
    assert all(abs(a - b) <= 1 for a, b in zip(*per_rank, strict=True))
    assert sum(per_rank[0]) > 0 and sum(per_rank[1]) > 0  # both ranks did model work


def test_ranks_with_other_settings_stop_before_model_work(tmp_path):
    results = _spawn(tmp_path, "mismatch")
    assert len(results) == 2
    for ranks in results:
        assert "ranks 1 were given other settings than rank 0" in ranks["error"] and "\n" not in ranks["error"]


def test_a_lost_peer_is_an_error_not_a_hang(tmp_path):
    _spawn(tmp_path, "lost-peer")  # rank 1 leaves right after joining; rank 0 must not wait for it forever
    result = torch.load(tmp_path / "rank0.pt")
    assert "peer rank stopped answering" in result["error"] and "\n" not in result["error"]


@pytest.mark.skipif(
    shutil.which("torchrun") is None and not (Path(sys.executable).parent / "torchrun").exists(),
    reason="torchrun not installed",
)
def test_torchrun_cli_writes_the_single_process_png_from_rank_zero(tmp_path):
    args = ["generate", "a red fox", "--model", "tiny-sdxl", "--steps", "2", "--no-previews", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread per process in both runs (same reduction order)
    single = [sys.executable, "-m", "hiresdiff", *args, "--out", str(tmp_path / "single")]
    assert subprocess.run(single, capture_output=True, text=True, timeout=300, env=env).returncode == 0
    torchrun = str(Path(sys.executable).parent / "torchrun")
    cmd = [torchrun, "--nproc_per_node", "2", "--master_port", str(_free_port()), "-m", "hiresdiff", *args]
    cmd += ["--parallel", "views", "--out", str(tmp_path / "parallel")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    name = "000-demofusion-seed0.png"
    assert (tmp_path / "parallel" / name).read_bytes() == (tmp_path / "single" / name).read_bytes()
    assert sorted(p.name for p in (tmp_path / "parallel").iterdir()) == [name]


def test_parallel_needs_a_launcher(monkeypatch, capsys):
    from hiresdiff.cli import main

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    assert main(["generate", "a", "--model", "tiny-sdxl", "--parallel", "views", "--quiet"]) == 2
    assert "torchrun --nproc_per_node" in capsys.readouterr().err


def test_gpu_bench_under_torchrun_records_one_view_parallel_run(tmp_path):
    """benchmarks/gpu_bench.py --parallel views on 2 CPU ranks: rank 0 records each run once, with ``ranks: 2``
    and the MFU taken over both devices' matmul rate."""
    import json

    torchrun = str(Path(sys.executable).parent / "torchrun")
    script = str(Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_bench.py")
    cmd = [torchrun, "--nproc_per_node", "2", "--master_port", str(_free_port()), script, "--model", "tiny-sd"]
    cmd += ["--methods", "demofusion", "--sizes", "256x256", "--dtype", "float32", "--steps", "2", "--matmul", "64"]
    cmd += ["--parallel", "views", "--out", str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    (path,) = tmp_path.glob("*.json")
    (record,) = json.loads(path.read_text())
    assert record["ranks"] == 2 and record["method"] == "demofusion"
    assert record["mfu"] == pytest.approx(
        record["model_flops"] / record["wall_s"] / 1e12 / (2 * record["matmul_tflops"])
    )
