"""The page's HTTP API: one named, typed endpoint, ``/generate``, for ``gradio_client`` and plain HTTP clients.

    from gradio_client import Client

    images, info = Client("http://127.0.0.1:7860/").predict(
        "a lighthouse at dusk", method="demofusion", width=2048, height=2048, steps=30, api_name="/generate"
    )

``images`` are the PNGs written to the server's ``--out`` (the client downloads them), ``info`` the run's status
line, plan, metadata and the equivalent ``hiresdiff generate`` command. Requests share the page's queue: one
generation at a time, the others wait their turn. Bad input (and a request whose estimated peak memory does not fit)
raises ``gr.Error`` with the library's one-line message, which the client receives as it is, and the server logs no
traceback for it. ``params`` takes the method's parameters (``{"sigma": 0.8}``, values as JSON or as ``--set``
strings) and the settings :data:`~hiresdiff.web.app.SETTING_PARAMS`; add-ons are named, never paths
(:mod:`hiresdiff.web.addons`).

This module has no ``from __future__ import annotations`` on purpose: gradio reads the endpoint's parameter and
return types from its annotations at run time.
"""

import contextlib
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hiresdiff.errors import HiresError, require
from hiresdiff.methods import METHODS
from hiresdiff.models.lora import DEFAULT_LORA_SCALE
from hiresdiff.web.app import MODEL_QUEUE, SETTING_PARAMS, WebApp, command_line


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


#: the JSON values each setting of ``params`` takes: (test, what the one-line refusal says it must be)
_SETTING_TYPES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "max_batch": (lambda v: _is_int(v) or v == "auto", 'a whole number or "auto"'),
    "low_vram": (lambda v: isinstance(v, bool), "true or false"),
    "decode_tile_area": (_is_int, "a whole number"),
    "previews": (lambda v: isinstance(v, bool), "true or false"),
    "eta": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number (DDIM η)"),
}


def _set_string(name: str, value: Any) -> str:
    """A JSON value as the ``--set`` string the method's parameter parser takes."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    if isinstance(value, (list, tuple)) and all(isinstance(v, (int, float, str)) for v in value):
        return ",".join(str(v) for v in value)
    require(isinstance(value, (int, float, str)), f"params: {name} must be a number, a switch or text, got {value!r}")
    return str(value)


def split_params(method: str, fields: list[str], params: Any) -> tuple[dict[str, Any], dict[str, str]]:
    """``params`` of an API call as (settings, ``--set`` strings of ``method``'s parameters ``fields``), every name
    and JSON type checked."""
    require(
        params is None or isinstance(params, dict), f'params must be an object such as {{"sigma": 0.8}}, not {params!r}'
    )
    settings: dict[str, Any] = {}
    values: dict[str, str] = {}
    for name, value in (params or {}).items():
        if name in _SETTING_TYPES:
            test, kind = _SETTING_TYPES[name]
            require(test(value), f"params: {name} must be {kind}, got {value!r}")
            settings[name] = value
        else:
            require(
                name in fields,
                f"params: method {method!r} has no parameter {name!r}; "
                f"its parameters: {', '.join(fields) or 'none'}; settings: {', '.join(SETTING_PARAMS)}",
            )
            values[name] = _set_string(name, value)
    return settings, values


def api_request(
    app: WebApp,
    prompt: Any,
    method: Any,
    width: Any,
    height: Any,
    steps: Any,
    guidance: Any,
    seed: Any,
    negative_prompt: Any,
    scheduler: Any,
    images: Any,
    preset: Any,
    params: Any,
    addons: dict[str, Any] | None = None,
) -> tuple[Any, dict[str, str], dict[str, Any]]:
    """Check the JSON types of an API call (gradio passes them through unchecked), then validate it as the page
    does (:meth:`WebApp.validate`): ``(request, --set strings, settings shown)`` or a one-line HiresError."""
    require(
        isinstance(method, str) and method in METHODS, f"unknown method {method!r}; choose one of: {', '.join(METHODS)}"
    )
    for name, value in (
        ("prompt", prompt),
        ("negative_prompt", negative_prompt),
        ("scheduler", scheduler),
        ("preset", preset),
    ):
        require(value is None or isinstance(value, str), f"{name} must be text, got {value!r}")
    for name, value in (("width", width), ("height", height), ("steps", steps), ("seed", seed), ("images", images)):
        require(value is None or _is_int(value), f"{name} must be a whole number, got {value!r}")
    number = isinstance(guidance, (int, float)) and not isinstance(guidance, bool)
    require(guidance is None or number, f"guidance must be a number, got {guidance!r}")
    settings, values = split_params(method, [spec.name for spec in app.fields[method]], params)
    settings.update(
        negative_prompt=negative_prompt or None,
        steps=steps,
        guidance=guidance,
        scheduler=scheduler or None,
        seed=seed,
        num_images_per_prompt=images,
        preset=preset or None,
    )
    choice = addons or {}
    for name in ("control_scale", "lora_scale"):
        value = choice.get(name)
        ok = value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))
        require(ok, f"{name} must be a number, got {value!r}")
    extras = app.addons.kwargs(choice)  # names of this server's add-ons → their paths (a one-line refusal else)
    return app.validate(prompt or "", method, width, height, settings, values, extras=extras)


def no_file_objects(value: Any) -> Any:
    """``value`` with every ``"path"`` key of a record named ``"file"``: gradio clients take any object with a
    ``path`` for a file to download from the server (an add-on's record would be fetched, and refused)."""
    if isinstance(value, dict):
        return {("file" if k == "path" else k): no_file_objects(v) for k, v in value.items()}
    if isinstance(value, list):
        return [no_file_objects(v) for v in value]
    return value


def add_api(app: WebApp, gr: Any) -> None:
    """Register ``/generate`` on the Blocks being built (call inside its ``with`` block)."""
    from gradio.data_classes import FileData

    def fail(message: str) -> Exception:
        return gr.Error(message, print_exception=False)

    def file_data(path: Path) -> dict[str, Any]:
        return FileData(path=str(path), orig_name=path.name, mime_type="image/png").model_dump()

    # the annotation is what each yield is: gradio derives the endpoint's two outputs from it
    def generate(
        prompt: str,
        method: str = "demofusion",
        width: int | None = None,
        height: int | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        seed: int | None = 0,
        negative_prompt: str = "",
        scheduler: str = "euler",
        images: int = 1,
        preset: str = "",
        params: dict[str, Any] | None = None,
        controlnet: str = "",
        control_scale: float | None = None,
        loras: list[str] | None = None,
        lora_scale: float = DEFAULT_LORA_SCALE,
        upscaler: str = "",
    ) -> tuple[list[FileData], dict[str, Any]]:
        """Generate ``prompt`` with ``method`` (one of the page's methods) at ``width × height`` pixels (empty:
        twice the model's native size). ``steps``/``guidance`` empty: the model's defaults; ``seed`` empty: a
        random one (recorded in the metadata); ``images`` 1 to 4; ``preset`` a method preset; ``params`` the
        method's parameters and the settings max_batch, low_vram, decode_tile_area, previews, eta. ``controlnet``,
        ``loras`` and ``upscaler`` name add-ons the server offers (``hiresdiff serve --controlnet/--lora/--upscaler``;
        a ControlNet here serves methods that make their own condition, such as accdiffusion-v2). Yields
        ``([], {"status": …})`` while it runs, then ``(PNG files, {"status", "plan", "command", "metadata"})`` (a
        file's ``path`` in the metadata named ``file``)."""
        begin = time.perf_counter()
        try:
            req, values, shown = api_request(
                app,
                prompt,
                method,
                width,
                height,
                steps,
                guidance,
                seed,
                negative_prompt,
                scheduler,
                images,
                preset,
                params,
                {
                    "controlnet": controlnet,
                    "control_scale": control_scale,
                    "loras": loras,
                    "lora_scale": lora_scale,
                    "upscaler": upscaler,
                },
            )
        except HiresError as exc:
            raise fail(str(exc)) from None
        plan = ""
        with contextlib.closing(app.stream(req, threading.Event())) as events:
            for kind, value in events:
                if kind == "error":
                    raise fail(value)
                if kind == "stopped":
                    raise fail("stopped; nothing was written")
                if kind == "done":
                    paths = app._save(value)
                    meta = value.metadata
                    elapsed = f"{time.perf_counter() - begin:.1f} s"
                    info = {
                        "status": f"done in {elapsed} · {meta[0]['width']}×{meta[0]['height']}",
                        "plan": plan,
                        "files": [p.name for p in paths],
                        "command": command_line(app.pipe.model_name, req.method.name, meta[0]["prompt"], shown, values),
                        "metadata": no_file_objects(meta),
                    }
                    yield [file_data(p) for p in paths], info
                elif kind in ("plan", "step"):
                    plan = value if kind == "plan" else plan
                    yield [], {"status": value}

    gr.api(generate, api_name="generate", concurrency_limit=1, concurrency_id=MODEL_QUEUE)
