"""APT — Adaptive Path Tracing (SPEC §4) over a DemoFusion or AccDiffusion host.

Per later phase of the host's loop, three independent switches:
  1. statistical matching (SM): right after upsampling, every dilated sub-lattice gets the statistics of the
     previous phase's clean latent (§4.1);
  2. scale-aware scheduling (SaS): the phase's scheduler uses ``β_t`` with exponent ``η(scale)`` for the noised
     reference, the step and the shortcut; the model sees the integer t (``betas``) or the original-schedule
     timestep with the same ᾱ (``relabel``) (§4.2);
  3. shortcut: start at step index ``N − T0`` instead of 0, ``T0 = max(1, round(0.6·N))`` by default (§4.3).
"""

from __future__ import annotations

from typing import Any

import torch

from hiresdiff.errors import require
from hiresdiff.methods.accdiffusion import AccDiffusion
from hiresdiff.methods.base import MethodOutput, weakly
from hiresdiff.methods.demofusion import PhaseSetup, Progressive
from hiresdiff.methods.specs.apt import HOST_NAMES, APTParams
from hiresdiff.methods.specs.apt import PRESETS as PRESETS  # re-exported: the APT table rows
from hiresdiff.methods.specs.apt import parse_eta_table as parse_eta_table  # re-exported
from hiresdiff.ops.matching import statistical_matching
from hiresdiff.ops.sas import eta_for_scale, relabel_timesteps, sas_betas
from hiresdiff.sampler import Run
from hiresdiff.stages import Phase

#: each host's phase loop, by name
HOSTS: dict[str, type[Progressive]] = dict(zip(HOST_NAMES, (Progressive, AccDiffusion), strict=True))


def scale_aware_scheduler(base: Any, eta: float) -> Any:
    """A copy of ``base`` whose β schedule is :func:`sas_betas` with exponent ``eta`` (β range from its config)."""
    cfg = base.config
    betas = sas_betas(eta, float(cfg.beta_start), float(cfg.beta_end), int(cfg.num_train_timesteps))
    return type(base).from_config(cfg, trained_betas=betas.tolist())


def timestep_relabeller(new: Any, original: Any) -> Any:
    """``t ↦`` the original-schedule timestep with the same ᾱ as ``t`` under ``new`` (SaS ``relabel``)."""
    table = relabel_timesteps(new.alphas_cumprod, original.alphas_cumprod)

    def relabel(t: torch.Tensor) -> torch.Tensor:
        return table[round(float(t))].to(t.device if isinstance(t, torch.Tensor) else "cpu")

    return relabel


class APT:
    """Configures a host's phase loop with the enabled APT components."""

    def __init__(self, run: Run, params: APTParams) -> None:
        self.run, self.params = run, params
        require(
            not (params.sas and run.adapter.family == "flux"),
            "scale-aware scheduling changes a DDPM β schedule and is undefined for flow-matching models (FLUX); "
            "use --set sas=false",
        )
        self.host = HOSTS[params.host](run, params)
        if params.sm:  # weakly: the host's lists holding bound methods of the APT holding the host is a cycle
            self.host.transforms.append(weakly(self.match))
        self.host.configure.append(weakly(self.setup))

    def match(self, z_up: torch.Tensor, z: torch.Tensor, phase: Phase) -> torch.Tensor:
        """SM (§4.1) with the phase's dilation."""
        return statistical_matching(z_up, z, phase.dilation, self.params.sm_per_channel)

    def setup(self, setup: PhaseSetup) -> None:
        """Shortcut (§4.3) and SaS (§4.2) for one later phase."""
        p, steps = self.params, self.run.settings.steps
        t0 = p.shortcut_length(steps)
        if t0 is not None:
            setup.start_step = steps - t0
        eta = eta_for_scale(setup.phase.scale, p.eta_table) if p.sas else None
        if eta is None:
            return
        base = self.run.scheduler
        setup.scheduler = scale_aware_scheduler(base, eta)
        if p.sas_mode == "relabel":
            setup.timestep_map = timestep_relabeller(setup.scheduler, base)

    def __call__(self) -> torch.Tensor:
        return self.host()


def run_apt(run: Run, params: APTParams) -> MethodOutput:
    return MethodOutput(latents=APT(run, params)())
