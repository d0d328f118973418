"""The page: generate, watch every phase, compare, download — one generation at a time over one loaded model.

Layout: prompt and sampling inputs, an optional picture to upscale, and an "advanced" panel per method built from
its parameter dataclass (:mod:`hiresdiff.web.fields`). A run happens in a worker thread; the page streams its
progress (phase k/K, step i/N, elapsed time) and each phase's preview as soon as it is decoded. Stop ends the run
between two steps. The result: the image(s), a before/after slider (native-size phase 1 against the final image,
both at the final size), the PNG with the same metadata as the CLI's, the equivalent ``hiresdiff generate``
command, and a history of this page's results. Bad input shows the library's one-line message.
"""

from __future__ import annotations

import queue
import shlex
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from hiresdiff.errors import HiresError, require
from hiresdiff.images import to_pil
from hiresdiff.methods import METHODS
from hiresdiff.outputs import NumberedImage, save_numbered
from hiresdiff.pipeline import HiresPipeline, ModelFacts, validate_request
from hiresdiff.schedulers import scheduler_names
from hiresdiff.web.fields import FieldSpec, changed_values, method_fields

#: limits of a shared instance when none are given: (pixels per image, steps) on CUDA / on the CPU
DEFAULT_LIMITS = {"cuda": (8192 * 8192, 200), "cpu": (1024 * 1024, 50)}


class Stopped(Exception):
    """Raised from the step callback when the page's Stop button was pressed."""


@dataclass
class Limits:
    """What one request on a shared page may ask for."""

    max_pixels: int
    max_steps: int

    def check(self, width: int, height: int, steps: int, batch: int) -> None:
        require(
            width * height <= self.max_pixels,
            f"{height}×{width} is above this server's limit of {self.max_pixels:,} pixels per image (--max-pixels)",
        )
        require(
            steps <= self.max_steps, f"{steps} steps are above this server's limit of {self.max_steps} (--max-steps)"
        )
        require(1 <= batch <= 4, f"batch must be 1 to 4 images, got {batch}")


@dataclass
class Session:
    """What one browser tab has made since it opened, and its stop switch."""

    history: list[tuple[Image.Image, str]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    running: bool = False


@dataclass
class Job:
    """A run in the worker thread and what it reports back."""

    events: queue.Queue = field(default_factory=queue.Queue)
    previews: list[Image.Image] = field(default_factory=list)
    status: str = "starting…"


def command_line(model: str, method: str, prompt: str, settings: dict[str, Any], params: dict[str, str]) -> str:
    """The ``hiresdiff generate`` command that makes the same image (the input picture as ``INPUT.png``)."""
    flags = {
        "negative_prompt": "--negative",
        "width": "--width",
        "height": "--height",
        "scale": "--scale",
        "steps": "--steps",
        "guidance": "--guidance",
        "scheduler": "--scheduler",
        "seed": "--seed",
        "num_images_per_prompt": "--batch",
        "preset": "--preset",
        "strength": "--strength",
    }
    argv = ["hiresdiff", "generate", prompt, "--model", model, "--method", method]
    if settings.get("image") is not None:
        argv += ["--image", "INPUT.png"]
    for key, flag in flags.items():
        if settings.get(key) not in (None, ""):
            argv += [flag, str(settings[key])]
    for name, value in params.items():
        argv += ["--set", f"{name}={value}"]
    return shlex.join(argv)


class WebApp:
    """The page's logic over one :class:`HiresPipeline`; :meth:`build` makes the gradio Blocks."""

    def __init__(self, pipe: HiresPipeline, out: Path, limits: Limits) -> None:
        self.pipe, self.out, self.limits = pipe, out, limits
        self.lock = threading.Lock()  # one generation at a time on the model
        self.fields = {name: method_fields(m) for name, m in METHODS.items()}

    # --- request ------------------------------------------------------------------------------------------
    def request(self, form: dict[str, Any], values: list[Any]) -> tuple[Any, dict[str, str], dict[str, Any]]:
        """Validate the form into a generation request (one-line errors), the ``--set`` values and settings."""
        method = form["method"]
        require(method in METHODS, f"unknown method {method!r}")
        params = changed_values(self.fields[method], self._method_values(method, values))
        for key, label in (("steps", "Steps"), ("guidance", "Guidance"), ("batch", "Images")):
            require(form[key] is not None, f"{label} is empty: type a number")
        seed = None if form["random_seed"] else int(form["seed"] or 0)
        settings = {
            "negative_prompt": form["negative"] or None,
            "steps": int(form["steps"]),
            "guidance": float(form["guidance"]),
            "scheduler": form["scheduler"],
            "seed": seed,
            "num_images_per_prompt": int(form["batch"]),
            "preset": form["preset"] or None,
            "strength": (form["strength"] or None) if form["image"] is not None else None,  # 0: the method's own
        }
        settings = {k: v for k, v in settings.items() if v is not None}
        ad = self.pipe.adapter
        kwargs: dict[str, Any] = {**settings, **params}
        size = {"width": int(form["width"] or 0) or None, "height": int(form["height"] or 0) or None}
        if form["image"] is not None:
            kwargs.update(image=form["image"], scale=form["scale"] or None)
            size = {"width": None, "height": None} if form["scale"] else size
        prompt = (form["prompt"] or "").strip()
        require(bool(prompt), "type a prompt first")
        facts = ModelFacts(ad.native_size, ad.pixel_grid, ad.family, ad.sampling_defaults)
        req = validate_request(prompt, method, size["width"], size["height"], facts, **kwargs)
        s = req.settings
        self.limits.check(s.width, s.height, s.steps, s.batch_size)
        shown = {**settings, "width": s.width, "height": s.height, "image": form["image"]}
        if form["image"] is not None and form["scale"]:
            shown.update(scale=form["scale"], width=None, height=None)
        return req, params, shown

    def _method_values(self, method: str, values: list[Any]) -> list[Any]:
        start = 0
        for name, fields in self.fields.items():
            if name == method:
                return values[start : start + len(fields)]
            start += len(fields)
        raise KeyError(method)

    # --- running ------------------------------------------------------------------------------------------
    def _work(self, req: Any, job: Job, stop: threading.Event) -> None:
        def on_step(name: str, step: int, total: int) -> None:
            if stop.is_set():
                raise Stopped
            job.events.put(("step", f"{name} · step {step}/{total}"))

        def on_preview(images: torch.Tensor) -> None:
            job.events.put(("preview", to_pil(images[:1])[0]))

        try:
            with self.lock:
                result = self.pipe.run(req, progress=False, callback=on_step, on_preview=on_preview)
            job.events.put(("done", result))
        except Stopped:
            job.events.put(("stopped", None))
        except HiresError as exc:
            job.events.put(("error", str(exc)))
        except Exception as exc:
            first = next((ln for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
            job.events.put(("error", f"{type(exc).__name__}: {first}"))

    def _save(self, result: Any) -> list[Path]:
        """Each final image as a PNG carrying the CLI's metadata, under the output folder's next free ``NNN-``
        index (claimed race-free: tabs, API clients and CLI runs sharing the folder never overwrite each other)."""
        items = [
            NumberedImage(f"{meta['method']}-seed{meta['seed']}", img, meta)
            for img, meta in zip(result.images, result.metadata, strict=True)
        ]
        return save_numbered(self.out, items)

    def generate(self, session: Session, form: dict[str, Any], values: list[Any]) -> Iterator[dict[str, Any]]:
        """Validate, run, and stream ``{status, previews, result, …}`` updates (a generator for gradio)."""
        begin = time.perf_counter()
        try:
            req, params, shown = self.request(form, values)
        except HiresError as exc:
            yield {"error": f"⚠ {exc}"}
            return
        session.stop.clear()
        session.running = True
        job = Job()
        worker = threading.Thread(target=self._work, args=(req, job, session.stop), daemon=True)
        worker.start()
        try:
            while True:
                kind, value = job.events.get()
                elapsed = f"{time.perf_counter() - begin:.1f} s"
                if kind == "step":
                    yield {"status": f"{value} · {elapsed}"}
                elif kind == "preview":
                    job.previews.append(value)
                    yield {"status": f"phase {len(job.previews)} decoded · {elapsed}", "previews": list(job.previews)}
                elif kind == "done":
                    yield self._finish(session, value, job, params, shown, elapsed)
                    return
                elif kind == "stopped":
                    yield {"status": f"stopped after {elapsed}; nothing was written", "error": ""}
                    return
                else:
                    yield {"error": f"⚠ {value}", "status": ""}
                    return
        finally:
            session.stop.set()  # a closed page or a cancelled event ends the run at its next step
            worker.join()
            session.running = False

    def _finish(
        self, session: Session, result: Any, job: Job, params: dict[str, str], shown: dict[str, Any], elapsed: str
    ) -> dict[str, Any]:
        paths = self._save(result)
        final = result.images[0]
        before = (job.previews[0] if job.previews else final).resize(final.size, Image.Resampling.BICUBIC)
        meta = result.metadata[0]
        command = command_line(self.pipe.model_name, meta["method"], meta["prompt"], shown, params)
        session.history.extend((img, str(path)) for img, path in zip(result.images, paths, strict=True))
        return {
            "status": f"done in {elapsed} · {final.size[0]}×{final.size[1]}",
            "error": "",
            "result": list(result.images),
            "slider": (before, final),
            "download": [str(p) for p in paths],
            "command": command,
            "history": [(img, Path(path).name) for img, path in session.history],
        }

    def build(self) -> Any:
        from hiresdiff.web.page import build_page

        return build_page(self, scheduler_names())


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
