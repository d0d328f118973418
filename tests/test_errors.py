"""Every bad input gives one clear line (HiresError) before any model work."""

from __future__ import annotations

import math

import pytest

import hiresdiff
from hiresdiff.errors import HiresError
from hiresdiff.models import loading, tiny


@pytest.fixture(autouse=True)
def no_model_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if a model would be built or loaded: errors must come first."""

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("model work started before the input was rejected")

    monkeypatch.setattr(loading, "load_pipeline", forbidden)
    monkeypatch.setattr(tiny, "build_builtin", forbidden)


BASE = {"prompt": "a cat", "model": "tiny-sdxl", "width": 512, "height": 512, "steps": 2}

CASES: list[tuple[str, dict[str, object], str]] = [
    ("width off the latent grid", {"width": 500}, "not a multiple of the latent grid"),
    ("height off the latent grid", {"height": 509}, "not a multiple of the latent grid"),
    ("below native size", {"width": 128, "height": 128}, "below the model's native size"),
    ("extreme aspect ratio", {"width": 4096, "height": 64}, "too extreme"),
    ("zero steps", {"steps": 0}, "steps must be a positive integer"),
    ("negative steps", {"steps": -3}, "steps must be a positive integer"),
    ("unknown method", {"method": "demofusionn"}, "unknown method 'demofusionn'"),
    ("unknown scheduler", {"scheduler": "eulerx"}, "unknown scheduler 'eulerx'"),
    ("unknown built-in model", {"model": "tiny-foo"}, "tiny-foo"),
    ("missing local path", {"model": "/nonexistent/dir/model"}, "/nonexistent/dir/model"),
    ("hub model not cached offline", {"model": "nobody-xyz/not-a-model"}, "HF_HUB_OFFLINE"),
    ("guidance NaN", {"guidance": math.nan}, "guidance must be a finite number"),
    ("guidance negative", {"guidance": -1.0}, "guidance must be ≥ 0"),
    ("stride equal to window", {"window": 256, "stride": 256}, "stride 256 must be smaller than window 256"),
    ("stride above window", {"window": 256, "stride": 384}, "must be smaller than window"),
    ("stride ≥ default window", {"stride": 256}, "stride 256 must be smaller than window 256"),
    ("window off the grid", {"window": 260}, "window 260 px is not a multiple"),
    ("sigma zero", {"sigma": 0.0}, "sigma must be > 0"),
    ("sigma negative", {"sigma": -0.5}, "sigma must be > 0"),
    ("negative cosine exponent", {"alpha1": -1.0}, "alpha1 must be ≥ 0"),
    ("start step past the end", {"start_step": 2}, "start_step 2 must be below steps 2"),
    ("zero images per prompt", {"num_images_per_prompt": 0}, "must be ≥ 1"),
    ("zero batch budget", {"max_batch": 0}, "max_batch must be ≥ 1"),
    ("negative seed", {"seed": -4}, "seed must be an integer"),
    ("unknown method parameter", {"sigmaa": 1.0}, "has no parameter sigmaa"),
    ("unknown resize filter", {"method": "resize", "filter": "nearest"}, "unknown filter 'nearest'"),
    ("negative prompt count", {"prompt": ["a", "b", "c"], "negative_prompt": ["x", "y"]}, "2 negative prompts for 3"),
    ("no prompt", {"prompt": []}, "at least one prompt"),
    ("unknown dtype", {"dtype": "float8"}, "unknown dtype 'float8'"),
    ("unknown device", {"device": "tpu"}, "unknown device 'tpu'"),
    ("negative tile area", {"decode_tile_area": -1}, "decode_tile_area must be ≥ 0"),
    ("steps given as a bool", {"steps": True}, "steps must be an integer, got True (bool)"),
    ("steps above the scheduler's timesteps", {"steps": 1001}, "above the 1000 timesteps"),
    ("method the family cannot run", {"method": "accdiffusion", "model": "tiny-flux"}, "not FLUX"),
    ("device without storage", {"device": "meta"}, "device 'meta' cannot run a generation"),
    ("prompt not UTF-8", {"prompt": "caf\udce9"}, "the prompt is not valid UTF-8 text: byte 0xe9"),
]


@pytest.mark.parametrize(("case", "overrides", "message"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_line(case: str, overrides: dict[str, object], message: str) -> None:
    kwargs = {**BASE, **overrides}
    with pytest.raises(HiresError) as info:
        hiresdiff.generate(**kwargs)  # type: ignore[arg-type]
    text = str(info.value)
    assert message in text
    assert "\n" not in text


def test_cuda_request_without_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with pytest.raises(HiresError, match="CUDA is not available"):
        hiresdiff.generate(**BASE, device="cuda")  # type: ignore[arg-type]


def test_pickle_checkpoint_needs_opt_in(tmp_path) -> None:
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(HiresError, match="--allow-pickle"):
        hiresdiff.generate(**{**BASE, "model": str(ckpt)})  # type: ignore[arg-type]


def test_there_are_at_least_fifteen_cases() -> None:
    assert len(CASES) >= 15
