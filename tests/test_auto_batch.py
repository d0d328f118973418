"""``max_batch="auto"``: the largest rows per denoiser call the estimate fits into free memory (issue 22, item 4)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from hiresdiff import plan
from hiresdiff.cli import main
from hiresdiff.config import AUTO, AUTO_FALLBACK, GenerationSettings
from hiresdiff.cost.meta import CallPeak
from hiresdiff.cost.model import CostReport, model_cost
from hiresdiff.errors import HiresError
from hiresdiff.images import read_png_settings
from hiresdiff.memory import GIB, MemoryEstimate
from hiresdiff.pipeline import build_request

TINY = ["--model", "tiny-sdxl", "--quiet"]
MIB = 2**20


def fake_cost(rows_needed: int, per_row: int, calls: list[int]) -> Any:
    """A stand-in for :func:`hiresdiff.plan.request_cost` whose denoiser peak grows with the rows per call (and a
    little canvas per row, as the stacked views do); ``calls`` collects each max_batch priced."""

    def cost(req: Any, model: str, **overrides: Any) -> CostReport:
        mb = overrides["max_batch"]
        calls.append(mb)
        rows = min(mb - mb % 2, rows_needed) if mb >= 2 else 2
        peak = CallPeak(canvas=10 * MIB + rows * MIB, activations=rows * per_row, rows=rows, cells=4096)
        return CostReport(
            "demofusion", model, "tiny-sdxl", 512, 512, 2, 1, 1.0, 0.0, 0.0, 1, rows, 1.0, 1, 1,
            weights_bytes={"denoiser": 300 * MIB, "vae": 50 * MIB},
            peaks={"denoiser": peak, "vae": CallPeak(5 * MIB, 40 * MIB, 1, 4096)},
            denoiser_rows=rows_needed,
        )  # fmt: skip

    return cost


def peak_at(cost: Any, rows: int) -> int:
    return MemoryEstimate.of(cost(None, "tiny-sdxl", max_batch=rows), torch.float32, False).peak


def test_auto_picks_largest_fitting_equal_to_brute_force(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    cost = fake_cost(rows_needed=50, per_row=97 * MIB, calls=calls)
    monkeypatch.setattr(plan, "request_cost", cost)
    candidates = plan.batch_candidates(50, 2)
    assert candidates == list(range(2, 51, 2))
    peaks = {c: peak_at(cost, c) for c in candidates}
    chosen = []
    for free in [GIB + 100 * MIB, *range(2 * GIB, 9 * GIB, 173 * MIB), 30 * GIB]:
        req = build_request("a fox", "demofusion", 512, 512, steps=2)
        calls.clear()
        report = plan.choose_max_batch(req, "tiny-sdxl", torch.float32, free)
        room = plan.auto_room(free)
        brute = max((c for c in candidates if peaks[c] <= room), default=candidates[0])
        assert req.settings.max_batch == brute and report.denoiser_rows == 50
        assert len(calls) <= 4  # the unlimited run, the linear guess, the line's answer and its neighbour
        chosen.append(brute)
    assert chosen == sorted(chosen) and chosen[0] == 2 and chosen[-1] == 50  # more memory: never fewer rows
    assert len(set(chosen)) > 10


def test_margin_keeps_ten_percent_or_one_gib() -> None:
    assert plan.auto_room(4 * GIB) == 3 * GIB
    assert plan.auto_room(40 * GIB) == 36 * GIB


def test_auto_on_tiny_model_is_the_cap_and_larger_values_change_nothing() -> None:
    req = build_request("a fox", "demofusion", 512, 512, steps=2, previews=False)
    assert req.settings.max_batch == AUTO
    b = plan.budget(req, "tiny-sdxl", "cpu", torch.float32)
    cap = req.settings.max_batch
    assert b.auto and isinstance(cap, int) and cap == b.report.denoiser_rows > 2
    more = plan.request_cost(req, "tiny-sdxl", max_batch=cap + 10)
    assert (more.denoiser_calls, more.peaks) == (b.report.denoiser_calls, b.report.peaks)
    fewer = plan.request_cost(req, "tiny-sdxl", max_batch=cap - 2)
    assert fewer.denoiser_calls > b.report.denoiser_calls


def test_explicit_number_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(plan, "free_memory", lambda device: GIB)  # an explicit number is kept whatever the memory
    req = build_request("a fox", "demofusion", 512, 512, steps=2, previews=False, max_batch=6, decode_tile_area=None)
    b = plan.budget(req, "tiny-sdxl", "cpu", torch.float32)
    assert req.settings.max_batch == 6 and not b.auto and not b.tiled  # the tile area too
    assert "max_batch 6;" in plan.describe_plan(req, 256, 8, b)[0]


def test_fallback_without_estimate(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(plan, "free_memory", lambda device: None)  # e.g. MPS
    req = build_request("a fox", "demofusion", 512, 512, steps=2, previews=False)
    b = plan.budget(req, "tiny-sdxl", "cpu", torch.float32)
    assert req.settings.max_batch == AUTO_FALLBACK == 8 and b.report is not None

    def broken(*args: Any, **kwargs: Any) -> CostReport:
        raise RuntimeError("boom")

    monkeypatch.setattr(plan, "free_memory", lambda device: 8 * GIB)
    monkeypatch.setattr(plan, "request_cost", broken)
    req = build_request("a fox", "demofusion", 512, 512, steps=2, previews=False)
    b = plan.budget(req, "tiny-sdxl", "cpu", torch.float32)
    assert req.settings.max_batch == 8 and b.report is None and "boom" in b.reason
    low = build_request("a fox", "demofusion", 512, 512, steps=2, low_vram=True, max_batch="auto")
    plan.budget(low, "tiny-sdxl", "cpu", torch.float32)
    assert low.settings.max_batch == 1  # low-VRAM's own default


def test_values_accepted_and_refused() -> None:
    for given, held in {"auto": "auto", "AUTO": "auto", 3: 3, np.int64(5): 5}.items():
        assert GenerationSettings(prompt="a", width=64, height=64, max_batch=given).max_batch == held
    assert build_request("a", "direct", 512, 512, max_batch="12").settings.max_batch == 12  # --set strings
    for bad, message in [("fast", "positive integer or auto"), (0, "≥ 1"), (2.5, "integer")]:
        with pytest.raises(HiresError, match=message):
            GenerationSettings(prompt="a", width=64, height=64, max_batch=bad)
    assert build_request("a", "direct", 512, 512, low_vram=True).settings.max_batch == 1  # low-VRAM keeps its own 1


@pytest.mark.auto_batch
def test_api_run_records_the_number_used(sdxl: Any) -> None:
    res = sdxl("a fox", "demofusion", 512, 512, steps=2, progress=False, previews=False)
    used = res.metadata[0]["max_batch"]
    req = build_request("a fox", "demofusion", 512, 512, steps=2, previews=False)
    plan.budget(req, "tiny-sdxl", "cpu", torch.float32)
    assert isinstance(used, int) and used == req.settings.max_batch


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def test_cli_plan_line_and_from_png_bit_exact(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    first, again = tmp_path / "a", tmp_path / "b"
    argv = ["generate", "a red fox", "--model", "tiny-sdxl", "--width", "512", "--height", "512", "--steps", "2"]
    assert main([*argv, "--no-previews", "--out", str(first)]) == 0
    line = next(ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("plan:"))
    src = first / "000-demofusion-seed0.png"
    used = read_png_settings(src)["max_batch"]
    assert isinstance(used, int) and used > AUTO_FALLBACK and f"max_batch {used} (auto)" in line
    assert main(["generate", "--from-png", str(src), "--quiet", "--out", str(again)]) == 0
    copy = again / "000-demofusion-seed0.png"
    assert np.array_equal(pixels(src), pixels(copy)) and src.read_bytes() == copy.read_bytes()
    assert main(["generate", "--dry-run", *argv[1:], *TINY[2:], "--max-batch", "4"]) == 0
    assert "max_batch 4\n" in capsys.readouterr().out


@pytest.mark.parametrize("shape", ["affine", "convex", "steps", "flat"])
def test_search_equals_trying_every_candidate_whatever_the_curve(shape: str) -> None:
    """:func:`plan.largest_fitting` finds what trying every candidate finds for any non-decreasing peak curve (the
    straight-line prediction only orders the probes), from any first guess, with few probes when the curve is a
    line."""
    gen = torch.Generator().manual_seed(7)
    candidates = plan.batch_candidates(130, 2)
    curves = {
        "affine": lambda r: 13 * GIB + r * 300 * MIB,
        "convex": lambda r: 13 * GIB + r * r * 5 * MIB,
        "steps": lambda r: 13 * GIB + (r // 16) * 4 * GIB,
        "flat": lambda r: 13 * GIB,
    }
    priced: list[int] = []

    def peak(rows: int) -> int:
        priced.append(rows)
        return curves[shape](rows)

    for _ in range(40):
        room = int(12 * GIB + torch.randint(0, 50 * 1024, (1,), generator=gen).item() * MIB)
        if curves[shape](candidates[-1]) <= room:  # the caller has taken the last candidate when it fits
            continue
        priced.clear()
        brute = max((c for c in candidates if curves[shape](c) <= room), default=candidates[0])
        guess = int(torch.randint(0, len(candidates), (1,), generator=gen).item())
        assert plan.largest_fitting(candidates, peak, room, guess) == brute
        assert len(priced) == len(set(priced)) <= 16  # never prices a candidate twice; bisection bounds the rest
        if shape == "affine":
            assert len(priced) <= 4  # the last candidate, the guess, the line's answer, its neighbour


def test_reports_are_reused_per_request_signature(monkeypatch: pytest.MonkeyPatch) -> None:
    """The auto search, the advice and later API calls of the same request shape price it once: another prompt or
    seed (which change no shape) reuses the report, another setting does not — and the reused report equals a
    fresh estimate at that prompt and seed."""
    import hiresdiff.cost.model as model_mod

    ran: list[Any] = []
    real = model_mod.model_cost

    def counted(*args: Any, **kwargs: Any) -> CostReport:
        ran.append(kwargs.get("max_batch"))
        return real(*args, **kwargs)

    monkeypatch.setattr(plan, "_PRICED", plan.OrderedDict())
    monkeypatch.setattr(model_mod, "model_cost", counted)
    first = build_request("a fox", "demofusion", 512, 512, steps=3, previews=False, seed=1)
    b1 = plan.budget(first, "tiny-sd", "cpu", torch.float32)
    priced = len(ran)
    assert priced >= 1 and b1.auto
    again = build_request("a castle on a hill at dusk", "demofusion", 512, 512, steps=3, previews=False, seed=9)
    b2 = plan.budget(again, "tiny-sd", "cpu", torch.float32)
    assert len(ran) == priced and again.settings.max_batch == first.settings.max_batch
    assert b2.report is not None and b1.report is not None and b2.report.to_dict() == b1.report.to_dict()
    fresh = real("demofusion", "tiny-sd", 512, 512, prompt=["a castle on a hill at dusk"], seed=9, steps=3,
                 max_batch=again.settings.max_batch)  # fmt: skip
    assert fresh.to_dict() == b2.report.to_dict()
    other = build_request("a fox", "demofusion", 512, 512, steps=4, previews=False, seed=1)
    plan.budget(other, "tiny-sd", "cpu", torch.float32)
    assert len(ran) > priced


def test_a_vae_that_does_not_fit_settles_without_a_search(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows per denoiser call change no VAE call: when the VAE alone exceeds the room no candidate fits, so auto
    takes the smallest, as trying every candidate would, after the unlimited estimate and that one only."""
    calls: list[int] = []
    cost = fake_cost(rows_needed=50, per_row=97 * MIB, calls=calls)

    def big_vae(req: Any, model: str, **overrides: Any) -> CostReport:
        report = cost(req, model, **overrides)
        report.peaks["vae"] = CallPeak(5 * MIB, 8 * GIB, 1, 65536)
        return report

    monkeypatch.setattr(plan, "request_cost", big_vae)
    req = build_request("a fox", "demofusion", 512, 512, steps=2)
    report = plan.choose_max_batch(req, "tiny-sdxl", torch.float32, 6 * GIB)
    assert req.settings.max_batch == 2 and calls == [plan._UNBOUNDED, 2]
    est = MemoryEstimate.of(report, torch.float32, False)
    assert est.largest == "vae" and est.apart_from_denoising == est.peak > plan.auto_room(6 * GIB)
    everything = [MemoryEstimate.of(big_vae(req, "tiny-sdxl", max_batch=c), torch.float32, False).peak for c in
                  plan.batch_candidates(50, 2)]  # fmt: skip
    assert min(everything) > plan.auto_room(6 * GIB)  # brute force: none fits, so the smallest


@pytest.mark.parametrize("method", ["demofusion", "accdiffusion"])
def test_calls_other_than_the_denoisers_do_not_move_with_the_rows(method: str) -> None:
    """What the shortcut above relies on: the VAE and text-encoder calls (previews included) and their canvas
    are the same whatever ``max_batch`` is, on the real cost model."""
    reports = [model_cost(method, "tiny-sdxl", 768, 768, steps=3, previews=True, max_batch=b) for b in (2, 4, 64)]
    floors = {MemoryEstimate.of(r, torch.float32, False).apart_from_denoising for r in reports}
    assert len({(r.peaks["vae"], r.peaks["text_encoder"]) for r in reports}) == 1 and len(floors) == 1
    assert len({r.denoiser_calls for r in reports}) == 3  # the rows did change the denoiser's calls


@pytest.mark.auto_batch
@pytest.mark.parametrize("free", [64 * GIB, GIB + 8 * MIB])
def test_cost_command_settles_auto_as_the_generate_plan(free: int, monkeypatch: Any, capsys: Any) -> None:
    """``hiresdiff cost`` prices what ``hiresdiff generate`` runs: previews on and ``max_batch`` auto settled for the
    device as the plan does — with room for every row (the cap) and with room for none (the smallest), both
    choose the same rows per call and report the same FLOPs (preview decodes included)."""
    import json
    import re

    size = ["--width", "768", "--height", "768", "--steps", "3"]
    monkeypatch.setattr(plan, "free_memory", lambda device: free)
    monkeypatch.setattr(plan, "_PRICED", plan.OrderedDict())
    assert main(["cost", "--method", "demofusion", "--model", "tiny-sdxl", *size, "--json"]) == 0
    priced = json.loads(capsys.readouterr().out)
    argv = ["generate", "x", "--method", "demofusion", *TINY[:2], *size, "--dry-run", "--skip-memory-check"]
    assert main(argv) == 0
    shown = capsys.readouterr().out
    chosen = int(re.search(r"max_batch (\d+) \(auto\)", shown).group(1))
    assert priced["max_batch"] == chosen == (priced["denoiser_rows"] if free > 2 * GIB else 2)
    assert f"{priced['model_flops'] / 1e12:,.4g} TFLOP" in shown
    tiled = free < 2 * GIB  # no room at all: the whole decode does not fit either, so both tile the VAE
    assert ("VAE tiled to fit" in shown) == tiled
    area = {"decode_tile_area": 0} if tiled else {}
    with_previews = model_cost("demofusion", "tiny-sdxl", 768, 768, steps=3, max_batch=chosen, previews=True, **area)
    assert priced["vae_calls"] == with_previews.vae_calls  # the phase previews are priced, as generate runs them


def watched_fake(monkeypatch: pytest.MonkeyPatch) -> tuple[list[int], list[int]]:
    """Install a :func:`fake_cost` that reports its run to the probe's watch before finishing (so a watch can stop
    it); returns the max_batch values priced and those whose run finished."""
    calls: list[int] = []
    finished: list[int] = []
    cost = fake_cost(rows_needed=50, per_row=97 * MIB, calls=calls)

    def watched(req: Any, model: str, watch: Any = None, **overrides: Any) -> CostReport:
        report = cost(req, model, **overrides)
        if watch is not None:
            watch(report.weights_bytes, report.peaks, report.canvas_bytes, report.vae_upcast, report.denoiser_rows)
        finished.append(overrides["max_batch"])
        return report

    monkeypatch.setattr(plan, "request_cost", watched)
    return calls, finished


def search_as_brute_force(free: int, calls: list[int], finished: list[int], peaks: dict[int, int]) -> set[int]:
    """Settle auto for ``free`` bytes with :func:`watched_fake` installed, assert the choice is brute force's over
    the candidates' ``peaks``, and return the candidates whose probe was stopped."""
    req = build_request("a fox", "demofusion", 512, 512, steps=2)
    calls.clear()
    finished.clear()
    plan.choose_max_batch(req, "tiny-sdxl", torch.float32, free)
    room, candidates = plan.auto_room(free), sorted(peaks)
    assert req.settings.max_batch == max((c for c in candidates if peaks[c] <= room), default=candidates[0])
    return {c for c in calls if c not in finished}


def test_probes_that_cannot_fit_stop_early_and_the_choice_is_brute_force(monkeypatch: pytest.MonkeyPatch) -> None:
    """Probes hand the cost model a watch; a probe whose run so far exceeds the room stops there (the fake run
    reports its peak to the watch before finishing) and leaves no report — and the choice is still brute force's
    for every amount of free memory."""
    calls, finished = watched_fake(monkeypatch)
    cost = fake_cost(rows_needed=50, per_row=97 * MIB, calls=[])
    candidates = plan.batch_candidates(50, 2)
    peaks = {c: peak_at(cost, c) for c in candidates}
    stops = 0
    for free in range(2 * GIB, 9 * GIB, 173 * MIB):
        stopped = search_as_brute_force(free, calls, finished, peaks)
        assert all(peaks[min(c, 50)] > plan.auto_room(free) for c in stopped)  # the unlimited run: the cap's 50
        stops += len(stopped)
    assert stops > 10


def test_stopped_probes_are_remembered_and_the_choice_stays_brute_force(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A probe stopped once is not run again: its peak so far (a lower bound) answers later searches of the same
    request whose room it exceeds — in this process and, from the report store, in a later one — and the choice
    stays brute force's at every amount of free memory."""
    calls, finished = watched_fake(monkeypatch)
    cost = fake_cost(rows_needed=50, per_row=97 * MIB, calls=[])
    monkeypatch.setenv("HIRESDIFF_TRACE_CACHE", str(tmp_path))
    candidates = plan.batch_candidates(50, 2)
    peaks = {c: peak_at(cost, c) for c in candidates}
    stopped_before: set[int] = set()
    for round_ in range(3):
        if round_ == 2:
            monkeypatch.setattr(plan, "_STOPPED", {})  # a new process: the bounds come from the store
        for free in range(2 * GIB, 9 * GIB, 373 * MIB):
            stopped = search_as_brute_force(free, calls, finished, peaks)
            if round_ == 0:
                stopped_before |= stopped
            else:
                assert not stopped, "a probe stopped before ran again"
    assert stopped_before
    assert any(plan.stopped_peak(build_request("a fox", "demofusion", 512, 512, steps=2), "tiny-sdxl",
                                 torch.float32, max_batch=c) > 0 for c in stopped_before)  # fmt: skip


def test_a_stopped_unlimited_run_bounds_the_search_as_the_whole_run_would(monkeypatch: pytest.MonkeyPatch) -> None:
    """On the real cost model: when every view of a step in one call does not fit, that estimate stops where it
    first exceeds the room (kept as a stopped estimate, no report), and the choice — searched below the most rows
    of one call up to there — is brute force's over every candidate up to the whole run's cap, at every room."""
    monkeypatch.setattr(plan, "_PRICED", plan.OrderedDict())
    req = build_request("a fox", "demofusion", 1024, 768, steps=3, previews=False, decode_tile_area=0)
    cap = plan.request_cost(req, "tiny-sdxl", max_batch=plan._UNBOUNDED).denoiser_rows
    candidates = plan.batch_candidates(cap, 2)
    peaks = {c: peak_of(plan.request_cost(req, "tiny-sdxl", max_batch=c)) for c in candidates}
    assert len(set(peaks.values())) > 5  # the rows move the peak here (previews off, tiled decodes)
    monkeypatch.setattr(plan, "_PRICED", plan.OrderedDict())  # nothing priced: the search runs its estimates
    for room in sorted(set(peaks.values()))[1:-1:3]:
        monkeypatch.setattr(plan, "_STOPPED", {})
        chosen = build_request("a fox", "demofusion", 1024, 768, steps=3, previews=False, decode_tile_area=0)
        report = plan.choose_max_batch(chosen, "tiny-sdxl", torch.float32, room + GIB)  # auto_room: 1 GiB less
        assert plan.auto_room(room + GIB) == room
        assert chosen.settings.max_batch == max(c for c in candidates if peaks[c] <= room)
        assert peak_of(report) == peaks[chosen.settings.max_batch]
        kwargs = {"max_batch": plan._UNBOUNDED}
        assert plan.stopped_peak(chosen, "tiny-sdxl", torch.float32, **kwargs) > room  # the unlimited run stopped


def peak_of(report: CostReport) -> int:
    return MemoryEstimate.of(report, torch.float32, False).peak


def test_a_watch_sees_the_run_so_far_and_can_stop_it() -> None:
    """The cost model hands its watch the weights, the call peaks, the canvas and the most rows of one denoiser
    call of the run so far whenever a call raises a peak: the last view equals the report's peaks and rows, no
    view exceeds the final estimate, the rows never fall; an exception raised by the watch stops the run."""
    seen: list[tuple[Any, ...]] = []
    report = model_cost("demofusion", "tiny-sdxl", 512, 512, steps=2, watch=lambda *view: seen.append(view))
    final = MemoryEstimate.of(report, torch.float32, False).peak
    assert seen and seen[-1][0] == report.weights_bytes and seen[-1][1] == report.peaks
    assert seen[-1][4] == report.denoiser_rows and [v[4] for v in seen] == sorted(v[4] for v in seen)
    assert all(MemoryEstimate.of_parts(*view[:4], torch.float32, False).peak <= final for view in seen)

    class Stop(Exception):
        pass

    def stop(*view: Any) -> None:
        raise Stop

    with pytest.raises(Stop):
        model_cost("demofusion", "tiny-sdxl", 512, 512, steps=2, watch=stop)


def test_a_whole_decode_beyond_the_room_tiles_instead(monkeypatch: pytest.MonkeyPatch) -> None:
    """budget: when the default tile area's whole VAE call sets a peak beyond the room ``auto`` aims at, every VAE
    call tiles (``decode_tile_area`` 0, as the settings record it), ``auto`` is settled again and the plan says so;
    a tile area given explicitly, or room enough, leaves the request as it is."""
    from hiresdiff.plan import budget, describe_plan

    kw: dict[str, Any] = {"steps": 2, "previews": False}

    def peak(**settings: Any) -> MemoryEstimate:
        req = build_request("a fox", "direct", 512, 512, **kw, **settings)
        return MemoryEstimate.of(plan.request_cost(req, "tiny-sdxl"), torch.float32, False)

    whole, tiled = peak(max_batch=2), peak(max_batch=2, decode_tile_area=0)
    assert whole.largest == "vae" and tiled.peak < whole.peak
    free = GIB + (whole.peak + tiled.peak) // 2  # the room (free − 1 GiB) lies between the two
    monkeypatch.setattr(plan, "free_memory", lambda device: free)
    req = build_request("a fox", "direct", 512, 512, **kw)
    b = budget(req, "tiny-sdxl", "cpu", torch.float32)
    assert b.tiled and b.auto and req.settings.decode_tile_area == 0 and req.settings.max_batch == 2
    assert b.estimate is not None and b.estimate.peak == tiled.peak <= plan.auto_room(free)
    assert "VAE tiled to fit" in describe_plan(req, 128, 8, b)[0]
    kept = build_request("a fox", "direct", 512, 512, decode_tile_area=None, **kw)  # never tile, as asked
    assert not budget(kept, "tiny-sdxl", "cpu", torch.float32).tiled and kept.settings.decode_tile_area is None
    monkeypatch.setattr(plan, "free_memory", lambda device: 2 * GIB + whole.peak)  # room enough: whole, as SPEC §2.4
    roomy = build_request("a fox", "direct", 512, 512, **kw)
    assert not budget(roomy, "tiny-sdxl", "cpu", torch.float32).tiled
    assert roomy.settings.decode_tile_area == plan.DEFAULT_TILE_AREA


def test_a_failed_estimate_leaves_the_tile_area_as_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    """The cost model failing after the plan chose to tile (the tiled estimate raises) leaves no tiling behind: the
    run goes on as asked, with the fallback batch."""
    from hiresdiff.plan import budget

    real = plan.request_cost

    def failing_when_tiled(req: Any, model: str, **overrides: Any) -> CostReport:
        if req.settings.decode_tile_area == 0:
            raise RuntimeError("boom")
        return real(req, model, **overrides)

    monkeypatch.setattr(plan, "request_cost", failing_when_tiled)
    monkeypatch.setattr(plan, "free_memory", lambda device: GIB)  # no room: the whole decode would be tiled
    req = build_request("a fox", "direct", 512, 512, steps=2, previews=False)
    b = budget(req, "tiny-sdxl", "cpu", torch.float32)
    assert b.report is None and "boom" in b.reason and not b.tiled
    assert req.settings.decode_tile_area == plan.DEFAULT_TILE_AREA and req.settings.max_batch == AUTO_FALLBACK
