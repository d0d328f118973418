"""The run plan shown before any work: stages and their sizes, steps, images, the cost model's FLOPs and the
estimated peak memory of the same request (:mod:`hiresdiff.cost`, :mod:`hiresdiff.memory`) — all without loading
weights; ``max_batch="auto"`` is settled here (:func:`choose_max_batch`); a request that would not fit stops here
with what would."""

from __future__ import annotations

import copy
import dataclasses
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from hiresdiff import pipeline
from hiresdiff.config import AUTO, DEFAULT_TILE_AREA, LOW_VRAM_DEFAULTS, GenerationSettings, fallback_batch
from hiresdiff.cost.meta import CallPeak
from hiresdiff.cost.model import CostReport, Watch, architecture_of
from hiresdiff.errors import HiresError
from hiresdiff.memory import (
    GIB,
    MemoryEstimate,
    free_memory,
    gib,
    loaded_bytes,
    rows_that_fit,
    side_scale_that_fits,
)
from hiresdiff.models.builtins import BUILTIN_MODELS
from hiresdiff.placement import parks_text
from hiresdiff.stages import area_steps, canvas_at, doubling_phases, native_area_canvas, progressive_phases

#: how each method plans its canvases: ``(height, width, native, grid) → [(h, w), …]`` in sampling order
_PROGRESSIVE = ("demofusion", "accdiffusion", "apt")


def stage_sizes(method: str, height: int, width: int, native: int, grid: int, stages: int = 1) -> list[tuple[int, int]]:
    """The canvases ``method`` samples, in order (pixels, height × width)."""
    if method in _PROGRESSIVE:
        return [(p.height, p.width) for p in progressive_phases(height, width, native, grid)]
    if method == "scalediff":
        return [(p.height, p.width) for p in doubling_phases(height, width, native, grid)]
    if method == "apldm":
        base = native_area_canvas(height, width, native, grid)
        return [base] if base == (height, width) else [base, *area_steps(height, width, base, stages, grid)]
    if method == "resize":
        return [canvas_at(height, width, native, grid), (height, width)]
    return [(height, width)]


def plan_phases(req: Any, native: int, grid: int) -> list[tuple[int, int]]:
    """The canvases of a validated request (a method's params may say them: ``params.canvases(h, w, native,
    grid)``)."""
    s, params = req.settings, req.params
    if hasattr(params, "canvases"):
        return params.canvases(s.height, s.width, native, grid)
    stages = len(params.fractions(s.height, s.width)) if hasattr(params, "fractions") else 1
    return stage_sizes(req.method.name, s.height, s.width, native, grid, stages)


def request_cost(req: Any, model: str, watch: Watch | None = None, **overrides: Any) -> CostReport:
    """The cost model's report (FLOPs, memory) of a validated request on ``model``'s architecture; ``overrides``
    change settings (e.g. what ``--low-vram`` implies). An input image is left out (a generation from noise); an
    SR model (``--upscaler``) is priced as its own component wherever the method enlarges pixels.

    Reports are kept per request signature (:func:`cost_key`): the auto batch search, the advice and every later
    API call of the same request shape reuse them instead of running the estimate again; reports of fixed
    architectures (built-in names, known hub ids) are also kept on disk for later processes
    (:func:`hiresdiff.cost.store.load_report`). ``watch`` goes to the cost model (:data:`hiresdiff.cost.model.Watch`:
    it may stop a run that is known not to fit, which then raises and keeps nothing)."""
    from hiresdiff.cost import model_cost, store

    s = req.settings
    key, width, height, kwargs = _request_key(req, model, overrides)
    controlnet, upscaler = req.extras.controlnet is not None, req.extras.upscaler
    with _PRICED_LOCK:
        if key in _PRICED:
            _PRICED.move_to_end(key)
            return copy.deepcopy(_PRICED[key])
    fixed = _fixed(model)
    kept = fixed and store.load_report(key)
    if kept:
        report = CostReport.from_dict(kept)
    else:
        report = model_cost(
            req.method.name,
            model,
            width,
            height,
            prompt=s.prompt,
            seed=s.seed or 0,
            controlnet=controlnet,
            upscaler=upscaler,
            watch=watch,
            **kwargs,
        )
        if fixed:
            store.save_report(key, report.to_dict())
    with _PRICED_LOCK:
        _PRICED[key] = copy.deepcopy(report)
        while len(_PRICED) > PRICED_SIZE:
            _PRICED.popitem(last=False)
    return report


def _request_key(req: Any, model: str, overrides: dict[str, Any]) -> tuple[str, int, int, dict[str, Any]]:
    """The report key of ``req`` with ``overrides`` (:func:`cost_key`), its size, and the cost model's keywords."""
    s = req.settings
    skip = {"prompt", "width", "height", "max_pixels", "strength", "seed"}
    settings = {k: v for k, v in dataclasses.asdict(s).items() if k not in skip}
    overrides = dict(overrides)
    width, height = overrides.pop("width", s.width), overrides.pop("height", s.height)
    kwargs = {**settings, **dataclasses.asdict(req.params), **overrides}
    controlnet, upscaler = req.extras.controlnet is not None, req.extras.upscaler
    shaped = {**kwargs, "upscaler": None if upscaler is None else upscaler.sha256}
    return cost_key(req.method.name, model, width, height, len(s.prompt), controlnet, shaped), width, height, kwargs


def _fixed(model: str) -> bool:
    """Whether ``model`` names an architecture that cannot change (built-in names, known hub ids): its reports
    may be kept on disk."""
    from hiresdiff.cost.model import ARCHITECTURES

    return model in BUILTIN_MODELS or model in ARCHITECTURES


#: reports kept by :func:`request_cost` (least recently used dropped first)
PRICED_SIZE = 256
_PRICED: OrderedDict[str, CostReport] = OrderedDict()
_PRICED_LOCK = threading.Lock()
#: what a :data:`~hiresdiff.cost.model.Watch` sees of a run so far: weights, call peaks, canvas, VAE upcast and the
#: most rows of one denoiser call — kept where an estimate was stopped (:func:`keep_stopped_peak`)
RunSoFar = tuple[dict[str, int], dict[str, CallPeak], int, bool, int]
#: estimates that were stopped (:class:`_Exceeded`), by report key and dtype: the lower bound of their peak
#: (``peak_at_least``, bytes) — a later search at less room knows without running that they do not fit — and the
#: memory of the run so far (``parts``, :func:`stopped_estimate`)
_STOPPED: dict[str, dict[str, Any]] = {}


def _stopped_key(req: Any, model: str, dtype: torch.dtype, device: str, overrides: dict[str, Any]) -> str:
    parked = " text parked" if parks_text(device) and not req.settings.low_vram else ""
    return _request_key(req, model, overrides)[0] + f" stopped at {dtype}{parked}"


def stopped_peak(req: Any, model: str, dtype: torch.dtype, device: str = "cpu", **overrides: Any) -> int:
    """The largest peak (bytes, at ``dtype`` on ``device``) an estimate of ``req`` with ``overrides`` was stopped
    at so far — a lower bound of its peak — or 0 when none was stopped (kept in the process and, for fixed
    architectures, on disk beside the reports)."""
    return int(_stopped(req, model, dtype, device, overrides).get("peak_at_least", 0))


def _stopped(req: Any, model: str, dtype: torch.dtype, device: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """The record of the highest stop of the estimate of ``req`` with ``overrides`` (in the process or on disk)."""
    from hiresdiff.cost import store

    key = _stopped_key(req, model, dtype, device, overrides)
    with _PRICED_LOCK:
        known = _STOPPED.get(key, {})
    kept = (_fixed(model) and store.load_report(key)) or {}
    return max(known, kept, key=lambda record: int(record.get("peak_at_least", 0)))


def stopped_estimate(
    req: Any, model: str, dtype: torch.dtype, device: str = "cpu", **overrides: Any
) -> tuple[MemoryEstimate, int] | None:
    """Where the estimate of ``req`` with ``overrides`` was stopped at its highest: the memory of the run so far
    (:class:`MemoryEstimate`) and the most rows of one denoiser call in it; ``None`` when none was stopped (or
    stopped without them kept)."""
    parts = _stopped(req, model, dtype, device, overrides).get("parts")
    if not parts:
        return None
    peaks = {name: CallPeak(**peak) for name, peak in parts["peaks"].items()}
    args = (parts["weights"], peaks, parts["canvas"], parts["upcast"], dtype, req.settings.low_vram, device)
    return MemoryEstimate.of_parts(*args), int(parts["rows"])


def keep_stopped_peak(
    req: Any,
    model: str,
    dtype: torch.dtype,
    peak: int,
    device: str = "cpu",
    parts: RunSoFar | None = None,
    **overrides: Any,
) -> None:
    """Remember that the estimate of ``req`` with ``overrides`` at ``dtype`` on ``device`` exceeds ``peak`` bytes,
    and (``parts``: :data:`RunSoFar`) where it was stopped."""
    from hiresdiff.cost import store

    key = _stopped_key(req, model, dtype, device, overrides)
    if peak <= stopped_peak(req, model, dtype, device, **overrides):
        return
    record: dict[str, Any] = {"peak_at_least": peak}
    if parts is not None:
        weights, peaks, canvas, upcast, rows = parts
        record["parts"] = {
            "weights": dict(weights),
            "peaks": {name: dataclasses.asdict(peak) for name, peak in peaks.items()},
            "canvas": canvas,
            "upcast": upcast,
            "rows": rows,
        }
    with _PRICED_LOCK:
        _STOPPED[key] = record
    if _fixed(model):
        store.save_report(key, record)


def cost_key(
    method: str, model: str, width: int, height: int, prompts: int, controlnet: bool, kwargs: dict[str, Any]
) -> str:
    """What a report depends on: everything of the request but the prompts' text and the seed. The cost model's
    numbers are shapes: text is tokenised to a fixed length (longer prompts are truncated) and the seed only moves
    values (noise, DemoFusion's jitter offsets), never a tensor's size or a call's rows (tested)."""
    return repr((method, model, width, height, prompts, controlnet, sorted(kwargs.items())))


def low_vram_overrides(s: GenerationSettings) -> dict[str, Any]:
    """What ``--low-vram`` changes for these settings (:data:`~hiresdiff.config.LOW_VRAM_DEFAULTS` as upper bounds)."""
    tile = LOW_VRAM_DEFAULTS["decode_tile_area"]
    area = tile if s.decode_tile_area is None else min(s.decode_tile_area, tile)
    rows = LOW_VRAM_DEFAULTS["max_batch"]
    return {
        "low_vram": True,
        "max_batch": rows if s.max_batch == AUTO else min(s.max_batch, rows),
        "decode_tile_area": area,
    }


#: ``max_batch="auto"`` leaves this share of the free memory unused, and at least :data:`AUTO_MARGIN_MIN`: the
#: estimate is a lower bound (no framework workspace, no allocator fragmentation, :mod:`hiresdiff.memory`)
AUTO_MARGIN = 0.10
AUTO_MARGIN_MIN = GIB
#: ``max_batch`` large enough that every view of a step shares one denoiser call (the cap is read from that run)
_UNBOUNDED = 2**20


def auto_room(free: int) -> int:
    """Bytes ``auto`` may fill of ``free``: all but 10 % of it, keeping at least 1 GiB (:data:`AUTO_MARGIN`)."""
    return free - max(int(free * AUTO_MARGIN), AUTO_MARGIN_MIN)


def batch_candidates(cap: int, branches: int) -> list[int]:
    """The ``max_batch`` values worth trying, ascending: multiples of the guidance branches per view (values in
    between make the same calls), up to ``cap``, the most rows any call of the run holds (more changes nothing)."""
    return [*range(branches, cap, branches), cap] if cap > branches else [cap]


def largest_fitting(candidates: list[int], peak: Callable[[int], int], room: int, guess: int) -> int:
    """The largest of ``candidates`` (ascending; the last is known not to fit) whose ``peak`` stays within ``room``,
    or the smallest when none does. ``peak`` must not decrease with the rows (it does not: more rows per call only
    add stacked views and activations), which makes the answer equal to trying every candidate.

    Each probe is where the answer is predicted to lie, and the search stops once a fitting candidate's next one is
    known not to fit: the first probe is the index ``guess``, the next ones the answers read off a straight line
    through two priced peaks (:func:`_predicted`; the peak is close to affine in the rows: activations and stacked
    views grow with them). An exact line settles the choice in two probes besides the last candidate; a
    search that has not settled after :data:`SECANT_ROUNDS` probes bisects, so a poor prediction costs at most a
    bisection's logarithm more."""
    known: dict[int, int] = {}

    def fits(i: int) -> bool:
        if i not in known:
            known[i] = peak(candidates[i])
        return known[i] <= room

    lo, hi = -1, len(candidates) - 1  # fits(lo) (lo = -1: none known), not fits(hi)
    known[hi] = peak(candidates[hi])
    probe, rounds = guess, 0
    while hi - lo > 1:
        rounds += 1
        i = probe if lo < probe < hi and rounds <= SECANT_ROUNDS else (lo + hi) // 2
        lo, hi = (i, hi) if fits(i) else (lo, i)
        probe = _predicted(candidates, known, lo, hi, room)
    return candidates[max(lo, 0)]


#: probes led by the straight-line prediction before :func:`largest_fitting` bisects
SECANT_ROUNDS = 4


def _predicted(candidates: list[int], known: dict[int, int], lo: int, hi: int, room: int) -> int:
    """The index to probe next: the last candidate whose peak, on the line through two priced peaks, stays within
    ``room`` (its neighbour when that one is ``lo``, known to fit). The line joins the nearest fitting (``lo``) and
    non-fitting (``hi``) candidates, or the two smallest non-fitting ones while none is known to fit; with a
    single priced peak the search bisects."""
    above = sorted(i for i in known if i >= hi)
    a, b = (lo, hi) if lo >= 0 else (above[0], above[1]) if len(above) > 1 else (-1, -1)
    if a < 0 or known[b] <= known[a]:
        return (lo + hi) // 2
    (r0, p0), (r1, p1) = (candidates[a], known[a]), (candidates[b], known[b])
    rows = r0 + (room - p0) * (r1 - r0) / (p1 - p0)
    answer = max(lo, min(hi - 1, sum(c <= rows for c in candidates) - 1))
    return answer + 1 if answer == lo else answer


def choose_max_batch(req: Any, model: str, dtype: torch.dtype, free: int | None, device: str = "cpu") -> CostReport:
    """Settle ``max_batch="auto"`` of ``req`` (its settings then hold the number) and return the cost report at it.

    The choice is the largest number of rows per denoiser call whose estimated peak (:class:`MemoryEstimate`)
    stays within :func:`auto_room` of ``free``, capped by the most rows any call of the run can hold (views ×
    guidance branches of the largest step: :attr:`CostReport.denoiser_rows` of a run with no limit). A run with no
    limit that does not fit is stopped where it first exceeds the room; the most rows of one call up to there are
    then the cap (with at least as many, a run makes the same calls up to that point and does not fit either). The
    peak grows with the rows per call, so the search over :func:`batch_candidates` (:func:`largest_fitting`) is
    exact (equal to trying every candidate); its first probe is the linear guess from the unlimited run's denoiser
    call (activations ∝ rows), the next ones follow the line through the peaks priced so far, so most choices cost
    that (partial) run and two or three more. When a call other than the denoiser's (an untiled VAE decode)
    exceeds the room alone, no number of rows fits (none changes that call): the smallest is taken, as the search
    would end, without searching, and the memory check names what would fit. Priced reports are reused
    (:func:`request_cost`'s cache). ``free`` unknown: :func:`~hiresdiff.config.fallback_batch`. ``device``: where the
    run goes (whether its text encoders wait on the CPU, :func:`~hiresdiff.placement.parks_text`).
    """
    s = req.settings
    if free is None:
        s.max_batch = fallback_batch(s.low_vram)
        return request_cost(req, model, max_batch=s.max_batch)
    room = auto_room(free)
    reports: dict[int, CostReport] = {}

    def estimate(rows: int) -> MemoryEstimate:
        if rows not in reports:
            reports[rows] = request_cost(req, model, max_batch=rows)
        return MemoryEstimate.of(reports[rows], dtype, s.low_vram, device)

    def over(weights: dict[str, int], peaks: dict[str, CallPeak], canvas: int, upcast: bool, rows: int) -> None:
        """Stop a run whose memory so far already exceeds the room (its peak can only grow)."""
        so_far = MemoryEstimate.of_parts(weights, peaks, canvas, upcast, dtype, s.low_vram, device).peak
        if so_far > room:
            raise _Exceeded(so_far, (weights, peaks, canvas, upcast, rows))

    def priced(rows: int) -> MemoryEstimate | None:
        """The memory at ``rows`` (its report kept), or ``None`` when the run was stopped beyond the room — now,
        or before (a stopped estimate of the same request: no run), its stop kept for later."""
        if stopped_peak(req, model, dtype, device, max_batch=rows) > room:
            return None
        try:
            reports[rows] = request_cost(req, model, watch=over, max_batch=rows)
        except _Exceeded as stop:
            keep_stopped_peak(req, model, dtype, stop.peak, device, stop.parts, max_batch=rows)
            return None
        return estimate(rows)

    # every view of a step in one call: the answer when it fits; else the run stops where it first exceeds the room,
    # and the most rows of one call so far bound the search: with at least as many, a run makes the same calls up to
    # there (so it does not fit either) — the rest of the unlimited run is never run
    top = priced(_UNBOUNDED)
    stopped = stopped_estimate(req, model, dtype, device, max_batch=_UNBOUNDED) if top is None else None
    if stopped is not None:
        top, rows_so_far = stopped
    elif top is None:  # stopped before without its parts: run it whole
        top = estimate(_UNBOUNDED)
    finished = _UNBOUNDED in reports
    if finished:
        cap = max(1, reports[_UNBOUNDED].denoiser_rows)
        reports[cap] = reports.pop(_UNBOUNDED)
        if top.peak <= room:
            s.max_batch = cap
            return reports[cap]
    branches = 2 if s.cfg and architecture_of(model) not in _SINGLE_BRANCH else 1
    if not finished:
        cap = max(branches, rows_so_far)
    candidates = batch_candidates(cap, branches)
    if top.apart_from_denoising > room:  # no rows fit: the VAE alone is too large (no search needed)
        s.max_batch = candidates[0]
        return reports[s.max_batch] if s.max_batch in reports else request_cost(req, model, max_batch=s.max_batch)

    def probe(rows: int) -> int:
        """The peak at ``rows``, or a lower bound above the room where its run (or at the cap the unlimited one)
        was stopped."""
        if rows in reports:
            return estimate(rows).peak
        if rows == cap and not finished:
            return top.peak
        found = priced(rows)
        return found.peak if found is not None else stopped_peak(req, model, dtype, device, max_batch=rows)

    linear = rows_that_fit(top, room, branches == 2) or 0
    guess = max(0, sum(c <= linear for c in candidates) - 1)
    s.max_batch = largest_fitting(candidates, probe, room, guess)
    return reports[s.max_batch] if s.max_batch in reports else request_cost(req, model, max_batch=s.max_batch)


class _Exceeded(BaseException):
    """Stops a probe of :func:`choose_max_batch` once its estimate exceeds the room: the run's peak so far
    (``peak``) already rules the candidate out. A :class:`BaseException` so no handler in the generation code on
    its way up takes it for a failure."""

    def __init__(self, peak: int, parts: RunSoFar) -> None:
        super().__init__(peak)
        self.peak, self.parts = peak, parts


#: architectures whose guidance is one branch per view (FLUX.1 is guidance-distilled: no unconditional half)
_SINGLE_BRANCH = ("tiny-flux", "random-flux")


def settle_batch(hp: pipeline.HiresPipeline, req: Any) -> None:
    """Settle ``max_batch="auto"`` for a run on the loaded pipeline ``hp`` (API callers): :func:`budget`'s choice
    on its adapter's device, with the weights already loaded there added back to the free memory; a model the
    cost model has no architecture for gets :func:`~hiresdiff.config.fallback_batch`."""
    ad, s = hp.adapter, req.settings
    arch = cost_architecture(hp.model_name, ad.family, ad.native_size)
    if arch is None:
        s.max_batch = fallback_batch(s.low_vram)
        return
    budget(req, arch, str(ad.device), ad.dtype, loaded=loaded_bytes(ad.pipe, ad.device))


def cost_architecture(name: str, family: str, native: int) -> str | None:
    """The cost model's name for a loaded model: its own when the cost model knows it (built-in names, known hub
    ids), else the built-in architecture of its family and native size; ``None`` when there is none."""
    from hiresdiff.cost.model import ARCHITECTURES, FAMILY_ARCHITECTURES

    if name in BUILTIN_MODELS or name in ARCHITECTURES:
        return name
    return FAMILY_ARCHITECTURES.get((family, native))


@dataclass(frozen=True)
class Budget:
    """The cost model's view of a request: its report and memory estimate at the run's dtype, and the device's
    free memory (``None``: unknown); ``reason`` says why there is no report; ``auto``: ``max_batch`` was chosen
    here (:func:`choose_max_batch`); ``tiled``: the VAE tiles because its whole call did not fit (:func:`budget`)."""

    report: CostReport | None
    estimate: MemoryEstimate | None
    free: int | None
    device: str
    reason: str = ""
    auto: bool = False
    tiled: bool = False

    def summary(self) -> str:
        if self.report is None or self.estimate is None:
            return f"no cost estimate ({self.reason})"
        free = f", {gib(self.free)} free on {self.device}" if self.free is not None else ""
        return f"{self.report.model_flops / 1e12:,.4g} TFLOP, est. peak {gib(self.estimate.peak)}{free}"


def budget(req: Any, model: str, device: str, dtype: torch.dtype, *, loaded: int = 0) -> Budget:
    """Cost and memory of ``req`` on ``device`` at ``dtype``, without loading weights; ``max_batch="auto"`` is
    settled first (:func:`choose_max_batch`; without a usable estimate, :func:`~hiresdiff.config.fallback_batch`).
    ``loaded``: bytes of weights already on the device, which its free memory lacks and the estimate counts.

    When a whole VAE call at the default tile area (SPEC §2.4: whole up to 2048²) sets a peak above the room
    ``auto`` aims at (:func:`auto_room`), the VAE tiles every call instead (``decode_tile_area`` 0, recorded with
    the image) and ``auto`` is settled again — as ComfyUI falls back to a tiled decode, but before the run: SDXL's
    float32 decode of a whole 2048² image alone is 12 GiB. A tile area given explicitly is kept."""
    free = free_memory(device)
    return budget_for(req, model, device, dtype, None if free is None else free + loaded)


def budget_for(req: Any, model: str, device: str, dtype: torch.dtype, free: int | None) -> Budget:
    """:func:`budget` with ``free`` bytes free on ``device`` (``None``: unknown) — e.g. a card not at hand."""
    s = req.settings
    auto, asked_area = s.max_batch == AUTO, s.decode_tile_area
    try:
        report = _settled(req, model, dtype, free, device, auto)
        est = MemoryEstimate.of(report, dtype, s.low_vram, device)
        tiled = free is not None and _whole_vae_too_large(s, est, free)
        if tiled:
            s.decode_tile_area, s.max_batch = 0, AUTO if auto else s.max_batch
            tiled_report = _settled(req, model, dtype, free, device, auto)
            tiled_est = MemoryEstimate.of(tiled_report, dtype, s.low_vram, device)
            if tiled_est.peak < est.peak:
                report, est = tiled_report, tiled_est
            else:  # tiling does not lower the peak: the request stays as asked
                tiled, s.decode_tile_area, s.max_batch = False, DEFAULT_TILE_AREA, AUTO if auto else s.max_batch
                report = _settled(req, model, dtype, free, device, auto)
    except HiresError as exc:
        reason = str(exc)
    except Exception as exc:  # the estimate is advice: a cost-model failure must not stop a generation
        reason = f"cost model failed: {type(exc).__name__}: {exc}"[:200]
    else:
        return Budget(report, est, free, device, auto=auto, tiled=tiled)
    s.decode_tile_area = asked_area  # no estimate, no reason to tile: the request as asked
    if auto:
        s.max_batch = fallback_batch(s.low_vram)
    return Budget(None, None, free, device, reason, auto=auto)


def _settled(req: Any, model: str, dtype: torch.dtype, free: int | None, device: str, auto: bool) -> CostReport:
    """The report of ``req``, its ``max_batch`` settled first when ``auto``."""
    return choose_max_batch(req, model, dtype, free, device) if auto else request_cost(req, model)


def _whole_vae_too_large(s: GenerationSettings, est: MemoryEstimate, free: int) -> bool:
    """Whether a VAE call at the default tile area sets a peak beyond :func:`auto_room` (outside low-VRAM mode,
    which tiles from its own smaller area)."""
    default = not s.low_vram and s.decode_tile_area == DEFAULT_TILE_AREA
    return default and est.largest == "vae" and est.peak > auto_room(free)


#: how a change of settings is spelled on a command line (``hiresdiff generate``; :data:`BENCH_FLAGS`)
GENERATE_FLAGS = {
    "low_vram": "--low-vram",
    "max_batch": "--max-batch {v}",
    "decode_tile_area": "--tile-area {v}",
    "previews": "--no-previews",
    "size": "--width {width} --height {height}",
}
BENCH_FLAGS = {**GENERATE_FLAGS, "decode_tile_area": "--set decode_tile_area={v}", "size": "--sizes {width}x{height}"}


_DEFAULTS = {f.name: f.default for f in dataclasses.fields(GenerationSettings)}


def _spell(change: dict[str, Any], flags: dict[str, str], s: GenerationSettings, auto: bool = False) -> str:
    """The flags of ``change``. ``--low-vram`` brings its batch and tile sizes only where the request kept the
    defaults (``auto``: the batch size was the default ``auto``), so sizes given explicitly that it lowers are
    spelled too."""
    if "width" in change:
        return flags["size"].format(**change)
    if change.get("low_vram"):
        given = {"max_batch": not auto and s.max_batch != _DEFAULTS["max_batch"]}
        kept = [k for k in ("max_batch", "decode_tile_area") if given.get(k, getattr(s, k) != _DEFAULTS[k])]
        extra = [flags[k].format(v=change[k]) for k in kept if change[k] != getattr(s, k)]
        return " ".join([flags["low_vram"], *extra])
    return " ".join(flags[k].format(v=v) for k, v in change.items())


def check_budget(
    b: Budget, req: Any, model: str, dtype: torch.dtype, grid: int, flags: dict[str, str] = GENERATE_FLAGS
) -> None:
    """Stop with one line when the estimate exceeds the free memory, naming the changes that fit (spelled with
    ``flags``) — each priced again by the cost model: fewer rows per denoiser call, ``--low-vram``, an always-tiled
    VAE, no previews, and a smaller size when a whole-canvas denoiser call sets the peak."""
    est, free = b.estimate, b.free
    if est is None or free is None or est.peak <= free:
        return
    s = req.settings

    def price(change: dict[str, Any]) -> int:
        report = request_cost(req, model, **change)
        return MemoryEstimate.of(report, dtype, change.get("low_vram", s.low_vram), b.device).peak

    changes: list[dict[str, Any]] = []
    if (rows := rows_that_fit(est, free, s.cfg)) is not None:
        changes.append({"max_batch": rows})
    if not s.low_vram:
        changes.append(low_vram_overrides(s))
    if est.largest == "vae" and s.decode_tile_area != 0:
        changes.append({"decode_tile_area": 0})
    if est.largest == "vae" and s.previews:
        changes.append({"previews": False})
    if (f := side_scale_that_fits(est, free, (s.height // grid) * (s.width // grid))) is not None:
        w, h = (max(grid, int(v * f * 0.95) // grid * grid) for v in (s.width, s.height))
        changes.append({"width": w, "height": h})
    fits = [(_spell(change, flags, s, b.auto), peak) for change in changes if (peak := price(change)) <= free]
    settings_only = [change for change in changes if "width" not in change]
    if not fits and len(settings_only) > 1:  # all of them together
        together = {k: v for change in settings_only for k, v in change.items()}
        if (peak := price(together)) <= free:
            fits = [(" ".join(_spell(change, flags, s, b.auto) for change in settings_only), peak)]
    advice = ", ".join(f"{flag} (≈{gib(peak)})" for flag, peak in fits) or "nothing smaller found (another device)"
    raise HiresError(
        f"estimated peak memory {gib(est.peak)} ({est.describe()}) exceeds the {gib(free)} free on {b.device}; "
        f"what fits: {advice} — or --skip-memory-check to run anyway"
    )


def describe_plan(req: Any, native: int, grid: int, b: Budget | None = None, *, full: bool = False) -> list[str]:
    """One line (``full``: several, with the cost model's FLOPs and memory) describing what the request will do."""
    s = req.settings
    sizes = plan_phases(req, native, grid)
    chain = " → ".join(f"{h}×{w}" for h, w in sizes)
    batch = f"max_batch {s.max_batch}" + (" (auto)" if b is not None and b.auto else "")
    batch += ", VAE tiled to fit" if b is not None and b.tiled else ""
    lines = [
        f"plan: {req.method.name} {s.height}×{s.width}, {len(sizes)} stage(s) ({chain}), {s.steps} steps, "
        f"{s.batch_size} image(s), {batch}"
        + (", from an input image" if req.extras.source is not None else "")
        + (f"; {b.summary()}" if b is not None and not full else "")
    ]
    if not full:
        return lines
    lines.append(f"  scheduler {s.scheduler}, guidance {s.guidance}, seed {s.seed}, {batch}")
    lines.append("  parameters: " + ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(req.params).items()))
    if b is None or b.report is None or b.estimate is None:
        lines.append(f"  cost model: unavailable ({b.reason if b else 'not asked'})")
        return lines
    report, est = b.report, b.estimate
    lines.append(
        f"  cost model ({report.architecture}): {report.model_flops / 1e12:,.4g} TFLOP, "
        f"{report.native_samples_per_step:g} native-size denoiser samples per step"
        + (" (without the input image)" if req.extras.source is not None else "")
    )
    free = f"{gib(b.free)} free on {b.device}" if b.free is not None else f"free memory of {b.device} unknown"
    lines.append(f"  memory: est. peak {gib(est.peak)} = {est.describe()}; {free}")
    return lines


pipeline.BATCH_PLANNER = settle_batch  # API runs settle auto with the plan (the pipeline cannot import this module)
