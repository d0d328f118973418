"""The page: generate, watch every phase, compare, download — one generation at a time over one loaded model.

Layout: prompt and sampling inputs, an optional picture to upscale, and an "advanced" panel per method built from
its parameter dataclass (:mod:`hiresdiff.web.fields`). A run happens in a worker thread; the page streams its
plan, progress (phase k/K, step i/N, elapsed time) and each phase's preview as soon as it is decoded. Stop ends the
run between two steps. The result: the image(s), a before/after slider (native-size phase 1 against the final
image, both at the final size), the PNG with the same metadata as the CLI's, the equivalent ``hiresdiff generate``
command, and a history of this tab's results. Bad input, and a request whose estimated peak memory does not fit,
show the library's one-line message.

What a tab keeps between calls lives here, on the server, keyed by gradio's session hash (:class:`Sessions`):
gradio deep-copies ``gr.State`` values for every call, which a stop switch (or a lock, or the pipeline) cannot be.
The HTTP API (:mod:`hiresdiff.web.api`) runs through the same :meth:`WebApp.stream`.
"""

from __future__ import annotations

import contextlib
import queue
import shlex
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from hiresdiff.errors import HiresError, require
from hiresdiff.images import to_pil
from hiresdiff.memory import loaded_bytes
from hiresdiff.methods import METHODS
from hiresdiff.outputs import NumberedImage, save_numbered
from hiresdiff.pipeline import HiresPipeline, ModelFacts, validate_request
from hiresdiff.plan import budget, check_budget, describe_plan
from hiresdiff.web.addons import FORM as ADDON_FORM
from hiresdiff.web.addons import AddOns
from hiresdiff.web.fields import changed_values, method_fields

#: limits of a shared instance when none are given: (pixels per image, steps) on CUDA / on the CPU
DEFAULT_LIMITS = {"cuda": (8192 * 8192, 200), "cpu": (1024 * 1024, 50)}
#: generation settings a request may set next to its method's parameters (the ones the memory advice names);
#: the rest of what ``generate`` takes (input paths, ControlNet, LoRAs, pickle loading) stays off a shared server
SETTING_PARAMS = ("max_batch", "low_vram", "decode_tile_area", "previews", "eta")
#: how the memory advice spells a change here: the size as the page's boxes, settings as API ``params`` entries
PAGE_FLAGS = {
    "low_vram": "low_vram=true",
    "max_batch": "max_batch={v}",
    "decode_tile_area": "decode_tile_area={v}",
    "previews": "previews=false",
    "size": "width {width} × height {height}",
}
#: the gradio concurrency group of every event that runs the model: one run at a time, page and API together
MODEL_QUEUE = "model"
#: events that end a run (:meth:`WebApp.stream`)
FINAL = ("done", "stopped", "error")


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
    """What one browser tab has made since it opened (its PNGs' paths), and its stop switch."""

    history: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    running: bool = False


class Sessions:
    """The tabs' sessions by gradio's session hash; beyond ``limit`` the least recently used idle ones are dropped
    (a tab that closed without gradio's unload event must not hold memory for ever)."""

    def __init__(self, limit: int = 256) -> None:
        self.limit = limit
        self._items: OrderedDict[str, Session] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> Session:
        """The session of ``key``, made on first use."""
        with self._lock:
            session = self._items.pop(key, None) or Session()
            self._items[key] = session  # now the most recent
            idle = [k for k, s in self._items.items() if not s.running and k != key]
            for k in idle[: max(0, len(self._items) - self.limit)]:
                del self._items[k]
            return session

    def drop(self, key: str) -> None:
        """Forget ``key`` (its tab closed); a run it started stops at its next step."""
        with self._lock:
            session = self._items.pop(key, None)
        if session is not None:
            session.stop.set()

    def __len__(self) -> int:
        return len(self._items)


@dataclass
class Job:
    """A run in the worker thread and what it reports back."""

    events: queue.Queue = field(default_factory=queue.Queue)


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
        "max_batch": "--max-batch",
        "decode_tile_area": "--tile-area",
        "eta": "--eta",
    }
    argv = ["hiresdiff", "generate", prompt, "--model", model, "--method", method]
    if settings.get("image") is not None:
        argv += ["--image", "INPUT.png"]
    if settings.get("controlnet") is not None:
        argv += ["--controlnet", settings["controlnet"]]
        argv += ["--control-image", "CONTROL.png"] if settings.get("control_image") is not None else []
        argv += ["--control-scale", str(settings["control_scale"])] if "control_scale" in settings else []
    for path, scale in settings.get("loras", ()):
        argv += ["--lora", f"{path}:{scale}"]
    argv += ["--upscaler", settings["upscaler"]] if settings.get("upscaler") is not None else []
    for key, flag in flags.items():
        if settings.get(key) not in (None, ""):
            argv += [flag, str(settings[key])]
    argv += ["--low-vram"] if settings.get("low_vram") else []
    argv += ["--no-previews"] if settings.get("previews") is False else []
    for name, value in params.items():
        argv += ["--set", f"{name}={value}"]
    return shlex.join(argv)


class WebApp:
    """The page's logic over one :class:`HiresPipeline` (:func:`hiresdiff.web.page.build_page` lays it out).

    ``memory_check`` (``hiresdiff serve --skip-memory-check`` turns it off) refuses a request whose estimated
    peak memory exceeds what the loaded model can use, before it runs."""

    def __init__(
        self, pipe: HiresPipeline, out: Path, limits: Limits, *, memory_check: bool = True, addons: AddOns | None = None
    ) -> None:
        self.pipe, self.out, self.limits, self.memory_check = pipe, out, limits, memory_check
        self.addons = addons or AddOns()  # what ``hiresdiff serve --controlnet/--lora/--upscaler`` offers, by name
        self.lock = threading.Lock()  # one generation at a time on the model
        self.fields = {name: method_fields(m) for name, m in METHODS.items()}
        self.sessions = Sessions()

    # --- request ------------------------------------------------------------------------------------------
    def request(self, form: dict[str, Any], values: list[Any]) -> tuple[Any, dict[str, str], dict[str, Any]]:
        """Validate the page's form into a generation request (one-line errors), the ``--set`` values and the
        settings the command line shows."""
        method = form["method"]
        require(method in METHODS, f"unknown method {method!r}; choose one of: {', '.join(METHODS)}")
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
        size = (int(form["width"] or 0) or None, int(form["height"] or 0) or None)
        extras = self.addons.kwargs({key: form.get(key) for key in ADDON_FORM})  # names → this server's paths
        return self.validate(
            form["prompt"], method, *size, settings, params, image=form["image"], scale=form["scale"], extras=extras
        )

    def validate(
        self,
        prompt: str,
        method: str,
        width: int | None,
        height: int | None,
        settings: dict[str, Any],
        params: dict[str, str],
        *,
        image: Any = None,
        scale: float | None = None,
        extras: dict[str, Any] | None = None,
    ) -> tuple[Any, dict[str, str], dict[str, Any]]:
        """The request of ``prompt`` with ``settings`` and method ``params`` (``--set`` strings), checked by the
        library (one-line errors) and against this server's limits; with ``params`` and the settings the command
        line shows. With an ``image``, a ``scale`` replaces the size; ``extras``: the add-ons chosen
        (:meth:`AddOns.kwargs`: ControlNet, control image and scale, LoRAs, upscaler)."""
        prompt = (prompt or "").strip()
        require(bool(prompt), "type a prompt first")
        settings = {k: v for k, v in settings.items() if v is not None}
        kwargs: dict[str, Any] = {**settings, **params, **(extras or {})}
        if image is not None:
            kwargs.update(image=image, scale=scale or None)
            width, height = (None, None) if scale else (width, height)
        facts = ModelFacts.of_pipeline(self.pipe)
        req = validate_request(prompt, method, width, height, facts, **kwargs)
        s = req.settings
        self.limits.check(s.width, s.height, s.steps, s.batch_size)
        shown = {**settings, **(extras or {}), "width": s.width, "height": s.height, "image": image}
        if image is not None and scale:
            shown.update(scale=scale, width=None, height=None)
        return req, params, shown

    def _method_values(self, method: str, values: list[Any]) -> list[Any]:
        start = 0
        for name, fields in self.fields.items():
            if name == method:
                return values[start : start + len(fields)]
            start += len(fields)
        raise KeyError(method)

    def check_plan(self, req: Any) -> str:
        """The run plan's line (stages, FLOPs, estimated peak memory); with ``memory_check``, a one-line
        :class:`HiresError` naming what fits when the estimate exceeds the memory the model may use (the free
        memory plus the loaded pipeline's own weights, which the estimate counts too)."""
        ad = self.pipe.adapter
        b = budget(req, self.pipe.model_name, str(ad.device), ad.dtype, loaded=loaded_bytes(ad.pipe, ad.device))
        if self.memory_check:
            check_budget(b, req, self.pipe.model_name, ad.dtype, ad.pixel_grid, PAGE_FLAGS)
        return describe_plan(req, ad.native_size, ad.pixel_grid, b)[0]

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
                job.events.put(("plan", self.check_plan(req)))
                result = self.pipe.run(req, progress=False, callback=on_step, on_preview=on_preview)
            job.events.put(("done", result))
        except Stopped:
            job.events.put(("stopped", None))
        except HiresError as exc:
            job.events.put(("error", str(exc)))
        except Exception as exc:
            first = next((ln for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
            job.events.put(("error", f"{type(exc).__name__}: {first}"))

    def stream(self, req: Any, stop: threading.Event) -> Iterator[tuple[str, Any]]:
        """Run ``req`` in a worker thread and yield its events as they come: ``("plan", line)``, ``("step",
        text)``, ``("preview", image)``, then one of ``("done", result)``, ``("stopped", None)``, ``("error",
        line)``. Closing the iterator early (a closed tab, a cancelled API call) ends the run at its next step."""
        stop.clear()
        job = Job()
        worker = threading.Thread(target=self._work, args=(req, job, stop), daemon=True)
        worker.start()
        try:
            while True:
                kind, value = job.events.get()
                yield kind, value
                if kind in FINAL:
                    return
        finally:
            stop.set()
            worker.join()

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
        session.running = True
        previews: list[Image.Image] = []
        try:
            with contextlib.closing(self.stream(req, session.stop)) as events:
                for kind, value in events:
                    elapsed = f"{time.perf_counter() - begin:.1f} s"
                    if kind == "plan":
                        yield {"status": value}
                    elif kind == "step":
                        yield {"status": f"{value} · {elapsed}"}
                    elif kind == "preview":
                        previews.append(value)
                        yield {"status": f"phase {len(previews)} decoded · {elapsed}", "previews": list(previews)}
                    elif kind == "done":
                        yield self._finish(session, value, previews, params, shown, elapsed)
                    elif kind == "stopped":
                        yield {"status": f"stopped after {elapsed}; nothing was written", "error": ""}
                    else:
                        yield {"error": f"⚠ {value}", "status": ""}
        finally:
            session.running = False

    def _finish(
        self,
        session: Session,
        result: Any,
        previews: list[Image.Image],
        params: dict[str, str],
        shown: dict[str, Any],
        elapsed: str,
    ) -> dict[str, Any]:
        paths = self._save(result)
        final = result.images[0]
        before = (previews[0] if previews else final).resize(final.size, Image.Resampling.BICUBIC)
        meta = result.metadata[0]
        session.history.extend(str(path) for path in paths)
        return {
            "status": f"done in {elapsed} · {final.size[0]}×{final.size[1]}",
            "error": "",
            "result": list(result.images),
            "slider": (before, final),
            "download": [str(p) for p in paths],
            "command": command_line(self.pipe.model_name, meta["method"], meta["prompt"], shown, params),
            "history": [(path, Path(path).name) for path in session.history],
        }
