"""ComfyUI nodes: hiresdiff's methods on the MODEL, CONDITIONING and VAE a workflow has already loaded.

* ``Hiresdiff Sample`` (:class:`HiresdiffSample`): MODEL, positive/negative CONDITIONING, VAE, method, preset, size,
  steps, cfg, seed; optionally an input picture (IMAGE, or a LATENT decoded through the VAE) with ``strength``, the
  method's parameters, and the CLIP with the positive prompt's text (AccDiffusion's content-aware view prompts,
  :mod:`hiresdiff.comfy.text`). Outputs the final LATENT (ComfyUI's raw latent) and the previews as a list of IMAGEs
  (each phase before the last at its own size, then the final image; only the final image with ``previews`` off).
* ``Hiresdiff <method> Parameters`` (one per method, :func:`parameter_node`): the fields of the method's parameter
  dataclass with their defaults, the ranges its own checks accept and the help of its docstring as tooltips
  (:func:`hiresdiff.web.fields.method_fields`, as the web page shows them); output HIRESDIFF_PARAMS.

Bad input (a size off the grid, a method the backend cannot run, parameters of another method, a FLUX model with a
UNet-only method …) raises :class:`~hiresdiff.errors.HiresError`: ComfyUI shows its one line in the
error dialog. ComfyUI's progress bar follows every step and its cancel button stops the run between steps (ComfyUI's
interrupt exception is let through).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch

from hiresdiff.comfy.text import PromptText, pad_tokens
from hiresdiff.errors import HiresError, require

#: what a HIRESDIFF_PARAMS output holds: ``{"method": name, "set": {field: text}}``
PARAMS_TYPE = "HIRESDIFF_PARAMS"
CATEGORY = "sampling/hiresdiff"
#: conditioning entries other nodes add that hiresdiff would otherwise silently leave out (GLiGEN, area and mask
#: conditioning, hooks): refused in one line. Apply ControlNet's ``control`` is taken (:func:`applied_controlnet`).
IGNORED_CONDITIONING = frozenset({"gligen", "area", "mask", "hooks"})
#: the prompt text hiresdiff records for a run whose prompts ComfyUI encoded (CONDITIONING carries no text)
PROMPT_LABEL = "(ComfyUI conditioning)"
#: methods the ComfyUI backend runs (tested against the diffusers backend); the UNet-patch methods reach ComfyUI's UNet
#: through its diffusers-named view (:mod:`hiresdiff.comfy.unet_view`)
COMFY_METHODS = (
    "demofusion",
    "accdiffusion",
    "multidiffusion",
    "apt",
    "apldm",
    "diffusehigh",
    "upsample-guidance",
    "scalediff",
    "scalecrafter",
    "fouriscale",
    "hidiffusion",
    "freescale",
    "resize",
    "direct",
    "accdiffusion-v2",
)
#: method → why the ComfyUI backend cannot run it (every method is either offered or named here)
COMFY_REFUSED: dict[str, str] = {}
#: the methods that take the node's ``controlnet`` input: they make their own conditions (accdiffusion-v2's edges);
#: a ControlNet on a picture of the user's comes with the conditioning, from ComfyUI's Apply ControlNet
CONTROLNET_METHODS = ("accdiffusion-v2",)
#: how a run records a ControlNet that came with the conditioning
APPLIED_CONTROLNET = "ComfyUI Apply ControlNet (the conditioning's ControlNet)"
#: AccDiffusion's content-aware view prompts encode words of the prompt text per view: ComfyUI hands over
#: CONDITIONING (no text, no text encoder), so without the node's ``clip`` and ``prompt`` inputs they are refused
#: with this line rather than silently left out
NO_PROMPT_TEXT = (
    "{method}'s content-aware view prompts need the prompt's text and a text encoder, which ComfyUI's "
    "CONDITIONING does not carry: connect the CLIP and the positive prompt's text to the node's clip and prompt "
    "inputs, or set content_prompts to false (window interaction still applies)"
)


def comfy_methods(family: str) -> list[str]:
    """The methods the ComfyUI backend runs on a ``family`` model."""
    from hiresdiff.methods import METHODS

    return [m for m in COMFY_METHODS if family in METHODS[m].families]


def check_method(method: str, family: str | None = None) -> None:
    """One line when ``method`` is not one the ComfyUI backend runs (on a ``family`` model, when given)."""
    from hiresdiff.methods import METHODS
    from hiresdiff.methods.base import FAMILY_NAMES

    require(method in METHODS, f"unknown method {method!r}; choose one of: {', '.join(COMFY_METHODS)}")
    if family is not None and family not in METHODS[method].families:
        raise HiresError(
            f"{method} runs on {', '.join(FAMILY_NAMES[f] for f in METHODS[method].families)} models, not "
            f"{FAMILY_NAMES[family]}; with this model choose one of: {', '.join(comfy_methods(family))}"
        )
    if method not in COMFY_METHODS:
        why = COMFY_REFUSED.get(method, "is not offered in ComfyUI")
        raise HiresError(f"{method} {why}; in ComfyUI choose one of: {', '.join(COMFY_METHODS)}")


def check_controlnet(method: str, controlnet: Any) -> None:
    """One line when the node's ``controlnet`` input does not fit ``method`` (:data:`CONTROLNET_METHODS`)."""
    if method in CONTROLNET_METHODS:
        require(
            controlnet is not None,
            f"{method} steers its local views with a canny SDXL ControlNet: load one (ControlNet Loader, e.g. "
            "diffusers' controlnet-canny-sdxl-1.0) and connect it to the node's controlnet input",
        )
    else:
        require(
            controlnet is None,
            f"the controlnet input serves {', '.join(CONTROLNET_METHODS)} (its own edge conditions); {method} takes "
            "none: disconnect it",
        )


def check_prompt_text(method: str, params: Any) -> None:
    """One line when the run would encode parts of the prompt text (AccDiffusion's content-aware view prompts, also
    as APT's host): :data:`NO_PROMPT_TEXT`."""
    accdiffusion = method == "accdiffusion" or getattr(params, "host", None) == "accdiffusion"
    require(not (accdiffusion and getattr(params, "content_prompts", False)), NO_PROMPT_TEXT.format(method=method))


def embeds_of(positive: Any, negative: Any, cfg: bool, family: str) -> Any:
    """CONDITIONING → :class:`~hiresdiff.models.adapter.PromptEmbeds` (one entry each: the text encoders' output
    and, for SDXL, its ``pooled_output``)."""
    from hiresdiff.models.adapter import PromptEmbeds

    def one(cond: Any, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        require(
            isinstance(cond, list) and len(cond) == 1 and len(cond[0]) == 2,
            f"hiresdiff takes one {name} conditioning (a CLIP Text Encode output); combined or area conditioning "
            "is not supported",
        )
        tensor, extra = cond[0]
        extra = extra if isinstance(extra, dict) else {}
        unused = sorted(k for k in IGNORED_CONDITIONING & set(extra) if extra[k] is not None)
        require(
            not unused,
            f"the {name} conditioning carries {', '.join(unused)}, which hiresdiff does not apply yet: connect the "
            "plain CLIP Text Encode output",
        )
        pooled = extra.get("pooled_output")
        require(tensor.shape[0] == 1, f"the {name} conditioning must be for one prompt (batch 1)")
        if family in ("sdxl", "flux"):
            require(pooled is not None, f"the {name} conditioning has no pooled output (encode it with the CLIP)")
        return tensor.float(), None if pooled is None else pooled.float()

    cond, pooled = one(positive, "positive")
    uncond, pooled_uncond = one(negative, "negative") if cfg else (None, None)
    if uncond is not None and uncond.shape[1] != cond.shape[1]:  # different token lengths: pad the shorter one
        length = max(cond.shape[1], uncond.shape[1])
        cond, uncond = (pad_tokens(t, length) for t in (cond, uncond))
    return PromptEmbeds(cond, uncond, pooled, pooled_uncond)


def applied_controlnet(positive: Any, negative: Any, cfg: bool) -> Any:
    """The ControlNet ComfyUI's Apply ControlNet put on the conditioning (``None``: none), with its control image and
    strength. hiresdiff runs it on every denoiser row — a view's row with the crop of the control image under it —
    and on both halves of a guidance pair, so with guidance (``cfg``) both prompts carry the same one (Apply
    ControlNet with positive and negative connected); one ControlNet (no chain) and one image. Its start/end
    percent hold as in ComfyUI's samplers: it acts while the step's σ lies in that range of the model's σ."""

    def control(cond: Any) -> Any:
        ok = isinstance(cond, list) and len(cond) == 1 and len(cond[0]) == 2 and isinstance(cond[0][1], dict)
        return cond[0][1].get("control") if ok else None

    pos, neg = control(positive), control(negative) if cfg else None
    if pos is None and neg is None:
        return None
    require(
        pos is not None and (neg is pos or not cfg),
        "the ControlNet is applied to one prompt only: hiresdiff runs it on both halves of the guidance; connect "
        "both the positive and the negative to Apply ControlNet",
    )
    require(
        getattr(pos, "previous_controlnet", None) is None,
        "the conditioning carries a chain of ControlNets: hiresdiff applies one Apply ControlNet at a time",
    )
    hint = getattr(pos, "cond_hint_original", None)
    require(
        isinstance(hint, torch.Tensor) and hint.ndim == 4 and hint.shape[0] == 1 and hint.shape[1] == 3,
        "Apply ControlNet's image must be one RGB picture (batch 1)",
    )
    return pos


def control_picture(net: Any) -> Any:
    """The control image of an applied ControlNet (``cond_hint_original``: ``(1, 3, H, W)`` in [0, 1]) as a PIL
    image, which hiresdiff crops per view and resizes per phase like any control image."""
    from PIL import Image

    hint = net.cond_hint_original[0].float().clamp(0, 1)
    return Image.fromarray((hint.movedim(0, -1) * 255).round().to(torch.uint8).cpu().numpy())


def flux_guidance(positive: Any, cfg: float) -> float:
    """FLUX.1-dev's guidance value: the one the positive conditioning carries (ComfyUI's FluxGuidance and
    CLIPTextEncodeFlux nodes set it, and ComfyUI's own samplers use it), else the node's ``cfg``."""
    extra = positive[0][1] if isinstance(positive, list) and positive and len(positive[0]) == 2 else {}
    value = extra.get("guidance") if isinstance(extra, dict) else None
    return cfg if value is None else float(value)


def scaled_target(image: Any, latent: Any, scale: float, factor: int, grid: int) -> tuple[int, int]:
    """``(height, width)`` of the node's ``scale`` input: the input IMAGE's (``(B, H, W, C)``) or LATENT's size
    (``factor`` pixels per latent cell) times ``scale`` on the pixel ``grid`` — as ``--scale`` sizes a picture."""
    from hiresdiff.inputs import target_size

    if image is not None:
        height, width = (int(v) for v in image.shape[1:3])
    else:
        require(latent is not None, "scale sizes an input image or latent: connect one, or set scale to 0")
        height, width = (int(v) * factor for v in latent["samples"].shape[-2:])
    return target_size(height, width, scale=scale, target_height=None, target_width=None, grid=grid)


def _picture(image: Any, latent: Any, vae: Any) -> Any:
    """The input picture as a PIL image: an IMAGE (first of its batch) or a LATENT decoded through the VAE."""
    from PIL import Image

    if image is None and latent is not None:
        require(vae is not None, "decoding the input LATENT needs the VAE")
        image = vae.decode(latent["samples"])
    if image is None:
        return None
    pixels = (image[0].float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    return Image.fromarray(pixels)


def _images(previews: list[list[Any]]) -> list[torch.Tensor]:
    """Previews (per phase, one PIL image per sample) → ComfyUI IMAGEs (B, H, W, 3) in [0, 1], one per phase."""
    import numpy as np

    def tensor(picture: Any) -> torch.Tensor:
        return torch.from_numpy(np.asarray(picture.convert("RGB"), dtype=np.float32) / 255.0)

    return [torch.stack([tensor(p) for p in phase]) for phase in previews]


def _progress(node_id: Any = None) -> Any:
    """A step callback that moves ComfyUI's progress bar per phase and honours its cancel button."""
    import comfy.model_management
    import comfy.utils

    bars: dict[str, Any] = {}

    def step(name: str, done: int, total: int) -> None:
        comfy.model_management.throw_exception_if_processing_interrupted()
        bar = bars.get(name)
        if bar is None:
            bar = bars[name] = comfy.utils.ProgressBar(total)
        bar.update_absolute(done, total)

    return step


class HiresdiffSample:
    """The ``Hiresdiff Sample`` node (module docstring)."""

    CATEGORY = CATEGORY
    FUNCTION = "sample"
    RETURN_TYPES = ("LATENT", "IMAGE")
    RETURN_NAMES = ("latent", "previews")
    OUTPUT_IS_LIST = (False, True)
    OUTPUT_TOOLTIPS = ("The final latent (decode it with the same VAE).", "Each phase's preview, the final image last.")
    DESCRIPTION = "Generates far beyond the model's training resolution without training (hiresdiff)."

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        from hiresdiff.methods import METHODS

        presets = sorted({p for m in COMFY_METHODS for p in METHODS[m].presets})
        size = {"default": 2048, "min": 64, "max": 16384, "step": 8}
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "An SD 1.x/2.x, SDXL or FLUX.1 model (LoRAs and patches applied)."}),
                "positive": ("CONDITIONING",),
                "negative": ("CONDITIONING",),
                "vae": ("VAE",),
                "method": (list(COMFY_METHODS), {"default": "demofusion"}),
                "preset": (["none", *presets], {"tooltip": "A named preset of the method (none: its defaults)."}),
                "width": ("INT", {**size, "tooltip": "Target width in pixels (a multiple of 8)."}),
                "height": ("INT", {**size, "tooltip": "Target height in pixels (a multiple of 8)."}),
                "steps": ("INT", {"default": 50, "min": 1, "max": 1000}),
                "cfg": (
                    "FLOAT",
                    {
                        "default": 7.5,
                        "min": 0.0,
                        "max": 100.0,
                        "step": 0.1,
                        "tooltip": "Classifier-free guidance scale; for FLUX.1-dev its guidance value when the "
                        "positive conditioning carries none (a FluxGuidance node's value wins; 3.5 is typical; no "
                        "negative prompt is used), unused by schnell.",
                    },
                ),
                "seed": ("INT", {"default": 0, "min": 0, "max": 2**63 - 1, "control_after_generate": True}),
            },
            "optional": {
                "image": ("IMAGE", {"tooltip": "A picture to upscale (its aspect is kept)."}),
                "latent": ("LATENT", {"tooltip": "A latent to upscale (decoded through the VAE first)."}),
                "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01}),
                "scale": (
                    "FLOAT",
                    {
                        "default": 0.0,
                        "min": 0.0,
                        "max": 16.0,
                        "step": 0.25,
                        "tooltip": "With an input image or latent: the target is its size times this, on the "
                        "model's grid (0: width × height).",
                    },
                ),
                "params": (PARAMS_TYPE, {"tooltip": "The method's parameters (a Hiresdiff … Parameters node)."}),
                "previews": (
                    "BOOLEAN",
                    {
                        "default": True,
                        "tooltip": "Decode every phase for the previews output "
                        "(off: only the final image; less memory at 4K).",
                    },
                ),
                "clip": (
                    "CLIP",
                    {
                        "tooltip": "The CLIP that encoded the positive prompt, with its text in prompt: "
                        "AccDiffusion's content-aware view prompts encode words of it per view.",
                    },
                ),
                "prompt": (
                    "STRING",
                    {
                        "default": "",
                        "multiline": True,
                        "tooltip": "The positive prompt's text (for AccDiffusion's view prompts, with clip).",
                    },
                ),
                "controlnet": (
                    "CONTROL_NET",
                    {
                        "tooltip": "accdiffusion-v2: a canny SDXL ControlNet (ControlNet Loader); each phase's edges "
                        "steer the next phase's local views.",
                    },
                ),
                "native_size": (
                    "INT",
                    {
                        "default": 0,
                        "min": 0,
                        "max": 4096,
                        "step": 8,
                        "tooltip": "The model's training resolution (0: its family's, "
                        "512 for SD 1.x, 1024 for SDXL and FLUX.1; set it for fine-tunes at other sizes).",
                    },
                ),
            },
            "hidden": {"node_id": "UNIQUE_ID"},
        }

    def sample(
        self,
        model: Any,
        positive: Any,
        negative: Any,
        vae: Any,
        method: str,
        preset: str,
        width: int,
        height: int,
        steps: int,
        cfg: float,
        seed: int,
        **optional: Any,
    ) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
        """Run ``method``; ``optional`` holds the connected optional inputs (``image``, ``latent``, ``strength``,
        ``scale``, ``params``, ``previews``, ``native_size``, ``clip`` with ``prompt``, ``controlnet``) and ComfyUI's
        hidden ``node_id``."""
        from hiresdiff.comfy.adapter import comfy_adapter
        from hiresdiff.comfy.controlnet import controlnet_spec
        from hiresdiff.inputs import check_min_size
        from hiresdiff.pipeline import HiresPipeline, ModelFacts, validate_request

        image, latent, params = optional.get("image"), optional.get("latent"), optional.get("params")
        strength, native_size = optional.get("strength", 1.0), int(optional.get("native_size") or 0)
        scale = float(optional.get("scale") or 0.0)

        adapter = comfy_adapter(model, vae, None, native_size=native_size or None)
        check_method(method, adapter.family)
        controlnet = optional.get("controlnet")
        check_controlnet(method, controlnet)
        clip, text = optional.get("clip"), str(optional.get("prompt") or "").strip()
        require(clip is None or text, "a CLIP is connected without the prompt's text: fill in the prompt input")
        label = text if clip is not None else PROMPT_LABEL
        if params is not None:
            require(
                params.get("method") == method,
                f"the parameters are {params.get('method')}'s but the method is {method}: connect its own node",
            )
        # FLUX.1 takes no negative prompt; its guidance value is the conditioning's (FluxGuidance) or cfg
        guided = cfg > 1.0 and adapter.family != "flux"
        applied = applied_controlnet(positive, negative, guided)
        if applied is not None:
            require(adapter.family != "flux", "ControlNets work with SD 1.x/2.x and SDXL models here, not FLUX")
            require(
                method not in CONTROLNET_METHODS,
                f"{method} makes its own ControlNet conditions: connect the ControlNet to the node's controlnet "
                "input, not through Apply ControlNet",
            )
        adapter.embeds = embeds_of(positive, negative, guided, adapter.family)
        guidance = flux_guidance(positive, cfg) if adapter.family == "flux" else cfg
        hp = HiresPipeline(None, "comfyui", adapter=adapter)
        previews = bool(optional.get("previews", True))
        kwargs: dict[str, Any] = {"steps": steps, "guidance": guidance, "seed": seed, "previews": previews}
        if preset != "none":
            kwargs["preset"] = preset
        if params:
            kwargs.update(params.get("set", {}))  # ``--set`` strings, checked as the command line's
        if controlnet is not None:  # the pipeline runs ComfyUI's network for the spec read off it
            kwargs["controlnet"] = controlnet_spec(controlnet)
            hp.provide_controlnet(kwargs["controlnet"].ref, controlnet)
        elif applied is not None:  # Apply ControlNet's network, image and strength
            kwargs["controlnet"] = controlnet_spec(applied, APPLIED_CONTROLNET)
            hp.provide_controlnet(kwargs["controlnet"].ref, applied)
            kwargs.update(control_image=control_picture(applied), control_scale=float(applied.strength))
        if scale > 0.0:  # the input's size × scale (an IMAGE's or a LATENT's size, known without decoding it)
            height, width = scaled_target(image, latent, scale, adapter.vae_scale_factor, adapter.pixel_grid)
        # everything but the input picture is checked before any model work (decoding an input LATENT included)
        request = validate_request(label, method, width, height, ModelFacts.of_pipeline(hp), **kwargs)
        if clip is None:
            check_prompt_text(method, request.params)
        else:
            adapter.text = PromptText(clip, text)
        if image is None and latent is not None:
            rows, cols = latent["samples"].shape[-2:]
            f = adapter.vae_scale_factor
            check_min_size(SimpleNamespace(height=rows * f, width=cols * f), adapter.native_size)  # type: ignore[arg-type]
        picture = _picture(image, latent, vae)
        if picture is not None:
            kwargs.update(image=picture, strength=strength)
        step = _progress(optional.get("node_id"))
        out = hp(label, method, width, height, progress=False, callback=step, **kwargs)
        scale, shift = adapter._vae_factors()
        shown = out.previews if previews else [out.images]  # never an empty list (SaveImage fails on one)
        return {"samples": (out.latents.float() / scale + shift).cpu()}, _images(shown)


def parameter_node(method_name: str) -> type:
    """The ``Hiresdiff <method> Parameters`` node class of a method, generated from its parameter dataclass."""
    from hiresdiff.methods import METHODS
    from hiresdiff.web.fields import changed_values, method_fields

    fields = method_fields(METHODS[method_name])

    def input_types(cls: type) -> dict[str, Any]:
        required: dict[str, Any] = {}
        for f in fields:
            options: dict[str, Any] = {"tooltip": f.help} if f.help else {}
            if f.kind == "bool":
                required[f.name] = ("BOOLEAN", {**options, "default": bool(f.default)})
            elif f.kind in ("int", "float"):
                kind = "INT" if f.kind == "int" else "FLOAT"
                bounds = {k: v for k, v in (("min", f.minimum), ("max", f.maximum)) if v is not None}
                step = {} if f.kind == "int" else {"step": 0.01}
                required[f.name] = (kind, {**options, **bounds, **step, "default": f.default})
            else:
                required[f.name] = ("STRING", {**options, "default": f.text_default()})
        return {"required": required}

    def make(self: Any, **values: Any) -> tuple[dict[str, Any]]:
        return ({"method": method_name, "set": changed_values(fields, [values[f.name] for f in fields])},)

    label = method_name.replace("-", " ").title().replace(" ", "")
    return type(
        f"Hiresdiff{label}Parameters",
        (),
        {
            "CATEGORY": CATEGORY,
            "FUNCTION": "make",
            "RETURN_TYPES": (PARAMS_TYPE,),
            "DESCRIPTION": METHODS[method_name].summary,
            "INPUT_TYPES": classmethod(input_types),
            "make": make,
        },
    )


def node_mappings() -> tuple[dict[str, type], dict[str, str]]:
    """``NODE_CLASS_MAPPINGS`` and ``NODE_DISPLAY_NAME_MAPPINGS`` of the pack."""
    from hiresdiff.methods import METHODS

    classes: dict[str, type] = {"HiresdiffSample": HiresdiffSample}
    names = {"HiresdiffSample": "Hiresdiff Sample"}
    for name in COMFY_METHODS:
        if not METHODS[name].params.__dataclass_fields__:
            continue  # nothing to set
        node = parameter_node(name)
        classes[node.__name__] = node
        names[node.__name__] = f"Hiresdiff {name} Parameters"
    return classes, names
