"""A run leaves nothing of hiresdiff's in a reference cycle: what a method's loop holds (canvases, edge maps, ControlNet
conditions) is freed when the run returns, not whenever Python's cyclic garbage collector happens to run — which
would make the memory alive at the final decode, and so the peak and its estimate, depend on the GC's timing (an
AccDiffusion v2 loop that kept a bound method of itself once made an estimate vary between 0.35 and 14.5 MB)."""

from __future__ import annotations

import gc

import pytest

from hiresdiff.cost import model_cost
from hiresdiff.methods import METHODS
from hiresdiff.models.builtins import BUILTIN_MODELS

SIDE = 2 * BUILTIN_MODELS["tiny-sdxl"].native_size


@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_run_leaves_no_hiresdiff_object_in_a_reference_cycle(method: str) -> None:
    """With the cyclic GC off during a whole run of the method (the cost model's, which runs its orchestration and
    supplies a ControlNet where the method needs one), no object of a hiresdiff class is found unreachable after it:
    everything the run made was freed by reference counting alone. (A first run in the process is left out: an
    import's caught exception keeps the frames of its callers, model_cost's among them, in a cycle.)"""
    extra = {"controlnet": True} if METHODS[method].own_control else {}
    model_cost(method, "tiny-sdxl", SIDE, SIDE, steps=3, previews=True, **extra)  # first-run imports settle first
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        model_cost(method, "tiny-sdxl", SIDE, SIDE, steps=3, previews=True, **extra)
        gc.collect()
        cyclic = sorted({type(o).__qualname__ for o in gc.garbage if type(o).__module__.startswith("hiresdiff.")})
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert not cyclic, f"{method} left these in reference cycles: {cyclic}"
