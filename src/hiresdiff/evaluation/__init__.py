"""Measuring quality: the papers' image metrics (``hiresdiff eval``) and reference sets (``hiresdiff dataset``).

* :func:`evaluate` — FID, KID, IS, CLIP score, MUSIQ, CLIPIQA of a folder of generated images, and the crop
  variants FIDc / KIDc / ISc under a seeded crop protocol (:mod:`~hiresdiff.evaluation.crops`);
* :func:`plan_evaluation` — every input check and every crop position, without building a network;
* :func:`build_reference_set` — real high-resolution images, centre-cropped square, resized, with captions.

Networks are injectable (:class:`Extractors`); the defaults come from torch-fidelity (Inception-v3), transformers
(CLIP) and pyiqa (MUSIQ, CLIPIQA), imported only when needed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hiresdiff.lazy import lazy_exports

if TYPE_CHECKING:
    from hiresdiff.evaluation.crops import CropBox, CropProtocol, crop_boxes, parse_crop_spec
    from hiresdiff.evaluation.dataset import DatasetReport, build_reference_set
    from hiresdiff.evaluation.evaluator import EvalResult, evaluate
    from hiresdiff.evaluation.extractors import ClipScorer, Extractors
    from hiresdiff.evaluation.plan import METRICS, EvalPlan, plan_evaluation

#: exported name → defining submodule, imported on first access (PEP 562) so that the ``eval``/``dataset``/
#: ``bench`` parsers (which import :mod:`hiresdiff.evaluation.cli`) do not import torch
_WHERE = {
    "CropBox": "crops",
    "CropProtocol": "crops",
    "crop_boxes": "crops",
    "parse_crop_spec": "crops",
    "DatasetReport": "dataset",
    "build_reference_set": "dataset",
    "EvalResult": "evaluator",
    "evaluate": "evaluator",
    "ClipScorer": "extractors",
    "Extractors": "extractors",
    "METRICS": "plan",
    "EvalPlan": "plan",
    "plan_evaluation": "plan",
}


__getattr__ = lazy_exports(__name__, _WHERE)


__all__ = [
    "METRICS",
    "ClipScorer",
    "CropBox",
    "CropProtocol",
    "DatasetReport",
    "EvalPlan",
    "EvalResult",
    "Extractors",
    "build_reference_set",
    "crop_boxes",
    "evaluate",
    "parse_crop_spec",
    "plan_evaluation",
]
