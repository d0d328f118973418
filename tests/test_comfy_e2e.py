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
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from PIL import Image

from comfy_twins import NATIVE, comfy

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
#: how the examples' loaders are replaced: their outputs → the test twin's
STAND_INS = {("ckpt", 0): ["twin", 0], ("ckpt", 2): ["twin", 1], ("positive", 0): ["twin", 2],
             ("negative", 0): ["twin", 3]}  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def _post(url: str, data: dict[str, Any]) -> Any:
    request = urllib.request.Request(url, json.dumps(data).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    comfy()  # skips without ComfyUI
    checkout = Path(os.environ.get("HIRESDIFF_COMFYUI", ""))
    if not (checkout / "main.py").is_file():
        pytest.skip("HIRESDIFF_COMFYUI does not name a ComfyUI checkout")
    base = tmp_path_factory.mktemp("comfy")
    nodes = base / "custom_nodes"
    nodes.mkdir()
    (nodes / "hiresdiff").symlink_to(REPO, target_is_directory=True)  # as `git clone` into custom_nodes would
    (nodes / "hiresdiff_test").symlink_to(REPO / "tests" / "comfy_e2e_nodes", target_is_directory=True)
    port = _free_port()
    log = (base / "server.log").open("w")
    command = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
               "--disable-auto-launch", "--base-directory", str(base)]  # fmt: skip
    proc = subprocess.Popen(command, cwd=checkout, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                _get(f"{url}/system_stats")
                break
            except (urllib.error.URLError, ConnectionError, OSError):
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail("ComfyUI did not start:\n" + (base / "server.log").read_text()[-3000:])
                time.sleep(1)
        yield SimpleNamespace(url=url, base=base, log=base / "server.log")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


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
    prompt_id = _post(f"{server.url}/prompt", {"prompt": workflow, "client_id": "hiresdiff-tests"})["prompt_id"]
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        entry = _get(f"{server.url}/history/{prompt_id}").get(prompt_id)
        if entry and entry["status"].get("completed") is not None and entry["status"]["status_str"] != "running":
            return entry
        time.sleep(0.5)
    pytest.fail("the workflow did not finish:\n" + server.log.read_text()[-3000:])


def saved(server: SimpleNamespace, entry: dict[str, Any], node: str) -> list[tuple[int, int]]:
    """Sizes of the images a SaveImage node wrote."""
    files = entry["outputs"][node]["images"]
    return [Image.open(server.base / "output" / f["subfolder"] / f["filename"]).size for f in files]


def test_the_pack_loads_without_errors(server: SimpleNamespace) -> None:
    info = _get(f"{server.url}/object_info/HiresdiffSample")["HiresdiffSample"]
    assert info["output"] == ["LATENT", "IMAGE"] and info["output_is_list"] == [False, True]
    assert "HiresdiffDemofusionParameters" in _get(f"{server.url}/object_info")
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
