"""The gradio layout of the page and its wiring to :class:`~hiresdiff.web.app.WebApp` (element ids are stable: the
browser tests and users' scripts address them). The page's own events are private (the HTTP API is
:mod:`hiresdiff.web.api`'s ``/generate``); a tab's state is kept by :class:`~hiresdiff.web.app.Sessions`, found
through the ``gr.Request`` gradio passes in.

No ``from __future__ import annotations``: gradio finds the ``gr.Request`` parameter by its annotation at run time.
"""

from typing import Any

from hiresdiff.extras import DEFAULT_CONTROL_SCALE
from hiresdiff.methods import METHODS
from hiresdiff.models.lora import DEFAULT_LORA_SCALE
from hiresdiff.schedulers import scheduler_names
from hiresdiff.web.addons import FORM as ADDON_FORM
from hiresdiff.web.addons import NONE
from hiresdiff.web.app import MODEL_QUEUE, WebApp
from hiresdiff.web.fields import FieldSpec

#: the form inputs, in the order the generate handler receives them
FORM = (
    "prompt",
    "negative",
    "method",
    "preset",
    "width",
    "height",
    "image",
    "scale",
    "strength",
    "steps",
    "guidance",
    "scheduler",
    "seed",
    "random_seed",
    "batch",
)
#: gradio's copies of shown images (in the server's own cache folder) older than a day go, checked hourly
CACHE_LIFETIME = (3600, 86400)
#: the outputs a run updates
OUTPUTS = ("status", "error", "previews", "result", "slider", "download", "command", "history")

INTRO = (
    "**hiresdiff** — high-resolution images from a diffusion model trained at a lower resolution. Type a prompt, "
    "pick a method and a size (or drop a picture to upscale) and press **Generate**: each phase's preview appears "
    "as soon as it is ready. Model: `{model}` (native {native} px)."
)


def _presets(method: str) -> list[str]:
    return ["", *METHODS[method].presets]


def build_page(app: WebApp) -> Any:
    """The page's gradio Blocks over ``app``, with the HTTP API (:func:`hiresdiff.web.api.add_api`)."""
    import gradio as gr

    from hiresdiff.web.api import add_api

    schedulers = scheduler_names()
    ad = app.pipe.adapter
    native, default_method = ad.native_size, "demofusion"
    defaults = ad.sampling_defaults
    with gr.Blocks(title="hiresdiff", delete_cache=CACHE_LIFETIME, analytics_enabled=False) as page:
        gr.Markdown(INTRO.format(model=app.pipe.model_name, native=native))
        c: dict[str, Any] = {}
        with gr.Row():
            with gr.Column(scale=2):
                c["prompt"] = gr.Textbox(label="Prompt", lines=2, elem_id="prompt", placeholder="a lighthouse at dusk")
                c["negative"] = gr.Textbox(label="Negative prompt (empty: the method's default)", elem_id="negative")
                with gr.Row():
                    c["method"] = gr.Dropdown(list(METHODS), value=default_method, label="Method", elem_id="method")
                    c["preset"] = gr.Dropdown(_presets(default_method), value="", label="Preset", elem_id="preset")
                with gr.Row():
                    c["width"] = gr.Number(2 * native, precision=0, label="Width (px)", elem_id="width")
                    c["height"] = gr.Number(2 * native, precision=0, label="Height (px)", elem_id="height")
                with gr.Accordion("Upscale your own picture", open=False, elem_id="upscale"):
                    c["image"] = gr.Image(type="pil", label="Input picture", elem_id="input-image")
                    with gr.Row():
                        c["scale"] = gr.Number(2.0, label="Scale (0 = use width/height)", elem_id="scale")
                        c["strength"] = gr.Slider(
                            0.0, 1.0, value=0.0, step=0.05, label="Strength (0: the method's own)", elem_id="strength"
                        )
                with gr.Row():
                    c["steps"] = gr.Number(defaults.get("steps", 50), precision=0, label="Steps", elem_id="steps")
                    c["guidance"] = gr.Number(defaults.get("guidance", 7.5), label="Guidance", elem_id="guidance")
                    c["scheduler"] = gr.Dropdown(schedulers, value="euler", label="Scheduler", elem_id="scheduler")
                with gr.Row():
                    c["seed"] = gr.Number(0, precision=0, label="Seed", elem_id="seed")
                    c["random_seed"] = gr.Checkbox(False, label="Random seed", elem_id="random-seed")
                    c["batch"] = gr.Number(1, precision=0, minimum=1, maximum=4, label="Images", elem_id="batch")
                add_ons(gr, app, c)
                groups, params = {}, []
                with gr.Accordion("Advanced: method parameters", open=False, elem_id="advanced"):
                    for name, fields in app.fields.items():
                        with gr.Group(visible=name == default_method, elem_id=f"params-{name}") as group:
                            params.extend(field_component(gr, spec) for spec in fields)
                        groups[name] = group
                with gr.Row():
                    generate = gr.Button("Generate", variant="primary", elem_id="generate")
                    stop = gr.Button("Stop", variant="stop", elem_id="stop")
            with gr.Column(scale=3):
                c["status"] = gr.Markdown("", elem_id="status")
                c["error"] = gr.Markdown("", elem_id="error")
                c["previews"] = gr.Gallery(label="Phases", columns=4, height=220, elem_id="previews")
                c["result"] = gr.Gallery(label="Result", columns=2, elem_id="result")
                c["slider"] = gr.ImageSlider(label="Before (phase 1) / after", type="pil", elem_id="slider")
                c["download"] = gr.File(label="PNG with its settings", file_count="multiple", elem_id="download")
                c["command"] = gr.Textbox(label="Same image from the command line", elem_id="command", buttons=["copy"])
                c["history"] = gr.Gallery(label="History", columns=6, height=160, elem_id="history")

        def on_method(method: str) -> list[Any]:
            return [gr.update(choices=_presets(method), value="")] + [
                gr.update(visible=name == method) for name in groups
            ]

        private = {"api_visibility": "private"}
        c["method"].change(on_method, c["method"], [c["preset"], *groups.values()], queue=False, **private)

        def run(request: gr.Request, *values: Any) -> Any:
            fixed = (*FORM, *ADDON_FORM)
            form = dict(zip(fixed, values[: len(fixed)], strict=True))
            for update in app.generate(app.sessions.get(_key(request)), form, list(values[len(fixed) :])):
                yield {c[key]: value for key, value in update.items()}

        inputs = [*(c[k] for k in (*FORM, *ADDON_FORM)), *params]
        outputs = [c[k] for k in OUTPUTS]
        generate.click(run, inputs, outputs, concurrency_limit=1, concurrency_id=MODEL_QUEUE, **private)

        def on_stop(request: gr.Request) -> None:
            """The run ends at its next step and says so itself (one writer of the status: no race)."""
            state = app.sessions.get(_key(request))
            if state.running:
                state.stop.set()

        stop.click(on_stop, None, None, queue=False, **private)

        def on_close(request: gr.Request) -> None:
            app.sessions.drop(_key(request))

        page.unload(on_close)
        add_api(app, gr)
    return page


def _key(request: Any) -> str:
    """The tab's key in :class:`~hiresdiff.web.app.Sessions`: gradio's session hash."""
    return str(getattr(request, "session_hash", None) or "")


def add_ons(gr: Any, app: WebApp, c: dict[str, Any]) -> None:
    """The add-ons this server offers (``hiresdiff serve --controlnet/--lora/--upscaler``), chosen by name; the
    panel is hidden where none are offered."""
    offer = app.addons
    with gr.Accordion("Add-ons: ControlNet, LoRA, upscaler", open=False, visible=bool(offer), elem_id="addons"):
        with gr.Row(visible=bool(offer.controlnets)):
            c["controlnet"] = gr.Dropdown(
                [NONE, *offer.controlnets], value=NONE, label="ControlNet", elem_id="controlnet"
            )
            scale = DEFAULT_CONTROL_SCALE
            c["control_scale"] = gr.Number(scale, minimum=0, label="ControlNet scale", elem_id="control-scale")
        c["control_image"] = gr.Image(
            type="pil", label="Control image (empty: the input picture)", elem_id="control-image",
            visible=bool(offer.controlnets),
        )  # fmt: skip
        with gr.Row(visible=bool(offer.loras)):
            c["loras"] = gr.Dropdown(list(offer.loras), value=[], multiselect=True, label="LoRAs", elem_id="loras")
            c["lora_scale"] = gr.Number(DEFAULT_LORA_SCALE, label="LoRA scale", elem_id="lora-scale")
        c["upscaler"] = gr.Dropdown(
            [NONE, *offer.upscalers], value=NONE, label="Upscaler (SR model of each pixel-space enlargement)",
            elem_id="upscaler", visible=bool(offer.upscalers),
        )  # fmt: skip


def field_component(gr: Any, spec: FieldSpec) -> Any:
    """The gradio input of one method parameter."""
    common = {"label": spec.name, "info": spec.help or None, "elem_id": spec.elem_id}
    if spec.kind == "bool":
        return gr.Checkbox(value=bool(spec.default), **common)
    if spec.kind in ("int", "float"):
        bounds = {k: v for k, v in (("minimum", spec.minimum), ("maximum", spec.maximum)) if v is not None}
        precision = 0 if spec.kind == "int" else None
        return gr.Number(value=spec.default, precision=precision, **bounds, **common)
    return gr.Textbox(value=spec.text_default(), **common)
