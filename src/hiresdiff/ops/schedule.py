"""Timestep-dependent weights shared by the DemoFusion family."""

from __future__ import annotations

import math
from fractions import Fraction


def cosine_factor(t: float, num_train_timesteps: int = 1000) -> float:
    """Cosine factor ``cf(t) = ½·(1 + cos(π·(T − t)/T))`` (SPEC §0).

    It is ≈ 1 at ``t ≈ T`` and 0 at ``t = 0``. Always evaluated on the absolute timestep ``t``; phases that start
    late do not restart it. DemoFusion's ``c1, c2, c3`` are powers of it.
    """
    big_t = float(num_train_timesteps)
    return 0.5 * (1.0 + math.cos(math.pi * (big_t - float(t)) / big_t))


def exact_fraction(value: float) -> Fraction:
    """The decimal the user wrote (``0.34`` → 34/100), not the binary float nearest to it.

    ``Fraction(repr(x))`` is exact for every float typed as a decimal, so step arithmetic such as
    ``⌊50·(1 − 0.34)⌋`` gives 33 (in floats ``50·(1 − 0.34) = 32.999…`` and the floor is one step early).
    """
    return Fraction(repr(float(value)))


def start_index(steps: int, fraction: float) -> int:
    """Step index ``⌊N·(1 − p)⌋`` a stage that denoises the last fraction ``p`` of ``N`` steps starts at, in exact
    arithmetic (AP-LDM sub-stages SPEC §5, ScaleDiff restart SPEC §6, image strength)."""
    return math.floor(steps * (1 - exact_fraction(fraction)))


def steps_of_fraction(steps: int, fraction: float) -> int:
    """``max(1, round(p·N))`` steps, rounded half up in exact arithmetic (APT's shortcut T0 = 0.6·N, SPEC §4.3)."""
    return max(1, math.floor(steps * exact_fraction(fraction) + Fraction(1, 2)))


#: decays of AP-LDM's attentive-guidance strength over the guided steps
AG_DECAYS = ("cosine", "linear", "none")
#: APT scale-aware scheduling, SPEC §4.2 defaults: η at scales 2, 3, 4 (linear in between, constant above 4, no
#: change below 2); used by :mod:`hiresdiff.ops.sas` and, without torch, by APT's parameter validation
DEFAULT_ETA_TABLE: dict[float, float] = {2.0: 2.0, 3.0: 3.0, 4.0: 3.5}


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
