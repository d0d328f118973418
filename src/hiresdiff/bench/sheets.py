"""Contact sheets: per prompt, one row per method/preset/swept values and one column per size."""

from __future__ import annotations

import textwrap
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from hiresdiff.bench.plan import BenchPlan, Size
from hiresdiff.bench.records import IMAGES_DIR
from hiresdiff.bench.rows import Row
from hiresdiff.demo import contact_sheet
from hiresdiff.images import save_png

#: longest side of a thumbnail, pixels
THUMB = 256
#: width of the row-label cell, pixels
LABEL_WIDTH = 200
SHEETS_DIR = "sheets"


LINE_HEIGHT = 14


def text_tile(text: str, width: int, height: int = 0, chars: int = 30) -> Image.Image:
    """White tile with ``text`` wrapped to ``chars`` characters per line, tall enough for all lines."""
    lines = textwrap.wrap(text, max(chars, 8)) or [" "]
    tile = Image.new("RGB", (width, max(height, LINE_HEIGHT * len(lines) + 12)), "white")
    ImageDraw.Draw(tile).multiline_text((6, 6), "\n".join(lines), fill="black", font=ImageFont.load_default())
    return tile


def thumb_size(size: Size) -> tuple[int, int]:
    scale = THUMB / max(size.width, size.height)
    return max(1, round(size.width * scale)), max(1, round(size.height * scale))


def _thumbnail(out: Path, row: Row, prompt_index: int) -> tuple[Image.Image, str]:
    """The row's image of the prompt with the lowest seed (a grey tile when none is finished), and its label."""
    dims = thumb_size(row.group.size)
    mine = [r for r in row.records if r["prompt_index"] == prompt_index]
    if not mine:
        return Image.new("RGB", dims, (200, 200, 200)), f"{row.group.size.pixels} missing"
    record = min(mine, key=lambda r: r["seed"])
    with Image.open(out / IMAGES_DIR / record["group"] / record["image"]) as im:
        thumb = im.convert("RGB").resize(dims, Image.Resampling.LANCZOS)
    return thumb, f"{row.group.size.pixels} seed {record['seed']}"


def prompt_sheet(out: Path, plan: BenchPlan, rows: list[Row], prompt_index: int) -> Image.Image:
    """Prompt text on top; then per method/preset/sweep a labelled row of thumbnails, sizes left to right."""
    lines: dict[str, list[Row]] = {}
    for row in rows:
        lines.setdefault(row.group.label, []).append(row)
    strips = []
    for label, line in lines.items():
        cells = [_thumbnail(out, row, prompt_index) for row in line]
        tile = text_tile(label, LABEL_WIDTH, max(im.height for im, _ in cells))
        strips.append(contact_sheet([tile, *(im for im, _ in cells)], ["", *(text for _, text in cells)]))
    width = max(s.width for s in strips)
    header = text_tile(f"prompt {prompt_index}: {plan.prompts[prompt_index].text}", width, chars=width // 7)
    sheet = Image.new("RGB", (width, header.height + sum(s.height for s in strips)), "white")
    sheet.paste(header, (0, 0))
    y = header.height
    for strip in strips:
        sheet.paste(strip, (0, y))
        y += strip.height
    return sheet


def write_sheets(out: Path, plan: BenchPlan, rows: list[Row], count: int) -> list[Path]:
    """``sheets/prompt-NNNN.png`` for the first ``count`` prompts."""
    if not rows:
        return []
    return [
        save_png(prompt_sheet(out, plan, rows, i), out / SHEETS_DIR / f"prompt-{i:04d}.png")
        for i in range(min(count, len(plan.prompts)))
    ]
