"""``hidiffusion=true``: HiDiffusion as a switch on other methods' first phase (issue 23 item 4)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from hiresdiff.errors import HiresError
from hiresdiff.patches.context import active_signature

KW: dict[str, Any] = {"steps": 4, "progress": False, "previews": False, "seed": 2}


def test_direct_with_the_switch_is_hidiffusion_bitwise(sdxl: Any, tmp_path: Path) -> None:
    plain = sdxl(["a cat", "a dog"], "direct", 512, 512, **KW).latents
    switched = sdxl(["a cat", "a dog"], "direct", 512, 512, hidiffusion=True, **KW)
    method = sdxl(["a cat", "a dog"], "hidiffusion", 512, 512, **KW).latents
    assert torch.equal(switched.latents, method) and not torch.allclose(switched.latents, plain)
    assert switched.metadata[0]["hidiffusion"] is True
    source = tmp_path / "in.png"
    Image.new("RGB", (256, 256), (200, 120, 40)).save(source)
    edit = {**KW, "image": str(source), "strength": 0.75}
    a = sdxl("a cat", "direct", 512, 512, hidiffusion=True, **edit).latents
    assert torch.equal(a, sdxl("a cat", "hidiffusion", 512, 512, **edit).latents)  # SDEdit path too


def test_first_phase_of_a_progressive_method_only(sdxl: Any) -> None:
    """DemoFusion's native-size phase runs with HiDiffusion's patches installed, its later phases without them."""
    seen: dict[str, set[bool]] = {}

    def record(phase: str, step: int, total: int) -> None:
        seen.setdefault(phase, set()).add(bool(active_signature()))

    sdxl("a cat", "demofusion", 512, 512, hidiffusion=True, callback=record, **KW)
    phases = list(seen)
    assert len(phases) >= 2
    assert seen[phases[0]] == {True} and all(seen[p] == {False} for p in phases[1:])
    off = sdxl("a cat", "demofusion", 512, 512, **{**KW, "previews": True})
    on = sdxl("a cat", "demofusion", 512, 512, hidiffusion=True, **{**KW, "previews": True})
    assert on.previews[0][0].tobytes() != off.previews[0][0].tobytes()


def test_switch_on_hidiffusion_itself_is_refused_in_one_line(sdxl: Any) -> None:
    with pytest.raises(HiresError, match="already") as err:
        sdxl("a cat", "hidiffusion", 512, 512, hidiffusion=True, **KW)
    assert "\n" not in str(err.value)


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hiresdiff", *args], capture_output=True, text=True, timeout=300, check=False
    )


def test_cli_png_round_trip_and_flux_refusal(tmp_path: Path) -> None:
    base = ["generate", "x", "--model", "tiny-sdxl", "--method", "direct", "--width", "512", "--height", "512"]
    res = cli(*base, "--steps", "3", "--set", "hidiffusion=true", "--quiet", "--out", str(tmp_path / "a"))
    assert res.returncode == 0, res.stderr
    (first,) = sorted((tmp_path / "a").glob("*.png"))
    res = cli("generate", "--from-png", str(first), "--quiet", "--out", str(tmp_path / "b"))
    assert res.returncode == 0, res.stderr
    (again,) = sorted((tmp_path / "b").glob("*.png"))
    assert Image.open(first).tobytes() == Image.open(again).tobytes()
    assert json.loads(Image.open(again).info["hiresdiff"])["hidiffusion"] is True
    res = cli("generate", "x", "--model", "tiny-flux", "--steps", "2", "--set", "hidiffusion=true", "--quiet")
    assert res.returncode == 2 and res.stderr.startswith("hiresdiff: error:") and res.stderr.strip().count("\n") == 0
    assert "hidiffusion" in res.stderr


def test_cost_of_the_switch_is_hidiffusion_s() -> None:
    from hiresdiff.cost.model import model_cost

    switched = model_cost("direct", "tiny-sdxl", 512, 512, steps=4, hidiffusion=True)
    assert switched.denoiser_flops == model_cost("hidiffusion", "tiny-sdxl", 512, 512, steps=4).denoiser_flops
    assert switched.denoiser_flops < model_cost("direct", "tiny-sdxl", 512, 512, steps=4).denoiser_flops
