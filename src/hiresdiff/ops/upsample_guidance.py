"""Upsample Guidance (Hwang, Park, Jo, arXiv 2404.01709; SPEC-baselines-progressive §3.2): pure tensor maths.

A target canvas m× the trained size is sampled directly; each guided step also predicts the canvas pooled m× down,
which after a *power* and a *time* adjustment is an ordinary noisy sample at the trained size, and the pooled
band of the prediction is replaced by that low-resolution prediction:

* D = m×m average pooling, U = nearest m× upsampling (``D U = I``);
* VP models, model input ``x = √ᾱ_t·x0 + √(1−ᾱ_t)·ε``: since ``D ε = ε'/m`` (ε' standard normal),
  ``y = D x / √P_t`` with ``P_t = ᾱ_t + (1−ᾱ_t)/m²`` is a noisy sample at ``ᾱ_τ = m²ᾱ_t / (1 − ᾱ_t + m²ᾱ_t)``
  (``SNR(τ) = m²·SNR(t)``; ``ᾱ_t/P_t + (1−ᾱ_t)/(m²P_t) = 1``);
* ``ε̃ = ε̂ + w_t·U(ε̂_low/m − D ε̂)``: with w_t = 1, ``D ε̃ = ε̂_low/m`` and ``(I − UD) ε̃ = (I − UD) ε̂``;
* flow matching, ``x = (1−σ)·x0 + σ·ε``, ``v = ε − x0``: ``y = D x / c`` with ``c = (1−σ) + σ/m`` is a sample at
  ``σ' = (σ/m)/c``, and with ``ε̂ = x + (1−σ)·v̂`` the same guidance reads (divided through by ``1 − σ``, so it also
  holds at σ = 1) ``ṽ = v̂ + w_t·U((v̂_low − (m−1)·D x)/(m·c) − D v̂)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

#: how τ is found for a VP model: the nearest integer timestep in log-SNR, or a fractional one (log-SNR
#: interpolated between the table's entries, ᾱ_τ exactly the adjusted value)
TAU_MODES = ("nearest", "continuous")


def pool(x: torch.Tensor, m: int) -> torch.Tensor:
    """D: the mean of every m×m block of the last two dimensions."""
    return x if m == 1 else F.avg_pool2d(x, m)


def unpool(x: torch.Tensor, m: int) -> torch.Tensor:
    """U: every cell repeated m× along both of the last two dimensions (nearest upsampling)."""
    return x if m == 1 else x.repeat_interleave(m, dim=-2).repeat_interleave(m, dim=-1)


def power(abar: float, m: int) -> float:
    """P_t = ᾱ_t + (1 − ᾱ_t)/m²: the variance of a pooled VP sample (per unit-variance x0 and ε)."""
    return abar + (1.0 - abar) / m**2


def low_alpha_bar(abar: float, m: int) -> float:
    """ᾱ_τ = m²ᾱ_t/(1 − ᾱ_t + m²ᾱ_t): the noise level of the power-adjusted pooled sample (SNR × m²)."""
    return m**2 * abar / (1.0 - abar + m**2 * abar)


def log_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """log(ᾱ/(1 − ᾱ)) of every entry of a training noise table (float64)."""
    a = alphas_cumprod.detach().double().cpu()
    return torch.log(a) - torch.log1p(-a)


def tau_for(alphas_cumprod: torch.Tensor, abar_t: float, m: int, mode: str, t: float) -> tuple[float, float]:
    """(τ, ᾱ_τ the low-resolution branch is converted with) for a step at ᾱ_t, never later than ``t``.

    ``nearest``: the integer timestep of the table whose log-SNR is nearest to ``log m² + log SNR(t)``, and its
    table ᾱ; ``continuous``: the fractional timestep where the table's log-SNR, linear between entries, equals it,
    and the adjusted ᾱ itself (the table's ends where it falls outside).
    """
    table = log_snr(alphas_cumprod)
    target = math.log(low_alpha_bar(abar_t, m)) - math.log1p(-low_alpha_bar(abar_t, m))
    if mode == "nearest":
        tau = min(int(torch.argmin((table - target).abs())), math.floor(t))
        return float(tau), float(alphas_cumprod[tau])
    if mode != "continuous":
        raise ValueError(f"unknown tau mode {mode!r}; choose one of: {', '.join(TAU_MODES)}")
    if target >= float(table[0]):
        return 0.0, float(alphas_cumprod[0])
    if target <= float(table[-1]):
        return float(len(table) - 1), float(alphas_cumprod[-1])
    k = int(torch.searchsorted(-table, torch.tensor(-target, dtype=table.dtype))) - 1  # table[k] > target ≥ [k+1]
    frac = (float(table[k]) - target) / (float(table[k]) - float(table[k + 1]))
    return min(k + frac, float(t)), low_alpha_bar(abar_t, m)


def low_sample(x: torch.Tensor, abar_t: float, m: int) -> torch.Tensor:
    """y = D x / √P_t: the VP model input of the low-resolution branch."""
    return pool(x, m) / math.sqrt(power(abar_t, m))


def epsilon_from(pred: torch.Tensor, x: torch.Tensor, abar: float, prediction_type: str) -> torch.Tensor:
    """ε from a VP model's output at model input ``x`` and ᾱ: ε itself, ``√ᾱ·v + √(1−ᾱ)·x`` (v-prediction) or
    ``(x − √ᾱ·x0)/√(1−ᾱ)`` (sample prediction)."""
    a, s = math.sqrt(abar), math.sqrt(1.0 - abar)
    if prediction_type == "epsilon":
        return pred
    if prediction_type == "v_prediction":
        return a * pred + s * x
    if prediction_type == "sample":
        return (x - a * pred) / s
    raise ValueError(f"unsupported prediction_type {prediction_type!r}")


def prediction_from_epsilon(eps: torch.Tensor, x: torch.Tensor, abar: float, prediction_type: str) -> torch.Tensor:
    """Inverse of :func:`epsilon_from` at the same ``x`` and ᾱ."""
    a, s = math.sqrt(abar), math.sqrt(1.0 - abar)
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "v_prediction":
        return (eps - s * x) / a
    if prediction_type == "sample":
        return (x - s * eps) / a
    raise ValueError(f"unsupported prediction_type {prediction_type!r}")


def guide_epsilon(eps: torch.Tensor, eps_low: torch.Tensor, m: int, weight: float) -> torch.Tensor:
    """ε̃ = ε̂ + w·U(ε̂_low/m − D ε̂)."""
    return eps + weight * unpool(eps_low / m - pool(eps, m), m)


def flow_low(sigma: float, m: int) -> tuple[float, float]:
    """(c, σ'): the low-resolution branch of a flow-matching model sees ``y = D x / c`` at σ' = (σ/m)/c,
    ``c = (1−σ) + σ/m``."""
    c = (1.0 - sigma) + sigma / m
    return c, (sigma / m) / c


def guide_velocity(
    v: torch.Tensor, v_low: torch.Tensor, x: torch.Tensor, sigma: float, m: int, weight: float
) -> torch.Tensor:
    """ṽ = v̂ + w·U((v̂_low − (m−1)·D x)/(m·c) − D v̂): the ε-space guidance of a flow-matching model's velocity
    (``x`` = the model input x_t at σ; finite at σ = 1, where the ε form divides 0 by 0)."""
    c, _ = flow_low(sigma, m)
    return v + weight * unpool((v_low - (m - 1) * pool(x, m)) / (m * c) - pool(v, m), m)
