"""The memoised trace mode (:mod:`hiresdiff.cost.shapes`) reports what PyTorch's FLOP counter and the live-bytes
mode stacked report — operation for operation — on every method's calls, while answering repeated operations from
its table."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import hiresdiff.cost.meta as meta_mod
import hiresdiff.cost.model as model_mod
from hiresdiff.cost import model_cost, shapes
from hiresdiff.cost.memory import LiveBytes, fused_attention
from hiresdiff.cost.shapes import TraceMode
from hiresdiff.models.tiny import build_builtin


class Stacked(contextlib.ExitStack):
    """What the cost model traced with before :class:`TraceMode`: the FLOP counter below a live-bytes mode."""

    def __enter__(self) -> Stacked:
        super().__enter__()
        self.counter = self.enter_context(FlopCounterMode(display=False))
        self.live = self.enter_context(LiveBytes("meta", trail=True))
        return self

    @property
    def flops(self) -> int:
        return self.counter.get_total_flops()

    @property
    def peak(self) -> int:
        return self.live.peak

    @property
    def trail(self) -> list[int]:
        return self.live.trail


def _both(fn):
    with torch.no_grad(), fused_attention(), Stacked() as old:
        fn()
    with torch.no_grad(), fused_attention(), TraceMode() as new:
        fn()
    return old, new


def test_unet_vae_and_text_encoder_calls_equal_the_stacked_modes():
    """tiny SDXL UNet (2 and 3 rows), VAE decode/encode and text encoder: FLOPs, peak and the whole live-bytes
    trail equal the stacked modes'; the second UNet call of a shape is answered from the table."""
    pipe = build_builtin("tiny-sdxl", torch.float32, "meta")
    shapes._MEMO.clear()

    def unet(rows: int):
        return lambda: pipe.unet(
            torch.zeros(rows, 4, 16, 24, device="meta"),
            torch.tensor(500.0, device="meta"),
            encoder_hidden_states=torch.zeros(rows, 77, 64, device="meta"),
            added_cond_kwargs={
                "text_embeds": torch.zeros(rows, 32, device="meta"),
                "time_ids": torch.zeros(rows, 6, device="meta"),
            },
        )

    calls = [
        unet(2),
        unet(3),
        lambda: pipe.vae.decode(torch.zeros(1, 4, 16, 16, device="meta")),
        lambda: pipe.vae.encode(torch.zeros(2, 3, 64, 48, device="meta")),
        lambda: pipe.text_encoder(torch.zeros(1, 77, dtype=torch.long, device="meta")),
    ]
    for call in calls:
        old, new = _both(call)
        assert (new.flops, new.peak, new.trail) == (old.flops, old.peak, old.trail)
        assert new.flops > 0 and new.peak > 0
    size = len(shapes._MEMO)
    assert size > 0
    _both(calls[0])
    assert len(shapes._MEMO) == size  # nothing new: every fresh operation came from the table
    assert not shapes._FRESH[torch.ops.aten._unsafe_view.default]  # returns its input's storage: always run


def test_an_operation_on_its_inputs_storage_is_not_counted_twice():
    """``_unsafe_view`` shares its input's storage without saying so in its schema: never rebuilt as new."""
    with TraceMode() as mode:
        x = torch.zeros(4, 8, device="meta")
        y = torch.ops.aten._unsafe_view(x @ x.T, [16])
        z = torch.ops.aten._unsafe_view(x @ x.T, [16])
    assert y.untyped_storage()._cdata != x.untyped_storage()._cdata
    assert mode.flops == 2 * 2 * 4 * 4 * 8
    assert mode.peak == (4 * 8 + 2 * 16) * 4  # x and the two products; the views allocate nothing
    del z


@pytest.mark.parametrize(
    ("method", "model", "side", "settings"),
    [
        ("demofusion", "tiny-sdxl", 512, {"steps": 3}),
        ("accdiffusion", "tiny-sdxl", 512, {"steps": 3}),  # recording attention processors
        ("apldm", "tiny-sdxl", 512, {"steps": 3}),  # PFSA
        ("hidiffusion", "tiny-sdxl", 512, {"steps": 3}),  # model patches: RAU-Net, MSW-MSA
        ("fouriscale", "tiny-sdxl", 512, {"steps": 3}),
        ("direct", "tiny-flux", 256, {"steps": 2}),
    ],
)
def test_a_whole_estimate_equals_the_stacked_modes(method, model, side, settings, monkeypatch):
    """Every number of an exact estimate (FLOPs, calls, peaks to the byte) is what tracing with the stacked modes
    gives, for methods with attention processors, recorders and model patches."""
    results = []
    for mode in (Stacked, TraceMode):
        monkeypatch.setattr(model_mod, "_PIPES", {})  # fresh shape-only modules: every call traced again
        monkeypatch.setattr(model_mod, "_CONTROLNETS", {})
        monkeypatch.setattr(meta_mod, "TraceMode", mode)
        results.append(model_cost(method, model, side, side, exact=True, **settings).to_dict())
    assert results[0] == results[1]


def test_value_free_operations_allocate_as_they_run_and_compute_nothing():
    """A wavelet swap and a sharpen of a 3 × 96 × 80 image under :class:`AllocationsOnly`: outputs of the real
    shapes and dtypes (zeros), and the CPU live-bytes mode sees the same peak and final bytes as the real run."""
    from hiresdiff.cost.shapes import AllocationsOnly
    from hiresdiff.ops.sharpen import sharpen
    from hiresdiff.ops.wavelet import dwt2, swap_low

    g = torch.Generator().manual_seed(0)
    image = torch.rand(2, 3, 96, 80, generator=g) * 2 - 1
    ref = dwt2(torch.rand(2, 3, 96, 80, generator=g))[0]

    def work():
        return swap_low(image, ref, "db4"), sharpen(image, [0.5, 1.5], 0.7)

    with LiveBytes("cpu") as real:
        want = work()
    with LiveBytes("cpu") as shaped, AllocationsOnly():
        got = work()
    assert [(t.shape, t.dtype) for t in got] == [(t.shape, t.dtype) for t in want]
    assert all(not t.any() for t in got) and all(t.abs().sum() > 0 for t in want)
    assert (shaped.peak, shaped.now()) == (real.peak, real.now()) and real.peak > 0


def test_discarded_work_allocates_the_same_bytes_and_runs_as_it_is_outside_estimates():
    """The estimate's 8-bit conversion (:func:`~hiresdiff.cost.shapes.discarded`): in a cost-model run the same peak
    and final live bytes and outputs of the real layout, nothing computed; outside one, the real result."""
    from hiresdiff.images import to_uint8

    image = torch.rand(1, 3, 64, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with LiveBytes("cpu") as real:
        want = to_uint8(image)
    token = shapes.COSTING.set(True)
    try:
        with LiveBytes("cpu") as shaped:
            got = shapes.discarded(to_uint8, image)
    finally:
        shapes.COSTING.reset(token)
    assert (got.shape, got.dtype, got.stride()) == (want.shape, want.dtype, want.stride())
    assert (shaped.peak, shaped.now()) == (real.peak, real.now()) and real.peak > 0
    assert torch.equal(shapes.discarded(to_uint8, image), want) and want.float().std() > 0


@pytest.mark.parametrize("method", ["diffusehigh"])
def test_the_cost_model_skips_value_free_work_with_the_same_numbers(method, monkeypatch):
    """DiffuseHigh (wavelet guidance and sharpening in every stage, tiles forced small): the estimates with
    value-free operations skipped equal those computing them, fast and exact, to the byte — and the skipping did
    happen."""
    from contextvars import ContextVar

    from hiresdiff.cost.shapes import AllocationsOnly

    used = []
    real = AllocationsOnly.__torch_dispatch__

    def spy(self, *args, **kwargs):
        used.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(AllocationsOnly, "__torch_dispatch__", spy)
    settings = {"steps": 6, "previews": True, "decode_tile_area": 256 * 256}
    skipping = [model_cost(method, "tiny-sdxl", 768, 768, exact=e, **settings).to_dict() for e in (False, True)]
    assert used
    monkeypatch.setattr(model_mod, "COSTING", ContextVar("elsewhere", default=False))  # value-free work runs
    used.clear()
    computing = [model_cost(method, "tiny-sdxl", 768, 768, exact=e, **settings).to_dict() for e in (False, True)]
    assert not used
    assert skipping == computing and skipping[0] == skipping[1]
