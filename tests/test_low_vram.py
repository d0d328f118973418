"""Low-VRAM mode (issue #7 lever): text encoders and VAE wait on the CPU and are moved in only while they run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from hiresdiff.cli import main
from hiresdiff.config import LOW_VRAM_DEFAULTS
from hiresdiff.images import read_png_settings
from hiresdiff.pipeline import HiresPipeline, build_request


def spy_moves(monkeypatch: pytest.MonkeyPatch, pipe: Any, names: tuple[str, ...]) -> list[tuple[str, str]]:
    """Record ``(module name, target)`` of every ``.to(device)`` call on the named pipeline modules."""
    moves: list[tuple[str, str]] = []
    for name in names:
        module = getattr(pipe, name)
        original = module.to

        def to(*args: Any, _name: str = name, _original: Any = original, **kwargs: Any) -> Any:
            moves.append((_name, str(args[0] if args else kwargs.get("device"))))
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, "to", to)
    return moves


def test_low_vram_defaults_and_explicit_values_win() -> None:
    req = build_request("a cat", "direct", 512, 512, low_vram=True)
    assert req.settings.low_vram and req.settings.max_batch == LOW_VRAM_DEFAULTS["max_batch"] == 2
    assert req.settings.decode_tile_area == LOW_VRAM_DEFAULTS["decode_tile_area"] == 1024 * 1024
    req = build_request("a cat", "direct", 512, 512, low_vram=True, max_batch=6, decode_tile_area=0)
    assert (req.settings.max_batch, req.settings.decode_tile_area) == (6, 0)
    plain = build_request("a cat", "direct", 512, 512)
    assert not plain.settings.low_vram and plain.settings.max_batch == 8


def test_modules_are_borrowed_only_while_they_run(tiny_sdxl_pipe: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    names = ("text_encoder", "text_encoder_2", "vae")
    moves = spy_moves(monkeypatch, tiny_sdxl_pipe, names)
    hp = HiresPipeline.from_pipe(tiny_sdxl_pipe, "tiny-sdxl")
    kw = {"steps": 2, "seed": 1, "progress": False, "previews": False, "max_batch": 8, "decode_tile_area": None}
    plain = hp("a cat", "direct", 256, 256, **kw)
    assert moves == []  # the mode is off and unchanged: the caller's placement is left alone
    low = hp("a cat", "direct", 256, 256, low_vram=True, **kw)
    home = [(n, "cpu") for n in names]
    borrow_text = [("text_encoder", "cpu"), ("text_encoder_2", "cpu")] * 2  # to the denoiser's device and back
    assert moves == home + borrow_text + [("vae", "cpu"), ("vae", "cpu")]
    assert torch.equal(low.latents, plain.latents)
    assert low.images[0].tobytes() == plain.images[0].tobytes()
    moves.clear()
    hp("a cat", "direct", 256, 256, **kw)  # off again: everything back on the denoiser's device, once
    assert moves[: len(names)] == [(n, str(hp.adapter.device)) for n in names] and len(moves) == len(names)


def test_flux_t5_is_borrowed(tiny_flux: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    moves = spy_moves(monkeypatch, tiny_flux, ("text_encoder_2",))
    hp = HiresPipeline.from_pipe(tiny_flux, "tiny-flux")
    hp("a cat", "direct", 256, 256, steps=1, guidance=3.5, progress=False, previews=False, low_vram=True)
    assert [m[0] for m in moves] == ["text_encoder_2"] * 3  # home, borrowed, returned
    hp.adapter.set_offload(False)


def test_cli_low_vram(tmp_path: Path) -> None:
    out = tmp_path / "out"
    argv = ["generate", "a cat", "--model", "tiny-sd", "--method", "demofusion", "--width", "256", "--height", "256"]
    assert main([*argv, "--steps", "2", "--low-vram", "--no-previews", "--quiet", "--out", str(out)]) == 0
    meta = read_png_settings(next(out.glob("*.png")))
    assert meta["max_batch"] == 2 and meta["decode_tile_area"] == 1024 * 1024
