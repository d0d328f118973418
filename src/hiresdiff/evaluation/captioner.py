"""Image captioning with a transformers vision-to-text model (BLIP, BLIP-2), for reference sets without captions.

APT captions its OpenImages test set with BLIP-2; the default here is the smaller BLIP
(``Salesforce/blip-image-captioning-large``). Weights come from a local folder or the Hugging Face cache; when
offline and not cached, loading fails in one line naming the model and the cache folder.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from PIL import Image

from hiresdiff.evaluation.defaults import DEFAULT_CAPTIONER
from hiresdiff.evaluation.weights import load_pretrained

#: RGB images → one caption each
Captioner = Callable[[Sequence[Image.Image]], list[str]]


class HFCaptioner:
    """Unconditional captions from a transformers image-to-text model and its processor (greedy decoding)."""

    def __init__(self, model: Any, processor: Any, max_new_tokens: int = 40) -> None:
        self.model = model.eval()
        self.processor = processor
        self.max_new_tokens = max_new_tokens

    @torch.no_grad()
    def __call__(self, images: Sequence[Image.Image]) -> list[str]:
        param = next(self.model.parameters())
        inputs = self.processor(images=list(images), return_tensors="pt")
        inputs = {k: v.to(param.device, param.dtype if v.is_floating_point() else v.dtype) for k, v in inputs.items()}
        ids = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        return [text.strip() for text in self.processor.batch_decode(ids, skip_special_tokens=True)]


def load_captioner(ref: str = DEFAULT_CAPTIONER, device: str | torch.device | None = None) -> HFCaptioner:
    """Load a captioning model (hub id or local folder) in float16 on CUDA, float32 on CPU."""
    import transformers
    from transformers import AutoProcessor

    auto = getattr(transformers, "AutoModelForImageTextToText", None) or transformers.AutoModelForVision2Seq
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    processor = load_pretrained(AutoProcessor.from_pretrained, ref, "captioning model")
    model = load_pretrained(auto.from_pretrained, ref, "captioning model")
    return HFCaptioner(model.to(dev, dtype), processor)
