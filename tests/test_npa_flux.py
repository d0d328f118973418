"""ScaleDiff's neighborhood patch attention on FLUX transformers (SPEC §6), on tiny-flux (native 256 px → latent
32 → token grid 16)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from diffusers import FluxPipeline

from hiresdiff.models.flux import FluxAdapter, adapter_for, image_ids
from hiresdiff.patches import attention_flux
from hiresdiff.patches.attention import NPAState, neighborhood_attention
from hiresdiff.patches.attention_flux import FluxNPAProcessor, flux_npa
from hiresdiff.pipeline import HiresPipeline

TXT = 5


@pytest.fixture
def adapter(tiny_flux: FluxPipeline) -> FluxAdapter:
    ad = adapter_for(tiny_flux)
    assert isinstance(ad, FluxAdapter) and ad.native_latent == 32
    return ad


def _rope(tiny_flux: FluxPipeline, latent_hw: tuple[int, int], txt: int = TXT) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.cat([torch.zeros(txt, 3), image_ids(*latent_hw)])
    return tiny_flux.transformer.pos_embed(ids)


def _transformer(tiny_flux: FluxPipeline, latent_hw: tuple[int, int], seed: int = 0) -> torch.Tensor:
    cfg = tiny_flux.transformer.config
    g = torch.Generator().manual_seed(seed)
    n = (latent_hw[0] // 2) * (latent_hw[1] // 2)
    with torch.no_grad():
        return tiny_flux.transformer(
            hidden_states=torch.randn(2, n, cfg.in_channels, generator=g),
            timestep=torch.tensor([0.7, 0.7]),
            guidance=torch.tensor([3.5, 3.5]),
            pooled_projections=torch.randn(2, cfg.pooled_projection_dim, generator=g),
            encoder_hidden_states=torch.randn(2, TXT, cfg.joint_attention_dim, generator=g),
            txt_ids=torch.zeros(TXT, 3),
            img_ids=image_ids(*latent_hw),
            return_dict=False,
        )[0]


def test_whole_map_window_equals_full_attention(tiny_flux: FluxPipeline, adapter: FluxAdapter) -> None:
    # Native canvas: one g×g window covers the map; text RoPE of the top-left (0, 0) = txt_ids zeros.
    expected = _transformer(tiny_flux, (32, 32))
    calls: list[int] = []
    with neighborhood_attention(adapter, (32, 32)):
        procs = tiny_flux.transformer.attn_processors.values()
        assert all(isinstance(p, FluxNPAProcessor) for p in procs)
        for p in procs:  # spy: NPA (not the fallback) ran
            inner = p.inner
            p.inner = lambda *a, _i=inner, **k: calls.append(1) or _i(*a, **k)
        out = _transformer(tiny_flux, (32, 32))
    assert not calls
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


def _attn_inputs(tiny_flux: FluxPipeline, n_img: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    dim = tiny_flux.transformer.inner_dim
    return torch.randn(2, n_img, dim, generator=g), torch.randn(2, TXT, dim, generator=g)


def test_patch_equals_full_attention_on_its_window_and_is_local(tiny_flux: FluxPipeline, adapter: FluxAdapter) -> None:
    # 2× canvas: token grid 32, g = 16, patches 8×8, windows 16×16 (start = patch start − 4, clamped).
    attn = tiny_flux.transformer.transformer_blocks[0].attn
    single = tiny_flux.transformer.single_transformer_blocks[0].attn
    original = attn.processor
    proc = FluxNPAProcessor(original, NPAState(adapter, (64, 64), None), 16)
    rope = _rope(tiny_flux, (64, 64))
    img, txt = _attn_inputs(tiny_flux, 32 * 32, 1)
    with torch.no_grad():
        out_img, out_txt = proc(attn, img, txt, None, rope)
        # patch (row 1, column 2): rows 8..15, columns 16..23; window rows 4..19, columns 12..27
        rows, cols = torch.arange(4, 20), torch.arange(12, 28)
        idx = (rows[:, None] * 32 + cols[None, :]).reshape(-1)
        corner = int(idx[0])
        win_rope = tuple(torch.cat([r[TXT + corner].expand(TXT, -1), r[TXT + idx]]) for r in rope)
        ref_img, _ = original(attn, img[:, idx], txt, None, win_rope)
        patch = (torch.arange(8, 16)[:, None] * 32 + torch.arange(16, 24)[None, :]).reshape(-1)
        in_window = ((torch.arange(4, 12)[:, None]) * 16 + torch.arange(4, 12)[None, :]).reshape(-1)
        torch.testing.assert_close(out_img[:, patch], ref_img[:, in_window], rtol=0, atol=1e-5)

        # locality: tokens outside the window do not change the patch; tokens inside do
        outside = torch.ones(32, 32, dtype=torch.bool)
        outside[4:20, 12:28] = False
        changed = img.clone()
        changed[:, outside.reshape(-1)] += 3.0
        new_img, new_txt = proc(attn, changed, txt, None, rope)
        torch.testing.assert_close(new_img[:, patch], out_img[:, patch], rtol=0, atol=1e-6)
        assert not torch.allclose(new_txt, out_txt)  # text sees every window (averaged)
        inside = img.clone()
        inside[:, 4 * 32 + 12] += 3.0
        assert not torch.allclose(proc(attn, inside, txt, None, rope)[0][:, patch], out_img[:, patch])

        # single-stream block: text first in one sequence, same locality
        sproc = FluxNPAProcessor(single.processor, NPAState(adapter, (64, 64), None), 16)
        joint, joint_changed = torch.cat([txt, img], 1), torch.cat([txt, changed], 1)
        a, b2 = sproc(single, joint, None, None, rope), sproc(single, joint_changed, None, None, rope)
        assert a.shape == joint.shape
        torch.testing.assert_close(a[:, TXT + patch], b2[:, TXT + patch], rtol=0, atol=1e-6)


def test_flux_npa_geometry_and_batch_major() -> None:
    # Text output = mean over windows; batch rows independent (batch-major windows); shift keeps shapes.
    g = torch.Generator().manual_seed(0)
    text = tuple(torch.randn(2, 3, 2, 8, generator=g) for _ in range(3))
    image = tuple(torch.randn(2, 24 * 16, 2, 8, generator=g) for _ in range(3))
    rope = (torch.ones(24 * 16, 8), torch.zeros(24 * 16, 8))
    t_out, i_out = flux_npa(text, image, rope, (24, 16), 16)
    t0, i0 = flux_npa(tuple(x[1:] for x in text), tuple(x[1:] for x in image), rope, (24, 16), 16)
    torch.testing.assert_close(t_out[1:], t0)
    torch.testing.assert_close(i_out[1:], i0)
    ts, is_ = flux_npa(text, image, rope, (24, 16), 16, shift=(3, 5))
    assert ts.shape == t_out.shape and is_.shape == i_out.shape and torch.isfinite(is_).all()


@pytest.mark.parametrize("latent_hw", [(36, 32), (16, 16)])
def test_unsupported_grid_falls_back(tiny_flux: FluxPipeline, adapter: FluxAdapter, latent_hw: Any) -> None:
    # token grid 18×16 (18 not a multiple of g/2 = 8) or 8×8 (< g): the original processor runs
    expected = _transformer(tiny_flux, latent_hw)
    calls: list[int] = []
    with neighborhood_attention(adapter, latent_hw):
        for p in tiny_flux.transformer.attn_processors.values():
            inner = p.inner
            p.inner = lambda *a, _i=inner, **k: calls.append(1) or _i(*a, **k)
        out = _transformer(tiny_flux, latent_hw)
    assert len(calls) == 2
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_processors_restored(tiny_flux: FluxPipeline, adapter: FluxAdapter) -> None:
    before = dict(tiny_flux.transformer.attn_processors)
    with pytest.raises(RuntimeError), neighborhood_attention(adapter, (64, 64)):
        assert all(isinstance(p, FluxNPAProcessor) for p in tiny_flux.transformer.attn_processors.values())
        raise RuntimeError("boom")
    assert all(tiny_flux.transformer.attn_processors[k] is v for k, v in before.items())


def test_scalediff_flux_end_to_end_and_batch(tiny_flux: FluxPipeline) -> None:
    hp = HiresPipeline.from_pipe(tiny_flux, "tiny-flux")
    before = dict(tiny_flux.transformer.attn_processors)
    seen: list[tuple[int, int]] = []
    original_npa = attention_flux.flux_npa

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append(args[3])
        return original_npa(*args, **kwargs)

    kw: dict[str, Any] = {"steps": 4, "progress": False, "previews": False}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(attention_flux, "flux_npa", spy)
        res = hp(["a cat", "a dog"], "scalediff", 512, 384, seed=3, **kw)
    # 384×512 px → latent 48×64 → tokens 24×32: NPA ran in both blocks at every denoised step
    assert len(seen) >= 2 and set(seen) == {(24, 32)}
    assert res.images[0].size == (512, 384) and torch.isfinite(res.latents).all()
    assert all(tiny_flux.transformer.attn_processors[k] is v for k, v in before.items())
    first = hp("a cat", "scalediff", 512, 384, seed=3, **kw).latents
    second = hp("a dog", "scalediff", 512, 384, seed=4, **kw).latents
    assert torch.allclose(res.latents[0], first[0], atol=1e-4) and torch.allclose(res.latents[1], second[0], atol=1e-4)
    assert not torch.allclose(first, second)


def test_query_shift_per_sample(tiny_flux: FluxPipeline, adapter: FluxAdapter) -> None:
    # a batch with one random query shift per canvas sample equals the samples run alone with the same generators
    attn = tiny_flux.transformer.transformer_blocks[0].attn
    rope = _rope(tiny_flux, (64, 48))
    img, txt = _attn_inputs(tiny_flux, 32 * 24, 2)

    def run(rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        gens = [torch.Generator().manual_seed(s) for s in (7, 8)]
        adapter.call_info = [(r, "cond") for r in rows]
        proc = FluxNPAProcessor(attn.processor, NPAState(adapter, (64, 48), gens), 16)
        with torch.no_grad():
            return proc(attn, img[rows], txt[rows], None, rope)

    both, alone = run([0, 1]), run([1])
    assert NPAState(adapter, (64, 48), [torch.Generator().manual_seed(s) for s in (7, 8)]).shifts(2, 8)[0] != (0, 0)
    torch.testing.assert_close(both[0][1:], alone[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(both[1][1:], alone[1], rtol=0, atol=1e-5)
    unshifted = FluxNPAProcessor(attn.processor, NPAState(adapter, (64, 48), None), 16)
    with torch.no_grad():
        assert not torch.allclose(unshifted(attn, img, txt, None, rope)[0], both[0])
