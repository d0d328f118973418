"""Generate one process's share of a benchmark: load the model once, then time and record each image.

Each image is made under its claim (:mod:`~hiresdiff.bench.claims`), so other runs on the same ``--out`` make the
others; its record names the process that made it (``made_by``: pid, host, rank).

Per image the record holds wall time (seconds, the accelerator synchronised before and after), peak accelerator
memory (``torch.cuda.max_memory_allocated`` after a reset, GB = 2³⁰ bytes as nvidia-smi and the papers count;
``None`` off CUDA) and the model FLOPs of :func:`hiresdiff.cost.model_cost`, counted once per group because they
depend on neither prompt nor seed.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from hiresdiff.bench.claims import Claim, Owner, claim, release
from hiresdiff.bench.plan import BenchPlan, Group, Item
from hiresdiff.bench.records import claim_path, device_name, is_finished, item_paths, versions, write_json
from hiresdiff.config import AUTO
from hiresdiff.cost import CostReport, model_cost
from hiresdiff.errors import HiresError
from hiresdiff.images import save_png
from hiresdiff.memory import free_memory
from hiresdiff.pipeline import (
    GenerationRequest,
    GenerationResult,
    HiresPipeline,
    build_request,
    resolve_device,
    resolve_dtype,
)

GIB = 2**30


@dataclass
class RunOptions:
    """How this process runs its items: device (``None``: the accelerate process's device), dtype (``None``:
    float16 on CUDA, float32 elsewhere), FLOP counting, an untimed warm-up generation, progress lines."""

    device: str | None = None
    dtype: str | None = None
    allow_pickle: bool = False
    flops: bool = True
    memory_check: bool = True
    warmup: bool = False
    progress: bool = True
    process_index: int = 0
    num_processes: int = 1


class CostCache:
    """The cost model's report per group, computed once (``None`` when the cost model cannot count this model);
    FLOPs go into the records when ``enabled``."""

    def __init__(self, plan: BenchPlan, enabled: bool) -> None:
        self.plan, self.enabled = plan, enabled
        self._reports: dict[Group, CostReport | None] = {}

    def report(self, group: Group) -> CostReport | None:
        if group not in self._reports:
            size, kwargs = group.size, self.plan.request_kwargs(group)
            try:
                self._reports[group] = model_cost(group.method, self.plan.model, size.width, size.height, **kwargs)
            except HiresError as exc:
                print(f"hiresdiff: warning: no cost estimate for {group.slug}: {exc}", file=sys.stderr)
                self._reports[group] = None
        return self._reports[group]

    def get(self, group: Group) -> dict[str, Any] | None:
        """The report as recorded (``None`` when FLOPs are off)."""
        report = self.report(group) if self.enabled else None
        return None if report is None else report.to_dict()


#: the settings the plan settles for a group (``max_batch`` auto, and the VAE tiling when a whole decode does not
#: fit), applied to each of its items: every image of a group runs as its first was planned
SETTLED = ("max_batch", "decode_tile_area")


def check_memory(
    plan: BenchPlan, items: list[Item], opts: RunOptions, costs: CostCache, settled: dict[Group, dict[str, Any]]
) -> None:
    """Before the model loads: every group among ``items`` is planned as ``hiresdiff generate`` plans a request
    (:func:`hiresdiff.plan.budget_for`: ``max_batch`` auto settled, the VAE tiled when a whole decode does not fit)
    and fits the device's free memory by the cost model's estimate, else one line naming the group and what fits
    (:func:`hiresdiff.plan.check_budget`). What the plan settled is kept in ``settled`` (:data:`SETTLED`)."""
    from hiresdiff.models.loading import resolve_model
    from hiresdiff.plan import BENCH_FLAGS, budget_for, check_budget

    device = resolve_device(opts.device)
    dtype = resolve_dtype(opts.dtype or ("float16" if device.startswith("cuda") else "float32"))
    grid, free = resolve_model(plan.model, allow_pickle=opts.allow_pickle).pixel_grid, free_memory(device)
    first_of_group = {item.group: item for item in reversed(items)}  # reversed: the first item of each wins
    for item in first_of_group.values():
        if costs.report(item.group) is None:
            continue
        req = item_request(plan, item)
        b = budget_for(req, plan.model, device, dtype, free)
        if b.report is None:
            continue
        settled[item.group] = {name: getattr(req.settings, name) for name in SETTLED}
        try:
            check_budget(b, req, plan.model, dtype, grid, BENCH_FLAGS)
        except HiresError as exc:
            raise HiresError(f"{item.group.slug}: {exc}") from None


class Progress:
    """One line per finished image: done/total, its time, and the estimated time left."""

    def __init__(self, total: int, enabled: bool, prefix: str = "") -> None:
        self.total, self.enabled, self.prefix = total, enabled, prefix
        self.done, self.start = 0, time.perf_counter()

    def skip(self) -> None:
        """An item that will not be made here."""
        self.total -= 1

    def step(self, item: Item, seconds: float) -> None:
        self.done += 1
        if not self.enabled:
            return
        left = (time.perf_counter() - self.start) / self.done * (self.total - self.done)
        eta = time.strftime("%H:%M:%S", time.gmtime(left))
        print(f"{self.prefix}[{self.done}/{self.total}] {item.id} {seconds:.2f} s  ETA {eta}", flush=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_run(pipe: HiresPipeline, req: GenerationRequest) -> tuple[GenerationResult, float, int | None]:
    """Run ``req``: (result, wall seconds, peak allocated bytes on CUDA or ``None``)."""
    device = torch.device(pipe.adapter.device)
    cuda = device.type == "cuda"
    _sync(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    begin = time.perf_counter()
    res = pipe.run(req, progress=False)
    _sync(device)
    seconds = time.perf_counter() - begin
    return res, seconds, torch.cuda.max_memory_allocated(device) if cuda else None


def item_request(plan: BenchPlan, item: Item) -> GenerationRequest:
    g = item.group
    prompt = plan.prompts[item.prompt_index].text
    kwargs = {**plan.request_kwargs(g), "seed": item.seed, "previews": False}
    return build_request(prompt, g.method, g.size.width, g.size.height, **kwargs)


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def make_record(
    plan: BenchPlan, item: Item, req: GenerationRequest, res: GenerationResult, measured: dict[str, Any]
) -> dict[str, Any]:
    """The JSON record of one image: coordinates, settings, then ``measured`` (image file, time, memory, FLOPs,
    device, versions)."""
    g, prompt = item.group, plan.prompts[item.prompt_index]
    values = {**dataclasses.asdict(req.settings), **dataclasses.asdict(req.params)}
    return {
        "id": item.id,
        "group": g.slug,
        "method": g.method,
        "preset": g.preset,
        "size": g.size.label,
        "width": g.size.width,
        "height": g.size.height,
        "megapixels": g.size.megapixels,
        "prompt_index": item.prompt_index,
        "prompt": prompt.text,
        "prompt_source": prompt.source,
        "seed": item.seed,
        "sweep": {name: _jsonable(values[name]) for name, _ in g.sweep},
        "model": plan.model,
        "settings": res.metadata[0],
        **measured,
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


@dataclass
class RunSummary:
    """What :func:`run_items` did: images made here, and the items left to other live runs with their holder."""

    generated: int = 0
    left: list[tuple[Item, Owner]] = field(default_factory=list)

    def left_line(self) -> str | None:
        """``N item(s) left to another run (pid P on host H)``, ``None`` when none was."""
        if not self.left:
            return None
        holders = "; ".join(dict.fromkeys(str(owner) for _, owner in self.left))
        return f"{len(self.left)} item(s) left to another run ({holders})"


class Maker:
    """Makes items: loads the model at the first one, then generates, times and records each."""

    def __init__(self, plan: BenchPlan, out: Path, opts: RunOptions) -> None:
        self.plan, self.out, self.opts = plan, out, opts
        self.me = Owner.this_process(opts.process_index, opts.num_processes)
        self.costs = CostCache(plan, opts.flops)
        self.pipe: HiresPipeline | None = None
        self.env: dict[str, Any] = {}
        #: what the plan settled for each group (:data:`SETTLED`), once, before the clock of any item
        self.settled: dict[Group, dict[str, Any]] = {}

    def _ready(self, item: Item) -> HiresPipeline:
        if self.pipe is None:
            self.pipe = load(self.plan, self.opts)
            self.env = {
                "device": device_name(self.pipe.adapter.device),
                "dtype": str(self.pipe.adapter.dtype).removeprefix("torch."),
                "process_index": self.opts.process_index,
                "num_processes": self.opts.num_processes,
                "versions": versions(),
                "made_by": self.me.made_by(),
            }
            if self.opts.warmup:
                self.pipe.run(self.request(self.pipe, item), progress=False)
        return self.pipe

    def request(self, pipe: HiresPipeline, item: Item) -> GenerationRequest:
        """``item``'s request as its group was planned (by the memory check before the model loaded, else on the
        loaded pipeline when ``max_batch`` is ``auto``: :func:`hiresdiff.plan.settle_batch`), once per group, so no
        item's time includes the estimate."""
        req = item_request(self.plan, item)
        if item.group not in self.settled and req.settings.max_batch == AUTO:
            from hiresdiff.plan import settle_batch

            settle_batch(pipe, req)
            self.settled[item.group] = {name: getattr(req.settings, name) for name in SETTLED}
        for name, value in self.settled.get(item.group, {}).items():
            setattr(req.settings, name, value)
        return req

    def make(self, item: Item) -> float:
        """Generate, time and record ``item``; its wall time."""
        pipe = self._ready(item)
        cost = self.costs.get(item.group)
        req = self.request(pipe, item)
        res, seconds, peak = timed_run(pipe, req)
        measured = {
            "image": item_paths(self.out, item)[0].name,
            "seconds": seconds,
            "peak_memory_gb": None if peak is None else peak / GIB,
            "peak_memory_bytes": peak,
            "flops": None if cost is None else cost["model_flops"],
            "cost": cost,
            **self.env,
        }
        write_item(self.out, item, res, make_record(self.plan, item, req, res, measured))
        return seconds


class ItemWriteError(Exception):
    """An item's PNG or record could not be written (``error``: the ``OSError``, e.g. a full disk)."""

    def __init__(self, path: Path, error: OSError) -> None:
        super().__init__(f"{path}: {error}")
        self.path, self.error = path, error


def write_item(out: Path, item: Item, res: GenerationResult, record: dict[str, Any]) -> None:
    """The PNG, then the JSON record (each atomic); the PNG is removed when the record cannot be written."""
    png, path = item_paths(out, item)
    try:
        save_png(res.images[0], png, res.metadata[0])
    except OSError as error:
        raise ItemWriteError(png, error) from error
    try:
        write_json(path, record)
    except BaseException as error:
        png.unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise ItemWriteError(path, error) from error
        raise


def make_claimed(maker: Maker, item: Item) -> float | Owner | None:
    """Make ``item`` under its claim: its wall time; the :class:`Owner` of a live claim in the way (left to it);
    ``None`` when it is finished (perhaps by another run meanwhile; it is never overwritten)."""
    if is_finished(maker.out, item):
        return None
    held: list[Claim] = []
    try:
        got = claim(claim_path(maker.out, item), maker.me, held)
        if isinstance(got, Owner):
            return got
        return None if is_finished(maker.out, item) else maker.make(item)
    finally:
        release(held)  # finished, failed or interrupted


def run_items(plan: BenchPlan, items: list[Item], out: Path, opts: RunOptions) -> RunSummary:
    """Make the unfinished ``items`` (this process's share) that no other live run holds; the items held are
    looked at once more at the end (finished by then, or their run gone)."""
    prefix = f"[process {opts.process_index}] " if opts.num_processes > 1 else ""
    progress = Progress(len(items), opts.progress, prefix)
    maker, summary = Maker(plan, out, opts), RunSummary()
    if opts.memory_check and items:
        check_memory(plan, items, opts, maker.costs, maker.settled)
    for second in (False, True):
        queue = [item for item, _ in summary.left] if second else items
        summary.left = []
        for item in queue:
            done = make_claimed(maker, item)
            if isinstance(done, float):
                summary.generated += 1
                progress.step(item, done)
            elif done is None or second:  # held items stay in the total until the second look
                progress.skip()
            if isinstance(done, Owner):
                summary.left.append((item, done))
    return summary


def load(plan: BenchPlan, opts: RunOptions) -> HiresPipeline:
    """The plan's model on this process's device (dtype default: float16 on CUDA, float32 elsewhere)."""
    device = resolve_device(opts.device)
    dtype = opts.dtype or ("float16" if device.startswith("cuda") else "float32")
    return HiresPipeline.from_model(plan.model, dtype=dtype, device=device, allow_pickle=opts.allow_pickle)
