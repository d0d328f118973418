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
    expected = model_cost("apt", "tiny-sd", 256, 256, preset="apt-sas", steps=2, shortcut_steps=1).model_flops
    assert records[1]["model_flops"] == expected
    capsys.readouterr()
    assert bench.main(argv) == 0  # everything recorded: nothing is run again
    assert "256×256" not in capsys.readouterr().out
    assert json.loads(path.read_text()) == records
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
