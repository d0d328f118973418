"""Accumulators: FID, KID and IS from precomputed Inception outputs (torchmetrics), and running means.

The Inception network runs once per batch (:mod:`hiresdiff.evaluation.extractors`); its features and logits are
handed to torchmetrics' metrics through an identity ``feature`` module, so FID, KID and IS share one forward pass.

* FID (Heusel et al. 2017): ``‖μ_r − μ_g‖² + Tr(Σ_r + Σ_g − 2 (Σ_r Σ_g)^½)`` of Gaussians fitted to the features.
* KID (Bińkowski et al. 2018): the unbiased estimator of the squared MMD with the polynomial kernel
  ``k(x, y) = (xᵀy / d + 1)³``, averaged over ``subsets`` random subsets of ``subset_size`` features per side
  (the mean and the standard deviation over subsets are reported). The subset size is clamped to the number of
  samples available (torchmetrics refuses fewer); features are kept in float64.
* IS (Salimans et al. 2016): ``exp(E_x[KL(p(y|x) ‖ p(y))])`` over the softmax of the logits, per split, mean and
  standard deviation over ``splits`` splits of the shuffled generated set.

KID's subsets and IS's shuffle draw from torch's global generator, forked and seeded for reproducibility.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

#: torch-fidelity / torchmetrics defaults
KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000
IS_SPLITS = 10


def require_torchmetrics() -> None:
    """One-line error unless torchmetrics' FID, KID and IS import (checked before any image is read)."""
    from hiresdiff.evaluation.weights import import_optional

    for module in ("torchmetrics.image.fid", "torchmetrics.image.kid", "torchmetrics.image.inception"):
        import_optional(module, "FID/KID/IS")


class _Precomputed(nn.Module):
    """Identity ``feature`` module for torchmetrics: the inputs already are the features."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class DistributionScores:
    """FID / KID / IS of one view (whole images or crops) of a generated set against a reference set.

    Args:
        metrics: The subset of ``fid``, ``kid``, ``is`` to compute.
        kid_subset_size: Samples per KID subset (already clamped to the sample counts by the caller).
        kid_subsets: Number of KID subsets.
        is_splits: Number of IS splits (already clamped to the generated count).
    """

    def __init__(
        self,
        metrics: set[str],
        *,
        kid_subset_size: int = KID_SUBSET_SIZE,
        kid_subsets: int = KID_SUBSETS,
        is_splits: int = IS_SPLITS,
    ) -> None:
        self.metrics = metrics
        self.kid_subset_size = kid_subset_size
        self.kid_subsets = kid_subsets
        self.is_splits = is_splits
        self._fid: nn.Module | None = None
        self._kid: nn.Module | None = None
        self._is: nn.Module | None = None

    def _build(self, num_features: int) -> None:
        from torchmetrics.image.fid import FrechetInceptionDistance
        from torchmetrics.image.inception import InceptionScore
        from torchmetrics.image.kid import KernelInceptionDistance

        with warnings.catch_warnings():  # "will save all extracted features in buffer": intended
            warnings.simplefilter("ignore", UserWarning)
            if "fid" in self.metrics:
                self._fid = FrechetInceptionDistance(feature=_Precomputed(num_features))
            if "kid" in self.metrics:
                self._kid = KernelInceptionDistance(
                    feature=_Precomputed(num_features), subsets=self.kid_subsets, subset_size=self.kid_subset_size
                )
            if "is" in self.metrics:
                self._is = InceptionScore(feature=_Precomputed(num_features), splits=self.is_splits)

    def update(self, features: torch.Tensor, logits: torch.Tensor, *, real: bool) -> None:
        """Add a batch of Inception features (B, D) and logits (B, K) of real (reference) or generated images."""
        features = features.detach().reshape(features.shape[0], -1).to("cpu", torch.float64)
        if self._fid is None and self._kid is None and self._is is None:
            self._build(features.shape[1])
        if self._fid is not None:
            self._fid.update(features, real=real)
        if self._kid is not None:
            self._kid.update(features, real=real)
        if self._is is not None and not real:
            self._is.update(logits.detach().reshape(logits.shape[0], -1).to("cpu", torch.float64))

    def compute(self, seed: int = 0) -> dict[str, float | None]:
        """``fid``, ``kid``, ``kid_std``, ``is``, ``is_std`` (those requested); a single IS split has no std."""
        out: dict[str, float | None] = {}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if self._fid is not None:
                out["fid"] = float(self._fid.compute())
            if self._kid is not None:
                mean, std = self._kid.compute()
                out["kid"], out["kid_std"] = float(mean), float(std)
            if self._is is not None:
                with warnings.catch_warnings():  # std of one split: NaN with a warning
                    warnings.simplefilter("ignore", UserWarning)
                    mean, std = self._is.compute()
                out["is"] = float(mean)
                out["is_std"] = None if self.is_splits < 2 or math.isnan(float(std)) else float(std)
        return out


class Mean:
    """Running mean of per-image scores."""

    def __init__(self) -> None:
        self.total = 0.0
        self.count = 0

    def update(self, values: torch.Tensor) -> None:
        values = values.detach().reshape(-1).double().cpu()
        self.total += float(values.sum())
        self.count += values.numel()

    @property
    def value(self) -> float | None:
        return self.total / self.count if self.count else None
