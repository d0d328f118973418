"""AccDiffusion window interaction: random permutations across dilated samples (SPEC §3)."""

from __future__ import annotations

from collections.abc import Callable

import torch


def permute_lattices(
    lattice: torch.Tensor, generators: list[torch.Generator]
) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """Shuffle ``lattice`` (d, d, B, C, h, w) across its ``d²`` samples, independently at every (c, row, column).

    Sample ``b`` draws its permutations from ``generators[b]``. Returns the shuffled lattice and the function
    that applies the inverse permutation to tensors of the same shape (the predictions).
    """
    d, _, b, c, h, w = lattice.shape
    flat = lattice.reshape(d * d, b, c, h, w)
    perms = []
    for g in generators[:b]:
        keys = torch.rand((d * d, c, h, w), generator=g, device=g.device)
        perms.append(keys.argsort(dim=0).to(lattice.device))
    perm = torch.stack(perms, dim=1)  # (d², B, C, h, w): position k takes sample perm[k]
    shuffled = flat.gather(0, perm).reshape(lattice.shape)

    def inverse(pred: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(pred.reshape(d * d, b, c, h, w))
        out.scatter_(0, perm, pred.reshape(d * d, b, c, h, w))
        return out.reshape(pred.shape)

    return shuffled, inverse
