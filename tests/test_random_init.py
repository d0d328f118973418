"""Where the weights of the built-in models are initialised (``HIRESDIFF_RANDOM_INIT_DEVICE``, random-* only)."""

from __future__ import annotations

import pytest
import torch

from hiresdiff.errors import HiresError
from hiresdiff.models import tiny
from hiresdiff.models.tiny import INIT_DEVICE_ENV


def test_weights_are_initialised_on_the_cpu_unless_a_random_model_is_sent_elsewhere(monkeypatch):
    monkeypatch.delenv(INIT_DEVICE_ENV, raising=False)
    assert tiny._build_device("random-sdxl", "cuda") == torch.device("cpu")
    assert tiny._build_device("random-sdxl", "meta") == torch.device("meta")
    monkeypatch.setenv(INIT_DEVICE_ENV, "cpu")
    assert tiny._build_device("random-flux", "cuda") == torch.device("cpu")
    monkeypatch.setenv(INIT_DEVICE_ENV, "cuda")
    assert tiny._build_device("tiny-sdxl", "cuda") == torch.device("cpu")  # tiny models: always the CPU's values
    assert tiny._build_device("random-sdxl", "meta") == torch.device("meta")
    if not torch.cuda.is_available():
        with pytest.raises(HiresError, match="the CPU or an available CUDA device"):
            tiny._build_device("random-sdxl", "cpu")
    monkeypatch.setenv(INIT_DEVICE_ENV, "gpu0")
    with pytest.raises(HiresError, match=f"{INIT_DEVICE_ENV}='gpu0' is no device"):
        tiny._build_device("random-sdxl", "cpu")


def test_seeding_leaves_the_callers_random_state_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    with tiny._seeded(torch.device("cpu")):
        inside = torch.rand(3)
    assert torch.equal(torch.rand(3), expected)
    with tiny._seeded(None):
        assert torch.equal(torch.rand(3), inside)  # seeded alike every time


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_random_model_initialised_on_cuda_is_the_same_every_time(monkeypatch):
    monkeypatch.setenv(INIT_DEVICE_ENV, "cuda")
    first, second = (tiny.build_builtin_denoiser("random-sd15", torch.float16, "cuda") for _ in range(2))
    a, b = (next(m.parameters()) for m in (first, second))
    assert a.device.type == "cuda" and torch.equal(a, b)
