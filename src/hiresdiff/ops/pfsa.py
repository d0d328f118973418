"""Parameter-free self-attention of AP-LDM's attentive guidance (SPEC §5)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: queries per chunk: at most ``chunk × h·w`` attention weights exist at once (never the full (hw)² matrix)
DEFAULT_CHUNK = 1024


def pfsa(latent: torch.Tensor, scale: float | None = None, chunk_size: int = DEFAULT_CHUNK) -> torch.Tensor:
    """``PFSA(z) = softmax(Z·Zᵀ·scale)·Z`` per sample, ``Z`` = z as (h·w tokens × c), ``scale = 1/√c`` by default.

    No learned weights; softmax over keys. Queries are processed ``chunk_size`` at a time with scaled dot-product
    attention, so memory stays bounded for large latents; the result equals the unchunked formula.
    """
    b, c, h, w = latent.shape
    z = latent.reshape(b, c, h * w).transpose(1, 2)  # (B, hw, c)
    scale = c**-0.5 if scale is None else scale
    out = torch.empty_like(z)
    for start in range(0, h * w, chunk_size):
        q = z[:, start : start + chunk_size]
        out[:, start : start + chunk_size] = F.scaled_dot_product_attention(q, z, z, scale=scale)
    return out.transpose(1, 2).reshape(b, c, h, w)
