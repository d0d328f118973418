"""Scheduler names accepted by ``--scheduler`` and their diffusers classes.

The table names the classes instead of importing them, so that ``--help`` and the settings checks (which list and
validate these names) do not import diffusers; :func:`scheduler_class` imports a class when a scheduler is built.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

from hiresdiff.errors import HiresError, require

#: name → (diffusers class name, config overrides applied on top of the model's own scheduler config)
SCHEDULER_CLASSES: dict[str, tuple[str, dict[str, Any]]] = {
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "dpmpp-2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp-2m-karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    "unipc": ("UniPCMultistepScheduler", {}),
}

#: latent-diffusion values for keys a model's scheduler config may lack (diffusers' own defaults would clip the
#: latent x̂0 to [−1, 1] in DDIM/DDPM, which also breaks the fused-step equivalence of SPEC §0.1)
LATENT_DEFAULTS: dict[str, Any] = {"clip_sample": False, "set_alpha_to_one": False}

#: keep the scheduler the loaded pipeline came with
MODEL_DEFAULT = "model-default"

#: the names above whose ``step`` takes DDIM's stochasticity η (``eta``; a test checks this against every class's
#: ``step`` signature), so that ``--eta`` is checked before any model is loaded
ETA_SCHEDULERS: tuple[str, ...] = ("ddim",)


def scheduler_names() -> list[str]:
    """All accepted ``--scheduler`` values."""
    return [*SCHEDULER_CLASSES, MODEL_DEFAULT]


def check_scheduler_name(name: str) -> str:
    """Raise a one-line :class:`HiresError` for an unknown scheduler name."""
    if name not in SCHEDULER_CLASSES and name != MODEL_DEFAULT:
        raise HiresError(f"unknown scheduler {name!r}; choose one of: {', '.join(scheduler_names())}")
    return name


def _eta_advice(eta: float) -> str:
    return f"--eta {eta:g} (DDIM stochasticity) needs --scheduler {' or '.join(ETA_SCHEDULERS)}, or use --eta 0"


def check_eta(eta: float, name: str) -> None:
    """Refuse η ≠ 0 in one line for a named scheduler whose step has no η (``model-default`` is checked once its
    class is known: :func:`check_scheduler_eta`)."""
    require(
        eta == 0 or name == MODEL_DEFAULT or name in ETA_SCHEDULERS,
        f"the {name} scheduler has no η: {_eta_advice(eta)}",
    )


def step_takes_eta(scheduler: Any) -> bool:
    """Whether ``scheduler.step`` has an ``eta`` parameter (diffusers passes η only where the signature has it)."""
    return "eta" in inspect.signature(scheduler.step).parameters


def check_scheduler_eta(eta: float, scheduler: Any) -> None:
    """Refuse η ≠ 0 in one line for a built scheduler whose ``step`` has no η (the model's own scheduler)."""
    require(
        eta == 0 or step_takes_eta(scheduler),
        f"the model's {type(scheduler).__name__} has no η: {_eta_advice(eta)}",
    )


def scheduler_class(name: str) -> type:
    """The diffusers class of scheduler ``name`` (imports diffusers)."""
    check_scheduler_name(name)
    if name == MODEL_DEFAULT:
        raise HiresError("'model-default' keeps the model's own scheduler; it names no class")
    return getattr(importlib.import_module("diffusers"), SCHEDULER_CLASSES[name][0])


def make_scheduler(name: str, base_config: Any) -> Any:
    """Build scheduler ``name`` from a model's scheduler config (β schedule, prediction type, spacing kept)."""
    check_scheduler_name(name)
    if name == MODEL_DEFAULT:
        raise HiresError("make_scheduler needs a concrete scheduler name, not 'model-default'")
    config = {**LATENT_DEFAULTS, **dict(base_config)}
    return scheduler_class(name).from_config(config, **SCHEDULER_CLASSES[name][1])


def __getattr__(name: str) -> Any:
    """``SCHEDULERS``: name → (diffusers class, overrides), built on first use (it imports diffusers)."""
    if name == "SCHEDULERS":
        return {key: (scheduler_class(key), overrides) for key, (_, overrides) in SCHEDULER_CLASSES.items()}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
