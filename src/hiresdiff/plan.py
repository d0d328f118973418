"""The run plan shown before any work: stages and their sizes, steps, images — and with ``--dry-run`` the cost
model's FLOPs of the same request (:mod:`hiresdiff.cost`), all without loading weights."""

from __future__ import annotations

import dataclasses
from typing import Any

from hiresdiff.errors import HiresError
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
    """The canvases of a validated request."""
    s, params = req.settings, req.params
    stages = len(params.fractions(s.height, s.width)) if hasattr(params, "fractions") else 1
    return stage_sizes(req.method.name, s.height, s.width, native, grid, stages)


def describe_plan(req: Any, native: int, grid: int, *, full: bool = False, model: str | None = None) -> list[str]:
    """One line (``full``: several, with the cost model's FLOPs) describing what the request will do."""
    s = req.settings
    sizes = plan_phases(req, native, grid)
    chain = " → ".join(f"{h}×{w}" for h, w in sizes)
    lines = [
        f"plan: {req.method.name} {s.height}×{s.width}, {len(sizes)} stage(s) ({chain}), {s.steps} steps, "
        f"{s.batch_size} image(s)" + (", from an input image" if req.extras.source is not None else "")
    ]
    if not full:
        return lines
    lines.append(f"  scheduler {s.scheduler}, guidance {s.guidance}, seed {s.seed}, max_batch {s.max_batch}")
    lines.append("  parameters: " + ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(req.params).items()))
    try:
        from hiresdiff.cost import model_cost

        settings = {"steps": s.steps, "guidance": s.guidance, "scheduler": s.scheduler, "max_batch": s.max_batch}
        report = model_cost(
            req.method.name,
            model or "random-sdxl",
            s.width,
            s.height,
            num_images_per_prompt=s.batch_size,
            **settings,
            **dataclasses.asdict(req.params),
        )
        lines.append(
            f"  cost model ({report.architecture}): {report.model_flops / 1e12:,.4g} TFLOP, "
            f"{report.native_samples_per_step:g} native-size denoiser samples per step"
            + (" (without the input image)" if req.extras.source is not None else "")
        )
    except HiresError as exc:
        lines.append(f"  cost model: unavailable ({exc})")
    return lines
