"""Conversions between a model's output (ε or v) and the clean-latent estimate x̂0.

All formulas work on the *model input* ``x_in = scheduler.scale_model_input(x_t, t)``, which is the
variance-preserving latent ``√ᾱ·x0 + √(1−ᾱ)·ε`` for every DDPM-family scheduler: σ-space schedulers (Euler, Heun,
…) keep ``x_t = x0 + σ·ε`` and divide by ``√(σ²+1)``; VP schedulers (DDIM, DPM-Solver, UniPC) keep it as is.
"""

from __future__ import annotations

from typing import Any

import torch


def alpha_bar(scheduler: Any, t: float | torch.Tensor) -> float:
    """ᾱ_t seen by the model at timestep ``t`` under ``scheduler``.

    σ-space schedulers (``init_noise_sigma > 1``) define ᾱ = 1/(1+σ²) with the σ of timestep ``t`` (this covers
    Karras σ, whose timesteps are not integers); VP schedulers read ``alphas_cumprod[t]``.
    """
    if float(getattr(scheduler, "init_noise_sigma", 1.0)) > 1.0 and hasattr(scheduler, "sigmas"):
        index = scheduler.index_for_timestep(torch.as_tensor(t, device=scheduler.timesteps.device))
        sigma = float(scheduler.sigmas[index])
        return 1.0 / (1.0 + sigma**2)
    return float(scheduler.alphas_cumprod[round(float(t))])


def x0_from_prediction(pred: torch.Tensor, x_in: torch.Tensor, abar: float, prediction_type: str) -> torch.Tensor:
    """x̂0 from ε (``x0 = (x − √(1−ᾱ)ε)/√ᾱ``), v (``x0 = √ᾱ·x − √(1−ᾱ)·v``) or a sample prediction."""
    a, s = abar**0.5, (1.0 - abar) ** 0.5
    if prediction_type == "epsilon":
        return (x_in - s * pred) / a
    if prediction_type == "v_prediction":
        return a * x_in - s * pred
    if prediction_type == "sample":
        return pred
    raise ValueError(f"unsupported prediction_type {prediction_type!r}")


def prediction_from_x0(x0: torch.Tensor, x_in: torch.Tensor, abar: float, prediction_type: str) -> torch.Tensor:
    """Inverse of :func:`x0_from_prediction` at the same ``x_in`` and ᾱ."""
    a, s = abar**0.5, (1.0 - abar) ** 0.5
    if prediction_type == "epsilon":
        return (x_in - a * x0) / s
    if prediction_type == "v_prediction":
        return (a * x_in - x0) / s
    if prediction_type == "sample":
        return x0
    raise ValueError(f"unsupported prediction_type {prediction_type!r}")
