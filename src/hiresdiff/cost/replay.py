"""Step replay: the cost of a denoising loop from the few steps that differ, the rest booked again.

The steps of one denoising loop (a phase) repeat the same work: the same denoiser calls with the same argument
shapes, the same canvas tensors allocated and freed in the same order; only values change. The cost model
(:func:`hiresdiff.cost.model.model_cost`) therefore runs a step for real only while the loop has not settled:

* every step until two consecutive steps (or two consecutive pairs of steps: second-order solvers alternate a
  predictor and a corrector) left the same **record** — the ledger's bookings (component, FLOPs,
  samples, the call's :class:`~hiresdiff.cost.meta.CallPeak` with the canvas bytes alive when it started), the
  view-parallel charges, and the orchestration's live bytes at the step's start, its peak within the step and at
  its end. The first step differs (nothing of a previous step is alive yet), so do a multistep solver's warm-up
  steps (their history fills up);
* every step whose model-patch state (:meth:`~hiresdiff.hooks.StepHook.signature_at`, e.g. RAU-Net switching
  on and off) differs from the settled record's: it runs and the loop settles again;
* the last :data:`TAIL` steps, where schedulers and strategies may differ (a lower-order final step, a blend
  weight of exactly 0 at ``t = 0``).

Every step in between is *replayed*: the settled record is booked again (the same FLOPs, samples and peaks; the
peak memory within it equals the recorded one, which the live-bytes mode has already seen), and the loop only
advances the scheduler with the last prediction (:data:`hiresdiff.sampler.STEP_REPLAY`). The result equals the
full trace (``model_cost(..., exact=True)``), which the tests check for every method.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from hiresdiff.cost.memory import LiveBytes
from hiresdiff.cost.meta import Ledger

#: steps at the end of every loop that always run (lower-order final steps, the weight at t = 0)
TAIL = 2
#: the cycles of settled steps recognised: every step alike, or two alternating kinds of step
PERIODS = (1, 2)


@dataclass
class StepReplay:
    """Records the steps of each denoising loop and books settled ones again instead of running them.

    ``charge`` re-applies a recorded view-parallel charge (:meth:`hiresdiff.cost.model.CountingParallel.charge`).
    ``replayed`` counts the steps booked without running (a measure of the saving, and a test handle).
    """

    ledger: Ledger
    host: LiveBytes
    charge: Any
    replayed: int = 0
    _total: int = 0
    _records: list[tuple[Any, ...]] = field(default_factory=list)
    _start: int = 0
    _running: bool = False
    _state: Hashable = ()

    def begin(self, total: int) -> None:
        """A denoising loop of ``total`` steps starts: nothing of an earlier loop is replayed in it."""
        self._close()
        self._total, self._records = total, []

    def repeats(self, step: int, state: Hashable = ()) -> bool:
        """Whether step ``step`` is booked as a copy of the settled record (the loop then only advances the
        scheduler); otherwise the step is recorded while it runs. ``state`` is what the loop's hooks make the model
        compute at this step (the model-patch schedule, :meth:`~hiresdiff.hooks.StepHook.signature_at`): a record
        is only copied onto a step of the same state, so a patch switching mid-loop runs for real and settles
        anew."""
        self._close()
        period = self._period()
        if period and step < self._total - TAIL and self._records[-period][-1] == state:
            record = self._records[-period]
            self._records.append(record)  # the cycle goes on
            self._book(record[0])
            self.replayed += 1
            return True
        self.ledger.journal = []
        self._start, self._running, self._state = self.host.mark(), True, state
        return False

    def _period(self) -> int:
        """The cycle the last records settled into: 1 (every step alike), 2 (alternating steps, e.g. Heun's
        predictor and corrector), 0 (not settled)."""
        r = self._records
        for period in PERIODS:
            if len(r) >= 2 * period and r[-period:] == r[-2 * period : -period]:
                return period
        return 0

    def _close(self) -> None:
        """End the record of the step that ran last (when one did)."""
        if not self._running:
            return
        journal, self.ledger.journal, self._running = self.ledger.journal or [], None, False
        self._records.append((tuple(journal), self._start, self.host.window_peak, self.host.now(), self._state))

    def _book(self, journal: tuple[tuple[Any, ...], ...]) -> None:
        for kind, *entry in journal:
            if kind == "book":
                self.ledger.book(*entry)
            else:
                self.charge(*entry)

    def end(self) -> None:
        """The loop is over: its last step's record closes here, so what runs after the loop (a decode) is not
        counted into it."""
        self._close()

    def finish(self) -> None:
        """Stop recording (the generation is over)."""
        self._close()


@dataclass
class SegmentReplay:
    """Whole calls that an estimate repeats unchanged — the VAE decodes of the auto batch search's probes, which
    differ only in the rows of their denoiser calls — recorded once and booked again.

    A record is kept by the call's key and the bytes alive when it starts (:meth:`run`): its bookings (the VAE's
    calls and their :class:`~hiresdiff.cost.meta.CallPeak`, whose canvas bytes are then the same), how far the live
    bytes rose above those it ends with, and its result's layout. Booking it again makes the same tallies, raises
    the host peak by the same bytes and allocates the same result (zeros) — what running it would have counted. The
    records live as long as the counting pipeline's ledger (``records``). Only calls made outside a recorded step
    are kept (a step's own record covers what it calls), and only those that leave nothing alive but their result.
    """

    ledger: Ledger
    host: LiveBytes
    records: dict[Hashable, tuple[tuple[tuple[Any, ...], ...], int, tuple[Any, ...]]]
    #: tiles of tiled passes booked again (:meth:`repeating`; a measure of the saving, and a test handle)
    tiles: int = 0

    def run(self, key: Hashable, fn: Callable[..., torch.Tensor], *args: Any) -> torch.Tensor:
        """``fn(*args)``, or its record booked again when one of ``key`` started from the bytes alive now."""
        if self.ledger.journal is not None:  # inside a step being recorded
            return fn(*args)
        start = self.host.now()
        found = self.records.get((key, start))
        if found is not None:
            journal, rise, (shape, dtype) = found
            for _kind, *entry in journal:
                self.ledger.book(*entry)
            out = torch.zeros(shape, dtype=dtype)
            self.host.bump(rise)
            return out
        self.ledger.journal = []
        try:
            with self.host.rise() as up:
                out = fn(*args)
        finally:
            journal, self.ledger.journal = tuple(self.ledger.journal or ()), None
        if _alone(out, self.host.now() - start) and all(kind == "book" for kind, *_ in journal):
            self.records[(key, start)] = (journal, up[0], (tuple(out.shape), out.dtype))
        return out

    def repeating(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
        """``fn`` for the tiles of one tiled VAE pass (:func:`~hiresdiff.ops.tiling.tiled_apply`), where most
        tiles repeat the previous one: the same input layout, the previous tile's output (the same layout) still
        alive, the same bytes alive around them. Such a tile is booked again from the record of the first call
        like it — its bookings, and the transient peak of a new output allocated beside the previous one — and
        answered with the previous output itself (its values steer nothing here), which is what the caller holds
        once it lets the previous one go: the live bytes after it equal a real call's, without zero-filling and
        blending a new tile (≈ 20 % of a new request's estimate at 4096², mostly memory traffic)."""
        records: dict[Hashable, tuple[tuple[tuple[Any, ...], ...], int, int]] = {}
        last: list[weakref.ref[torch.Tensor] | None] = [None]

        def tile(x: torch.Tensor) -> torch.Tensor:
            start, prev = self.host.now(), last[0]() if last[0] is not None else None
            held = None if prev is None else (tuple(prev.shape), prev.dtype, prev.untyped_storage().nbytes())
            key = (tuple(x.shape), x.dtype, start, held)
            found = records.get(key) if prev is not None else None
            if prev is not None and found is not None:
                journal, kept, rise = found
                for _kind, *entry in journal:
                    self.ledger.book(*entry)
                self.host.bump(kept + rise)
                self.tiles += 1
                return prev
            outer = self.ledger.journal
            self.ledger.journal = journal_ = [] if outer is None else outer
            mark = len(journal_)
            try:
                with self.host.rise() as up:
                    out = fn(x)
            finally:
                self.ledger.journal = outer
            entries, kept = tuple(journal_[mark:]), self.host.now() - start
            same = held == (tuple(out.shape), out.dtype, kept)
            if same and _alone(out, kept) and all(kind == "book" for kind, *_ in entries):
                records[key] = (entries, kept, up[0])
            last[0] = weakref.ref(out)
            return out

        return tile


def _alone(out: torch.Tensor, kept: int) -> bool:
    """Whether ``out`` is all a call left alive (``kept`` bytes more than before it): one whole contiguous storage."""
    return kept == out.untyped_storage().nbytes() and out.storage_offset() == 0 and out.is_contiguous()


@contextmanager
def replaying(ledger: Ledger, host: LiveBytes, charge: Any) -> Iterator[StepReplay]:
    """Denoising loops run inside replay their settled steps (:data:`hiresdiff.sampler.STEP_REPLAY`) and decodes
    seen in an earlier estimate of the same pipeline are booked again (:class:`SegmentReplay`,
    :data:`hiresdiff.models.adapter.DECODE_REPLAY`)."""
    from hiresdiff.models.adapter import DECODE_REPLAY
    from hiresdiff.sampler import STEP_REPLAY

    replay = StepReplay(ledger, host, charge)
    token = STEP_REPLAY.set(replay)
    decodes = DECODE_REPLAY.set(SegmentReplay(ledger, host, ledger.segments))
    try:
        yield replay
    finally:
        DECODE_REPLAY.reset(decodes)
        STEP_REPLAY.reset(token)
        replay.finish()
