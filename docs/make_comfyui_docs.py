"""Make the UI-format example workflows (``workflows/*-ui.json``) and the screenshot ``docs/comfyui-workflow.png``
from the API-format examples, with ComfyUI's own page: each example is loaded into the page of a running ComfyUI
(the node pack installed as a clone would be), laid out, and saved as the page saves workflows.

Run with ComfyUI's Python (playwright and Debian's chromium installed):
``$COMFY/venv/bin/python docs/make_comfyui_docs.py $COMFY/ComfyUI``
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from PIL import Image
from playwright.sync_api import sync_playwright

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from comfy_server import REPO, comfyui_server

CHROMIUM = "/usr/bin/chromium"
#: the example shown in the screenshot
SHOWN = "txt2img-4x-sdxl-api.json"


def main(checkout: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp, comfyui_server(checkout, Path(tmp)) as server:
        checkpoints = server.base / "models" / "checkpoints"
        checkpoints.mkdir(parents=True, exist_ok=True)
        (checkpoints / "sd_xl_base_1.0.safetensors").touch()  # listed by the loader (never loaded here)
        (server.base / "input").mkdir(exist_ok=True)
        Image.new("RGB", (64, 64)).save(server.base / "input" / "example.png")
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1800, "height": 1000})
            page.goto(server.url, wait_until="networkidle")
            page.wait_for_function("window.app && window.app.graph", timeout=60_000)
            page.wait_for_timeout(1500)
            page.keyboard.press("Escape")  # the first-run templates dialog
            for path in sorted((REPO / "workflows").glob("*-api.json")):
                page.evaluate("api => window.app.loadApiJson(api, 'hiresdiff')", json.loads(path.read_text()))
                page.wait_for_timeout(1000)
                page.evaluate(
                    """() => { window.app.graph.arrange(60); const c = window.app.canvas;
                    c.ds.scale = 0.75; c.ds.offset = [40, 80]; c.setDirty(true, true); }"""
                )
                page.wait_for_timeout(1500)
                graph = page.evaluate("() => window.app.graph.serialize()")
                ui = path.with_name(path.name.replace("-api.json", "-ui.json"))
                ui.write_text(json.dumps(graph, indent=2) + "\n")
                if path.name == SHOWN:
                    page.screenshot(path=str(REPO / "docs" / "comfyui-workflow.png"), clip={
                        "x": 60, "y": 60, "width": 1400, "height": 480})  # fmt: skip
                print(f"wrote {ui.relative_to(REPO)} ({len(graph['nodes'])} nodes)")
            browser.close()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
