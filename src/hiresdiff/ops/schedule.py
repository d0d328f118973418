"""Timestep-dependent weights shared by the DemoFusion family."""

from __future__ import annotations

import math


def cosine_factor(t: float, num_train_timesteps: int = 1000) -> float:
    """Cosine factor ``cf(t) = ½·(1 + cos(π·(T − t)/T))`` (SPEC §0).

    It is ≈ 1 at ``t ≈ T`` and 0 at ``t = 0``. Always evaluated on the absolute timestep ``t``; phases that start
    late do not restart it. DemoFusion's ``c1, c2, c3`` are powers of it.
    """
    big_t = float(num_train_timesteps)
    return 0.5 * (1.0 + math.cos(math.pi * (big_t - float(t)) / big_t))


#: decays of AP-LDM's attentive-guidance strength over the guided steps
AG_DECAYS = ("cosine", "linear", "none")


def attentive_lambdas(strength: float, count: int, exponent: float = 3.0, decay: str = "cosine") -> list[float]:
    """λ_k for the ``count`` guided steps k = 0 … K−1 (SPEC §5).

    ``cosine``: ``λ·((1 + cos(π·k/(K−1)))/2)^f`` (the paper's, f = ``exponent``); ``linear``: ``λ·(1 − k/(K−1))``;
    ``none``: constant λ. With a single guided step λ_0 = λ.
    """
    if decay not in AG_DECAYS:
        raise ValueError(f"unknown decay {decay!r}; choose one of {', '.join(AG_DECAYS)}")
    if count <= 0:
        return []
    if count == 1 or decay == "none":
        return [strength] * count
    frac = [k / (count - 1) for k in range(count)]
    if decay == "linear":
        return [strength * (1.0 - f) for f in frac]
    return [strength * ((1.0 + math.cos(math.pi * f)) / 2.0) ** exponent for f in frac]
