"""UNet level addresses → module names of a diffusers ``UNet2DConditionModel`` (SPEC-baselines-unet §0).

Official tables name diffusers modules of one architecture; hiresdiff stores them by *level* ℓ (the number of
stride-2 downsamplings above a feature map) so they apply to UNets with other block counts. Addresses:

=================  ==========================================================================================
``downℓ.res``      ``conv1``/``conv2`` of every resnet of ``down_blocks.ℓ``
``dsℓ``            ``down_blocks.ℓ.downsamplers.0.conv`` (its input is at level ℓ)
``mid``            ``conv1``/``conv2`` of every resnet of ``mid_block``
``upℓ.res``        ``conv1``/``conv2`` of every resnet of the up block at level ℓ, ``up_blocks.(L−1−ℓ)``
``usℓ``            that block's ``upsamplers.0.conv`` (runs after the ×2 upsample, at level ℓ−1 size)
``downℓ.attn1``    every self-attention (``attn1``) of ``down_blocks.ℓ``; likewise ``upℓ.attn1``, ``mid.attn1``
``downℓ``, ``upℓ`` the block itself (for block hooks)
=================  ==========================================================================================

Addresses absent from a UNet are refused with one :class:`~hiresdiff.errors.HiresError` line naming them and
listing what exists (the official ScaleCrafter SDXL tables silently skip names SDXL lacks, SPEC bug B1). This
module imports no torch: it only walks ``named_modules()``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, TypeVar

from hiresdiff.errors import HiresError

if TYPE_CHECKING:
    from torch import nn

V = TypeVar("V")

_MODULE_RULES: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"down_blocks\.(\d+)\.resnets\.\d+\.conv[12]"), "down{}.res"),
    (re.compile(r"down_blocks\.(\d+)\.downsamplers\.0\.conv"), "ds{}"),
    (re.compile(r"mid_block\.resnets\.\d+\.conv[12]"), "mid"),
    (re.compile(r"up_blocks\.(\d+)\.resnets\.\d+\.conv[12]"), "up{}.res"),
    (re.compile(r"up_blocks\.(\d+)\.upsamplers\.0\.conv"), "us{}"),
    (re.compile(r"down_blocks\.(\d+)\.attentions\.\d+\.transformer_blocks\.\d+\.attn1"), "down{}.attn1"),
    (re.compile(r"mid_block\.attentions\.\d+\.transformer_blocks\.\d+\.attn1"), "mid.attn1"),
    (re.compile(r"up_blocks\.(\d+)\.attentions\.\d+\.transformer_blocks\.\d+\.attn1"), "up{}.attn1"),
    (re.compile(r"down_blocks\.(\d+)"), "down{}"),
    (re.compile(r"up_blocks\.(\d+)"), "up{}"),
)

_LEVEL = re.compile(r"^(down|up|ds|us)(\d+)(\.res|\.attn1)?$")


def unet_levels(unet: nn.Module) -> int:
    """Number of levels L of ``unet`` (its down blocks; the deepest level is L − 1)."""
    return len(unet.down_blocks)


def address_index(unet: nn.Module) -> dict[str, tuple[str, ...]]:
    """Every address that exists in ``unet`` → its module names, in module order."""
    levels = unet_levels(unet)
    index: dict[str, list[str]] = {}
    for name, _ in unet.named_modules():
        for pattern, template in _MODULE_RULES:
            match = pattern.fullmatch(name)
            if match is None:
                continue
            number = int(match.group(1)) if match.groups() else 0
            if name.startswith("up_blocks"):
                number = levels - 1 - number
            index.setdefault(template.format(number), []).append(name)
            break
    return {address: tuple(names) for address, names in index.items()}


def resolve(unet: nn.Module, addresses: Iterable[str]) -> dict[str, tuple[str, ...]]:
    """Module names of each address in ``unet``.

    Raises:
        HiresError: some addresses do not exist in ``unet`` (one line naming them and listing those that exist).
    """
    index = address_index(unet)
    wanted = list(dict.fromkeys(addresses))
    missing = [a for a in wanted if a not in index]
    if missing:
        raise HiresError(
            f"UNet level address(es) {', '.join(missing)} do not exist in this UNet "
            f"({unet_levels(unet)} levels); it has: {', '.join(sorted(index, key=_sort_key))}"
        )
    return {a: index[a] for a in wanted}


def expand(unet: nn.Module, table: Mapping[str, V]) -> dict[str, V]:
    """A table keyed by address → the same values keyed by module name (refusing absent addresses)."""
    return {name: table[address] for address, names in resolve(unet, table).items() for name in names}


def shift_level(address: str, offset: int) -> str | None:
    """``address`` moved ``offset`` levels (``down3.res`` − 2 → ``down1.res``); None below level 0; ``mid*`` kept."""
    match = _LEVEL.match(address)
    if match is None:
        return address
    level = int(match.group(2)) + offset
    return f"{match.group(1)}{level}{match.group(3) or ''}" if level >= 0 else None


def adapt(table: Mapping[str, V], source_levels: int, unet: nn.Module) -> tuple[dict[str, V], tuple[str, ...]]:
    """A table written for a UNet of ``source_levels`` levels, aligned at the deepest level onto ``unet``.

    Level ℓ becomes ℓ − (source_levels − L), so ``mid`` and the deepest blocks keep their role; entries with no
    counterpart (below level 0, or a module this UNet lacks, e.g. an upsampler at its top level) are dropped and
    returned as the second element (original addresses) so the caller can say so. Identity when the level counts
    match, except that absent entries are still dropped; use :func:`resolve` to refuse them instead.
    """
    index = address_index(unet)
    offset = unet_levels(unet) - source_levels
    kept: dict[str, V] = {}
    dropped: list[str] = []
    for address, value in table.items():
        moved = shift_level(address, offset)
        if moved is None or moved not in index:
            dropped.append(address)
        else:
            kept[moved] = value
    return kept, tuple(dropped)


def _sort_key(address: str) -> tuple[int, str]:
    """Order addresses by level, then name, for readable listings."""
    match = _LEVEL.match(address)
    return (int(match.group(2)) if match else 99, address)
