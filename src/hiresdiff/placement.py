"""Where a run keeps its weights between uses: the one rule the loaded pipeline and the memory estimate share."""

from __future__ import annotations

import torch


def parks_text(device: str | torch.device) -> bool:
    """Whether a run on ``device`` outside low-VRAM mode keeps the text encoders on the CPU between prompts: on an
    accelerator (they run once per image, the rest of the run needs the room — SDXL's two 1.5 GiB in float16,
    FLUX's T5-XXL 8.9 GiB); on the CPU every weight is in the same memory anyway."""
    return torch.device(device).type not in ("cpu", "meta")
