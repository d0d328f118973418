"""Offline demo: every method on a tiny random model, side by side in one contact sheet."""

from __future__ import annotations

import importlib.util
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from hiresdiff.images import save_png
from hiresdiff.methods import METHODS
from hiresdiff.models.builtins import BUILTIN_MODELS
from hiresdiff.ops.edges import OPENCV_INSTALL
from hiresdiff.pipeline import GenerationResult, generate

#: every registered method
DEMO_METHODS = tuple(METHODS)
DEMO_PROMPT = "a lighthouse on a cliff at sunset, highly detailed"
LABEL_HEIGHT = 24


def contact_sheet(images: list[Image.Image], labels: list[str], title: str = "") -> Image.Image:
    """Images in one row, each with its label above it, under an optional title line."""
    top = LABEL_HEIGHT if title else 0
    width = sum(im.width for im in images)
    height = max(im.height for im in images) + LABEL_HEIGHT + top
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    if title:
        draw.text((6, 5), title, fill="black", font=font)
    x = 0
    for im, label in zip(images, labels, strict=True):
        sheet.paste(im, (x, top + LABEL_HEIGHT))
        draw.text((x + 6, top + 5), label, fill="black", font=font)
        x += im.width
    return sheet


def _own_controlnet(method: str, model: str, folder: Path, seed: int) -> dict[str, str] | None:
    """A method that makes its own ControlNet conditions (accdiffusion-v2) runs with the tiny canny ControlNet of
    ``make-tiny``, written once into ``folder``; ``None`` when it cannot run here (OpenCV missing)."""
    if not METHODS[method].own_control:
        return {}
    if importlib.util.find_spec("cv2") is None:
        return None
    from hiresdiff.models.tiny_addons import save_tiny_addons

    net = folder / "controlnet-canny"
    if not net.exists():
        save_tiny_addons(model, folder, seed)
    return {"controlnet": str(net)}


def run_demo(
    out: Path, model: str = "tiny-sdxl", steps: int = 12, seed: int = 0, progress: bool = True
) -> tuple[Path, dict[str, GenerationResult]]:
    """Run :data:`DEMO_METHODS` (those made for the model's family) at twice the native size, write each image and
    ``contact_sheet.png`` to ``out``."""
    results: dict[str, GenerationResult] = {}
    info = BUILTIN_MODELS.get(model)  # a built-in model's family: the methods made for others are left out
    methods = [m for m in DEMO_METHODS if info is None or info.family in METHODS[m].families]
    with tempfile.TemporaryDirectory() as addons:
        for method in methods:
            extra = _own_controlnet(method, model, Path(addons), seed)
            if extra is None:
                print(f"demo: {method} left out (needs OpenCV: {OPENCV_INSTALL})")
                continue
            res = generate(DEMO_PROMPT, method=method, model=model, steps=steps, seed=seed, progress=progress, **extra)
            save_png(res.images[0], out / f"{method}.png", res.metadata[0])
            results[method] = res
    labels = [f"{m} ({r.seconds:.1f} s)" for m, r in results.items()]
    first = next(iter(results.values())).metadata[0]
    title = f'"{DEMO_PROMPT}" at {first["width"]}×{first["height"]} on {model} — random weights: noise is expected'
    sheet = contact_sheet([r.images[0] for r in results.values()], labels, title)
    return save_png(sheet, out / "contact_sheet.png"), results
