"""benchmarks/gpu_bench.py (issue #7): records, resume, validation — on the CPU with a tiny model; and bf16 on CUDA."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
FIELDS = {
    "method", "preset", "model", "width", "height", "dtype", "device", "torch", "wall_s", "peak_mem_gb",
    "model_flops", "matmul_tflops", "achieved_tflops", "mfu", "flop_bound_s",
}  # fmt: skip


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_bench", ROOT / "benchmarks" / "gpu_bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_records_resume_and_flops(tmp_path, capsys):
    bench = load_script()
    argv = ["--model", "tiny-sd", "--methods", "direct,apt:apt-sas", "--sizes", "256x256", "--dtype", "float32",
            "--device", "cpu", "--steps", "2", "--matmul", "64", "--set", "shortcut_steps=1",
            "--out", str(tmp_path)]  # fmt: skip
    assert bench.main(argv) == 0
    (path,) = tmp_path.glob("*.json")
    records = json.loads(path.read_text())
    assert [(r["method"], r["preset"]) for r in records] == [("direct", None), ("apt", "apt-sas")]
    from hiresdiff.cost import model_cost

    for r in records:
        assert r.keys() >= FIELDS and r["peak_mem_gb"] is None and r["wall_s"] > 0
        assert r["mfu"] == pytest.approx(r["model_flops"] / r["wall_s"] / 1e12 / r["matmul_tflops"])
        parts = (r["denoiser_s"], r["vae_s"], r["text_s"])
        assert all(p > 0 for p in parts) and sum(parts) < r["wall_s"]  # every part timed, each inside the run
    report = model_cost("apt", "tiny-sd", 256, 256, preset="apt-sas", steps=2, shortcut_steps=1)
    apt = records[1]
    assert apt["model_flops"] == report.model_flops
    rate = report.denoiser_flops / apt["denoiser_s"] / 1e12
    assert apt["denoiser_mfu"] == pytest.approx(rate / apt["matmul_tflops"])
    assert apt["vae_tflops"] == pytest.approx(report.vae_flops / apt["vae_s"] / 1e12)
    capsys.readouterr()
    assert bench.main(argv) == 0  # everything recorded: nothing is run again
    assert "256×256" not in capsys.readouterr().out
    assert json.loads(path.read_text()) == records
    later = tmp_path / "later"  # another day's folder: --done names the earlier records, nothing runs again
    assert bench.main([*argv, "--out", str(later), "--done", str(tmp_path)]) == 0
    assert "256×256" not in capsys.readouterr().out and not later.exists()
    assert bench.main([*argv, "--set", "low_vram=true"]) == 0  # another setting: new runs
    low = json.loads(path.read_text())[2:]
    assert [(r["method"], r["max_batch"]) for r in low] == [("direct", 1), ("apt", 1)]
    assert low[0]["params"] == {"shortcut_steps": "1", "low_vram": "true"}
    assert records[0]["max_batch"] == 8


def test_bad_runs_are_refused_before_loading(tmp_path, capsys, monkeypatch):
    bench = load_script()

    def no_load(*args, **kwargs):
        raise AssertionError("model loaded before validation")

    monkeypatch.setattr(bench.HiresPipeline, "from_model", no_load)
    base = ["--model", "tiny-sd", "--device", "cpu", "--out", str(tmp_path)]
    assert bench.main([*base, "--methods", "nope", "--sizes", "256x256"]) == 2
    assert "unknown method" in capsys.readouterr().err
    assert bench.main([*base, "--methods", "direct", "--sizes", "250x250"]) == 2
    assert "latent grid" in capsys.readouterr().err
    assert bench.main([*base, "--methods", "direct", "--sizes", "2x", "--set", "sigmaa=0.5"]) == 2
    assert "--set sigmaa: no method in --methods takes it" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bf16_matches_fp32_on_cuda():
    from hiresdiff import generate

    images = {
        dtype: generate("a cat", "demofusion", "tiny-sdxl", 512, 512, dtype=dtype, device="cuda", steps=4,
                        progress=False, previews=False).images[0]
        for dtype in ("float32", "bfloat16")
    }  # fmt: skip
    import numpy as np

    a, b = (np.asarray(images[d], dtype=np.float32) / 255 for d in ("float32", "bfloat16"))
    assert np.abs(a - b).mean() < 0.05


def test_card_settles_as_the_plan_and_records_the_estimate(tmp_path, capsys, monkeypatch):
    """``--card``: max_batch and tiling settled as generate's plan on such a card; the record holds that estimate;
    ``--plan-only`` prints the same plan without loading a model."""
    bench = load_script()
    from hiresdiff.memory import CARD_CONTEXT, GIB
    from hiresdiff.pipeline import build_request
    from hiresdiff.plan import budget_for

    argv = ["--model", "tiny-sd", "--methods", "demofusion", "--sizes", "256x256", "--dtype", "float32",
            "--device", "cpu", "--steps", "2", "--matmul", "64", "--card", "12", "--previews",
            "--out", str(tmp_path)]  # fmt: skip
    req = build_request(bench.PROMPT, "demofusion", 256, 256, seed=0, steps=2, previews=True)
    plan = budget_for(req, "tiny-sd", "cpu", torch.float32, 12 * GIB - CARD_CONTEXT)
    real = bench.HiresPipeline.from_model

    def no_load(*args, **kwargs):
        raise AssertionError("--plan-only loaded a model")

    monkeypatch.setattr(bench.HiresPipeline, "from_model", no_load)
    assert bench.main([*argv, "--plan-only"]) == 0
    assert f"max_batch {req.settings.max_batch}" in capsys.readouterr().out
    assert not list(tmp_path.glob("*.json"))
    monkeypatch.setattr(bench.HiresPipeline, "from_model", real)
    assert bench.main(argv) == 0
    (record,) = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert record["card"] == 12 and record["previews"] is True and record["max_batch"] == req.settings.max_batch
    assert record["estimated_peak_gb"] == plan.estimate.peak / GIB
    assert record["estimate_setter"] == plan.estimate.largest and record["model_flops"] == plan.report.model_flops
    assert record["decode_tile_area"] == req.settings.decode_tile_area
    assert record["measured_over_estimated"] is None and record["peak_reserved_gb"] is None  # no CUDA here
    assert bench.main(argv) == 0 and len(json.loads(next(tmp_path.glob("*.json")).read_text())) == 1  # resumed
    assert bench.main([*argv, "--max-batch", "2"]) == 2
    assert "give one of --card, --max-batch" in capsys.readouterr().err


def test_a_failed_run_is_recorded_and_retried_and_the_deadline_stops_new_runs(tmp_path, capsys, monkeypatch):
    bench = load_script()
    argv = ["--model", "tiny-sd", "--methods", "direct,multidiffusion", "--sizes", "256x256", "--dtype", "float32",
            "--device", "cpu", "--steps", "2", "--matmul", "64", "--out", str(tmp_path)]  # fmt: skip
    real = bench.timed_run
    calls = []

    def failing(pipe, req):
        calls.append(req.method.name)
        if req.method.name == "direct" and req.settings.width == 256:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail")
        return real(pipe, req)

    monkeypatch.setattr(bench, "timed_run", failing)
    assert bench.main(argv) == 0
    out = capsys.readouterr().out
    assert "direct 256×256: failed: RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB" in out
    path = next(tmp_path.glob("*.json"))
    failed, done = json.loads(path.read_text())
    assert failed["error"].startswith("RuntimeError: CUDA out of memory") and "wall_s" not in failed
    assert failed["estimated_peak_gb"] > 0 and done["method"] == "multidiffusion" and "error" not in done
    calls.clear()
    monkeypatch.setattr(bench, "timed_run", real)
    assert bench.main([*argv, "--deadline", "0"]) == 0  # the failed run would be retried, but no run starts
    assert "direct 256×256: not started (--deadline 0 s passed)" in capsys.readouterr().out
    assert bench.main(argv) == 0  # retried: the error record stays beside the new one
    records = json.loads(path.read_text())
    expected = [(True, "direct"), (False, "multidiffusion"), (False, "direct")]
    assert [("error" in r, r["method"]) for r in records] == expected
