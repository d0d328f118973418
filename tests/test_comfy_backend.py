"""The ComfyUI backend (:mod:`hiresdiff.comfy.adapter`) against the diffusers one, in process, on tiny twins.

Both backends get the same weights (:mod:`comfy_twins`), the same conditioning and the same noise: their denoiser
predictions, x̂0 conversions, VAE passes and whole runs of every method the ComfyUI backend offers must agree to float
rounding, for SD 1.x, SDXL and FLUX.1 (dev; schnell's predictions too). Needs a ComfyUI checkout
(``$HIRESDIFF_COMFYUI``) and its requirements; skipped without them unless ``HIRESDIFF_REQUIRE_COMFYUI=1``.
"""

from __future__ import annotations

import dataclasses
import zlib
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from comfy_twins import (
    FLUX_POOLED,
    FLUX_TEXT,
    LATENT,
    NATIVE,
    SDXL_POOLED,
    comfy,
    controlnet_twin,
    flux_twin,
    sd_vae,
    twin,
)
from hiresdiff.comfy.nodes import COMFY_METHODS, comfy_methods
from hiresdiff.errors import HiresError
from hiresdiff.models.adapter import ModelAdapter, PromptEmbeds, Request
from hiresdiff.models.flux import FluxAdapter

pytestmark = pytest.mark.slow

#: method parameters a FLUX run needs (APT's scale-aware scheduling changes a DDPM β schedule: SD/SDXL only)
FLUX_PARAMS: dict[str, dict[str, Any]] = {"apt": {"sas": False}}
#: method parameters of the whole runs: AccDiffusion's view prompts encode prompt text, which ComfyUI's node cannot
#: (its content prompts have their own test, with a stand-in text encoder)
RUN_PARAMS: dict[str, dict[str, Any]] = {
    "accdiffusion": {"content_prompts": False},
    "accdiffusion-v2": {"content_prompts": False},
}


class Given:
    """The diffusers backend with the prompts' embeddings given (as ComfyUI's CONDITIONING is)."""

    embeds: PromptEmbeds

    def encode_prompt(self, prompts: list[str], negatives: list[str] | None, cfg: bool) -> PromptEmbeds:
        return self.embeds

    def truncated(self, prompt: str) -> tuple[int, str] | None:
        return None


class GivenEmbeds(Given, ModelAdapter):
    def __init__(self, pipe: Any, embeds: PromptEmbeds) -> None:
        super().__init__(pipe)
        self.embeds = embeds


class GivenFluxEmbeds(Given, FluxAdapter):
    def __init__(self, pipe: Any, embeds: PromptEmbeds) -> None:
        super().__init__(pipe)
        self.embeds = embeds


def embeds_for(family: str, context: int, seed: int = 1) -> PromptEmbeds:
    g = torch.Generator().manual_seed(seed)
    cond, uncond = torch.randn(1, 7, context, generator=g), torch.randn(1, 7, context, generator=g)
    if family == "sd":
        return PromptEmbeds(cond, uncond)
    if family == "flux":  # T5 sequence and pooled CLIP; no negative prompt
        return PromptEmbeds(cond, None, torch.randn(1, FLUX_POOLED, generator=g))
    pooled = torch.randn(2, SDXL_POOLED, generator=g)
    return PromptEmbeds(cond, uncond, pooled[:1], pooled[1:])


def native_shift(patcher: Any) -> Any:
    """The model patched by ComfyUI's own ModelSamplingFlux node for the twins' native size, as a FLUX workflow
    sets it: the shift its schedule then has must be the μ hiresdiff's FLUX schedule uses at that size."""
    from comfy_extras.nodes_model_advanced import ModelSamplingFlux

    (patched,) = ModelSamplingFlux().patch(patcher, max_shift=1.15, base_shift=0.5, width=NATIVE, height=NATIVE)
    return patched


def make_backends(family: str) -> SimpleNamespace:
    """(diffusers adapter, ComfyUI adapter) over the twins of ``family`` (``sd``, ``sdxl``, ``flux`` — FLUX.1-dev —
    or ``flux-schnell``) with the same embeds; SD/SDXL share the scheduler config, FLUX's diffusers backend has
    FLUX.1's own (the ComfyUI one's comes from the model's shift)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from hiresdiff.comfy.adapter import comfy_adapter
    from hiresdiff.models.tiny import make_flux_scheduler

    if family.startswith("flux"):
        dev = family == "flux"
        tw = flux_twin(guidance=dev)
        embeds = embeds_for("flux", FLUX_TEXT)
        vae_d, vae_c = sd_vae(float(tw.model.latent_format.scale_factor), flux=True)
        ours = comfy_adapter(native_shift(tw.patcher) if dev else tw.patcher, vae_c, embeds, native_size=NATIVE)
        own = make_flux_scheduler() if dev else FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)
        pipe = SimpleNamespace(transformer=tw.transformer, vae=vae_d, scheduler=own, default_sample_size=LATENT)
        ref: ModelAdapter = GivenFluxEmbeds(pipe, embeds)
    else:
        tw = twin(family)
        embeds = embeds_for(family, tw.context)
        vae_d, vae_c = sd_vae(float(tw.model.latent_format.scale_factor))
        ours = comfy_adapter(tw.patcher, vae_c, embeds, native_size=NATIVE)
        same = type(ours.scheduler).from_config(ours.scheduler.config)
        pipe = SimpleNamespace(unet=tw.unet, vae=vae_d, scheduler=same)
        if family == "sdxl":
            pipe.text_encoder_2 = None  # the diffusers backend tells SDXL by this attribute
        ref = GivenEmbeds(pipe, embeds)
    return SimpleNamespace(family=family, ref=ref, ours=ours, embeds=embeds, twin=tw)


@pytest.fixture(scope="module", params=["sd", "sdxl", "flux"])
def backends(request: pytest.FixtureRequest) -> SimpleNamespace:
    return make_backends(request.param)


def _requests(b: SimpleNamespace, seed: int) -> list[Request]:
    """Two requests of views (different sizes, crops, guidance scales), one prompt row."""
    g = torch.Generator().manual_seed(seed)
    channels = b.ours.latent_channels
    big = torch.randn(3, channels, LATENT, LATENT, generator=g)
    small = torch.randn(2, channels, LATENT // 2, LATENT // 2, generator=g)
    size = (2 * NATIVE, 2 * NATIVE)
    return [
        Request(big, [0, 0, 0], [(0, 0), (0, 64), (64, 0)], b.embeds, 7.5, size),
        Request(small, [0, 0], [(0, 0), (32, 32)], b.embeds, 3.0, size),
    ]


@pytest.mark.parametrize("max_batch", [2, 64])
def test_predictions_and_x0_equal_the_diffusers_backend(backends: SimpleNamespace, max_batch: int) -> None:
    """Guided predictions of batched views (per-view SDXL size/crop conditioning, FLUX canvas positions and
    guidance) and their x̂0 agree to 1e-5 at several timesteps, whatever the chunking; the schedules are equal."""
    check_predictions(backends, max_batch)


@pytest.mark.parametrize("max_batch", [2, 64])
def test_flux_schnell_predictions_equal_the_diffusers_backend(max_batch: int) -> None:
    """FLUX.1-schnell (no guidance embedding, ComfyUI's discrete-flow σ with shift 1): the same agreement."""
    b = make_backends("flux-schnell")
    assert b.ours.guidance_distilled is False and b.ours.model_kind == "FLOW"
    check_predictions(b, max_batch)


def check_predictions(b: SimpleNamespace, max_batch: int) -> None:
    for ad in (b.ref, b.ours):
        ad.set_timesteps(10)
        ad.refresh_placement()
    steps = b.ref.scheduler.timesteps
    assert torch.equal(steps, b.ours.scheduler.timesteps)
    for t in (steps[0], steps[4], steps[-1]):
        ref = b.ref.predict(_requests(b, 3), t, max_batch)
        ours = b.ours.predict(_requests(b, 3), t, max_batch)
        for r, o, x in zip(ref, ours, _requests(b, 3), strict=True):
            assert r.shape == o.shape
            torch.testing.assert_close(o, r, atol=1e-5, rtol=0)
            torch.testing.assert_close(b.ours.to_x0(o, x.x, t), b.ref.to_x0(r, x.x, t), atol=1e-5, rtol=1e-5)


def test_sdxl_size_conditioning_is_embedded_once_per_view(monkeypatch: pytest.MonkeyPatch) -> None:
    """SDXL's ``y`` (pooled text + size/crop embedding) is made once per distinct view and text of a run, not per
    row of every call: the views recur every step."""
    b = make_backends("sdxl")
    calls: list[dict[str, Any]] = []
    original = b.ours.model.encode_adm
    monkeypatch.setattr(b.ours.model, "encode_adm", lambda **kw: (calls.append(kw), original(**kw))[1])
    b.ours.set_timesteps(10)
    b.ours.refresh_placement()
    steps = b.ours.scheduler.timesteps
    first = b.ours.predict(_requests(b, 3), steps[0], 64)
    crops = {(kw["crop_h"], kw["crop_w"]) for kw in calls}
    assert len(calls) == 2 * 4 and crops == {(0, 0), (0, 64), (64, 0), (32, 32)}  # 2 texts × 4 distinct views
    assert [p.shape for p in b.ours.predict(_requests(b, 3), steps[1], 2)] == [p.shape for p in first]
    assert len(calls) == 8


def test_vae_passes_equal_the_diffusers_backend(backends: SimpleNamespace) -> None:
    """Decode (untiled and tiled) and encode through ComfyUI's VAE equal diffusers' AutoencoderKL on the same
    weights: layouts, ranges and the latent scaling converted."""
    b = backends
    g = torch.Generator().manual_seed(5)
    latents = torch.randn(1, b.ours.latent_channels, LATENT, LATENT, generator=g)
    for tile_area in (None, (NATIVE // 2) ** 2):
        torch.testing.assert_close(b.ours.decode(latents, tile_area), b.ref.decode(latents, tile_area), atol=2e-4,
                                   rtol=0)  # fmt: skip
    images = torch.rand(1, 3, NATIVE, NATIVE, generator=g) * 2 - 1
    torch.testing.assert_close(b.ours.encode(images, None), b.ref.encode(images, None), atol=2e-4, rtol=0)


@pytest.mark.parametrize("method", COMFY_METHODS)
def test_a_whole_run_gives_the_same_latents(
    backends: SimpleNamespace, method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same request and noise through both backends, for every method the ComfyUI backend offers on the
    family: phases, views, dilated sampling, skip-residuals, pixel-space passes (accdiffusion-v2: its ControlNet on
    the edges of the previous phase) see the same predictions and VAE results, so the final latents agree."""
    from hiresdiff.pipeline import HiresPipeline

    b = backends
    if method not in comfy_methods(b.family):
        pytest.skip(f"{method} does not run on {b.family} in ComfyUI")
    params = FLUX_PARAMS.get(method, {}) if b.family == "flux" else RUN_PARAMS.get(method, {})
    runs, controls = [], []
    if method == "accdiffusion-v2":
        get_control = type(controlnet_twin_of(b).comfy).get_control
        monkeypatch.setattr(type(b.controlnet.comfy), "get_control",
                            lambda net, x, *a: (controls.append(x), get_control(net, x, *a))[1])  # fmt: skip
    for ad in (b.ref, b.ours):
        hp = HiresPipeline(None, "twin", adapter=ad)
        extras = {"controlnet": provided_controlnet(b, hp)} if method == "accdiffusion-v2" else {}
        out = hp("a twin", method, 2 * NATIVE, 2 * NATIVE, steps=4, guidance=5.0, seed=7, max_batch=8,
                 previews=False, progress=False, **params, **extras)  # fmt: skip
        runs.append(out.latents)
    torch.testing.assert_close(runs[1], runs[0], atol=1e-4, rtol=1e-4)
    if method == "accdiffusion-v2":  # ComfyUI's ControlNet ran on the later phase's local views (both CFG halves)
        assert len(controls) >= 4 and all(int(x.shape[0]) % 2 == 0 for x in controls)


def provided_controlnet(b: SimpleNamespace, hp: Any) -> Any:
    """The twins' ControlNet for the pipeline ``hp`` of one of ``b``'s backends (built once per backends): the
    diffusers one under a canny folder name, ComfyUI's as the node hands it over (:mod:`hiresdiff.comfy.controlnet`)."""
    from hiresdiff.comfy.controlnet import controlnet_spec
    from hiresdiff.models.controlnet import ControlNetSpec

    controlnet_twin_of(b)
    if hp.adapter is b.ours:
        spec, net = controlnet_spec(b.controlnet.comfy), b.controlnet.comfy
    else:
        spec, net = ControlNetSpec("twin/controlnet-canny", None, dict(b.controlnet.net.config)), b.controlnet.net
    hp.provide_controlnet(spec.ref, net)
    return spec


def controlnet_twin_of(b: SimpleNamespace) -> SimpleNamespace:
    """The ControlNet twins of ``b``'s UNet twins (:func:`comfy_twins.controlnet_twin`), built once per backends."""
    if not hasattr(b, "controlnet"):
        b.controlnet = controlnet_twin(b.twin)
    return b.controlnet


def _controlled_requests(b: SimpleNamespace, seed: int) -> list[Request]:
    """:func:`_requests` with ControlNet conditions: views of weight 0.3 and 1 in one call (same size), the small
    views at weight 0 (no condition: they opt out)."""
    big, small = _requests(b, seed)
    g = torch.Generator().manual_seed(seed + 1)
    px = 8 * LATENT
    other = Request(torch.randn(2, 4, LATENT, LATENT, generator=g), [0, 0], [(0, 32), (32, 0)], b.embeds, 5.0,
                    big.size, control=torch.rand(2, 3, px, px, generator=g))  # fmt: skip
    return [
        dataclasses.replace(big, control=torch.rand(3, 3, px, px, generator=g), control_weight=0.3),
        dataclasses.replace(small, control_weight=0.0),
        other,
    ]


@pytest.mark.parametrize("max_batch", [2, 64])
def test_controlnet_predictions_equal_the_diffusers_backend(unets: SimpleNamespace, max_batch: int) -> None:
    """ComfyUI's ControlNet (a CONTROL_NET, called as ComfyUI's samplers call it) on per-view conditions — views of
    different weights in one call, views that opt out — gives the diffusers backend's guided predictions on the
    same twin weights to 1e-5; the residuals matter (the predictions differ from those without)."""
    b = unets
    controlnet_twin_of(b)
    preds = []
    for ad, net in ((b.ref, b.controlnet.net), (b.ours, b.controlnet.comfy)):
        ad.set_timesteps(10)
        ad.refresh_placement()
        t = ad.scheduler.timesteps[3]
        with ad.use_controlnet(net, 0.8):
            preds.append(ad.predict(_controlled_requests(b, 4), t, max_batch))
        plain = ad.predict(_controlled_requests(b, 4), t, max_batch)
        assert (preds[-1][0] - plain[0]).abs().max() > 1e-3 and torch.equal(preds[-1][1], plain[1])
    for r, o in zip(*preds, strict=True):
        torch.testing.assert_close(o, r, atol=1e-5, rtol=0)


@pytest.fixture(scope="module", params=["sd", "sdxl"])
def unets(request: pytest.FixtureRequest) -> SimpleNamespace:
    return make_backends(request.param)


def _npa_layer(b: SimpleNamespace) -> tuple[Any, str, int]:
    """The first self-attention of the diffusers twin: (its ``Attention``, processor name, level)."""
    from hiresdiff.models.self_attention import attention_level

    unet = b.ref.unet
    name = next(n for n in unet.attn_processors if n.endswith("attn1.processor"))
    return unet.get_submodule(name.removesuffix(".processor")), name, attention_level(name, 2)


def test_the_comfyui_npa_patch_equals_the_diffusers_processor(unets: SimpleNamespace) -> None:
    """ScaleDiff's NPA (with a query shift) as ComfyUI's ``attn1`` replacement of a transformer block, on q, k, v
    projected from the same tokens, equals the diffusers NPA processor to 1e-5 (and is not full attention); a call
    it declines (another grid) runs ComfyUI's own attention, and nothing is left installed afterwards."""
    from hiresdiff.comfy.attention import comfy_attention, transformer_block_keys
    from hiresdiff.patches.attention import neighborhood_attention

    b = unets
    attn, name, level = _npa_layer(b)
    latent_hw = (2 * LATENT, 2 * LATENT)
    gh, gw = latent_hw[0] >> level, latent_hw[1] >> level
    g = torch.Generator().manual_seed(4)
    tokens = torch.randn(2, gh * gw, attn.to_q.in_features, generator=g)
    key = transformer_block_keys(b.twin.model.diffusion_model)[0]
    options = {"n_heads": attn.heads, "original_shape": [2, 4, *latent_hw], "attn_precision": None}
    with torch.no_grad():
        q, k, v = attn.to_q(tokens), attn.to_k(tokens), attn.to_v(tokens)
        with neighborhood_attention(b.ref, latent_hw, [torch.Generator().manual_seed(9)]):
            ref = b.ref.unet.attn_processors[name](attn, tokens)
        with neighborhood_attention(b.ours, latent_hw, [torch.Generator().manual_seed(9)]):
            patch = b.ours.transformer_options["patches_replace"]["attn1"][key]
            ours = attn.to_out[0](patch(q, k, v, options))
            small = torch.randn(2, 12 * 12, q.shape[-1], generator=g)  # a 12 × 12 canvas: not NPA's grid
            declined = patch(small, small, small, {**options, "original_shape": [2, 4, 12, 12]})
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    full = attn.to_out[0](comfy_attention(q, k, v, options))
    assert (full - ours).abs().max() > 1e-3  # NPA changed the attention
    heads = small.view(2, -1, attn.heads, small.shape[-1] // attn.heads).transpose(1, 2)
    plain = torch.nn.functional.scaled_dot_product_attention(heads, heads, heads).transpose(1, 2).flatten(2)
    torch.testing.assert_close(declined, plain, atol=1e-5, rtol=0)
    assert "patches_replace" not in b.ours.transformer_options  # restored


def _zeroing_node(seen: list[int]) -> Any:
    """Another node's attention replacement: notes each call's query count in ``seen`` and returns zeros."""

    def other_node(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra: dict[str, Any]) -> torch.Tensor:
        seen.append(q.shape[1])
        return torch.zeros_like(q)

    return other_node


def test_an_attention_replacement_of_another_node_stays_the_fallback(unets: SimpleNamespace) -> None:
    """A node's ``attn1`` replacement on the model keeps running every call NPA declines (and only those), the
    patcher's own options are left as they were, and a patch of whole attention calls (not a q/k/v kernel) is
    refused in one line where the node's replacement would bypass it."""
    from hiresdiff.comfy.adapter import ComfyAdapter
    from hiresdiff.patches.attention import neighborhood_attention
    from hiresdiff.patches.freescale import ScaleFusionProcessor

    b = unets
    seen: list[int] = []
    other_node = _zeroing_node(seen)

    patcher = b.twin.patcher.clone()
    key = next(k for k in _keys(b) if k[0] == "input")
    patcher.set_model_attn1_replace(other_node, key[0], key[1])  # the block's two-part key, as most nodes set it
    before = patcher.model_options["transformer_options"]["patches_replace"]["attn1"].copy()
    adapter = ComfyAdapter(patcher, None, b.embeds, NATIVE)
    latent_hw = (2 * LATENT, 2 * LATENT)
    options = {"n_heads": 1, "original_shape": [1, 4, *latent_hw], "attn_precision": None}
    _, _, level = _npa_layer(b)
    taken = torch.randn(1, (latent_hw[0] >> level) * (latent_hw[1] >> level), 64)
    other = torch.randn(1, 12 * 12, 64)
    with neighborhood_attention(adapter, latent_hw):
        patch = adapter.transformer_options["patches_replace"]["attn1"][key]
        assert torch.count_nonzero(patch(taken, taken, taken, options)) > 0  # NPA ran
        patch(other, other, other, {**options, "original_shape": [1, 4, 12, 12]})  # declined: the node's
    assert seen == [12 * 12]
    assert patcher.model_options["transformer_options"]["patches_replace"]["attn1"] == before
    assert adapter.transformer_options["patches_replace"]["attn1"] == before

    def fusion(module: Any, inner: Any, level: int) -> Any:
        return ScaleFusionProcessor(inner, None, level)  # type: ignore[arg-type]

    # a patch of whole attention calls takes the attn1 modules' forward, which the node's replacement bypasses
    refused = pytest.raises(HiresError, match="another node replaces the self-attention at input_blocks")
    with refused as caught, adapter.self_attention_patched(fusion):
        pass
    assert "\n" not in str(caught.value) and "ScaleFusionProcessor" in str(caught.value)
    assert all("forward" not in vars(m) for m in b.twin.model.diffusion_model.modules())


def _keys(b: SimpleNamespace) -> list[tuple[str, int, int]]:
    from hiresdiff.comfy.attention import transformer_block_keys

    return transformer_block_keys(b.twin.model.diffusion_model)


def test_predictions_with_npa_equal_the_diffusers_backend(
    unets: SimpleNamespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With NPA installed through each adapter (one replacement per transformer block of ComfyUI's UNet, as many as
    the diffusers UNet has self-attention processors), batched guided predictions of two canvas samples (each its
    own query shift) on a 2× canvas run NPA in ComfyUI's UNet calls and agree with the diffusers backend's to 1e-5."""
    import hiresdiff.patches.attention as attention_mod
    from hiresdiff.patches.attention import neighborhood_attention

    b = unets
    assert len(_keys(b)) == sum(n.endswith("attn1.processor") for n in b.ref.unet.attn_processors)
    grids: list[tuple[int, int]] = []
    real = attention_mod.npa_attention

    def spy(*args: Any, **kwargs: Any) -> torch.Tensor:
        grids.append(args[3])
        return real(*args, **kwargs)

    monkeypatch.setattr(attention_mod, "npa_attention", spy)
    latent_hw = (2 * LATENT, 2 * LATENT)
    x = torch.randn(2, 4, *latent_hw, generator=torch.Generator().manual_seed(6))
    preds = []
    for ad in (b.ref, b.ours):
        ad.set_timesteps(10)
        ad.refresh_placement()
        request = Request(x, [0, 0], [(0, 0), (0, 0)], b.embeds, 5.0, (2 * NATIVE, 2 * NATIVE), [0, 1])
        with neighborhood_attention(ad, latent_hw, [torch.Generator().manual_seed(s) for s in (1, 2)]):
            preds.append(ad.predict([request], ad.scheduler.timesteps[3], 8)[0])
        assert grids and set(grids) <= {(2 * LATENT >> level,) * 2 for level in (0, 1)}
        grids.clear()
    torch.testing.assert_close(preds[1], preds[0], atol=1e-5, rtol=0)


def test_models_hiresdiff_cannot_run_are_refused_in_one_line() -> None:
    """A model type or family the backend does not handle is named in one line, before any work."""
    from hiresdiff.comfy.adapter import ComfyAdapter

    c = comfy()
    tw = twin("sd")
    model = tw.model
    original = model.model_type
    try:
        model.model_type = c.model_base.ModelType.EDM
        with pytest.raises(HiresError, match="EDM"):
            ComfyAdapter(tw.patcher)
    finally:
        model.model_type = original


def test_a_model_sampling_node_sets_the_prediction_and_the_schedule() -> None:
    """ComfyUI's ModelSamplingDiscrete node on an ε checkpoint (v_prediction, zero terminal SNR) is what the backend
    samples — read from the patcher, not the model, whose own sampling the patch replaces only while loaded: a
    v-prediction zsnr scheduler, the patched σ, and predictions equal to the diffusers backend's with that scheduler
    on the same UNet. x0 and LCM sampling are refused in one line."""
    comfy()  # skips without ComfyUI (before importing its nodes)
    from comfy_extras.nodes_model_advanced import ModelSamplingDiscrete

    from hiresdiff.comfy.adapter import comfy_adapter

    tw = twin("sd")
    embeds = embeds_for("sd", tw.context)
    assert comfy_adapter(tw.patcher, None, embeds, native_size=NATIVE).prediction_type == "epsilon"
    (patched,) = ModelSamplingDiscrete().patch(tw.patcher, "v_prediction", True)
    ours = comfy_adapter(patched, None, embeds, native_size=NATIVE)
    assert ours.prediction_type == "v_prediction" and ours.scheduler.config.rescale_betas_zero_snr
    same = type(ours.scheduler).from_config(ours.scheduler.config)
    vae_d, _ = sd_vae(float(tw.model.latent_format.scale_factor))
    ref = GivenEmbeds(SimpleNamespace(unet=tw.unet, vae=vae_d, scheduler=same), embeds)
    check_predictions(SimpleNamespace(ref=ref, ours=ours, embeds=embeds), 64)
    for sampling, name in (("x0", "X0"), ("lcm", "LCM")):
        (other,) = ModelSamplingDiscrete().patch(tw.patcher, sampling, False)
        with pytest.raises(HiresError, match=rf"^hiresdiff cannot run a model sampled as [\w.]*{name} [^\n]+$"):
            comfy_adapter(other, None, embeds, native_size=NATIVE)


def _capture_request(b: SimpleNamespace, latent_hw: tuple[int, int]) -> Request:
    """Two canvas samples of one prompt, guided: the recorder must sort the conditional rows by sample."""
    x = torch.randn(2, 4, *latent_hw, generator=torch.Generator().manual_seed(8))
    return Request(x, [0, 0], [(0, 0), (0, 0)], b.embeds, 5.0, (2 * NATIVE, 2 * NATIVE), [0, 1])


def test_the_comfyui_capture_records_the_diffusers_maps(unets: SimpleNamespace) -> None:
    """AccDiffusion's cross-attention capture through ComfyUI's ``attn2`` replacement records the same maps (per
    sample, conditional rows only, at the same level) as the diffusers processors on the same twin and input, to
    1e-5, and leaves the predictions and the model's options as they were."""
    from hiresdiff.patches.attention import capture_cross_attention

    b = unets
    latent_hw = (2 * LATENT, 2 * LATENT)
    maps, counts = [], []
    for ad in (b.ref, b.ours):
        ad.set_timesteps(10)
        ad.refresh_placement()
        t = ad.scheduler.timesteps[3]
        plain = ad.predict([_capture_request(b, latent_hw)], t, 8)[0]
        with capture_cross_attention(ad, 2, latent_hw) as rec:
            captured = ad.predict([_capture_request(b, latent_hw)], t, 8)[0]
        torch.testing.assert_close(captured, plain, atol=1e-6, rtol=0)  # observed, not changed
        maps.append(rec.maps())
        counts.append(rec.counts)
    assert "patches_replace" not in b.ours.transformer_options  # restored
    assert maps[0].shape[1] == b.embeds.cond.shape[1] and bool((counts[0] > 0).all())
    torch.testing.assert_close(counts[1], counts[0], atol=0, rtol=0)
    torch.testing.assert_close(maps[1], maps[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(maps[1].sum(1), torch.ones_like(maps[1].sum(1)), atol=1e-5, rtol=0)
    assert not torch.allclose(maps[1][0], maps[1][1])  # each sample its own maps


def test_an_attn2_replacement_of_another_node_computes_the_observed_attention(unets: SimpleNamespace) -> None:
    """The capture only observes: a node's ``attn2`` replacement on the model still computes the attention of the
    blocks it observes, and the patcher's options are left as they were."""
    from hiresdiff.comfy.adapter import ComfyAdapter
    from hiresdiff.comfy.attention import cross_attention_levels
    from hiresdiff.patches.attention import capture_cross_attention

    b = unets
    calls: list[int] = []
    other_node = _zeroing_node(calls)

    patcher = b.twin.patcher.clone()
    for name, number, _ in cross_attention_levels(b.twin.model.diffusion_model):
        patcher.set_model_attn2_replace(other_node, name, number)
    before = patcher.model_options["transformer_options"]["patches_replace"]["attn2"].copy()
    adapter = ComfyAdapter(patcher, None, b.embeds, NATIVE)
    adapter.set_timesteps(10)
    latent_hw = (2 * LATENT, 2 * LATENT)
    t = adapter.scheduler.timesteps[3]
    plain = adapter.predict([_capture_request(b, latent_hw)], t, 8)[0]
    unobserved = len(calls)
    with capture_cross_attention(adapter, 2, latent_hw) as rec:
        captured = adapter.predict([_capture_request(b, latent_hw)], t, 8)[0]
    assert len(calls) == 2 * unobserved > 0 and bool((rec.counts > 0).all())
    torch.testing.assert_close(captured, plain, atol=0, rtol=0)
    assert patcher.model_options["transformer_options"]["patches_replace"]["attn2"] == before


class WordEncoder:
    """A stand-in text encoder for both backends (ComfyUI's CONDITIONING carries no text): each prompt's embedding
    is seeded by its text, one token per word — so AccDiffusion's view prompts get their own conditioning."""

    def __init__(self, family: str, context: int) -> None:
        self.family, self.context = family, context
        self.seen: list[str] = []

    def _one(self, text: str) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(zlib.crc32(text.encode()))
        return torch.randn(1, 8, self.context, generator=g), torch.randn(1, SDXL_POOLED, generator=g)

    def encode_prompt(self, prompts: list[str], negatives: list[str] | None, cfg: bool) -> PromptEmbeds:
        self.seen.extend(prompts)
        cond = [self._one(p) for p in prompts]
        uncond = [self._one(n) for n in (negatives or [""] * len(prompts))]
        pooled = self.family == "sdxl"
        return PromptEmbeds(
            torch.cat([c for c, _ in cond]),
            torch.cat([u for u, _ in uncond]) if cfg else None,
            torch.cat([p for _, p in cond]) if pooled else None,
            torch.cat([p for _, p in uncond]) if pooled and cfg else None,
        )

    @staticmethod
    def count_tokens(text: str) -> int:
        return 1


def test_a_whole_accdiffusion_run_gives_the_same_latents(
    unets: SimpleNamespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    """AccDiffusion (phase-1 capture, word masks, content-aware view prompts, window interaction) through both
    backends with the same prompt encoder and noise: the same view prompts and final latents (≤ 1e-4)."""
    from hiresdiff.pipeline import HiresPipeline

    b = unets
    runs, prompts = [], []
    for ad in (b.ref, b.ours):
        words = WordEncoder(b.family, b.twin.context)
        monkeypatch.setattr(ad, "encode_prompt", words.encode_prompt)
        monkeypatch.setattr(ad, "count_tokens", words.count_tokens)
        hp = HiresPipeline(None, "twin", adapter=ad)
        out = hp("a castle on a misty hill", "accdiffusion", 2 * NATIVE, 2 * NATIVE, steps=4, guidance=5.0, seed=7,
                 max_batch=8, previews=False, progress=False)  # fmt: skip
        runs.append(out.latents)
        prompts.append(words.seen)
    assert prompts[1] == prompts[0] and len(set(prompts[0])) > 1  # view prompts were encoded
    torch.testing.assert_close(runs[1], runs[0], atol=1e-4, rtol=1e-4)


#: the methods that patch UNet modules, which reach ComfyUI's UNet through its diffusers-named view
UNET_PATCH_METHODS = ("scalecrafter", "fouriscale", "hidiffusion", "freescale")


def _parameter_sum(module: Any) -> float:
    return float(sum(p.detach().double().sum() for p in module.parameters()))


def test_the_unet_view_names_the_modules_diffusers_has(unets: SimpleNamespace) -> None:
    """ComfyUI's UNet under diffusers' names: the same level addresses resolve to the same names, each name is the
    module with the diffusers module's weights (the twins share them), the config the patches read agrees, and the
    ``attn1`` processors come in diffusers' order (MSW-MSA numbers its layers in it)."""
    from hiresdiff.ops.freeu import up_resnet_channels
    from hiresdiff.patches.levels import address_index, unet_levels

    b = unets
    view, ref = b.ours.unet, b.ref.unet
    assert address_index(view) == address_index(ref)
    assert unet_levels(view) == unet_levels(ref)
    compared = 0
    for name, module in view.named_modules():
        if name and not isinstance(module, torch.nn.Module):
            assert name.count(".") == 1 or name == "mid_block"  # a level or group: no module of its own
            continue
        if name:
            theirs = ref.get_submodule(name)
            assert sum(1 for _ in module.parameters()) == sum(1 for _ in theirs.parameters()), name
            assert _parameter_sum(module) == pytest.approx(_parameter_sum(theirs), rel=1e-12, abs=1e-12), name
            compared += 1
    assert compared > 10
    modules = {id(m) for m in b.twin.model.diffusion_model.modules()}
    assert all(id(view.get_submodule(n)) in modules for n in address_index(view)["down0.res"])
    assert view.get_submodule("down_blocks.1.resnets.0.conv1").dilation == (1, 1)
    with pytest.raises(HiresError, match="group of modules") as caught:
        view.get_submodule("down_blocks.1")
    assert "\n" not in str(caught.value)
    layout = up_resnet_channels(view.config.block_out_channels, view.config.layers_per_block)
    assert layout == up_resnet_channels(ref.config.block_out_channels, ref.config.layers_per_block)
    assert view.config.cross_attention_dim == ref.config.cross_attention_dim
    attn1 = [n for n in ref.attn_processors if n.endswith("attn1.processor")]
    assert list(view.attn_processors) == attn1


@pytest.mark.parametrize("method", UNET_PATCH_METHODS)
def test_unet_patches_act_on_comfyui_modules(
    unets: SimpleNamespace, method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A UNet-patch method's run in ComfyUI patches ComfyUI's own modules — as many as in diffusers, each one
    called patched — and its attention kernels (FouriScale's shared Q/K, HiDiffusion's MSW-MSA) run as ``attn1``
    replacements, FreeScale's scale fusion in place of the ``attn1`` modules' ``forward``; after the run every
    module's ``forward`` and the adapter's replacements are as before."""
    import hiresdiff.comfy.attention as comfy_attention
    import hiresdiff.patches.context as context
    from hiresdiff.patches.freescale import ScaleFusionProcessor
    from hiresdiff.pipeline import HiresPipeline

    b = unets
    original, run_kernel = context._patched_forward, comfy_attention.run_kernel
    patched: dict[str, list[Any]] = {"ref": [], "ours": []}
    kernels: list[int] = []
    calls: dict[int, int] = {}

    def recording(which: str) -> Any:
        def make(patch: Any, module: Any, clock: Any, rows: Any) -> Any:
            call = original(patch, module, clock, rows)
            patched[which].append(module)

            def counted(*args: Any, **kwargs: Any) -> Any:
                if any(patch.setting(clock.index, branch) is not None for _, branch in rows() or [(0, "cond")]):
                    calls[id(module)] = calls.get(id(module), 0) + 1
                return call(*args, **kwargs)

            return counted

        return make

    def kernel(*args: Any) -> Any:
        kernels.append(1)
        return run_kernel(*args)

    fused: dict[str, list[Any]] = {"ref": [], "ours": []}
    running = ["ref"]
    attend_self = ScaleFusionProcessor.attend_self

    def fusing(self: Any, attn: Any, hidden_states: Any, *args: Any, **kwargs: Any) -> Any:
        fused[running[0]].append(attn)
        return attend_self(self, attn, hidden_states, *args, **kwargs)

    monkeypatch.setattr(comfy_attention, "run_kernel", kernel)
    monkeypatch.setattr(ScaleFusionProcessor, "attend_self", fusing)
    for which, ad in (("ref", b.ref), ("ours", b.ours)):
        monkeypatch.setattr(context, "_patched_forward", recording(which))
        running[0] = which
        hp = HiresPipeline(None, "twin", adapter=ad)
        hp("a twin", method, 2 * NATIVE, 2 * NATIVE, steps=4, guidance=5.0, seed=7, max_batch=8, previews=False,
           progress=False)  # fmt: skip
    comfy_modules = {id(m) for m in b.twin.model.diffusion_model.modules()}
    assert patched["ours"] and len(patched["ours"]) == len(patched["ref"])
    assert all(id(m) in comfy_modules for m in patched["ours"])
    assert all(calls.get(id(m), 0) > 0 for m in patched["ours"])
    assert all("forward" not in vars(m) for m in patched["ours"])  # restored
    assert bool(kernels) == (method in ("fouriscale", "hidiffusion"))
    if method == "freescale":  # both runs fused as often; ComfyUI's on its own attn1 modules only
        assert fused["ours"] and len(fused["ours"]) == len(fused["ref"])
        assert all(id(a) in comfy_modules for a in fused["ours"]) and not {id(a) for a in fused["ref"]} & comfy_modules
    else:
        assert not fused["ours"] and not fused["ref"]
    assert b.ours.attn1 == {} and b.ours.transformer_options.get("patches_replace", {}).get("attn1", {}) == {}


def test_freeu_through_the_view_gives_the_same_latents(unets: SimpleNamespace) -> None:
    """FreeU (an input patch on decoder resnets, split at the backbone's channels the view's config gives) with
    ScaleCrafter's re-dilation, through both backends: the same latents, and not those of the run without FreeU."""
    from hiresdiff.pipeline import HiresPipeline

    b = unets
    runs = {}
    for name, ad, freeu in (("ref", b.ref, True), ("ours", b.ours, True), ("plain", b.ours, False)):
        hp = HiresPipeline(None, "twin", adapter=ad)
        out = hp("a twin", "scalecrafter", 2 * NATIVE, 2 * NATIVE, steps=4, guidance=5.0, seed=7, max_batch=8,
                 previews=False, progress=False, freeu=freeu)  # fmt: skip
        runs[name] = out.latents
    torch.testing.assert_close(runs["ours"], runs["ref"], atol=1e-4, rtol=1e-4)
    assert (runs["ours"] - runs["plain"]).abs().max() > 1e-2


def test_flux_npa_runs_as_comfyui_attention_override(monkeypatch: pytest.MonkeyPatch) -> None:
    """ScaleDiff on FLUX: the neighborhood attention runs in ComfyUI's FLUX through the attention override — as
    many windowed calls as the diffusers processors make (the latents agree: the whole-run test) — calls it leaves
    go to the override another node set (so do the calls of the stages without it), and nothing of it stays on the
    adapter or the patcher afterwards."""
    import hiresdiff.comfy.flux_attention as comfy_flux
    import hiresdiff.patches.attention_flux as diffusers_flux
    from hiresdiff.pipeline import HiresPipeline

    b = make_backends("flux")
    counts = {"ref": 0, "ours": 0}
    for module, which in ((diffusers_flux, "ref"), (comfy_flux, "ours")):
        original = module.shifted_npa

        def counted(*args: Any, _original: Any = original, _which: str = which, **kwargs: Any) -> Any:
            counts[_which] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, "shifted_npa", counted)
    seen: list[int] = []

    def other_node(function: Any, q: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        seen.append(b.ours.attention_override is not None)  # NPA installed: a call it leaves
        return function(q, *args, **kwargs)

    options = b.ours.patcher.model_options.setdefault("transformer_options", {})
    options["optimized_attention_override"] = other_node
    try:
        for ad in (b.ref, b.ours):
            hp = HiresPipeline(None, "twin", adapter=ad)
            hp("a twin", "scalediff", 2 * NATIVE, 2 * NATIVE, steps=3, seed=7, max_batch=8, previews=False,
               progress=False)  # fmt: skip
    finally:
        options.pop("optimized_attention_override")
    assert counts["ours"] == counts["ref"] > 0
    assert seen and not any(seen)  # the native stage ran the node's override; every NPA-stage call was windowed
    assert b.ours.attention_override is None and b.ours.flux_call is None
    # a call NPA leaves (no transformer call of the canvas in progress) goes to the override in force before
    from hiresdiff.patches.processors import NPAState

    state = NPAState(b.ours, (2 * LATENT, 2 * LATENT), None)
    override = comfy_flux.FluxNPAOverride(b.ours, state, LATENT // 2, other_node)
    q = torch.randn(1, 1, 9, 128)
    plain = override(lambda *a, **k: "plain", q, q, q, 1, skip_reshape=True, mask=None)
    assert plain == "plain" and len(seen) == 7


class WordClip:
    """A stand-in for ComfyUI's CLIP with :class:`WordEncoder`'s embeddings: ``tokenize`` gives one token per word
    between start and end tokens (and keeps the text), ``encode_from_tokens`` the word encoder's (cond, pooled)."""

    START, END = 49406, 49407

    def __init__(self, words: WordEncoder) -> None:
        self.words = words
        self.encoded: list[str] = []

    def tokenize(self, text: str) -> dict[str, Any]:
        ids = [self.START, *(1000 + i for i, _ in enumerate(text.split())), self.END]
        return {"l": [[(t, 1.0) for t in ids + [self.END] * (77 - len(ids))]], "text": text}

    def encode_from_tokens(self, tokens: dict[str, Any], return_pooled: bool = False) -> Any:
        self.encoded.append(tokens["text"])
        return self.words._one(tokens["text"])


def test_accdiffusion_view_prompts_through_comfyui_clip_give_the_same_latents(
    unets: SimpleNamespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    """AccDiffusion's content-aware view prompts in ComfyUI: the run's own prompt from the CONDITIONING, the view
    prompts encoded by the workflow's CLIP (:class:`~hiresdiff.comfy.text.PromptText`: word token counts from its
    tokenizer, the negative CONDITIONING as their unconditional half) — the same view prompts and latents as the
    diffusers backend encoding every prompt itself."""
    from hiresdiff.comfy.text import PromptText
    from hiresdiff.pipeline import HiresPipeline

    b, text = unets, "a castle on a misty hill"
    words = WordEncoder(b.family, b.twin.context)
    negatives: list[Any] = []

    def encode(prompts: list[str], negative: list[str] | None, cfg: bool) -> PromptEmbeds:
        negatives.append(negative)  # the run's negative prompt (AccDiffusion's default one)
        return words.encode_prompt(prompts, negative, cfg)

    monkeypatch.setattr(b.ref, "encode_prompt", encode)
    monkeypatch.setattr(b.ref, "count_tokens", words.count_tokens)
    clip = WordClip(WordEncoder(b.family, b.twin.context))
    monkeypatch.setattr(b.ours, "text", PromptText(clip, text))
    assert b.ours.count_tokens("misty") == 1 and b.ours.count_tokens("a misty hill") == 3
    runs = []
    for ad in (b.ref, b.ours):
        if ad is b.ours:  # ComfyUI's CONDITIONING: the run's own prompt and negative, encoded as the reference did
            own = WordEncoder(b.family, b.twin.context).encode_prompt([text], negatives[0], True)
            monkeypatch.setattr(b.ours, "embeds", own)
        hp = HiresPipeline(None, "twin", adapter=ad)
        out = hp(text, "accdiffusion", 2 * NATIVE, 2 * NATIVE, steps=4, guidance=5.0, seed=7, max_batch=8,
                 previews=False, progress=False)  # fmt: skip
        runs.append(out.latents)
    views = [p for p in words.seen[1:] if p != text]  # the diffusers backend's view prompts (the run's own first)
    assert [p for p in clip.encoded if p != text] == views and views  # view prompts went through the CLIP
    torch.testing.assert_close(runs[1], runs[0], atol=1e-4, rtol=1e-4)
