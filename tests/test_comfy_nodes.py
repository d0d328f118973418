"""The ComfyUI node pack (:mod:`hiresdiff.comfy.nodes`, the repository's ``__init__.py``) called in process, as
ComfyUI's executor calls a node, on the tiny SD twin (:mod:`comfy_twins`). Skipped without ComfyUI unless
``HIRESDIFF_REQUIRE_COMFYUI=1``."""

from __future__ import annotations

import dataclasses
import importlib.util
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

import comfy_twins
from comfy_twins import LATENT, NATIVE, comfy, controlnet_twin, flux_twin, sd_vae, twin
from hiresdiff.comfy.nodes import COMFY_METHODS, HiresdiffSample, node_mappings, parameter_node
from hiresdiff.errors import HiresError
from hiresdiff.methods import METHODS

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sd() -> SimpleNamespace:
    tw = twin("sd")
    _, vae = sd_vae(float(tw.model.latent_format.scale_factor))
    g = torch.Generator().manual_seed(2)
    positive = [[torch.randn(1, 7, tw.context, generator=g), {}]]
    negative = [[torch.randn(1, 7, tw.context, generator=g), {}]]
    return SimpleNamespace(twin=tw, vae=vae, positive=positive, negative=negative)


@pytest.fixture(scope="module")
def flux() -> SimpleNamespace:
    """The FLUX.1-dev twin with its VAE and conditioning as ComfyUI's FLUX text encoder gives it (the T5 sequence,
    CLIP's ``pooled_output``)."""
    tw = flux_twin()
    _, vae = sd_vae(float(tw.model.latent_format.scale_factor), flux=True)
    g = torch.Generator().manual_seed(2)
    text, pooled = comfy_twins.FLUX_TEXT, comfy_twins.FLUX_POOLED
    positive = [[torch.randn(1, 7, text, generator=g), {"pooled_output": torch.randn(1, pooled)}]]
    negative = [[torch.zeros(1, 7, text), {"pooled_output": torch.zeros(1, pooled)}]]
    return SimpleNamespace(twin=tw, vae=vae, positive=positive, negative=negative)


def run(sd: SimpleNamespace, **changes: Any) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    args: dict[str, Any] = {"model": sd.twin.patcher, "positive": sd.positive, "negative": sd.negative,
                            "vae": sd.vae, "method": "demofusion", "preset": "none", "width": 2 * NATIVE,
                            "height": 2 * NATIVE, "steps": 3, "cfg": 5.0, "seed": 7, "native_size": NATIVE}  # fmt: skip
    return HiresdiffSample().sample(**{**args, **changes})


def test_the_pack_loads_as_comfyui_loads_it() -> None:
    """The repository's ``__init__.py`` (what ComfyUI imports from ``custom_nodes/``) exports the mappings: the
    Sample node and one parameter node per method with parameters, each with ComfyUI's class attributes."""
    root = Path(__file__).resolve().parents[1] / "__init__.py"
    spec = importlib.util.spec_from_file_location("custom_nodes_x_hiresdiff", root)
    assert spec is not None and spec.loader is not None
    pack = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pack)
    classes, names = pack.NODE_CLASS_MAPPINGS, pack.NODE_DISPLAY_NAME_MAPPINGS
    assert classes["HiresdiffSample"] is HiresdiffSample and names["HiresdiffSample"] == "Hiresdiff Sample"
    assert set(classes) == set(names) == set(node_mappings()[0])
    for cls in classes.values():
        types = cls.INPUT_TYPES()
        assert "required" in types and callable(getattr(cls(), cls.FUNCTION))
        assert isinstance(cls.RETURN_TYPES, tuple)
    sample = HiresdiffSample.INPUT_TYPES()
    assert sample["required"]["method"][0] == list(COMFY_METHODS)
    assert {"image", "latent", "strength", "params"} <= set(sample["optional"])


def test_parameter_nodes_are_the_dataclass() -> None:
    """A method's parameter node shows every field with its default (tooltips from the docstring); its output
    carries only the changed values, as ``--set`` strings."""
    node = parameter_node("demofusion")
    required = node.INPUT_TYPES()["required"]
    params = METHODS["demofusion"].params
    fields = {f.name: f for f in dataclasses.fields(params)}
    assert list(required) == list(fields)
    for name, (kind, options) in required.items():
        default = fields[name].default
        if kind in ("INT", "FLOAT", "BOOLEAN"):
            assert options["default"] == default
    defaults = {name: options["default"] for name, (_, options) in required.items()}
    assert node().make(**defaults) == ({"method": "demofusion", "set": {}},)
    changed = node().make(**{**defaults, "alpha1": 1.5})[0]
    assert changed == {"method": "demofusion", "set": {"alpha1": "1.5"}}


def test_sample_gives_the_backend_run_as_comfyui_latents_and_previews(sd: SimpleNamespace) -> None:
    """The node's LATENT is the hiresdiff run's final latents in ComfyUI's raw form (``process_latent_out``), its
    previews each phase at its own size and the final image last; parameters from a parameter node take effect."""
    from hiresdiff.comfy.adapter import ComfyAdapter
    from hiresdiff.comfy.nodes import embeds_of
    from hiresdiff.pipeline import HiresPipeline

    latent, previews = run(sd)
    adapter = ComfyAdapter(sd.twin.patcher, sd.vae, embeds_of(sd.positive, sd.negative, True, "sd"), NATIVE)
    direct = HiresPipeline(None, "twin", adapter=adapter)("x", "demofusion", 2 * NATIVE, 2 * NATIVE, steps=3,
                                                         guidance=5.0, seed=7, progress=False)  # fmt: skip
    expected = sd.twin.model.process_latent_out(direct.latents.float())
    torch.testing.assert_close(latent["samples"], expected, atol=1e-6, rtol=1e-6)
    assert latent["samples"].shape == (1, 4, 2 * NATIVE // 8, 2 * NATIVE // 8)
    sizes = [NATIVE, 2 * NATIVE]  # DemoFusion's first phase, then the final image (the last phase's)
    assert [tuple(p.shape) for p in previews] == [(1, side, side, 3) for side in sizes]
    assert all(float(p.min()) >= 0.0 and float(p.max()) <= 1.0 for p in previews)
    node = parameter_node("demofusion")
    defaults = {name: options["default"] for name, (_, options) in node.INPUT_TYPES()["required"].items()}
    (params,) = node().make(**{**defaults, "alpha1": 0.5})
    other, _ = run(sd, params=params)
    assert not torch.allclose(other["samples"], latent["samples"])


def test_previews_off_gives_the_final_image_only(sd: SimpleNamespace) -> None:
    """With ``previews`` off no phase is decoded for the output; the list still holds the final image (ComfyUI's
    SaveImage fails on an empty list) and the latent is the same."""
    latent, previews = run(sd)
    quiet, final = run(sd, previews=False)
    torch.testing.assert_close(quiet["samples"], latent["samples"], atol=0, rtol=0)
    assert len(final) == 1 and torch.equal(final[0], previews[-1])


def test_an_input_picture_is_upscaled(sd: SimpleNamespace) -> None:
    """An IMAGE (or a LATENT, decoded by the VAE) with a strength below 1 is the run's input picture."""
    g = torch.Generator().manual_seed(3)
    picture = torch.rand(1, NATIVE, NATIVE, 3, generator=g)
    latent, _ = run(sd, image=picture, strength=0.6)
    assert latent["samples"].shape == (1, 4, 2 * NATIVE // 8, 2 * NATIVE // 8)
    from_latent, _ = run(sd, latent={"samples": sd.vae.encode(picture)}, strength=0.6)
    assert from_latent["samples"].shape == latent["samples"].shape


def test_scale_sizes_the_target_from_the_input() -> None:
    """``scale`` takes the input IMAGE's or LATENT's size (latent cells × 8) times the scale, on the grid, as
    ``--scale`` does; without an input, or below the input's size, it is one line."""
    from hiresdiff.comfy.nodes import scaled_target

    image = torch.zeros(1, 120, 200, 3)
    assert scaled_target(image, None, 2.0, 8, 8) == (240, 400)
    assert scaled_target(None, {"samples": torch.zeros(1, 4, 15, 25)}, 1.5, 8, 16) == (176, 304)
    for args, message in (((None, None, 2.0), "connect one, or set scale to 0"), ((image, None, 0.5), "enlarge")):
        with pytest.raises(HiresError, match=message) as caught:
            scaled_target(*args, 8, 8)
        assert "\n" not in str(caught.value)


def test_scale_runs_the_input_at_its_size_times_scale(sd: SimpleNamespace) -> None:
    """The node's ``scale`` replaces width × height when there is an input picture."""
    picture = torch.rand(1, NATIVE, NATIVE + 64, 3, generator=torch.Generator().manual_seed(3))
    latent, _ = run(sd, image=picture, strength=0.6, scale=1.5, width=64, height=64, steps=2, previews=False)
    assert latent["samples"].shape == (1, 4, 3 * NATIVE // 16, 3 * (NATIVE + 64) // 16)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"width": 2 * NATIVE + 4}, "not a multiple of the latent grid"),
        ({"method": "accdiffusion-v2"}, "runs on SDXL models, not SD 1.x/2.x; with this model choose one of"),
        ({"method": "accdiffusion"}, "accdiffusion's content-aware view prompts need the prompt's text"),
        ({"method": "apt", "params": {"method": "apt", "set": {"host": "accdiffusion"}}}, "content_prompts to false"),
        ({"params": {"method": "apt", "set": {}}}, "are apt's but the method is demofusion"),
        ({"positive": [[torch.zeros(2, 7, 32), {}]]}, "batch 1"),
        ({"positive": [[torch.zeros(1, 7, 32), {"gligen": object()}]]}, "carries gligen, which hiresdiff"),
        ({"positive": [[torch.zeros(1, 7, 32), {"control": object()}]]}, "applied to one prompt only"),
        ({"steps": 0}, "steps"),
        ({"latent": {"samples": torch.zeros(1, 4, LATENT // 2, LATENT // 2)}}, "smaller than the model's base"),
    ],
)
def test_bad_input_is_one_line_before_any_work(sd: SimpleNamespace, changes: dict[str, Any], message: str) -> None:
    with pytest.raises(HiresError, match=message) as caught:
        run(sd, **changes)
    assert "\n" not in str(caught.value)


def test_accdiffusion_without_content_prompts_runs(sd: SimpleNamespace) -> None:
    """AccDiffusion (window interaction, view guidance) and APT on its host run in ComfyUI with content prompts off."""
    for method, set_ in (("accdiffusion", {}), ("apt", {"host": "accdiffusion"})):
        params = {"method": method, "set": {**set_, "content_prompts": "false"}}
        latent, _ = run(sd, method=method, params=params, previews=False, steps=2)
        assert latent["samples"].shape == (1, 4, 2 * NATIVE // 8, 2 * NATIVE // 8)
        assert bool(torch.isfinite(latent["samples"]).all())


class TextClip:
    """A stand-in for ComfyUI's CLIP on the SD twin: one token per word, each text's embedding seeded by it."""

    def __init__(self, context: int) -> None:
        self.context, self.encoded = context, []  # type: ignore[var-annotated]

    def tokenize(self, text: str) -> dict[str, Any]:
        ids = [49406, *(1000 + i for i, _ in enumerate(text.split())), 49407]
        return {"l": [[(t, 1.0) for t in ids + [49407] * (77 - len(ids))]], "text": text}

    def encode_from_tokens(self, tokens: dict[str, Any], return_pooled: bool = False) -> Any:
        self.encoded.append(tokens["text"])
        g = torch.Generator().manual_seed(len(tokens["text"]))
        return torch.randn(1, 7, self.context, generator=g), torch.randn(1, 32, generator=g)


def test_accdiffusion_content_prompts_run_with_the_clip_and_the_text(sd: SimpleNamespace) -> None:
    """With the CLIP and the positive prompt's text connected, AccDiffusion's content-aware view prompts run (the
    CLIP encodes the view prompts); a CLIP without the text is one line."""
    clip = TextClip(sd.twin.context)
    text = "a castle on a misty hill"
    latent, _ = run(sd, method="accdiffusion", clip=clip, prompt=text, previews=False, steps=2)
    assert latent["samples"].shape == (1, 4, 2 * NATIVE // 8, 2 * NATIVE // 8)
    assert clip.encoded and all(set(p.split()) <= set(text.split()) for p in clip.encoded)
    with pytest.raises(HiresError, match="a CLIP is connected without the prompt's text") as caught:
        run(sd, method="accdiffusion", clip=clip, prompt="  ")
    assert "\n" not in str(caught.value)


def test_flux_1_is_taken_and_other_flux_models_are_refused_in_one_line() -> None:
    """FLUX.1-dev and schnell are the FLUX family; FLUX inpainting, FLUX.2 or a FLUX model of another sampling type
    are named in one line."""
    from hiresdiff.comfy.adapter import comfy_family

    def model(config: str, kind: str) -> SimpleNamespace:
        return SimpleNamespace(model_config=type(config, (), {})(), model_type=SimpleNamespace(name=kind))

    assert comfy_family(model("Flux", "FLUX")) == ("flux", 1024)
    assert comfy_family(model("FluxSchnell", "FLOW")) == ("flux", 1024)
    for config, kind, message in [("FluxInpaint", "FLUX", "not a FluxInpaint model"),
                                  ("Flux2", "FLUX", "not a Flux2 model"),
                                  ("Flux", "EPS", "cannot run a EPS FLUX model")]:  # fmt: skip
        with pytest.raises(HiresError, match=message) as caught:
            comfy_family(model(config, kind))
        assert "\n" not in str(caught.value)


def test_sample_runs_a_flux_model(flux: SimpleNamespace) -> None:
    """A FLUX.1 MODEL runs through the node: cfg is its guidance value (no negative rows), and the LATENT is the
    run's latents in ComfyUI's raw form (FLUX's latent format: scale and shift)."""
    from hiresdiff.comfy.adapter import ComfyFluxAdapter, comfy_adapter
    from hiresdiff.comfy.nodes import embeds_of
    from hiresdiff.pipeline import HiresPipeline

    latent, previews = run(flux, model=flux.twin.patcher, positive=flux.positive, negative=flux.negative,
                           vae=flux.vae, steps=2, cfg=3.5, previews=False)  # fmt: skip
    adapter = comfy_adapter(flux.twin.patcher, flux.vae, embeds_of(flux.positive, None, False, "flux"), NATIVE)
    assert isinstance(adapter, ComfyFluxAdapter)
    direct = HiresPipeline(None, "twin", adapter=adapter)("x", "demofusion", 2 * NATIVE, 2 * NATIVE, steps=2,
                                                         guidance=3.5, seed=7, progress=False)  # fmt: skip
    expected = flux.twin.model.process_latent_out(direct.latents.float())
    assert latent["samples"].shape == (1, 16, 2 * NATIVE // 8, 2 * NATIVE // 8)
    torch.testing.assert_close(latent["samples"], expected, atol=1e-6, rtol=1e-6)
    assert [tuple(p.shape) for p in previews] == [(1, 2 * NATIVE, 2 * NATIVE, 3)]
    other, _ = run(flux, model=flux.twin.patcher, positive=flux.positive, negative=flux.negative, vae=flux.vae,
                   steps=2, cfg=1.5, previews=False)  # fmt: skip
    assert not torch.allclose(other["samples"], latent["samples"])  # the guidance value reaches the model
    guided = [[flux.positive[0][0], {**flux.positive[0][1], "guidance": 3.5}]]  # as ComfyUI's FluxGuidance sets it
    same, _ = run(flux, model=flux.twin.patcher, positive=guided, negative=flux.negative, vae=flux.vae, steps=2,
                  cfg=1.5, previews=False)  # fmt: skip
    torch.testing.assert_close(same["samples"], latent["samples"], atol=0, rtol=0)  # the conditioning's value wins


def test_a_flux_model_with_a_unet_only_method_is_refused_in_one_line(flux: SimpleNamespace) -> None:
    """A method that needs a UNet names the families it runs on and the methods a FLUX model can use, before any
    work."""
    message = "accdiffusion runs on SD 1.x/2.x, SDXL models, not FLUX; with this model choose one of: demofusion"
    with pytest.raises(HiresError, match=re.escape(message)) as caught:
        run(flux, model=flux.twin.patcher, positive=flux.positive, negative=flux.negative, vae=flux.vae,
            method="accdiffusion")  # fmt: skip
    assert "\n" not in str(caught.value)


def test_scalediff_runs_on_a_flux_model(flux: SimpleNamespace) -> None:
    """ScaleDiff is offered on every family in ComfyUI (its neighborhood attention reaches ComfyUI's FLUX through
    the attention override): the node runs it on the FLUX twin and gives the canvas's latent."""
    from hiresdiff.comfy.nodes import check_method, comfy_methods

    assert all("scalediff" in comfy_methods(family) for family in ("sd", "sdxl", "flux"))
    check_method("scalediff", "flux")  # offered: no error
    latent, _ = run(flux, model=flux.twin.patcher, positive=flux.positive, negative=flux.negative, vae=flux.vae,
                    method="scalediff", steps=2, cfg=1.5, previews=False)  # fmt: skip
    assert latent["samples"].shape == (1, 16, 2 * LATENT, 2 * LATENT)
    assert torch.isfinite(latent["samples"]).all()


def test_every_method_is_offered_or_refused_with_its_reason() -> None:
    """Every method runs in ComfyUI (the UNet patches through the view, accdiffusion-v2 with a CONTROL_NET) or is
    named in COMFY_REFUSED with its reason."""
    from hiresdiff.comfy.nodes import COMFY_REFUSED, check_method

    for method in ("accdiffusion", "accdiffusion-v2", "scalecrafter", "fouriscale", "hidiffusion", "freescale"):
        check_method(method, "sdxl")  # offered: no error
    assert set(METHODS) == set(COMFY_METHODS) | set(COMFY_REFUSED)


@pytest.fixture(scope="module")
def sdxl() -> SimpleNamespace:
    """The SDXL twin with its VAE, CONDITIONING with ``pooled_output``, and its ControlNet twin (ComfyUI's)."""
    tw = twin("sdxl")
    _, vae = sd_vae(float(tw.model.latent_format.scale_factor))
    g = torch.Generator().manual_seed(2)
    pooled = comfy_twins.SDXL_POOLED
    positive = [[torch.randn(1, 7, tw.context, generator=g), {"pooled_output": torch.randn(1, pooled)}]]
    negative = [[torch.randn(1, 7, tw.context, generator=g), {"pooled_output": torch.randn(1, pooled)}]]
    net = controlnet_twin(tw).comfy
    return SimpleNamespace(twin=tw, vae=vae, positive=positive, negative=negative, controlnet=net)


ACC_V2 = {"method": "accdiffusion-v2", "steps": 2, "previews": False}


def test_accdiffusion_v2_runs_with_a_comfyui_controlnet(sdxl: SimpleNamespace) -> None:
    """accdiffusion-v2 on an SDXL model with a CONTROL_NET at the node's controlnet input: the previous phase's
    edges steer the later phase's local views through ComfyUI's ControlNet (κ 0 gives another result)."""
    params = {"method": "accdiffusion-v2", "set": {"content_prompts": "false"}}
    latent, _ = run(sdxl, **ACC_V2, params=params, controlnet=sdxl.controlnet)
    assert latent["samples"].shape == (1, 4, 2 * LATENT, 2 * LATENT) and bool(torch.isfinite(latent["samples"]).all())
    off = {"method": "accdiffusion-v2", "set": {"content_prompts": "false", "control_weight": "0"}}
    unsteered, _ = run(sdxl, **ACC_V2, params=off, controlnet=sdxl.controlnet)
    assert (latent["samples"] - unsteered["samples"]).abs().max() > 1e-4


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({}, "accdiffusion-v2 steers its local views with a canny SDXL ControlNet: load one"),
        ({"controlnet": object()}, "the controlnet input is not a ControlNet of an SD or SDXL UNet"),
        ({"method": "demofusion", "controlnet": "net"}, "the controlnet input serves accdiffusion-v2"),
        ({"controlnet": "sd"}, "is an SD 1.x/2.x ControlNet; the model is SDXL"),
    ],
)
def test_a_controlnet_that_does_not_fit_is_one_line(
    sdxl: SimpleNamespace, changes: dict[str, Any], message: str
) -> None:
    if changes.get("controlnet") == "net":
        changes = {**changes, "controlnet": sdxl.controlnet}
    elif changes.get("controlnet") == "sd":
        changes = {**changes, "controlnet": controlnet_twin(twin("sd")).comfy}
    with pytest.raises(HiresError, match=message) as caught:
        run(sdxl, **{**ACC_V2, **changes})
    assert "\n" not in str(caught.value)


def _applied(
    sdxl: SimpleNamespace, strength: float = 1.0, start: float = 0.0, end: float = 1.0, seed: int = 3
) -> tuple[Any, Any]:
    """ComfyUI's Apply ControlNet (advanced) node on the SDXL fixture's prompts, with a picture of the target's size."""
    import importlib

    comfy()
    nodes = importlib.import_module("nodes")
    picture = torch.rand(1, 2 * NATIVE, 2 * NATIVE, 3, generator=torch.Generator().manual_seed(seed))
    apply = nodes.ControlNetApplyAdvanced().apply_controlnet
    return apply(sdxl.positive, sdxl.negative, sdxl.controlnet, picture, strength, start, end)


def _conds(pair: tuple[Any, Any]) -> dict[str, Any]:
    return {"positive": pair[0], "negative": pair[1]}


def test_apply_controlnet_conditioning_steers_the_run(sdxl: SimpleNamespace) -> None:
    """A ControlNet from ComfyUI's Apply ControlNet (the conditioning's ``control``) runs with its image and
    strength: DemoFusion's views carry their crops of it; another strength gives another result."""
    plain, _ = run(sdxl, steps=2, previews=False)
    positive, negative = _applied(sdxl)
    steered, _ = run(sdxl, steps=2, previews=False, positive=positive, negative=negative)
    weaker, _ = run(sdxl, steps=2, previews=False, **_conds(_applied(sdxl, 0.3)))
    assert bool(torch.isfinite(steered["samples"]).all())
    assert (steered["samples"] - plain["samples"]).abs().max() > 1e-4
    assert (steered["samples"] - weaker["samples"]).abs().max() > 1e-4
    # start/end percent as ComfyUI's samplers hold them: an empty range never steers; half the range steers less
    never, _ = run(sdxl, steps=2, previews=False, **_conds(_applied(sdxl, end=0.0)))
    assert torch.equal(never["samples"], plain["samples"])
    early, _ = run(sdxl, steps=2, previews=False, **_conds(_applied(sdxl, end=0.5)))
    assert (early["samples"] - plain["samples"]).abs().max() > 1e-4
    assert (early["samples"] - steered["samples"]).abs().max() > 1e-4


def test_the_control_image_reaches_the_run_exactly() -> None:
    from hiresdiff.comfy.nodes import control_picture

    levels = torch.randint(0, 256, (1, 3, 5, 7), generator=torch.Generator().manual_seed(0))
    picture = control_picture(SimpleNamespace(cond_hint_original=levels.float() / 255))
    pixels = torch.from_numpy(np.array(picture))
    assert picture.size == (7, 5) and torch.equal(pixels, levels[0].permute(1, 2, 0).to(torch.uint8))


def test_apply_controlnet_that_hiresdiff_cannot_honour_is_one_line(sdxl: SimpleNamespace) -> None:
    import importlib

    nodes = importlib.import_module("nodes")
    picture = torch.rand(1, 2 * NATIVE, 2 * NATIVE, 3)
    (positive_only,) = nodes.ControlNetApply().apply_controlnet(sdxl.positive, sdxl.controlnet, picture, 1.0)
    positive, negative = _applied(sdxl)
    chained = nodes.ControlNetApplyAdvanced().apply_controlnet(
        positive, negative, sdxl.controlnet, picture, 1.0, 0.0, 1.0
    )
    cases = [
        ({"positive": positive_only}, "the ControlNet is applied to one prompt only"),
        (_conds(chained), "a chain of ControlNets"),
        ({"positive": positive, "negative": negative, **ACC_V2, "controlnet": sdxl.controlnet},
         "accdiffusion-v2 makes its own ControlNet conditions"),
    ]  # fmt: skip
    for changes, message in cases:
        with pytest.raises(HiresError, match=message) as caught:
            run(sdxl, **{"steps": 2, "previews": False, **changes})
        assert "\n" not in str(caught.value)
    run(sdxl, steps=2, previews=False, positive=positive_only, cfg=1.0)  # no guidance: the positive alone is enough


def test_the_cancel_button_stops_the_run(sd: SimpleNamespace) -> None:
    """ComfyUI's interrupt flag stops the run at the next step with ComfyUI's own exception (not an error)."""
    mm = comfy().model_management
    mm.interrupt_current_processing(True)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            run(sd)
    finally:
        mm.interrupt_current_processing(False)
