"""A ComfyUI server on 127.0.0.1 with hiresdiff's node pack (this repository, linked into ``custom_nodes`` as a
clone would be) and the test-only twin node — for the end-to-end tests and the docs script
(``docs/make_comfyui_docs.py``). It runs under the current interpreter (ComfyUI's environment) and is always
stopped."""

from __future__ import annotations

import contextlib
import json
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

REPO = Path(__file__).resolve().parents[1]


def get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def post(url: str, data: dict[str, Any]) -> Any:
    request = urllib.request.Request(url, json.dumps(data).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def comfyui_server(checkout: Path, base: Path, timeout: float = 180) -> Iterator[SimpleNamespace]:
    """Start ComfyUI from ``checkout`` with ``base`` as its base directory; yields ``url``, ``base``, ``log``.
    ``RuntimeError`` (with the log's end) when it does not come up."""
    nodes = base / "custom_nodes"
    nodes.mkdir(parents=True, exist_ok=True)
    for name, target in (("hiresdiff", REPO), ("hiresdiff_test", REPO / "tests" / "comfy_e2e_nodes")):
        if not (nodes / name).exists():
            (nodes / name).symlink_to(target, target_is_directory=True)
    port = _free_port()
    log_path = base / "server.log"
    command = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
               "--disable-auto-launch", "--base-directory", str(base)]  # fmt: skip
    with log_path.open("w") as log:
        proc = subprocess.Popen(command, cwd=checkout, stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    get(f"{url}/system_stats")
                    break
                except (urllib.error.URLError, ConnectionError, OSError):
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError("ComfyUI did not start:\n" + log_path.read_text()[-3000:]) from None
                    time.sleep(1)
            yield SimpleNamespace(url=url, base=base, log=log_path)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
