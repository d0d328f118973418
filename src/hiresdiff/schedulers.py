"""Scheduler names accepted by ``--scheduler`` and their diffusers classes."""

from __future__ import annotations

from typing import Any

from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    UniPCMultistepScheduler,
)

from hiresdiff.errors import HiresError

#: name → (diffusers class, config overrides applied on top of the model's own scheduler config)
SCHEDULERS: dict[str, tuple[type, dict[str, Any]]] = {
    "euler": (EulerDiscreteScheduler, {}),
    "euler-a": (EulerAncestralDiscreteScheduler, {}),
    "heun": (HeunDiscreteScheduler, {}),
    "ddim": (DDIMScheduler, {}),
    "ddpm": (DDPMScheduler, {}),
    "dpmpp-2m": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp-2m-karras": (
        DPMSolverMultistepScheduler,
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    "unipc": (UniPCMultistepScheduler, {}),
}

#: latent-diffusion values for keys a model's scheduler config may lack (diffusers' own defaults would clip the
#: latent x̂0 to [−1, 1] in DDIM/DDPM, which also breaks the fused-step equivalence of SPEC §0.1)
LATENT_DEFAULTS: dict[str, Any] = {"clip_sample": False, "set_alpha_to_one": False}

#: keep the scheduler the loaded pipeline came with
MODEL_DEFAULT = "model-default"


def scheduler_names() -> list[str]:
    """All accepted ``--scheduler`` values."""
    return [*SCHEDULERS, MODEL_DEFAULT]


def check_scheduler_name(name: str) -> str:
    """Raise a one-line :class:`HiresError` for an unknown scheduler name."""
    if name not in SCHEDULERS and name != MODEL_DEFAULT:
        raise HiresError(f"unknown scheduler {name!r}; choose one of: {', '.join(scheduler_names())}")
    return name


def make_scheduler(name: str, base_config: Any) -> Any:
    """Build scheduler ``name`` from a model's scheduler config (β schedule, prediction type, spacing kept)."""
    check_scheduler_name(name)
    if name == MODEL_DEFAULT:
        raise HiresError("make_scheduler needs a concrete scheduler name, not 'model-default'")
    cls, overrides = SCHEDULERS[name]
    config = {**LATENT_DEFAULTS, **dict(base_config)}
    return cls.from_config(config, **overrides)
