"""Generate one process's share of a benchmark: load the model once, then time and record each image.

Per image the record holds wall time (seconds, the accelerator synchronised before and after), peak accelerator
memory (``torch.cuda.max_memory_allocated`` after a reset, GB = 2³⁰ bytes as nvidia-smi and the papers count;
``None`` off CUDA) and the model FLOPs of :func:`hiresdiff.cost.model_cost`, counted once per group because they
depend on neither prompt nor seed.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from hiresdiff.bench.plan import BenchPlan, Group, Item
from hiresdiff.bench.records import device_name, is_finished, item_paths, versions, write_json
from hiresdiff.cost import model_cost
from hiresdiff.errors import HiresError
from hiresdiff.images import save_png
from hiresdiff.pipeline import GenerationRequest, GenerationResult, HiresPipeline, build_request, resolve_device

GIB = 2**30


@dataclass
class RunOptions:
    """How this process runs its items: device (``None``: the accelerate process's device), dtype (``None``:
    float16 on CUDA, float32 elsewhere), FLOP counting, an untimed warm-up generation, progress lines."""

    device: str | None = None
    dtype: str | None = None
    allow_pickle: bool = False
    flops: bool = True
    warmup: bool = False
    progress: bool = True
    process_index: int = 0
    num_processes: int = 1


class CostCache:
    """Model FLOPs per group (``None`` when off or when the cost model cannot count this model)."""

    def __init__(self, plan: BenchPlan, enabled: bool) -> None:
        self.plan, self.enabled = plan, enabled
        self._costs: dict[Group, dict[str, Any] | None] = {}

    def get(self, group: Group) -> dict[str, Any] | None:
        if not self.enabled:
            return None
        if group not in self._costs:
            size, kwargs = group.size, self.plan.request_kwargs(group)
            try:
                report = model_cost(group.method, self.plan.model, size.width, size.height, **kwargs)
                self._costs[group] = report.to_dict()
            except HiresError as exc:
                print(f"hiresdiff: warning: no FLOP count for {group.slug}: {exc}", file=sys.stderr)
                self._costs[group] = None
        return self._costs[group]


class Progress:
    """One line per finished image: done/total, its time, and the estimated time left."""

    def __init__(self, total: int, enabled: bool, prefix: str = "") -> None:
        self.total, self.enabled, self.prefix = total, enabled, prefix
        self.done, self.start = 0, time.perf_counter()

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


def run_items(plan: BenchPlan, items: list[Item], out: Path, opts: RunOptions) -> int:
    """Generate the unfinished ``items`` (this process's share); returns how many were generated."""
    prefix = f"[process {opts.process_index}] " if opts.num_processes > 1 else ""
    progress = Progress(len(items), opts.progress, prefix)
    costs = CostCache(plan, opts.flops)
    pipe: HiresPipeline | None = None
    env: dict[str, Any] = {}
    generated = 0
    for item in items:
        if is_finished(out, item):  # finished meanwhile (another run on the same folder): never overwrite
            continue
        if pipe is None:
            pipe = load(plan, opts)
            env = {
                "device": device_name(pipe.adapter.device),
                "dtype": str(pipe.adapter.dtype).removeprefix("torch."),
                "process_index": opts.process_index,
                "num_processes": opts.num_processes,
                "versions": versions(),
            }
            if opts.warmup:
                pipe.run(item_request(plan, item), progress=False)
        cost = costs.get(item.group)
        req = item_request(plan, item)
        res, seconds, peak = timed_run(pipe, req)
        png, record = item_paths(out, item)
        measured = {
            "image": png.name,
            "seconds": seconds,
            "peak_memory_gb": None if peak is None else peak / GIB,
            "peak_memory_bytes": peak,
            "flops": None if cost is None else cost["model_flops"],
            "cost": cost,
            **env,
        }
        save_png(res.images[0], png, res.metadata[0])
        write_json(record, make_record(plan, item, req, res, measured))
        generated += 1
        progress.step(item, seconds)
    return generated


def load(plan: BenchPlan, opts: RunOptions) -> HiresPipeline:
    """The plan's model on this process's device (dtype default: float16 on CUDA, float32 elsewhere)."""
    device = resolve_device(opts.device)
    dtype = opts.dtype or ("float16" if device.startswith("cuda") else "float32")
    return HiresPipeline.from_model(plan.model, dtype=dtype, device=device, allow_pickle=opts.allow_pickle)
