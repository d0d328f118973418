"""``evaluate``: the papers' image metrics over a folder of generated images, streamed in batches.

Whole images and crops are resized to the extractor input and scored with FID, KID and IS (crop variants keyed
``fid_crop``, ``kid_crop``, ``is_crop``); generated images against their prompts with the CLIP score; and with the
no-reference quality metrics MUSIQ and CLIPIQA on the full-resolution images. See
:mod:`hiresdiff.evaluation.scores` for the metric definitions and :mod:`hiresdiff.evaluation.crops` for the crop
protocols.
"""

from __future__ import annotations

import platform
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from hiresdiff.errors import HiresError
from hiresdiff.evaluation.crops import CropProtocol
from hiresdiff.evaluation.extractors import DEFAULT_CLIP_MODEL, Extractors, complete_extractors
from hiresdiff.evaluation.plan import EvalPlan, ImageSet, plan_evaluation
from hiresdiff.evaluation.scores import (
    IS_SPLITS,
    KID_SUBSET_SIZE,
    KID_SUBSETS,
    DistributionScores,
    Mean,
    require_torchmetrics,
)
from hiresdiff.evaluation.views import Batcher, ImageViews, ViewRequest, prefetch, prepare


def _suffixed(key: str, suffix: str) -> str:
    """``kid_std`` + ``_crop`` → ``kid_crop_std``."""
    base, _, rest = key.partition("_")
    return f"{base}{suffix}" + (f"_{rest}" if rest else "")


_DISTRIBUTION_KEYS = ("fid", "kid", "kid_std", "is", "is_std")
#: order of the keys in :attr:`EvalResult.metrics`
METRIC_KEYS = (
    *_DISTRIBUTION_KEYS,
    "clip",
    "musiq",
    "clipiqa",
    *(_suffixed(k, "_crop") for k in _DISTRIBUTION_KEYS),
)


@dataclass
class EvalResult:
    """Metric values and how they were obtained.

    Attributes:
        metrics: Values by key (:data:`METRIC_KEYS` order); ``None`` where undefined (IS std of one split).
        details: Folders, counts, crop protocol, seeds, sample-size settings, networks and device.
        notes: Adjustments made (e.g. KID's subset size clamped to the number of images).
    """

    metrics: dict[str, float | None]
    details: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"metrics": self.metrics, "details": self.details, "notes": self.notes}


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``device`` as a torch device (default: CUDA when available), one-line error when unusable."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise HiresError(f"--device: unknown device {str(device)!r} (cpu, cuda, cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise HiresError(f"--device {device}: CUDA is not available here")
    return dev


def evaluate(
    images: str | Path,
    *,
    reference: str | Path | None = None,
    prompts: str | Path | Mapping[str, str] | None = None,
    metrics: str | Sequence[str] | None = None,
    crops: str | CropProtocol | None = None,
    crop_seed: int = 0,
    native: int | None = None,
    extractors: Extractors | None = None,
    inception_weights: str | Path | None = None,
    clip_model: str = DEFAULT_CLIP_MODEL,
    batch_size: int = 16,
    device: str | torch.device | None = None,
    workers: int = 4,
    kid_subset_size: int = KID_SUBSET_SIZE,
    kid_subsets: int = KID_SUBSETS,
    is_splits: int = IS_SPLITS,
    progress: bool = True,
) -> EvalResult:
    """Score a folder of generated images.

    Args:
        images: Folder of generated images (top level only; hiresdiff's ``-phaseKofN`` previews are skipped).
        reference: Folder of real images, needed by FID and KID.
        prompts: ``file,prompt`` CSV or a mapping file → prompt; otherwise the prompts stored in hiresdiff PNGs.
        metrics: Names among ``fid, kid, is, clip, musiq, clipiqa`` (default FID, KID, IS, CLIP with a reference,
            IS and CLIP without).
        crops: Crop protocol for FIDc/KIDc/ISc: ``native``, ``windows:K[xS]``, ``fixed:NxS`` (see
            :mod:`~hiresdiff.evaluation.crops`).
        crop_seed: Seeds the crop positions, KID's subsets and IS's shuffle.
        native: Native size in pixels for ``native`` / ``windows`` crops (default: from the PNG settings' model).
        extractors: Networks to use instead of the defaults (tests pass tiny ones).
        inception_weights: Local copy of torch-fidelity's Inception weights.
        clip_model: Hub id or local folder of a transformers CLIP model.
        batch_size: Images (or crops) per network call.
        device: ``cpu``, ``cuda``, ``cuda:N`` (default: CUDA when available).
        workers: Threads decoding and resizing images ahead of the networks (0: none).
        kid_subset_size: Samples per KID subset (clamped to the available count, noted).
        kid_subsets: Number of KID subsets.
        is_splits: IS splits (clamped to the generated count, noted).
        progress: Show progress bars.

    Raises:
        HiresError: Bad input, unusable environment or missing weights, in one line (input checks come before any
            network is built).
    """
    _require_positive(batch_size=batch_size, kid_subsets=kid_subsets)
    if workers < 0:
        raise HiresError(f"--workers must not be negative, got {workers}")
    plan = plan_evaluation(
        images,
        reference=reference,
        prompts=prompts,
        metrics=metrics,
        crops=crops,
        seed=crop_seed,
        native=native,
        kid_subset_size=kid_subset_size,
        is_splits=is_splits,
    )
    dev = resolve_device(device)
    if plan.distribution_metrics:
        require_torchmetrics()
    nets = complete_extractors(
        extractors, plan.metrics, dev, inception_weights_path=inception_weights, clip_model=clip_model
    )
    return _Run(plan, nets, dev, batch_size=batch_size, kid_subsets=kid_subsets).execute(workers, progress)


def _require_positive(**values: int) -> None:
    """One-line error unless every named value is at least 1."""
    for name, value in values.items():
        if value < 1:
            raise HiresError(f"--{name.replace('_', '-')} is too small ({value})")


class _Run:
    """One evaluation: streams the generated then the reference images through the networks."""

    def __init__(
        self, plan: EvalPlan, nets: Extractors, device: torch.device, *, batch_size: int, kid_subsets: int
    ) -> None:
        self.plan, self.nets, self.device, self.batch_size = plan, nets, device, batch_size
        dist = plan.distribution_metrics
        suffixes = ["", "_crop"] if plan.crops is not None else [""]
        self.scores = {
            suffix: DistributionScores(
                dist,
                kid_subset_size=plan.kid_subset_size.get(suffix, KID_SUBSET_SIZE),
                kid_subsets=kid_subsets,
                is_splits=plan.is_splits.get(suffix, IS_SPLITS),
            )
            for suffix in (suffixes if dist else [])
        }
        self.clip = Mean()
        self.iqa = {name: Mean() for name in ("musiq", "clipiqa") if name in plan.metrics}

    def execute(self, workers: int, progress: bool) -> EvalResult:
        self._stream(self.plan.generated, real=False, workers=workers, progress=progress)
        if self.plan.reference is not None:
            self._stream(self.plan.reference, real=True, workers=workers, progress=progress)
        return self._result()

    def _request(self, real: bool) -> ViewRequest:
        clip = self.nets.clip if "clip" in self.plan.metrics and not real else None
        return ViewRequest(
            input_size=self.nets.input_size if self.scores else None,
            clip_pixels=clip.pixels if clip is not None else None,
            full=bool(self.iqa) and not real,
        )

    def _inception(self, suffix: str, real: bool) -> Batcher[torch.Tensor]:
        net, scores = self.nets.inception, self.scores[suffix]
        if net is None:
            raise HiresError("FID/KID/IS need an Inception network")

        def consume(batch: list[torch.Tensor]) -> None:
            with torch.no_grad():
                features, logits = net(torch.stack(batch).to(self.device))
            scores.update(features, logits, real=real)

        return Batcher(self.batch_size, consume)

    def _clip_batcher(self) -> Batcher[tuple[torch.Tensor, str]]:
        scorer = self.nets.clip
        if scorer is None:
            raise HiresError("the CLIP score needs a CLIP model")

        def consume(batch: list[tuple[torch.Tensor, str]]) -> None:
            self.clip.update(scorer(torch.stack([p for p, _ in batch]), [t for _, t in batch]))

        return Batcher(self.batch_size, consume)

    def _stream(self, images: ImageSet, *, real: bool, workers: int, progress: bool) -> None:
        request = self._request(real)
        whole = self._inception("", real) if self.scores else None
        crops = self._inception("_crop", real) if "_crop" in self.scores else None
        clip = self._clip_batcher() if request.clip_pixels is not None else None
        prompts = self.plan.prompts or []
        jobs = list(zip(images.records, images.boxes, strict=True))
        views = prefetch(lambda job: prepare(job[0], job[1], request), jobs, workers)
        desc = "reference" if real else "generated"
        for i, v in enumerate(tqdm(views, total=len(jobs), desc=desc, unit="img", disable=not progress)):
            self._feed(v, whole, crops, clip, prompts[i] if clip is not None else "")
        for batcher in (whole, crops, clip):
            if batcher is not None:
                batcher.flush()

    def _feed(
        self,
        v: ImageViews,
        whole: Batcher[torch.Tensor] | None,
        crops: Batcher[torch.Tensor] | None,
        clip: Batcher[tuple[torch.Tensor, str]] | None,
        prompt: str,
    ) -> None:
        if whole is not None and v.whole is not None:
            whole.extend([v.whole])
        if crops is not None and v.crops is not None:
            crops.extend(list(v.crops))
        if clip is not None and v.clip is not None:
            clip.extend([(v.clip, prompt)])
        if v.full is not None:
            x = (v.full.to(self.device, torch.float32) / 255.0).unsqueeze(0)
            with torch.no_grad():
                for name, mean in self.iqa.items():
                    mean.update(self.nets.iqa[name](x))

    def _result(self) -> EvalResult:
        values: dict[str, float | None] = {}
        for suffix, scores in self.scores.items():
            values.update({_suffixed(k, suffix): v for k, v in scores.compute(self.plan.seed).items()})
        if "clip" in self.plan.metrics:
            values["clip"] = self.clip.value
        values.update({name: mean.value for name, mean in self.iqa.items()})
        ordered = {k: values[k] for k in METRIC_KEYS if k in values}
        return EvalResult(ordered, self._details(), list(self.plan.notes))

    def _details(self) -> dict[str, Any]:
        p, ref = self.plan, self.plan.reference
        return {
            "images": str(p.generated.root),
            "n_images": len(p.generated.records),
            "reference": str(ref.root) if ref is not None else None,
            "n_reference": len(ref.records) if ref is not None else 0,
            "metrics": list(p.metrics),
            "crops": p.crops.spec if p.crops is not None else None,
            "crop_size": p.crops.size if p.crops is not None else None,
            "n_crops": p.generated.n_crops if p.crops is not None else 0,
            "n_reference_crops": ref.n_crops if ref is not None and p.crops is not None else 0,
            "crop_seed": p.seed,
            "kid_subset_size": {f"kid{k}": v for k, v in p.kid_subset_size.items()},
            "is_splits": {f"is{k}": v for k, v in p.is_splits.items()},
            "extractor_input_size": self.nets.input_size if self.scores else None,
            "device": _device_name(self.device),
            "torch": torch.__version__,
            "python": platform.python_version(),
        }


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({platform.processor() or platform.machine()})"
