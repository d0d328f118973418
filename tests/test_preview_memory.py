"""Previews and other intermediate VAE calls never set the peak (issue 22, item 3): when the final image decodes in
tiles, no other decode or encode of the run is larger than one of its tiles (the native latent area), the final
image is unchanged, and the cost model's peak is the same with previews as without."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from hiresdiff import HiresPipeline
from hiresdiff.cost import model_cost
from hiresdiff.memory import MemoryEstimate

#: tiny-sdxl (native 256 px, latent 32²): a tile area that makes a 768² or 1024² final image tile
TILE_AREA = 512 * 512


def spy_vae(monkeypatch: pytest.MonkeyPatch, hp: HiresPipeline) -> list[tuple[str, int]]:
    """Record ``(kind, latent cells)`` of every VAE decode and encode call."""
    vae, f = hp.adapter.vae, hp.adapter.vae_scale_factor
    calls: list[tuple[str, int]] = []
    real_decode, real_encode = vae.decode, vae.encode

    def decode(z: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        calls.append(("decode", z.shape[-2] * z.shape[-1]))
        return real_decode(z, *args, **kwargs)

    def encode(x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        calls.append(("encode", x.shape[-2] * x.shape[-1] // f**2))
        return real_encode(x, *args, **kwargs)

    monkeypatch.setattr(vae, "decode", decode)
    monkeypatch.setattr(vae, "encode", encode)
    return calls


@pytest.mark.parametrize(("method", "side"), [("demofusion", 768), ("scalediff", 768), ("apldm", 768)])
def test_no_vae_call_is_larger_than_a_final_tile(
    tiny_sdxl_pipe: Any, monkeypatch: pytest.MonkeyPatch, method: str, side: int
) -> None:
    hp = HiresPipeline.from_pipe(tiny_sdxl_pipe, "tiny-sdxl")
    native_cells = hp.adapter.native_latent**2
    calls = spy_vae(monkeypatch, hp)
    kw: dict[str, Any] = {"steps": 2, "seed": 4, "progress": False, "decode_tile_area": TILE_AREA}
    res = hp("a cat", method, side, side, **kw)
    assert len(res.previews) >= 2  # at least one intermediate image beside the final one
    assert max(cells for _, cells in calls) <= native_cells
    if method == "demofusion":  # the 512² phase preview (latent 64², not above the tile area) tiles too
        assert ("decode", 64 * 64) not in calls
        calls.clear()
        quiet = hp("a cat", method, side, side, previews=False, **kw)
        assert torch.equal(quiet.latents, res.latents)
        assert quiet.images[0].tobytes() == res.images[0].tobytes()  # the final image does not change


def test_previews_decode_whole_where_the_final_image_does(tiny_sdxl_pipe: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A final image at or below the tile area decodes whole, and so do the (smaller) previews, exactly as before."""
    hp = HiresPipeline.from_pipe(tiny_sdxl_pipe, "tiny-sdxl")
    calls = spy_vae(monkeypatch, hp)
    hp("a cat", "demofusion", 512, 512, steps=2, progress=False, decode_tile_area=TILE_AREA)
    assert calls == [("decode", 32 * 32), ("decode", 64 * 64)]  # the 256² preview, then the final 512² image


def test_estimated_peak_is_the_same_with_previews() -> None:
    """The cost model runs the real code path: with the final image tiled, previews change neither the VAE's largest
    call nor the device peak. The estimate still counts the previews' float32 copies, which the run keeps on the
    host (the cost model's canvas stands for the device), so its peak may grow by those bytes and no more; before
    previews tiled, the 512² preview's whole decode added four times a tile's activations."""
    kw: dict[str, Any] = {"steps": 2, "decode_tile_area": TILE_AREA}
    with_previews = model_cost("demofusion", "tiny-sdxl", 768, 768, previews=True, **kw)
    without = model_cost("demofusion", "tiny-sdxl", 768, 768, previews=False, **kw)
    assert with_previews.vae_calls > without.vae_calls  # the previews were decoded
    assert with_previews.peaks["vae"].cells == without.peaks["vae"].cells == 32 * 32
    assert with_previews.peaks["vae"].activations == without.peaks["vae"].activations
    preview_bytes = 3 * 4 * (256 * 256 + 512 * 512)  # the phase previews, float32 RGB on the host
    for dtype in (torch.float16, torch.float32):
        grown = MemoryEstimate.of(with_previews, dtype, False).peak - MemoryEstimate.of(without, dtype, False).peak
        assert 0 <= grown <= preview_bytes
