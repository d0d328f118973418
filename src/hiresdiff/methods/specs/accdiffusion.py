"""AccDiffusion (Lin et al., ECCV 2024) — SPEC §3 parameters; recipe: :mod:`hiresdiff.methods.accdiffusion`."""

from __future__ import annotations

from dataclasses import dataclass

from hiresdiff.config import PAPER_NEGATIVE_PROMPT, check_finite
from hiresdiff.errors import require
from hiresdiff.methods.base import Method
from hiresdiff.methods.specs.demofusion import DemoFusionParams, start_step_of


@dataclass
class AccDiffusionParams(DemoFusionParams):
    """SPEC §3 parameters on top of DemoFusion's.

    ``prompt_threshold``: the fraction ``c`` of a view a word's mask must cover to enter its prompt;
    ``multi_guidance_scale``: guidance of the local (view-prompt) predictions; ``content_prompts`` and
    ``window_interaction`` switch the two components.
    """

    prompt_threshold: float = 0.3
    multi_guidance_scale: float = 7.5
    content_prompts: bool = True
    window_interaction: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_finite("prompt_threshold", self.prompt_threshold, low=0.0)
        require(
            self.prompt_threshold <= 1.0, f"prompt_threshold is a fraction of the view, got {self.prompt_threshold}"
        )
        check_finite("multi_guidance_scale", self.multi_guidance_scale, low=0.0)


METHOD = Method(
    "accdiffusion",
    "AccDiffusion: DemoFusion + patch-content-aware prompts and window interaction",
    "https://arxiv.org/abs/2407.10738",
    AccDiffusionParams,
    "hiresdiff.methods.accdiffusion:run_accdiffusion",
    default_negative=PAPER_NEGATIVE_PROMPT,
    strength_params=start_step_of,
    families=("sd", "sdxl"),  # UNet attention layers (window interaction, content-aware prompts)
)
