"""AccDiffusion v2 (Lin et al., TPAMI 2025) — SPEC-baselines-progressive §4 parameters; recipe:
:mod:`hiresdiff.methods.accdiffusion_v2`.

The ControlNet must be a canny-type SDXL one. A ControlNet config does not say what it was trained on, so the rule
is the name: ``canny`` (any case) in its hub id or in its local folder's path (``diffusers/controlnet-canny-sdxl-1.0``,
``xinsir/controlnet-canny-sdxl-1.0``, a folder ``…/controlnet-canny-sdxl-1.0`` or ``tiny/controlnet-canny``);
SDXL is checked from its config with the model (:func:`~hiresdiff.models.controlnet.check_controlnet_fits`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from hiresdiff.config import PAPER_NEGATIVE_PROMPT, GenerationSettings, check_finite
from hiresdiff.errors import HiresError, require
from hiresdiff.methods.base import Method
from hiresdiff.methods.specs.accdiffusion import AccDiffusionParams
from hiresdiff.methods.specs.demofusion import start_step_of

if TYPE_CHECKING:
    from hiresdiff.models.controlnet import ControlNetSpec

#: the ControlNet of the official code (``accdiffusion_plus.py`` ``__main__``)
CANNY_CONTROLNET = "diffusers/controlnet-canny-sdxl-1.0"


def is_canny(controlnet: ControlNetSpec) -> bool:
    """Whether ``controlnet`` counts as a canny ControlNet: ``canny`` in its hub id or its folder's path. One handed
    over without a name (ComfyUI's ``CONTROL_NET``, :attr:`ControlNetSpec.named`) is taken as the canny one the
    node's input asks for: nothing else can be read off it."""
    if not controlnet.named:
        return True
    return any("canny" in name.lower() for name in (controlnet.ref, controlnet.path or ""))


@dataclass
class AccDiffusionV2Params(AccDiffusionParams):
    """SPEC-baselines-progressive §4.2 parameters on top of AccDiffusion's.

    ``control_weight``: the ControlNet scale κ of the local views on every step (the official command line's
    0.3), a weight of the run's ``--control-scale`` (default 1: κ itself; named apart from it, since both are
    keyword arguments of a generation); ``canny_sigma``: the auto-Canny spread s;
    ``clamp_condition``: clamp the bicubic-upsampled edge map to [0, 1] (off: it rings outside, as the official);
    ``control_with_content_prompts_only``: the official quirk (SPEC §4.3) — the ControlNet is used only with
    content prompts on (parity; off: with or without them).
    """

    control_weight: float = 0.3
    canny_sigma: float = 0.3
    clamp_condition: bool = False
    control_with_content_prompts_only: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        check_finite("control_weight", self.control_weight, low=0.0)
        check_finite("canny_sigma", self.canny_sigma, low=0.0)

    @property
    def controlled(self) -> bool:
        """Whether the ControlNet steers the local views at all (scale above 0, not switched off by the quirk)."""
        return self.control_weight > 0.0 and (self.content_prompts or not self.control_with_content_prompts_only)

    def check(self, settings: GenerationSettings, native: int, grid: int) -> None:
        super().check(settings, native, grid)
        from hiresdiff.ops.edges import opencv  # OpenCV is an optional extra: refused before any model work

        opencv()

    def check_controlnet(self, controlnet: ControlNetSpec | None) -> None:
        if controlnet is None:
            raise HiresError(
                f"accdiffusion-v2 steers its local views with a canny SDXL ControlNet: pass --controlnet "
                f"{CANNY_CONTROLNET}"
            )
        require(
            is_canny(controlnet),
            f"accdiffusion-v2 needs a canny SDXL ControlNet ('canny' in its hub id or folder path), not "
            f"{controlnet.ref!r}: pass --controlnet {CANNY_CONTROLNET}",
        )


#: ``official``: the argparse defaults of ``accdiffusion_plus.py`` with ``--use_controlnet`` (SPEC §4.2), its
#: guidance and steps, and the quirk of the ControlNet call inside the content-prompt branch
PRESETS = {
    "official": {
        "steps": 50,
        "guidance": 7.5,
        "sigma": 0.8,
        "prompt_threshold": 0.3,
        "multi_guidance_scale": 7.5,
        "control_weight": 0.3,
        "canny_sigma": 0.3,
        "clamp_condition": False,
        "control_with_content_prompts_only": True,
    }
}

METHOD = Method(
    "accdiffusion-v2",
    "AccDiffusion v2: AccDiffusion + a canny ControlNet on the local views, edges of the previous phase",
    "https://arxiv.org/abs/2412.02099",
    AccDiffusionV2Params,
    "hiresdiff.methods.accdiffusion_v2:run_accdiffusion_v2",
    default_negative=PAPER_NEGATIVE_PROMPT,
    presets=PRESETS,
    strength_params=start_step_of,
    families=("sdxl",),  # the official code and its ControlNet are SDXL-only (SPEC-baselines-progressive §4.4)
    own_control=True,
)
