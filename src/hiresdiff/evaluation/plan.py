"""Everything :func:`~hiresdiff.evaluation.evaluate` checks and decides before any network is built.

:func:`plan_evaluation` reads only image headers and CSV files. Bad paths, empty folders, unknown metrics,
malformed crop specs, FID/KID without reference images, missing prompts, crops larger than an image, an unknown
native size and too few samples all fail here, in one line, before any weights are loaded. The plan fixes every
crop position, so the positions can be inspected (and compared across methods) without evaluating anything.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from hiresdiff.errors import HiresError, require
from hiresdiff.evaluation.crops import CropBox, CropProtocol, crop_boxes, parse_crop_spec
from hiresdiff.evaluation.files import CaptionTable, ImageRecord, list_images, scan_image
from hiresdiff.evaluation.scores import IS_SPLITS, KID_SUBSET_SIZE

METRICS = ("fid", "kid", "is", "clip", "musiq", "clipiqa")
#: metrics computed from Inception outputs, with crop variants
DISTRIBUTION_METRICS = ("fid", "kid", "is")
#: metrics that compare against reference images
REFERENCE_METRICS = ("fid", "kid")


@dataclass(frozen=True)
class ImageSet:
    """A folder of images with the crop positions of each image (empty lists when no crops are scored)."""

    root: Path
    records: list[ImageRecord]
    boxes: list[list[CropBox]]

    @property
    def n_crops(self) -> int:
        return sum(len(b) for b in self.boxes)


@dataclass(frozen=True)
class EvalPlan:
    """What will be computed, on which images and crops.

    Attributes:
        metrics: Requested metrics in :data:`METRICS` order.
        generated: The images to score.
        reference: The real images (only when FID or KID is requested).
        prompts: One prompt per generated image (only when the CLIP score is requested).
        crops: The crop protocol with its size resolved, or ``None``.
        seed: Seeds the crop positions, KID's subsets and IS's shuffle.
        kid_subset_size: KID subset size for whole images and for crops (clamped to the sample counts).
        is_splits: IS splits for whole images and for crops (clamped to the generated counts).
        notes: Adjustments made (clamped sizes), for the report.
    """

    metrics: tuple[str, ...]
    generated: ImageSet
    reference: ImageSet | None
    prompts: list[str] | None
    crops: CropProtocol | None
    seed: int
    kid_subset_size: dict[str, int] = field(default_factory=dict)
    is_splits: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def distribution_metrics(self) -> set[str]:
        return set(self.metrics) & set(DISTRIBUTION_METRICS)


def parse_metrics(metrics: str | Sequence[str] | None, has_reference: bool) -> tuple[str, ...]:
    """Metric names from ``"fid,kid"`` or a sequence; ``None`` → FID, KID, IS, CLIP (IS, CLIP without reference)."""
    if metrics is None:
        return ("fid", "kid", "is", "clip") if has_reference else ("is", "clip")
    names = metrics.split(",") if isinstance(metrics, str) else list(metrics)
    wanted = {n.strip().lower() for n in names if n.strip()}
    unknown = sorted(wanted - set(METRICS))
    require(not unknown, f"--metrics: unknown {', '.join(map(repr, unknown))}; choose from {','.join(METRICS)}")
    require(bool(wanted), f"--metrics: name at least one of {','.join(METRICS)}")
    return tuple(m for m in METRICS if m in wanted)


def native_size(records: Sequence[ImageRecord]) -> int:
    """The native size of the model(s) named in the images' hiresdiff settings (read cheaply, no weights)."""
    from hiresdiff.models.loading import resolve_model

    models = {r.settings.get("model") for r in records if r.settings}
    missing = next((r.path.name for r in records if not (r.settings and r.settings.get("model"))), None)
    if missing is not None:
        raise HiresError(f"--crops: the native size is unknown ({missing} names no model); pass --native PX")
    sizes = set()
    for model in sorted(map(str, models)):
        try:
            sizes.add(resolve_model(model).native_size)
        except HiresError as exc:
            raise HiresError(
                f"--crops: cannot tell the native size of model {model!r} ({exc}); pass --native PX"
            ) from None
    require(
        len(sizes) == 1,
        f"--crops: the images come from models of different native sizes {sorted(sizes)}; pass --native PX",
    )
    return sizes.pop()


def _prompts(records: Sequence[ImageRecord], prompts: str | Path | Mapping[str, str] | None) -> list[str]:
    table = None
    if prompts is not None:
        table = CaptionTable(prompts) if isinstance(prompts, Mapping) else CaptionTable.read(prompts)
    out = []
    for r in records:
        prompt = table.get(r.path) if table is not None else None
        if prompt is None and r.settings is not None and isinstance(r.settings.get("prompt"), str):
            prompt = r.settings["prompt"]
        if prompt is None:
            where = "the prompts CSV or its hiresdiff settings" if table is not None else "its hiresdiff settings"
            raise HiresError(
                f"CLIP score: no prompt for {r.path.name} in {where}; pass --prompts CSV (file,prompt) or drop clip"
            )
        out.append(prompt)
    return out


def _image_set(root: Path, records: list[ImageRecord], crops: CropProtocol | None, seed: int) -> ImageSet:
    if crops is None or crops.size is None:
        return ImageSet(root, records, [[] for _ in records])
    for r in records:
        require(
            crops.size <= min(r.width, r.height),
            f"--crops {crops.spec}: a {crops.size} px crop does not fit {r.path.name} ({r.width}×{r.height})",
        )
    counts = crops.counts(len(records))
    boxes = [crop_boxes(r.width, r.height, crops.size, n, seed) for r, n in zip(records, counts, strict=True)]
    return ImageSet(root, records, boxes)


def _scan(folder: str | Path, what: str) -> tuple[Path, list[ImageRecord]]:
    files = list_images(folder, what=what)
    return Path(folder).expanduser(), [scan_image(p) for p in files]


def plan_evaluation(
    images: str | Path,
    *,
    reference: str | Path | None = None,
    prompts: str | Path | Mapping[str, str] | None = None,
    metrics: str | Sequence[str] | None = None,
    crops: str | CropProtocol | None = None,
    seed: int = 0,
    native: int | None = None,
    kid_subset_size: int = KID_SUBSET_SIZE,
    is_splits: int = IS_SPLITS,
) -> EvalPlan:
    """Check the inputs and fix images, prompts, crop positions and sample-size settings (see module docstring).

    Raises:
        HiresError: Any input problem, in one line.
    """
    names = parse_metrics(metrics, reference is not None)
    protocol = parse_crop_spec(crops) if isinstance(crops, str) else crops
    require(seed >= 0, f"--crop-seed must not be negative, got {seed}")
    require(native is None or native >= 1, f"--native must be a positive number of pixels, got {native}")
    require(kid_subset_size >= 2 and is_splits >= 1, "KID subset size must be ≥ 2 and IS splits ≥ 1")
    needs_reference = [m for m in names if m in REFERENCE_METRICS]
    require(
        reference is not None or not needs_reference,
        f"{'/'.join(m.upper() for m in needs_reference)} compare against real images: pass --reference DIR",
    )
    root, records = _scan(images, "images folder")
    ref = _scan(reference, "--reference") if reference is not None and needs_reference else None
    prompt_list = _prompts(records, prompts) if "clip" in names else None
    notes = [] if ref is not None or reference is None else ["reference images unused: no FID or KID requested"]
    if protocol is not None and not set(names) & set(DISTRIBUTION_METRICS):
        notes.append("crops unused: no FID, KID or IS requested")
        protocol = None
    if protocol is not None and protocol.size is None:
        protocol = protocol.with_native(native or native_size(records))
    generated = _image_set(root, records, protocol, seed)
    reference_set = _image_set(ref[0], ref[1], protocol, seed) if ref is not None else None
    plan = EvalPlan(names, generated, reference_set, prompt_list, protocol, seed, notes=notes)
    _sample_sizes(plan, kid_subset_size, is_splits)
    return plan


def _sample_sizes(plan: EvalPlan, kid_subset_size: int, is_splits: int) -> None:
    """Check sample counts per view and clamp KID's subset size and IS's splits to them (recorded in notes)."""
    views = {"": (len(plan.generated.records), len(plan.reference.records) if plan.reference else 0)}
    if plan.crops is not None:
        views["_crop"] = (plan.generated.n_crops, plan.reference.n_crops if plan.reference else 0)
    for suffix, (n_gen, n_ref) in views.items():
        label = "images" if not suffix else "crops"
        reference_metrics = plan.distribution_metrics & set(REFERENCE_METRICS)
        if reference_metrics:
            require(
                min(n_gen, n_ref) >= 2,
                f"{'/'.join(sorted(m.upper() for m in reference_metrics))} need at least 2 generated and 2 "
                f"reference {label} (got {n_gen} and {n_ref})",
            )
        if "kid" in plan.metrics:
            size = min(kid_subset_size, n_gen, n_ref)
            plan.kid_subset_size[suffix] = size
            if size < kid_subset_size:
                plan.notes.append(f"kid{suffix}: subset size {kid_subset_size} clamped to {size} (only {size} {label})")
        if "is" in plan.metrics:
            require(n_gen >= 1, f"IS needs at least one generated {label[:-1]}")
            splits = math.ceil(n_gen / math.ceil(n_gen / is_splits))  # torch.chunk's count: 12 in 10 splits → 6
            plan.is_splits[suffix] = splits
            if splits < is_splits:
                plan.notes.append(f"is{suffix}: {is_splits} splits clamped to {splits} (only {n_gen} {label})")
