"""AccDiffusion patch-content-aware prompts (SPEC §3): words, their attention masks, per-view prompts."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hiresdiff.ops.geometry import View

#: structuring element side of the opening (erode then dilate) applied to each word mask
OPENING_KERNEL = 3
#: the opening runs ``map side // OPENING_DIVISOR`` iterations (lzhxmu/AccDiffusion ``utils.py``,
#: ``get_multidiffusion_prompts``: ``iterations=mask.shape[0]//16``): 2 on SDXL's 32 × 32 maps, 0 below 16 × 16
OPENING_DIVISOR = 16


@dataclass(frozen=True)
class Word:
    """A whitespace-separated word of the prompt and the token positions (in the 77-token sequence) it spans."""

    text: str
    positions: tuple[int, ...]


def prompt_words(prompt: str, count_tokens: Callable[[str], int], max_length: int = 77) -> list[Word]:
    """Split ``prompt`` into words and map each to its sub-word token positions.

    Position 0 is the start token; words follow in order; words that fall past the last content position
    (``max_length − 2``, before the end token) are dropped, as the text encoder truncates them.
    """
    words, pos = [], 1
    for text in prompt.split():
        n = count_tokens(text)
        span = tuple(p for p in range(pos, pos + n) if p <= max_length - 2)
        if span:
            words.append(Word(text, span))
        pos += n
    return words


def _dilate(mask: torch.Tensor, k: int) -> torch.Tensor:
    """Binary dilation; pixels outside the map count as background (OpenCV ``dilate``'s default border)."""
    return F.max_pool2d(mask, k, stride=1, padding=k // 2)


def _erode(mask: torch.Tensor, k: int) -> torch.Tensor:
    """Binary erosion; pixels outside the map count as foreground (OpenCV ``erode``'s default border value is
    +∞), so the border itself does not erode a mask."""
    padded = F.pad(mask, (k // 2,) * 4, value=1.0)
    return -F.max_pool2d(-padded, k, stride=1)


def opening_iterations(height: int, width: int) -> int:
    """Iterations of the opening for a ``height × width`` map: ``side // 16`` (the official code uses the first
    side of its square maps; for other maps hiresdiff takes the shorter side)."""
    return min(height, width) // OPENING_DIVISOR


def binary_opening(mask: torch.Tensor, kernel: int = OPENING_KERNEL, iterations: int | None = None) -> torch.Tensor:
    """Opening of a boolean (…, H, W) mask: ``iterations`` erosions then as many dilations, ``kernel²`` square,
    with OpenCV's default borders (:func:`_erode`, :func:`_dilate`); ``iterations`` defaults to
    :func:`opening_iterations` of the map."""
    h, w = mask.shape[-2:]
    n = opening_iterations(h, w) if iterations is None else iterations
    x = mask.float().reshape(-1, 1, h, w)
    for _ in range(n):
        x = _erode(x, kernel)
    for _ in range(n):
        x = _dilate(x, kernel)
    return x.reshape(mask.shape) > 0.5


def word_masks(attention: torch.Tensor, words: list[Word]) -> torch.Tensor:
    """Masks (n_words, gh, gw): each word's map (mean of its tokens' maps) binarised at its mean, then opened
    (:func:`binary_opening`: ``min(gh, gw) // 16`` iterations).

    ``attention`` (tokens, gh, gw) holds the cross-attention probabilities averaged over heads, layers and steps.
    """
    if not words:
        return torch.zeros(0, *attention.shape[-2:], dtype=torch.bool)
    maps = torch.stack([attention[list(w.positions)].mean(0) for w in words])
    binary = maps > maps.mean(dim=(1, 2), keepdim=True)
    return binary_opening(binary)


def view_prompt(words: list[Word], masks: torch.Tensor, view: View, height: int, width: int, threshold: float) -> str:
    """The prompt of a local view: the words whose mask covers at least ``threshold`` of the view, in order.

    ``masks`` live on a coarse grid spanning the whole ``height × width`` latent canvas; they are resized
    (nearest) to the canvas. A word's coverage is its mask's area inside the view divided by the view's **full**
    window area — the part of a jittered view that lies past the border counts as uncovered, as in the official
    ``get_multidiffusion_prompts`` (lzhxmu/AccDiffusion ``utils.py``: the mask zero-padded by the jitter range,
    ``view_mask.sum() / window²``). No word gives the empty prompt.
    """
    if not words:
        return ""
    full = F.interpolate(masks[None].float(), size=(height, width), mode="nearest")[0]
    top, left = max(0, view.top), max(0, view.left)
    bottom, right = min(height, view.top + view.height), min(width, view.left + view.width)
    coverage = full[:, top:bottom, left:right].sum(dim=(1, 2)) / (view.height * view.width)
    return " ".join(w.text for w, c in zip(words, coverage.tolist(), strict=True) if c >= threshold)
