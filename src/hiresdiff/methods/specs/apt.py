"""APT — Adaptive Path Tracing (SPEC §4): switches, per-scale η, presets (the paper's table rows); recipe:
:mod:`hiresdiff.methods.apt`."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from hiresdiff.config import PAPER_NEGATIVE_PROMPT, GenerationSettings, check_finite
from hiresdiff.errors import HiresError, require
from hiresdiff.methods.base import Method
from hiresdiff.methods.specs.accdiffusion import AccDiffusionParams
from hiresdiff.ops.schedule import DEFAULT_ETA_TABLE, start_index, steps_of_fraction

#: the methods APT runs over (their phase loops: :data:`hiresdiff.methods.apt.HOSTS`)
HOST_NAMES = ("demofusion", "accdiffusion")
SAS_MODES = ("betas", "relabel")
#: β^η underflows for larger η (β ≈ 0.01): the schedule would degenerate
MAX_ETA = 20.0
#: the paper's shortcut: denoise the last T0 = 30 of N = 50 steps, i.e. the fraction T0/N = 0.6 of any N
PAPER_SHORTCUT = 0.6


def parse_eta_table(text: str) -> dict[float, float]:
    """``"2=2.0,4=3.2"`` → SPEC defaults with those scales overridden or added."""
    table = dict(DEFAULT_ETA_TABLE)
    for item in filter(None, (part.strip() for part in text.split(","))):
        scale, sep, eta = item.partition("=")
        try:
            key, value = float(scale), float(eta)
        except ValueError:
            raise HiresError(f"sas_eta expects scale=eta pairs like '2=2.0,4=3.5', got {item!r}") from None
        ok = bool(sep) and math.isfinite(key) and math.isfinite(value) and key > 0 and 0 < value <= MAX_ETA
        require(ok, f"sas_eta: scales must be finite and > 0 and eta in (0, {MAX_ETA}], got {item!r}")
        table[key] = value
    return table


@dataclass
class APTParams(AccDiffusionParams):
    """SPEC §4 switches on top of the host's parameters (the AccDiffusion ones apply with ``host=accdiffusion``).

    ``sm``/``sm_per_channel``: statistical matching, scalar or per channel; ``sas``/``sas_mode``/``sas_eta``:
    scale-aware scheduling, its mode and per-scale η overrides (``"2=2.0,3=3.0,4=3.5"``; defaults from SPEC §4.2);
    ``shortcut``: the fraction T0/N of the steps each later phase denoises (T0 = max(1, round(shortcut·N)), half
    up; the paper's 30/50 = 0.6, so N = 50 starts later phases at t = 581 and N = 20 denoises 12 steps; ``None`` =
    all N); ``shortcut_steps``: an absolute T0 that overrides ``shortcut`` when given.
    """

    host: str = "demofusion"
    sm: bool = True
    sm_per_channel: bool = False
    sas: bool = True
    sas_mode: str = "betas"
    sas_eta: str = ""
    shortcut: float | None = PAPER_SHORTCUT
    shortcut_steps: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.host in HOST_NAMES, f"unknown APT host {self.host!r}; choose one of: {', '.join(HOST_NAMES)}")
        require(
            self.sas_mode in SAS_MODES, f"unknown sas_mode {self.sas_mode!r}; choose one of: {', '.join(SAS_MODES)}"
        )
        self.eta_table = parse_eta_table(self.sas_eta)
        require(
            self.shortcut_steps is None or (isinstance(self.shortcut_steps, int) and self.shortcut_steps >= 1),
            f"shortcut_steps must be an integer ≥ 1 or none, got {self.shortcut_steps!r}",
        )
        if self.shortcut is not None:
            check_finite("shortcut", self.shortcut, low=0.0, strict=True)
            require(self.shortcut <= 1.0, f"shortcut is the fraction T0/N in (0, 1] (or none), got {self.shortcut}")

    def shortcut_length(self, steps: int) -> int | None:
        """T0 for ``steps`` inference steps: ``shortcut_steps``, else ``max(1, round(shortcut·N))``, else None."""
        if self.shortcut_steps is not None:
            return self.shortcut_steps
        return None if self.shortcut is None else steps_of_fraction(steps, self.shortcut)

    def check(self, settings: GenerationSettings, native: int, grid: int) -> None:
        super().check(settings, native, grid)
        if self.shortcut_steps is not None:
            require(
                self.shortcut_steps <= settings.steps,
                f"shortcut_steps {self.shortcut_steps} must not exceed steps {settings.steps}",
            )


def shortcut_of(strength: float, settings: GenerationSettings) -> dict[str, Any]:
    """``strength`` s → ``shortcut_steps = N − ⌊N·(1 − s)⌋`` (later phases start at step ``⌊N·(1 − s)⌋``)."""
    return {"shortcut_steps": settings.steps - start_index(settings.steps, strength)}


#: the rows of the APT paper (SPEC §4.4): switches per row, for each host
_ROWS: dict[str, dict[str, Any]] = {
    "": {"sm": False, "sas": False, "shortcut": None},
    "-shortcut": {"sm": False, "sas": False, "shortcut": PAPER_SHORTCUT},
    "apt-sm": {"sm": True, "sas": False, "shortcut": PAPER_SHORTCUT},
    "apt-sas": {"sm": False, "sas": True, "shortcut": PAPER_SHORTCUT},
    "apt": {"sm": True, "sas": True, "shortcut": PAPER_SHORTCUT},
}


def _preset_name(host: str, row: str) -> str:
    if not row or row.startswith("-"):
        return host + row
    return row if host == "demofusion" else f"{host}-{row}"


PRESETS: dict[str, dict[str, Any]] = {
    _preset_name(host, row): {"host": host, **switches} for host in HOST_NAMES for row, switches in _ROWS.items()
}

METHOD = Method(
    "apt",
    "APT: statistical matching, scale-aware scheduling, shortcut sampling over DemoFusion or AccDiffusion",
    "https://arxiv.org/abs/2507.21690",
    APTParams,
    "hiresdiff.methods.apt:run_apt",
    default_negative=PAPER_NEGATIVE_PROMPT,
    presets=PRESETS,
    strength_params=shortcut_of,
    unsupported={"flux": {"sas": True, "host": "accdiffusion"}},  # SaS: DDPM β schedule; AccDiffusion: UNet only
)
