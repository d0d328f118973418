"""End to end in real ComfyUI: a server on 127.0.0.1 with the node pack (this repository, as a cloned
``custom_nodes`` folder) runs the example workflows of ``workflows/`` through its HTTP API.

The examples load SDXL with ComfyUI's checkpoint loader and encode prompts with its CLIP; here a test-only node
(``tests/comfy_e2e_nodes``) stands in for both with the seeded tiny SD twin (nothing can be downloaded), and the
sizes and steps are made small — the rest of each workflow (hiresdiff's nodes, ComfyUI's VAE decode, its image
saving) is the example as shipped. The server runs under this interpreter (ComfyUI's environment, with the
checkout named by ``$HIRESDIFF_COMFYUI``) and is always stopped. Skipped without ComfyUI unless
``HIRESDIFF_REQUIRE_COMFYUI=1``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from PIL import Image

from comfy_server import REPO, comfyui_server, get, post
from comfy_twins import NATIVE, comfy

pytestmark = pytest.mark.slow
#: how the examples' loaders are replaced: their outputs → the test twin's
STAND_INS = {("ckpt", 0): ["twin", 0], ("ckpt", 2): ["twin", 1], ("positive", 0): ["twin", 2],
             ("negative", 0): ["twin", 3]}  # fmt: skip


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    comfy()  # skips without ComfyUI
    checkout = Path(os.environ.get("HIRESDIFF_COMFYUI", ""))
    if not (checkout / "main.py").is_file():
        pytest.skip("HIRESDIFF_COMFYUI does not name a ComfyUI checkout")
    try:
        with comfyui_server(checkout, tmp_path_factory.mktemp("comfy")) as running:
            yield running
    except RuntimeError as error:
        pytest.fail(str(error))


def example(name: str, **changes: Any) -> dict[str, Any]:
    """An example workflow with its loaders replaced by the test twin and ``changes`` to the Hiresdiff Sample
    node's inputs."""
    workflow = json.loads((REPO / "workflows" / name).read_text())
    for node in ("ckpt", "positive", "negative"):
        del workflow[node]
    workflow["twin"] = {"class_type": "HiresdiffTestTwin", "inputs": {"seed": 0}}
    for node in workflow.values():
        for key, value in node["inputs"].items():
            if isinstance(value, list) and tuple(value) in STAND_INS:
                node["inputs"][key] = STAND_INS[tuple(value)]
    workflow["hiresdiff"]["inputs"].update({"steps": 3, "native_size": NATIVE, **changes})
    return workflow


def run(server: SimpleNamespace, workflow: dict[str, Any]) -> dict[str, Any]:
    """Queue ``workflow`` and return its history entry once it has finished."""
    prompt_id = post(f"{server.url}/prompt", {"prompt": workflow, "client_id": "hiresdiff-tests"})["prompt_id"]
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        entry = get(f"{server.url}/history/{prompt_id}").get(prompt_id)
        if entry and entry["status"].get("completed") is not None and entry["status"]["status_str"] != "running":
            return entry
        time.sleep(0.5)
    pytest.fail("the workflow did not finish:\n" + server.log.read_text()[-3000:])


def saved(server: SimpleNamespace, entry: dict[str, Any], node: str) -> list[tuple[int, int]]:
    """Sizes of the images a SaveImage node wrote."""
    files = entry["outputs"][node]["images"]
    return [Image.open(server.base / "output" / f["subfolder"] / f["filename"]).size for f in files]


def test_the_pack_loads_without_errors(server: SimpleNamespace) -> None:
    info = get(f"{server.url}/object_info/HiresdiffSample")["HiresdiffSample"]
    assert info["output"] == ["LATENT", "IMAGE"] and info["output_is_list"] == [False, True]
    assert "HiresdiffDemofusionParameters" in get(f"{server.url}/object_info")
    assert "IMPORT FAILED" not in server.log.read_text()


def test_text_to_image_4x(server: SimpleNamespace) -> None:
    """The 4× example: DemoFusion's phases as previews (each phase before the last, then the final image) and the
    final image decoded by ComfyUI's VAE at the target size."""
    side = 4 * NATIVE
    entry = run(server, example("txt2img-4x-sdxl-api.json", width=side, height=side))
    assert entry["status"]["status_str"] == "success", entry["status"]
    assert saved(server, entry, "save") == [(side, side)]
    assert saved(server, entry, "save_previews") == [(s, s) for s in (NATIVE, 2 * NATIVE, 3 * NATIVE, side)]


def test_upscaling_a_picture(server: SimpleNamespace) -> None:
    (server.base / "input").mkdir(exist_ok=True)
    Image.new("RGB", (NATIVE, NATIVE), (90, 140, 200)).save(server.base / "input" / "example.png")
    entry = run(server, example("upscale-image-sdxl-api.json", width=2 * NATIVE, height=2 * NATIVE))
    assert entry["status"]["status_str"] == "success", entry["status"]
    assert saved(server, entry, "save") == [(2 * NATIVE, 2 * NATIVE)]


def test_bad_input_shows_hiresdiffs_one_line(server: SimpleNamespace) -> None:
    """A size off the grid passes ComfyUI's validation (it does not check ``step``) and reaches the node: the run
    fails with hiresdiff's one line as the error dialog's message."""
    side = 2 * NATIVE + 4
    entry = run(server, example("txt2img-4x-sdxl-api.json", width=side, height=side))
    assert entry["status"]["status_str"] == "error"
    errors = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
    assert errors and errors[0]["exception_type"].endswith("HiresError")
    message = errors[0]["exception_message"].strip()
    assert "not a multiple of the latent grid" in message and "\n" not in message


def test_ui_workflows_are_the_api_examples_in_the_page(server: SimpleNamespace) -> None:
    """The UI-format examples (made by ``docs/make_comfyui_docs.py``) load in ComfyUI's page and are the same
    workflows as the API-format ones: the page turns each into the API prompt it would queue."""
    chromium = Path("/usr/bin/chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        if os.environ.get("HIRESDIFF_REQUIRE_COMFYUI") == "1":
            raise
        pytest.skip("playwright is not installed in ComfyUI's environment")
    if not chromium.exists():
        pytest.skip("no /usr/bin/chromium")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(chromium), args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(server.url, wait_until="networkidle")
            page.wait_for_function("window.app && window.app.graph", timeout=60_000)
            for ui in sorted((REPO / "workflows").glob("*-ui.json")):
                api = json.loads(ui.with_name(ui.name.replace("-ui.json", "-api.json")).read_text())
                page.evaluate("g => window.app.loadGraphData(g)", json.loads(ui.read_text()))
                queued = page.evaluate("async () => (await window.app.graphToPrompt()).output")
                assert sorted(n["class_type"] for n in queued.values()) == sorted(
                    n["class_type"] for n in api.values()
                ), ui.name
                sample = next(n["inputs"] for n in queued.values() if n["class_type"] == "HiresdiffSample")
                expected = next(n["inputs"] for n in api.values() if n["class_type"] == "HiresdiffSample")
                widgets = {k: v for k, v in expected.items() if not isinstance(v, list)}
                assert {k: sample[k] for k in widgets} == widgets, ui.name
        finally:
            browser.close()
