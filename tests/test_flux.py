"""FLUX behind the model adapter: tiny-flux, packing and RoPE positions, flow matching, baselines end to end."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler, FluxPipeline
from safetensors.torch import save_file

from hiresdiff.config import model_sampling_defaults
from hiresdiff.errors import HiresError
from hiresdiff.models.adapter import ModelAdapter, Request
from hiresdiff.models.flux import (
    FluxAdapter,
    adapter_for,
    image_ids,
    pack_latents,
    shift_mu,
    unpack_latents,
)
from hiresdiff.models.loading import ModelSpec, load_pipeline, resolve_model
from hiresdiff.models.tiny import (
    BUILTIN_MODELS,
    FLUX_DEV_SCHEDULER,
    TINY_FLUX_TRANSFORMER,
    build_builtin,
    build_builtin_denoiser,
    build_builtin_unet,
)
from hiresdiff.models.tokenizer import T5_VOCAB_SIZE, char_level_t5_tokenizer
from hiresdiff.pipeline import HiresPipeline, build_request


@pytest.fixture
def adapter(tiny_flux: FluxPipeline) -> FluxAdapter:
    ad = adapter_for(tiny_flux)
    assert isinstance(ad, FluxAdapter)
    return ad


def _state_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


COMPONENTS = ("transformer", "vae", "text_encoder", "text_encoder_2")


def _spy(monkeypatch: pytest.MonkeyPatch, module: torch.nn.Module) -> list[dict[str, Any]]:
    """Record the keyword arguments of every forward call of ``module``."""
    calls: list[dict[str, Any]] = []
    original = module.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, "forward", forward)
    return calls


# ----------------------------------------------------------------------------------------- tiny-flux


def test_registry_and_structure(tiny_flux: FluxPipeline) -> None:
    assert {n: (i.family, i.native_size, i.vae_scale_factor) for n, i in BUILTIN_MODELS.items() if "flux" in n} == {
        "tiny-flux": ("flux", 256, 8),
        "random-flux": ("flux", 1024, 8),
    }
    tr, vae = tiny_flux.transformer.config, tiny_flux.vae.config
    assert tr.in_channels == 4 * vae.latent_channels == 64
    assert sum(tr.axes_dims_rope) == tr.attention_head_dim
    assert tr.guidance_embeds is True
    assert tr.joint_attention_dim == tiny_flux.text_encoder_2.config.d_model
    assert tr.pooled_projection_dim == tiny_flux.text_encoder.config.hidden_size
    assert (vae.latent_channels, vae.scaling_factor, vae.shift_factor) == (16, 0.3611, 0.1159)
    assert not vae.use_quant_conv and not vae.use_post_quant_conv
    assert tiny_flux.vae_scale_factor == 8 and tiny_flux.default_sample_size * 8 == 256
    assert isinstance(tiny_flux.scheduler, FlowMatchEulerDiscreteScheduler)
    assert {k: tiny_flux.scheduler.config[k] for k in FLUX_DEV_SCHEDULER} == FLUX_DEV_SCHEDULER
    assert tiny_flux.text_encoder_2.config.vocab_size == T5_VOCAB_SIZE == len(tiny_flux.tokenizer_2)
    with pytest.raises(HiresError, match="not a UNet"):
        build_builtin_unet("tiny-flux")


def test_t5_tokenizer_offline() -> None:
    tok = char_level_t5_tokenizer(16)
    ids = tok("a cat").input_ids
    assert tok.convert_ids_to_tokens(ids) == ["▁a", "▁c", "a", "t", "</s>"]
    padded = tok(["a"], padding="max_length", max_length=16, truncation=True).input_ids[0]
    assert len(padded) == 16 and padded[2:] == [tok.pad_token_id] * 14
    assert tok("日本").input_ids[-2] == tok.unk_token_id == 2


def test_tiny_flux_weights_bit_identical_and_rng_untouched(tiny_flux: FluxPipeline) -> None:
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    again = build_builtin("tiny-flux")
    assert torch.equal(torch.rand(3), expected), "building must not consume the caller's random state"
    for name in COMPONENTS:
        assert _state_equal(getattr(again, name), getattr(tiny_flux, name)), name
    assert _state_equal(build_builtin_denoiser("tiny-flux"), tiny_flux.transformer)


def test_tiny_flux_forward_is_fast(adapter: FluxAdapter) -> None:
    """One transformer forward at a 32×32 latent (256 image tokens), batch 2 (timing is reported, not asserted:
    shared CPUs make wall times unreliable; the bound is generous)."""
    embeds = adapter.encode_prompt(["a", "b"], None, False)
    adapter.set_timesteps(4)
    req = Request(torch.randn(2, 16, 32, 32), [0, 1], [(0, 0)] * 2, embeds, 3.5, (256, 256))
    adapter.predict([req], adapter.scheduler.timesteps[0], 8)
    start = time.perf_counter()
    adapter.predict([req], adapter.scheduler.timesteps[0], 8)
    assert time.perf_counter() - start < 5.0


def test_random_flux_on_meta_is_full_size() -> None:
    start = time.perf_counter()
    pipe = build_builtin("random-flux", torch.bfloat16, device="meta")
    if time.perf_counter() - start > 20:
        pytest.skip("building FLUX on meta took more than 20 s")
    count = {name: sum(p.numel() for p in getattr(pipe, name).parameters()) for name in COMPONENTS}
    assert count["transformer"] == pytest.approx(11.9e9, rel=0.01)
    assert count["text_encoder_2"] == pytest.approx(4.76e9, rel=0.01)
    assert pipe.transformer.device.type == "meta" and pipe.transformer.dtype == torch.bfloat16
    assert pipe.default_sample_size == 128
    assert torch.get_default_dtype() == torch.float32


# ------------------------------------------------------------------------------------- packing and ids


def test_pack_unpack_round_trip_matches_diffusers() -> None:
    x = torch.randn(3, 16, 6, 10)
    tokens = pack_latents(x)
    assert tokens.shape == (3, 15, 64)
    assert torch.equal(tokens, FluxPipeline._pack_latents(x, 3, 16, 6, 10))
    assert torch.equal(unpack_latents(tokens, 6, 10), x)
    assert torch.equal(unpack_latents(tokens, 6, 10), FluxPipeline._unpack_latents(tokens, 48, 80, 8))
    with pytest.raises(HiresError, match="even"):
        pack_latents(torch.randn(1, 16, 5, 8))


def test_image_ids_match_diffusers_and_shift() -> None:
    ids = image_ids(8, 12)
    assert torch.equal(ids, FluxPipeline._prepare_latent_image_ids(1, 4, 6, "cpu", torch.float32))
    shifted = image_ids(8, 12, (2.5, 3.0))
    assert torch.equal(shifted[:, 0], ids[:, 0])
    assert torch.equal(shifted[:, 1:], ids[:, 1:] + torch.tensor([2.5, 3.0]))


# ------------------------------------------------------------------------------------------- predict


def test_whole_canvas_prediction_equals_transformer_call(
    tiny_flux: FluxPipeline, adapter: FluxAdapter, monkeypatch: pytest.MonkeyPatch
) -> None:
    embeds = adapter.encode_prompt(["a red fox", "a blue whale"], ["ignored", "ignored"], True)
    assert embeds.uncond is None and embeds.pooled_uncond is None
    with torch.no_grad():
        cond, pooled, text_ids = tiny_flux.encode_prompt(["a red fox", "a blue whale"], max_sequence_length=32)
    assert torch.equal(embeds.cond, cond) and torch.equal(embeds.pooled_cond, pooled)
    adapter.set_timesteps(5)
    t = adapter.scheduler.timesteps[1]
    x = torch.randn(2, 16, 12, 20, generator=torch.Generator().manual_seed(0))
    calls = _spy(monkeypatch, tiny_flux.transformer)
    req = Request(x, [1, 0], [(0, 0), (0, 0)], embeds, 3.5, (96, 160), samples=[0, 1])
    (pred,) = adapter.predict([req], t, 8)
    assert len(calls) == 1 and calls[0]["guidance"].tolist() == [3.5, 3.5]
    assert adapter.call_info == [(0, "cond"), (1, "cond")]
    with torch.no_grad():
        direct = tiny_flux.transformer(
            hidden_states=FluxPipeline._pack_latents(x, 2, 16, 12, 20),
            timestep=t.expand(2) / 1000,
            guidance=torch.full([2], 3.5),
            pooled_projections=pooled[[1, 0]],
            encoder_hidden_states=cond[[1, 0]],
            txt_ids=text_ids,
            img_ids=FluxPipeline._prepare_latent_image_ids(2, 6, 10, "cpu", torch.float32),
            return_dict=False,
        )[0]
    assert pred.shape == x.shape
    torch.testing.assert_close(pred, FluxPipeline._unpack_latents(direct, 96, 160, 8), rtol=0, atol=1e-6)


def test_views_get_their_canvas_positions(
    tiny_flux: FluxPipeline, adapter: FluxAdapter, monkeypatch: pytest.MonkeyPatch
) -> None:
    embeds = adapter.encode_prompt(["a castle"], None, False)
    adapter.set_timesteps(3)
    t = adapter.scheduler.timesteps[0]
    view = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(1)).expand(3, -1, -1, -1)
    calls = _spy(monkeypatch, tiny_flux.transformer)
    crops = [(0, 0), (128, 64), (128, 64)]
    (pred,) = adapter.predict([Request(view, [0, 0, 0], crops, embeds, 2.0, (512, 512))], t, 8)
    assert len(calls) == 2, "views at different canvas positions need separate transformer calls"
    ids = {tuple(c["img_ids"][0, 1:].tolist()): c for c in calls}
    assert set(ids) == {(0.0, 0.0), (8.0, 4.0)}  # (top/16, left/16) in packed units
    base = image_ids(8, 8)
    assert torch.equal(ids[(8.0, 4.0)]["img_ids"], base + torch.tensor([0.0, 8.0, 4.0]))
    assert ids[(8.0, 4.0)]["hidden_states"].shape[0] == 2
    torch.testing.assert_close(pred[1], pred[2])
    assert not torch.allclose(pred[0], pred[1]), "the RoPE position must change the prediction"


def test_predict_batches_within_max_batch_and_rejects_odd_views(
    tiny_flux: FluxPipeline, adapter: FluxAdapter, monkeypatch: pytest.MonkeyPatch
) -> None:
    embeds = adapter.encode_prompt(["a", "b"], None, False)
    adapter.set_timesteps(3)
    t = adapter.scheduler.timesteps[0]
    x = torch.randn(5, 16, 4, 4)
    calls = _spy(monkeypatch, tiny_flux.transformer)
    (full,) = adapter.predict([Request(x, [0, 1, 0, 1, 0], [(0, 0)] * 5, embeds, 3.5, (32, 32))], t, 2)
    assert [c["hidden_states"].shape[0] for c in calls] == [2, 2, 1]
    (single,) = adapter.predict([Request(x, [0, 1, 0, 1, 0], [(0, 0)] * 5, embeds, 3.5, (32, 32))], t, 8)
    torch.testing.assert_close(full, single, rtol=0, atol=1e-5)
    with pytest.raises(HiresError, match="even sides"):
        adapter.predict([Request(torch.randn(1, 16, 4, 5), [0], [(0, 0)], embeds, 3.5, (32, 40))], t, 2)


def test_schnell_gets_no_guidance(tiny_flux: FluxPipeline, monkeypatch: pytest.MonkeyPatch) -> None:
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(**{**TINY_FLUX_TRANSFORMER, "guidance_embeds": False}).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)
    parts = {k: getattr(tiny_flux, k) for k in ("vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")}
    pipe = FluxPipeline(scheduler=scheduler, transformer=transformer, **parts)
    pipe.default_sample_size = 32
    ad = FluxAdapter(pipe)
    assert not ad.guidance_distilled
    ad.set_timesteps(4)  # static shift: no μ, sigmas linspace(1, 1/N, N) shifted by 1 (unchanged)
    np.testing.assert_allclose(ad.scheduler.sigmas[:-1].numpy(), np.linspace(1.0, 0.25, 4), rtol=1e-6)
    calls = _spy(monkeypatch, transformer)
    embeds = ad.encode_prompt(["a"], None, True)
    ad.predict([Request(torch.randn(1, 16, 4, 4), [0], [(0, 0)], embeds, 3.5, (32, 32))], ad.scheduler.timesteps[0], 2)
    assert calls[0]["guidance"] is None


def _schnell(tiny_flux: FluxPipeline) -> FluxPipeline:
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(**{**TINY_FLUX_TRANSFORMER, "guidance_embeds": False}).eval()
    parts = {k: getattr(tiny_flux, k) for k in ("vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")}
    pipe = FluxPipeline(scheduler=tiny_flux.scheduler, transformer=transformer, **parts)
    pipe.default_sample_size = tiny_flux.default_sample_size
    return pipe


def test_flux_sampling_defaults_when_none_given(tiny_flux: FluxPipeline) -> None:
    """SPEC §6: FLUX-dev 30 steps at guidance 3.5, FLUX-schnell 4 steps at 0; explicit values win; SD/SDXL 50/7.5."""
    dev = HiresPipeline.from_pipe(tiny_flux, "tiny-flux")
    kw = {"progress": False, "previews": False}
    meta = dev("a", "direct", 256, 256, **kw).metadata[0]
    assert (meta["steps"], meta["guidance"]) == (30, 3.5)
    meta = dev("a", "direct", 256, 256, steps=2, guidance=2.0, **kw).metadata[0]
    assert (meta["steps"], meta["guidance"]) == (2, 2.0)
    schnell = HiresPipeline.from_pipe(_schnell(tiny_flux), "tiny-schnell")
    meta = schnell("a", "direct", 256, 256, **kw).metadata[0]
    assert (meta["steps"], meta["guidance"]) == (4, 0.0)
    assert model_sampling_defaults("sdxl") == {} and model_sampling_defaults("sd", False) == {}
    s = build_request("a", "demofusion", 512, 512).settings
    assert (s.steps, s.guidance) == (50, 7.5)
    s = build_request("a", "scalediff", 512, 512, model_defaults=model_sampling_defaults("flux")).settings
    assert (s.steps, s.guidance) == (30, 3.5)
    s = build_request("a", "scalediff", 512, 512, paper=True, model_defaults=model_sampling_defaults("flux")).settings
    assert s.steps == 50  # an asked-for setting (--paper, presets, method defaults) wins over the model's


# ---------------------------------------------------------------------------------------- flow matching


def test_flow_x0_conversions_and_noising(adapter: FluxAdapter) -> None:
    adapter.set_timesteps(6)
    sched = adapter.scheduler
    g = torch.Generator().manual_seed(3)
    x0, eps = torch.randn(2, 16, 8, 8, generator=g), torch.randn(2, 16, 8, 8, generator=g)
    for index in (0, 2, 5):
        t = sched.timesteps[index]
        sched.set_begin_index(index)
        x_t = adapter.add_noise(x0, eps, t)
        torch.testing.assert_close(x_t, sched.scale_noise(x0, t.reshape(1), eps))
        sigma = float(sched.sigmas[index])
        assert adapter.sigma(t) == pytest.approx(sigma) and adapter.structure_gamma(t, sched.timesteps[0]) == sigma
        v = eps - x0
        torch.testing.assert_close(adapter.to_x0(v, x_t, t), x0, rtol=0, atol=1e-5)
        torch.testing.assert_close(adapter.from_x0(x0, x_t, t), v, rtol=0, atol=1e-4)
        other = torch.randn(2, 16, 8, 8, generator=g)
        torch.testing.assert_close(adapter.from_x0(adapter.to_x0(other, x_t, t), x_t, t), other, rtol=0, atol=1e-4)
    assert adapter.scale_input(x0, sched.timesteps[0]) is x0
    assert adapter.init_noise_sigma == 1.0 and adapter.prediction_type == "flow_prediction"
    assert adapter.pixel_grid == 16
    # One Euler step with v = ε − x0 lands exactly on the next noise level of the same (x0, ε) path.
    sched.set_begin_index(0)
    t0, t1 = sched.timesteps[0], sched.timesteps[1]
    stepped = sched.step(eps - x0, t0, adapter.add_noise(x0, eps, t0), return_dict=False)[0]
    torch.testing.assert_close(stepped, adapter.add_noise(x0, eps, t1), rtol=0, atol=1e-5)


def test_set_timesteps_uses_native_mu(adapter: FluxAdapter) -> None:
    steps = 7
    assert adapter.native_sequence_length == (256 // 16) ** 2
    assert adapter.shift_mu == pytest.approx(0.5)  # base shift at the base sequence length 256
    adapter.set_timesteps(steps)
    reference = FlowMatchEulerDiscreteScheduler.from_config(adapter.scheduler.config)
    reference.set_timesteps(steps, sigmas=np.linspace(1.0, 1 / steps, steps), mu=0.5)
    torch.testing.assert_close(adapter.scheduler.sigmas, reference.sigmas)
    torch.testing.assert_close(adapter.scheduler.timesteps, reference.timesteps)
    # FLUX.1 geometry: native 1024 px = 4096 tokens → the max shift, whatever the canvas size.
    assert shift_mu(4096, FLUX_DEV_SCHEDULER) == pytest.approx(1.15)
    assert shift_mu(256, {}) == pytest.approx(0.5)


def test_direct_at_native_size_equals_flux_pipeline(tiny_flux: FluxPipeline) -> None:
    hp = HiresPipeline.from_pipe(tiny_flux, "tiny-flux")
    result = hp("a lighthouse", "direct", 256, 256, steps=3, guidance=3.5, seed=11, progress=False)
    noise = torch.randn((1, 16, 32, 32), generator=torch.Generator().manual_seed(11))
    ref = tiny_flux(
        "a lighthouse",
        height=256,
        width=256,
        num_inference_steps=3,
        guidance_scale=3.5,
        max_sequence_length=32,
        latents=FluxPipeline._pack_latents(noise, 1, 16, 32, 32),
        output_type="latent",
    ).images
    expected = FluxPipeline._unpack_latents(ref, 256, 256, 8)
    torch.testing.assert_close(result.latents, expected, rtol=0, atol=1e-5)


def test_scheduler_choice(adapter: FluxAdapter) -> None:
    euler = EulerDiscreteScheduler.from_config(adapter.scheduler.config)
    adapter.scheduler = euler
    assert isinstance(adapter.scheduler, FlowMatchEulerDiscreteScheduler)
    assert adapter.scheduler.config.use_dynamic_shifting
    with pytest.raises(HiresError, match="flow matching"):
        adapter.scheduler = DDIMScheduler()


def test_vae_shift_and_scale(tiny_flux: FluxPipeline, adapter: FluxAdapter) -> None:
    z = torch.randn(1, 16, 6, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = tiny_flux.vae.decode(z / 0.3611 + 0.1159, return_dict=False)[0].clamp(-1, 1)
        image = adapter.decode(z, None)
        torch.testing.assert_close(image, expected)
        latent = tiny_flux.vae.encode(image).latent_dist.mean
    torch.testing.assert_close(adapter.encode(image, None), (latent - 0.1159) * 0.3611)
    assert adapter.decode(z, 0).shape == image.shape  # tiled path runs on the unpacked latent


# ------------------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def hires(tiny_flux: FluxPipeline) -> HiresPipeline:
    return HiresPipeline.from_pipe(tiny_flux, "tiny-flux")


@pytest.mark.parametrize("method", ["direct", "resize"])
def test_baselines_end_to_end(hires: HiresPipeline, method: str) -> None:
    assert hires.native_size == 256
    prompts = ["a red fox", "a blue whale"]
    a = hires(prompts, method, 512, 384, steps=3, seed=1, progress=False)
    assert [im.size for im in a.images] == [(512, 384), (512, 384)]
    assert len(a.metadata) == 2 and a.metadata[1]["seed"] == 2
    b = hires(prompts, method, 512, 384, steps=3, seed=1, progress=False)
    c = hires(prompts[::-1], method, 512, 384, steps=3, seed=2, progress=False, scheduler="model-default")
    arrays = [[np.asarray(im) for im in r.images] for r in (a, b, c)]
    assert all(np.array_equal(x, y) for x, y in zip(arrays[0], arrays[1], strict=True))
    assert not np.array_equal(arrays[0][0], arrays[2][1]), "same prompt, other seed"
    if method == "direct":
        assert a.latents is not None and a.latents.shape == (2, 16, 48, 64)
        assert c.latents is not None
        torch.testing.assert_close(a.latents[1], c.latents[0], rtol=0, atol=1e-5)  # image i uses seed + i


@pytest.mark.parametrize("method", ["multidiffusion", "demofusion"])
def test_view_methods_run_unchanged(hires: HiresPipeline, method: str) -> None:
    a = hires(["a red fox", "a blue whale"], method, 512, 384, steps=2, seed=3, progress=False)
    b = hires(["a red fox", "a blue whale"], method, 512, 384, steps=2, seed=3, progress=False)
    assert [im.size for im in a.images] == [(512, 384), (512, 384)]
    assert a.latents is not None and torch.isfinite(a.latents).all()
    assert torch.equal(a.latents, b.latents)


@pytest.mark.parametrize(("width", "height"), [(640, 400), (624, 336)])
def test_demofusion_at_non_integer_scales_keeps_dilated_samples_packable(
    hires: HiresPipeline, width: int, height: int
) -> None:
    """At 2.5× the canvas latent is 80 × 50 cells: d = 3 lattices of odd sides would not pack into 2 × 2 tokens."""
    res = hires("a lighthouse", "demofusion", width, height, steps=2, seed=0, progress=False, previews=False)
    assert res.images[0].size == (width, height)
    assert res.latents is not None and torch.isfinite(res.latents).all()


def test_other_pipelines_keep_the_sd_adapter(tiny_sd_pipe: Any) -> None:
    ad = adapter_for(tiny_sd_pipe)
    assert type(ad) is ModelAdapter and ad.family == "sd"


# ---------------------------------------------------------------------------------------------- loading


@pytest.fixture(scope="module")
def tiny_flux_folder(tmp_path_factory: pytest.TempPathFactory, tiny_flux: FluxPipeline) -> Path:
    folder = tmp_path_factory.mktemp("saved") / "tiny-flux"
    tiny_flux.save_pretrained(folder)
    return folder


def test_resolve_builtin_flux() -> None:
    assert resolve_model("tiny-flux") == ModelSpec("tiny-flux", "builtin", "flux", 256, 8)
    assert resolve_model("random-flux").native_size == 1024
    assert resolve_model("tiny-flux").sampling_defaults == {"steps": 30, "guidance": 3.5}


def test_saved_schnell_folder_resolves_to_schnell_defaults(tmp_path: Path, tiny_flux: FluxPipeline) -> None:
    folder = tmp_path / "schnell"
    _schnell(tiny_flux).save_pretrained(folder)
    spec = resolve_model(str(folder))
    assert spec.family == "flux" and spec.guidance_distilled is False
    assert spec.sampling_defaults == {"steps": 4, "guidance": 0.0}


def test_cli_tiny_flux_without_steps_or_guidance_uses_the_flux_defaults(tmp_path: Path) -> None:
    from hiresdiff.cli import main
    from hiresdiff.images import read_png_settings

    out = tmp_path / "flux"
    argv = ["generate", "x", "--model", "tiny-flux", "--method", "direct", "--width", "256", "--height", "256"]
    assert main([*argv, "--quiet", "--no-previews", "--out", str(out)]) == 0
    meta = read_png_settings(out / "000-direct-seed0.png")
    assert (meta["steps"], meta["guidance"]) == (30, 3.5)


def test_saved_folder_loads_as_flux(tiny_flux_folder: Path, tiny_flux: FluxPipeline) -> None:
    spec = resolve_model(str(tiny_flux_folder))
    assert (spec.source, spec.family, spec.native_size, spec.vae_scale_factor) == ("folder", "flux", 256, 8)
    pipe = load_pipeline(spec)
    assert isinstance(pipe, FluxPipeline) and pipe.default_sample_size == 32
    for name in COMPONENTS:
        assert _state_equal(getattr(pipe, name), getattr(tiny_flux, name)), name
    assert pipe.tokenizer_2("a cat").input_ids == tiny_flux.tokenizer_2("a cat").input_ids
    hp = HiresPipeline.from_model(str(tiny_flux_folder), device="cpu")
    assert isinstance(hp.adapter, FluxAdapter) and hp.native_size == 256 and hp.adapter.max_sequence_length == 32


def test_flux_folder_without_vae_sample_size_is_native_1024(tmp_path: Path, tiny_flux_folder: Path) -> None:
    import json
    import shutil

    folder = tmp_path / "flux"
    for name in ("model_index.json", "transformer/config.json", "vae/config.json"):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(tiny_flux_folder / name, folder / name)
    vae = json.loads((folder / "vae/config.json").read_text())
    del vae["sample_size"]
    (folder / "vae/config.json").write_text(json.dumps(vae))
    assert resolve_model(str(folder)).native_size == 1024
    (folder / "transformer/config.json").unlink()
    with pytest.raises(HiresError, match=r"transformer/config\.json"):
        resolve_model(str(folder))


@pytest.mark.parametrize(
    "key", ["double_blocks.0.img_attn.qkv.weight", "model.diffusion_model.single_blocks.0.linear1.weight"]
)
def test_single_file_flux_is_rejected_in_one_line(tmp_path: Path, key: str) -> None:
    path = tmp_path / "flux1-dev.safetensors"
    save_file({key: torch.zeros(2), "model.diffusion_model.img_in.weight": torch.zeros(2)}, str(path))
    with pytest.raises(HiresError, match="single-file FLUX") as info:
        resolve_model(str(path))
    assert "\n" not in str(info.value)
