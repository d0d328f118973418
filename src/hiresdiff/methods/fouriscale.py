"""FouriScale (SPEC-baselines-unet §2): the base model at the target size with low-passed dilated convs.

Once per image: the base size (SD native, SDXL the official aspect bucket) and d₀ = the common ratio of the target
to it; the layers and start/stop steps are the official ones for the architecture and size
(:mod:`hiresdiff.methods.specs.fouriscale`). Per step i of the one full-canvas loop (the step clock sets i):
  1. the patched convs low-pass their input and run dilated by ⌈d(i)⌉, d = d₀ until ``start``, ramping to 1 at
     ``stop``, plain after (:mod:`hiresdiff.patches.fouriscale`);
  2. for i < stop, rule FOURISCALE: rows (uncond, cond, weak@cond text), the weak row with the weak mask (SDXL a
     lighter dilation) and the cond row's self-attention queries and keys; ε = ε_u + w·(ε_weak − ε_u), w × ``amp``
     for i < start;
  3. for i ≥ stop, plain CFG (the official code keeps the 3 rows, whose weak row then equals cond: same output);
  4. one scheduler step (DDIM η = 1 in the ``official`` presets). SDXL size conditioning is the base size.
An input image is SDEdited at the target size as in ``direct``, with the same size conditioning (the base size).

Deliberate differences: switch steps are fractions of N (official: absolute steps at any N); odd padded sides get
a length-n mask (official: crash); conv LoRAs are dilated too (official: dropped).
"""

from __future__ import annotations

from hiresdiff.methods.base import MethodOutput
from hiresdiff.methods.specs.fouriscale import FouriScaleParams, base_and_dilation, switch_steps
from hiresdiff.models.guidance import CFG, FOURISCALE, NO_GUIDANCE, GuidanceRule
from hiresdiff.patches.clock import PatchClock
from hiresdiff.patches.fouriscale import FouriScaleLayers, conv_layers, fouriscale_patches, layer_bases
from hiresdiff.patches.freeu import freeu_installed
from hiresdiff.patches.tables import FOURISCALE_MODELS, model_kind
from hiresdiff.sampler import Run
from hiresdiff.strategies.ruled import RuledCanvas


def amplified(rule: GuidanceRule, factor: float) -> GuidanceRule:
    """``rule`` with its guidance scale multiplied by ``factor`` (FouriScale's ``amp_guidance``)."""
    return GuidanceRule(
        f"{rule.name}×{factor:g}", rule.branches, lambda out, g: rule.combine(out, g * factor), rule.coupled
    )


def run_fouriscale(run: Run, params: FouriScaleParams) -> MethodOutput:
    s, ad = run.settings, run.adapter
    kind = model_kind(ad.family, ad.text_width)
    arch = FOURISCALE_MODELS[kind]
    start, stop = switch_steps(params, kind, ad.native_size, s.height, s.width, s.steps)
    base, d0 = base_and_dilation(arch, params.base_size, ad.native_size, s.height, s.width)
    layers = FouriScaleLayers(
        d0=d0,
        start=start,
        stop=stop,
        progressive=params.progressive,
        floor=arch.mask_floor if params.mask_floor is None else params.mask_floor,
        weak_divisor=params.weak_dilation_divisor or arch.weak_dilation_divisor,  # ≥ 1 when given
        weak_scale_at_least_one=arch.weak_scale_at_least_one,
        base_of=layer_bases(arch, base, s.height, ad.vae_scale_factor),
    )
    weak = params.guidance_variant == "fouriscale"
    strong = FOURISCALE if weak else CFG if s.cfg else NO_GUIDANCE
    early = amplified(strong, params.amp_guidance) if params.amp_guidance != 1 and strong is not NO_GUIDANCE else strong

    def rule_at(index: int | None) -> GuidanceRule | None:
        """Step i's rule: amplified before ``start``, the strong rule until ``stop``, the default after."""
        if index is None or index >= stop:
            return None
        return early if index < start else strong

    clock = PatchClock()
    unsign = clock.sign(lambda index: getattr(rule_at(index), "name", None))  # rows and rule: the cost model's key
    strategy = RuledCanvas(lambda: rule_at(clock.index))
    filtered, dilate_only = conv_layers(arch, kind, ad.unet)
    try:
        with (
            fouriscale_patches(ad, clock, layers, filtered, dilate_only, weak),
            freeu_installed(ad, clock, params.freeu, params.freeu_rule),
        ):
            hooks = [clock]
            size = base if ad.family == "sdxl" else None  # SDXL size conditioning: the base size, also for SDEdit
            if run.source is not None:  # upscaling: SDEdit of the input picture at the target size
                return MethodOutput(latents=run.sdedit(strategy, "fouriscale (SDEdit)", hooks, size))
            latents = run.sample_canvas(s.height, s.width, size, "fouriscale", hooks, strategy)
            return MethodOutput(latents=latents)
    finally:
        unsign()
