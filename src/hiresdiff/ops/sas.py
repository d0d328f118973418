"""APT scale-aware scheduling (SPEC §4.2): β schedules with exponent η, η per scale, timestep relabelling."""

from __future__ import annotations

import numpy as np
import torch

from hiresdiff.ops.schedule import DEFAULT_ETA_TABLE


def sas_betas(eta: float, beta_start: float, beta_end: float, num_train_timesteps: int = 1000) -> torch.Tensor:
    """``β_t = (β_start^η + t/(T−1)·(β_end^η − β_start^η))^(1/η)``, t = 0 … T−1 (float32, computed in float64).

    η = 0.5 is SD/SDXL's ``scaled_linear`` schedule, η = 1 the linear one; larger η adds noise faster.
    """
    if not eta > 0:
        raise ValueError(f"eta must be > 0, got {eta}")
    frac = torch.arange(num_train_timesteps, dtype=torch.float64) / (num_train_timesteps - 1)
    start, end = beta_start**eta, beta_end**eta
    return ((start + frac * (end - start)) ** (1.0 / eta)).to(torch.float32)


def eta_for_scale(scale: float, table: dict[float, float] | None = None) -> float | None:
    """η for a phase at ``scale``: piecewise linear through ``table``; ``None`` (no change) below its first scale.

    Above the last scale the last η is kept.
    """
    points = sorted((table or DEFAULT_ETA_TABLE).items())
    if scale < points[0][0]:
        return None
    xs, ys = zip(*points, strict=True)
    return float(np.interp(scale, xs, ys))


def relabel_timesteps(alphas_cumprod_new: torch.Tensor, alphas_cumprod_orig: torch.Tensor) -> torch.Tensor:
    """For every t, the (fractional) timestep of the original schedule with the same ᾱ (mode ``relabel``).

    ᾱ is decreasing in t, so the inverse is a monotone interpolation; values outside the original range are
    clamped to ``[0, T − 1]``.
    """
    orig = alphas_cumprod_orig.double().numpy()[::-1]  # increasing
    steps = np.arange(len(orig), dtype=np.float64)[::-1]
    return torch.from_numpy(np.interp(alphas_cumprod_new.double().numpy(), orig, steps)).float()
