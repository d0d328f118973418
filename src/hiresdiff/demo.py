"""Offline demo: every method on a tiny random model, side by side in one contact sheet."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from hiresdiff.images import save_png
from hiresdiff.pipeline import GenerationResult, generate

DEMO_METHODS = ("direct", "resize", "multidiffusion", "demofusion")
DEMO_PROMPT = "a lighthouse on a cliff at sunset, highly detailed"
LABEL_HEIGHT = 24


def contact_sheet(images: list[Image.Image], labels: list[str]) -> Image.Image:
    """Images in one row, each with its label above it."""
    width = sum(im.width for im in images)
    height = max(im.height for im in images) + LABEL_HEIGHT
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    x = 0
    for im, label in zip(images, labels, strict=True):
        sheet.paste(im, (x, LABEL_HEIGHT))
        draw.text((x + 6, 5), label, fill="black", font=font)
        x += im.width
    return sheet


def run_demo(
    out: Path, model: str = "tiny-sdxl", steps: int = 12, seed: int = 0, progress: bool = True
) -> tuple[Path, dict[str, GenerationResult]]:
    """Run :data:`DEMO_METHODS` at twice the native size, write each image and ``contact_sheet.png`` to ``out``."""
    results: dict[str, GenerationResult] = {}
    for method in DEMO_METHODS:
        res = generate(DEMO_PROMPT, method=method, model=model, steps=steps, seed=seed, progress=progress)
        save_png(res.images[0], out / f"{method}.png", res.metadata[0])
        results[method] = res
    labels = [f"{m} ({r.seconds:.1f} s)" for m, r in results.items()]
    sheet = contact_sheet([r.images[0] for r in results.values()], labels)
    return save_png(sheet, out / "contact_sheet.png"), results
