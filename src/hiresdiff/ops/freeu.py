"""FreeU (Si et al., 2023) as pure functions, and which up-block resnets it applies to (SPEC-baselines-unet §0).

FreeU edits the two inputs of a decoder resnet before they are concatenated: the backbone features h get their
first half of channels scaled by b, the skip features s are Fourier-filtered, scaling the lowest frequencies
(the centred 2t × 2t square of the fftshift spectrum, t = 1) by s. Stage 1 uses (b1, s1), stage 2 (b2, s2).

Which resnets belong to which stage differs between implementations:

- ``"diffusers"`` (``enable_freeu`` / ``apply_freeu``): by up-block index: every resnet of up block 0 is stage 1,
  every resnet of up block 1 is stage 2.
- ``"channels"`` (the FreeU, ScaleCrafter and FouriScale scripts): by the backbone's channel count, 1280 → stage 1,
  640 → stage 2. Generalised here by level: stage 1 when the backbone has the deepest level's channel count, stage
  2 when it has the largest count below that, which is exactly 1280 / 640 on SD 1.x/2.x and SDXL and still fires on
  tiny UNets (with the literal constants FreeU would never fire there).

On SDXL the two rules differ on 2 up-block resnets, on SD 1.5 on 7 (SPEC §0).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

FreeURule = Literal["diffusers", "channels"]

#: (up-block index, resnet index) within diffusers' ``up_blocks``
ResnetKey = tuple[int, int]


def freeu_backbone(hidden: torch.Tensor, b: float) -> torch.Tensor:
    """``hidden`` (B, C, H, W) with its first ⌊C/2⌋ channels multiplied by ``b`` (a new tensor)."""
    half = hidden.shape[1] // 2
    return torch.cat([hidden[:, :half] * b, hidden[:, half:]], dim=1)


def freeu_skip(skip: torch.Tensor, s: float, threshold: int = 1) -> torch.Tensor:
    """``skip`` (B, C, H, W) with its low frequencies scaled by ``s``: float32 FFT, fftshift, the square
    [H/2 − t, H/2 + t) × [W/2 − t, W/2 + t) times s, inverse, real part, back to the input dtype."""
    h, w = skip.shape[-2:]
    spectrum = torch.fft.fftshift(torch.fft.fft2(skip.float()), dim=(-2, -1))
    mask = torch.ones(h, w, device=skip.device)
    mask[max(h // 2 - threshold, 0) : h // 2 + threshold, max(w // 2 - threshold, 0) : w // 2 + threshold] = s
    filtered = torch.fft.ifft2(torch.fft.ifftshift(spectrum * mask, dim=(-2, -1))).real
    return filtered.to(skip.dtype)


def up_resnet_channels(
    block_out_channels: Sequence[int], layers_per_block: int | Sequence[int]
) -> list[list[tuple[int, int]]]:
    """(backbone, skip) input channels of every up-block resnet of a ``UNet2DConditionModel`` config.

    Outer list: ``up_blocks`` in diffusers order (deepest level first); inner: its resnets. Mirrors how diffusers
    builds the decoder: resnet 0 takes the previous block's output (the mid block's for up block 0), the others
    this block's channels; the last resnet's skip comes from one level up.
    """
    channels = list(block_out_channels)
    levels = len(channels)
    per_block = [layers_per_block] * levels if isinstance(layers_per_block, int) else list(layers_per_block)
    layout: list[list[tuple[int, int]]] = []
    prev = channels[-1]
    for i, level in enumerate(reversed(range(levels))):
        out, skip_last = channels[level], channels[max(level - 1, 0)]
        n = per_block[levels - 1 - i] + 1
        layout.append([(prev if j == 0 else out, skip_last if j == n - 1 else out) for j in range(n)])
        prev = out
    return layout


def freeu_stages(layout: Sequence[Sequence[tuple[int, int]]], rule: FreeURule) -> dict[ResnetKey, int]:
    """Stage (1 or 2) of every up-block resnet FreeU touches under ``rule``; absent keys are left alone.

    ``layout`` is :func:`up_resnet_channels`'s result.
    """
    stages: dict[ResnetKey, int] = {}
    if rule == "diffusers":
        for block, resnets in enumerate(layout[:2]):
            stages.update({(block, j): block + 1 for j in range(len(resnets))})
        return stages
    if rule != "channels":
        raise ValueError(f"unknown FreeU rule {rule!r}; use 'diffusers' or 'channels'")
    deepest = layout[0][0][0]
    below = [c for resnets in layout for c, _ in resnets if c < deepest]
    stage_channels = {deepest: 1, **({max(below): 2} if below else {})}
    for block, resnets in enumerate(layout):
        for j, (backbone, _) in enumerate(resnets):
            if backbone in stage_channels:
                stages[(block, j)] = stage_channels[backbone]
    return stages
