"""Upsample Guidance (Hwang, Park, Jo, arXiv 2404.01709) — SPEC-baselines-progressive §3: ``direct`` with one more
model call per guided step.

Per step at timestep t of the one full-canvas loop (target H × W = m·(h × w)):
  1. ε̂ = ε_θ(x_in, t) on the whole canvas (CFG as usual, SDXL size conditioning the target's);
  2. on guided steps (t > (1 − η)·T, w > 0): y = D(x_in)/√P_t, ε̂_low = ε_θ(y, τ) with SNR(τ) = m²·SNR(t), in the
     same batched model call when the sizes allow, on the H/m × W/m canvas (size conditioning its own);
  3. ε̃ = ε̂ + w·U(ε̂_low/m − D ε̂), converted back to the model's parametrisation at (x_in, ᾱ_t); one scheduler step.
v-prediction models are converted to ε at (x_in, ᾱ_t) and (y, ᾱ_τ); ᾱ_τ is read from the training noise table.
An input image is SDEdited at the target size as in ``direct``. FLUX runs the flow-matching form of the same
guidance (:mod:`hiresdiff.ops.upsample_guidance`), experimental: no paper or port evidence on DiTs.

Deliberate differences from the unofficial ports: the low branch gets its own size conditioning on SDXL (the port
passes the target's; ``low_size_cond=target`` restores it), τ's noise level is converted with the table's ᾱ_τ
(the port scales the input with the current step's σ), the guidance is applied after CFG (equal: it is linear).
"""

from __future__ import annotations

import warnings

from hiresdiff.errors import HiresWarning
from hiresdiff.methods.base import MethodOutput
from hiresdiff.methods.specs.upsample_guidance import UpsampleGuidanceParams
from hiresdiff.sampler import Run
from hiresdiff.strategies.upsample import UpsampleGuidance

#: said once per FLUX run: the flow-matching form is derived, not validated by a paper or a port
FLUX_NOTICE = (
    "upsample-guidance on FLUX is experimental: the flow-matching form of the guidance has no paper or port "
    "evidence on DiTs, and the SD weights (w, η) are untuned there"
)


def run_upsample_guidance(run: Run, params: UpsampleGuidanceParams) -> MethodOutput:
    s, ad = run.settings, run.adapter
    if ad.family == "flux":
        warnings.warn(FLUX_NOTICE, HiresWarning, stacklevel=2)
    m = params.factor(s.height, s.width, ad.native_size)
    low = (s.height // m, s.width // m) if params.low_size_cond == "native" else (s.height, s.width)
    ug = UpsampleGuidance(ad, m, params.weight, params.ug_eta, low, params.tau)
    if run.source is not None:  # upscaling: SDEdit of the input picture at the target size
        return MethodOutput(latents=run.sdedit(ug, "upsample-guidance (SDEdit)", [ug]))
    return MethodOutput(latents=run.sample_canvas(s.height, s.width, name="upsample-guidance", hooks=[ug], strategy=ug))
