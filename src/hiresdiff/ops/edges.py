"""Automatic Canny edge maps: AccDiffusion v2's ControlNet condition (SPEC-baselines-progressive §4.2, the official
``utils.auto_canny`` as ``accdiffusion_plus.py`` calls it).

For an 8-bit RGB image with median value ``v`` over all its values (every channel), ``lo = int(max(0, (1 − s)·v))``
and ``hi = int(min(255, (1 + s)·v))``; ``cv2.Canny(image, lo, hi)`` runs on the 3-channel image (OpenCV takes the
largest gradient over the channels: more edges than on grey), and the {0, 255} map becomes three equal channels in
{0, 1}, as diffusers' control image processor feeds it (no normalisation).

OpenCV is an optional extra (``pip install 'hiresdiff[accv2]'``): a torch re-implementation would not match its
hysteresis exactly, and the ControlNet was trained on OpenCV's edges.
"""

from __future__ import annotations

from types import ModuleType

import numpy as np
import torch

from hiresdiff.errors import HiresError

#: how to install OpenCV for AccDiffusion v2
OPENCV_INSTALL = "pip install 'hiresdiff[accv2]'"


def opencv() -> ModuleType:
    """The ``cv2`` module; a one-line error naming the extra to install when OpenCV is missing."""
    try:
        import cv2
    except ImportError:
        raise HiresError(
            f"accdiffusion-v2 finds its Canny edges with OpenCV, which is not installed: {OPENCV_INSTALL}"
        ) from None
    return cv2


def canny_thresholds(median: float, sigma: float) -> tuple[int, int]:
    """Hysteresis thresholds ``(int(max(0, (1 − s)·v)), int(min(255, (1 + s)·v)))`` around the median ``v``."""
    return int(max(0.0, (1.0 - sigma) * median)), int(min(255.0, (1.0 + sigma) * median))


def auto_canny(image: np.ndarray, sigma: float) -> np.ndarray:
    """Canny edges (H, W) in {0, 255} of an 8-bit image (H, W, 3), thresholds from its median
    (:func:`canny_thresholds`)."""
    lo, hi = canny_thresholds(float(np.median(image)), sigma)
    return opencv().Canny(np.ascontiguousarray(image), lo, hi)


def edge_maps(pixels: torch.Tensor, sigma: float) -> torch.Tensor:
    """8-bit RGB images (B, H, W, 3) → their edge maps (B, 3, H, W), float32 in {0, 1}, on the CPU."""
    images = pixels.cpu().numpy()
    edges = np.stack([auto_canny(image, sigma) for image in images])
    return torch.from_numpy(edges).float().div_(255.0)[:, None].expand(-1, 3, -1, -1).contiguous()
