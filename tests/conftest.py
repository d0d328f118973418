"""Shared test setup: offline hub, two passive CPU threads, tiny built-in pipelines (built once per test module)."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
# idle OpenMP workers sleep instead of spinning: on a shared 2-core machine spinning slows torch down 30×
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ["HIRESDIFF_TRACE_CACHE"] = "off"  # hermetic: no shape-only traces from earlier runs (cost.store)

import pytest
import torch

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def make_lora():
    """``make(family, seed, folder) → file``: an offline LoRA for tiny ``family`` (see ``tiny_addons``)."""
    from hiresdiff.models.tiny_addons import save_tiny_lora

    return lambda family, seed, folder: save_tiny_lora(family, folder, seed)


@pytest.fixture(scope="session")
def make_controlnet():
    """``make(unet, seed=0) → ControlNetModel`` with non-zero zero-convolutions (it changes the output)."""
    from hiresdiff.models.tiny_addons import tiny_controlnet

    return tiny_controlnet


@pytest.fixture(scope="module")
def tiny_sdxl_pipe():
    from hiresdiff.models.tiny import build_builtin

    return build_builtin("tiny-sdxl")


@pytest.fixture(scope="module")
def tiny_sd_pipe():
    from hiresdiff.models.tiny import build_builtin

    return build_builtin("tiny-sd")


@pytest.fixture(scope="module")
def tiny_flux():
    from hiresdiff.models.tiny import build_builtin

    return build_builtin("tiny-flux")


@pytest.fixture(scope="module")
def sdxl(tiny_sdxl_pipe):
    """HiresPipeline over tiny-sdxl."""
    from hiresdiff import HiresPipeline

    return HiresPipeline.from_pipe(tiny_sdxl_pipe, "tiny-sdxl")


@pytest.fixture(scope="module")
def sd(tiny_sd_pipe):
    """HiresPipeline over tiny-sd."""
    from hiresdiff import HiresPipeline

    return HiresPipeline.from_pipe(tiny_sd_pipe, "tiny-sd")


@pytest.fixture(autouse=True)
def _api_auto_batch_from_fallback(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Python-API runs settle ``max_batch="auto"`` with the cost model (one more shape-only run of the method per
    call). Tests of a method's numerics and call structure spy on that very code, and the estimate on the tiny
    models chooses the cap anyway: they run with auto's fallback (8, the former default). Tests marked
    ``auto_batch`` keep the planner; the command line settles auto in its plan either way."""
    import hiresdiff.pipeline as pipeline
    import hiresdiff.plan  # (registers the planner; patched below for this test only)

    monkeypatch.setattr(hiresdiff.plan, "_STOPPED", {})  # stopped estimates' bounds: none from other tests
    if request.node.get_closest_marker("auto_batch") is not None:
        return

    monkeypatch.setattr(pipeline, "BATCH_PLANNER", None)
