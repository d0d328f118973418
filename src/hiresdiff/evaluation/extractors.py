"""The networks behind the metrics, injectable: Inception features/logits, CLIP, no-reference quality models.

:class:`Extractors` holds whatever the caller passes (tests pass tiny deterministic modules);
:func:`complete_extractors` builds the library defaults for the rest:

* ``inception``: torch-fidelity's Inception-v3 (the network torchmetrics' FID/KID/IS use with ``feature=2048``),
  returning the 2048-d pool features (FID, KID) and the 1008 ``logits_unbiased`` (IS) from one forward pass;
* ``clip``: a transformers ``CLIPModel`` (default ``openai/clip-vit-large-patch14``, as torchmetrics' CLIPScore);
* ``iqa``: pyiqa's ``musiq`` and ``clipiqa`` metrics.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from hiresdiff.evaluation.defaults import DEFAULT_CLIP_MODEL
from hiresdiff.evaluation.views import center_box, resized
from hiresdiff.evaluation.weights import (
    check_pyiqa_weights,
    import_optional,
    inception_weights,
    load_pretrained,
)

#: side of the square the Inception network sees (torch-fidelity / TensorFlow FID)
INCEPTION_SIZE = 299
#: OpenAI CLIP's image normalisation (every released CLIP checkpoint uses it)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

#: images in [0, 1], shape (B, 3, H, W) → one quality score per image, shape (B,)
QualityFn = Callable[[torch.Tensor], torch.Tensor]


class ClipScorer:
    """CLIP score of image–prompt pairs: ``100 · max(cos(E_image(x), E_text(p)), 0)`` per pair.

    The definition of Hessel et al. 2021 ("CLIPScore") with weight 100, as torchmetrics' ``CLIPScore``, which
    itself is not used because torchmetrics 1.9 breaks with transformers 5. Images are resized so the shorter
    side is the model's input size (bicubic, antialiased), centre-cropped and normalised with the CLIP mean/std;
    prompts are truncated to the tokenizer's 77 tokens.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, image_size: int | None = None) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.input_size = int(image_size or model.config.vision_config.image_size)
        self._mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
        self._std = torch.tensor(CLIP_STD).view(3, 1, 1)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def pixels(self, image: Image.Image) -> torch.Tensor:
        """The normalised (3, S, S) float input of one RGB image (safe to call from worker threads)."""
        square = resized(image, center_box(*image.size), self.input_size)
        x = torch.from_numpy(np.asarray(square, dtype=np.float32) / 255.0).permute(2, 0, 1)
        return (x - self._mean) / self._std

    @torch.no_grad()
    def __call__(self, pixels: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """CLIP scores (B,) of a batch of :meth:`pixels` outputs and their prompts."""
        limit = min(77, int(getattr(self.tokenizer, "model_max_length", 77)))
        tokens = self.tokenizer(list(prompts), padding=True, truncation=True, max_length=limit, return_tensors="pt")
        out = self.model(
            input_ids=tokens["input_ids"].to(self.device),
            attention_mask=tokens["attention_mask"].to(self.device),
            pixel_values=pixels.to(self.device, dtype=next(self.model.parameters()).dtype),
        )
        cos = torch.nn.functional.cosine_similarity(out.image_embeds.float(), out.text_embeds.float(), dim=-1)
        return 100.0 * cos.clamp(min=0.0)


@dataclass
class Extractors:
    """Networks used by :func:`~hiresdiff.evaluation.evaluate`; ``None`` / missing entries get the defaults.

    Attributes:
        inception: uint8 images (B, 3, S, S) → ``(features (B, D), logits (B, K))``: features for FID and KID,
            logits for IS.
        input_size: S, the side images and crops are resized to for ``inception`` (299 for Inception-v3).
        clip: CLIP scorer (:class:`ClipScorer`).
        iqa: No-reference quality metrics by name (``musiq``, ``clipiqa``): images in [0, 1] → scores (B,).
    """

    inception: nn.Module | None = None
    input_size: int = INCEPTION_SIZE
    clip: ClipScorer | None = None
    iqa: dict[str, QualityFn] = field(default_factory=dict)


def inception_builder(weights: str | Path | None = None) -> Callable[[], nn.Module]:
    """Check torch-fidelity and the weights now; return a builder of its Inception-v3.

    The network maps uint8 input to ``(2048-d pool features, logits_unbiased)``.
    """
    module = import_optional("torch_fidelity.feature_extractor_inceptionv3", "FID/KID/IS")
    path = inception_weights(weights)
    return lambda: module.FeatureExtractorInceptionV3(
        "inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=path
    )


def pyiqa_builder(name: str, device: torch.device) -> Callable[[], QualityFn]:
    """Check pyiqa and the weights of metric ``name`` (``musiq``, ``clipiqa``) now; return a builder of it."""
    pyiqa = import_optional("pyiqa", name.upper())
    check_pyiqa_weights(name)

    def build() -> QualityFn:
        metric = pyiqa.create_metric(name, device=device, as_loss=False)
        return lambda x: metric(x).reshape(-1)

    return build


def clip_scorer(ref: str = DEFAULT_CLIP_MODEL) -> ClipScorer:
    """A :class:`ClipScorer` over a transformers CLIP model (hub id or local folder)."""
    from transformers import AutoTokenizer, CLIPModel

    model = load_pretrained(CLIPModel.from_pretrained, ref, "CLIP model")
    tokenizer = load_pretrained(AutoTokenizer.from_pretrained, ref, "CLIP tokenizer")
    return ClipScorer(model, tokenizer)


def complete_extractors(
    given: Extractors | None,
    metrics: Sequence[str],
    device: torch.device,
    *,
    inception_weights_path: str | Path | None = None,
    clip_model: str = DEFAULT_CLIP_MODEL,
) -> Extractors:
    """``given`` completed with the default networks ``metrics`` need and the caller did not pass.

    Every package and weights check runs before the first network is built, so a missing piece fails fast.
    """
    ext = replace(given) if given is not None else Extractors()
    ext.iqa = dict(ext.iqa)
    build_inception = None
    if ext.inception is None and {"fid", "kid", "is"} & set(metrics):
        build_inception = inception_builder(inception_weights_path)
    build_iqa = {n: pyiqa_builder(n, device) for n in ("musiq", "clipiqa") if n in metrics and n not in ext.iqa}
    if ext.clip is None and "clip" in metrics:
        ext.clip = clip_scorer(clip_model)
    if build_inception is not None:
        ext.inception, ext.input_size = build_inception(), INCEPTION_SIZE
    ext.iqa.update({name: build() for name, build in build_iqa.items()})
    if ext.inception is not None:
        ext.inception = ext.inception.to(device).eval()
    if ext.clip is not None:
        ext.clip.model.to(device)
    return ext
