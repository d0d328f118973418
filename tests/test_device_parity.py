"""benchmarks/device_parity.py on the CPU: the comparison and the records (device_run.py: tests/test_readme.py)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch
from PIL import Image

from hiresdiff.pipeline import GenerationResult

ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def result(latents: torch.Tensor | None, level: int) -> GenerationResult:
    return GenerationResult([Image.new("RGB", (8, 8), (level,) * 3)], [], [{}], latents)


def test_compare_flags_latents_beyond_the_tolerance():
    parity = load_script("device_parity")
    base = torch.tensor([[1.0, -4.0], [2.0, 0.5]])
    close = parity.compare(result(base, 100), result(base + 0.1, 102))
    assert abs(close["max_abs"] - 0.1) < 1e-6
    assert close["scale"] == 4.0 and abs(close["relative"] - 0.025) < 1e-6 and close["ok"] is True
    assert abs(close["image_mean_abs"] - 2 / 255) < 1e-7
    far = parity.compare(result(base, 100), result(base + 0.3, 100))
    assert far["ok"] is False and abs(far["relative"] - 0.075) < 1e-6
    assert parity.compare(result(None, 100), result(None, 101))["ok"] is True  # pixels alone (resize)
    assert parity.compare(result(None, 100), result(None, 110))["ok"] is False


def test_parity_of_the_cpu_with_itself_is_exact(tmp_path, capsys):
    """CPU against CPU: the same seed gives the same latents bit for bit (noise from CPU generators)."""
    parity = load_script("device_parity")
    argv = ["--device", "cpu", "--models", "tiny-sd", "--methods", "direct,demofusion,resize", "--steps", "2"]
    assert parity.main([*argv, "--out", str(tmp_path)]) == 0
    assert "3 of 3 runs agree" in capsys.readouterr().out
    records = json.loads(next(tmp_path.glob("parity-*.json")).read_text())
    assert [r["case"] for r in records] == ["tiny-sd direct", "tiny-sd resize", "tiny-sd demofusion"]
    assert all(r["ok"] and r["image_mean_abs"] == 0 for r in records)
    assert records[0]["max_abs"] == 0 and records[0]["scale"] > 0
