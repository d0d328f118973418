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
