"""Scalar statistics per sample and renormalisation (DemoFusion anchor and blur renormalisation)."""

from __future__ import annotations

import torch


def scalar_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and (unbiased) standard deviation of each sample of ``x`` over all non-batch dims, shaped (B, 1, …)."""
    flat = x.reshape(x.shape[0], -1)
    shape = (x.shape[0],) + (1,) * (x.dim() - 1)
    return flat.mean(dim=1).view(shape), flat.std(dim=1).view(shape)


def renormalise(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """``(x − μ_x)/σ_x · std + mean`` per sample: give ``x`` the scalar statistics ``(mean, std)``."""
    mu, sd = scalar_stats(x)
    return (x - mu) / sd.clamp_min(eps) * std + mean
