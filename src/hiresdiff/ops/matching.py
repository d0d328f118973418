"""APT statistical matching of dilated sub-lattices (SPEC §4.1)."""

from __future__ import annotations

import torch


def _stats(x: torch.Tensor, per_channel: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased std per sample (scalar) or per sample and channel, shaped to broadcast over x."""
    dims = (2, 3) if per_channel else (1, 2, 3)
    return x.mean(dim=dims, keepdim=True), x.std(dim=dims, keepdim=True)


def statistical_matching(
    latent: torch.Tensor, reference: torch.Tensor, dilation: int, per_channel: bool = False, eps: float = 1e-12
) -> torch.Tensor:
    """Give every dilated sub-lattice of ``latent`` the statistics of ``reference`` (SPEC §4.1).

    For each of the ``d²`` lattices ``D = Z[:, :, i::d, j::d]``: ``D ← (D − μ_D)·σ_z/σ_D + μ_z``, with μ, σ per
    sample over channels and positions (``per_channel=False``) or per sample and channel. ``latent`` (B, C, H, W)
    is the upsampled latent Z, ``reference`` (B, C, h, w) the previous phase's clean latent z. Sizes need not be
    divisible by ``d``: edge lattices are simply shorter.
    """
    mu_ref, sd_ref = _stats(reference, per_channel)
    out = latent.clone()
    for i in range(dilation):
        for j in range(dilation):
            lattice = latent[:, :, i::dilation, j::dilation]
            mu, sd = _stats(lattice, per_channel)
            out[:, :, i::dilation, j::dilation] = (lattice - mu) * (sd_ref / sd.clamp_min(eps)) + mu_ref
    return out
