"""An unreachable hub stops a hub id at once with one line; cached models, built-ins and folders never probe it."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from huggingface_hub import constants

import hiresdiff.pipeline as pipeline_mod
from hiresdiff.cli import main
from hiresdiff.errors import HiresError
from hiresdiff.models import loading

HUB_ID = "someone/some-model"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _use_endpoint(monkeypatch: pytest.MonkeyPatch, endpoint: str) -> None:
    """Point huggingface_hub (probe and downloads) at ``endpoint``, as ``HF_ENDPOINT`` at start-up would."""
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")


@pytest.fixture(autouse=True)
def online(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Online (conftest sets HF_HUB_OFFLINE), no proxy, an empty hub cache, no remembered probe, no model work."""
    for name in ("HF_HUB_OFFLINE", "HIRESDIFF_HUB_TIMEOUT", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setattr(loading, "_PROBES", {})
    monkeypatch.setattr(pipeline_mod.HiresPipeline, "from_model", lambda *a, **k: pytest.fail("a model was loaded"))
    pipeline_mod._CACHE.clear()


@pytest.fixture
def closed_endpoint(monkeypatch: pytest.MonkeyPatch) -> str:
    """A hub endpoint on a local port nobody listens on (connection refused)."""
    endpoint = f"http://127.0.0.1:{_free_port()}"
    _use_endpoint(monkeypatch, endpoint)
    return endpoint


@pytest.fixture
def no_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loading, "hub_unreachable", lambda: pytest.fail("the hub was probed"))


@pytest.fixture
def silent_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """An endpoint that accepts TCP connections (kernel backlog) but never answers a request."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        _use_endpoint(monkeypatch, f"http://127.0.0.1:{server.getsockname()[1]}")
        yield server


def _generate(capsys: pytest.CaptureFixture[str], tmp_path: Path, *model: str) -> tuple[int, str, float]:
    """``hiresdiff generate "a cat"`` → (exit code, its one stderr line, seconds taken)."""
    begin = time.perf_counter()
    code = main(["generate", "a cat", *model, "--out", str(tmp_path / "out"), "--quiet"])
    seconds = time.perf_counter() - begin
    err = capsys.readouterr().err.strip()
    assert err.startswith("hiresdiff: ") and "\n" not in err and "Traceback" not in err, err
    assert len(err) < 300, err
    return code, err, seconds


def test_default_model_with_unreachable_hub_stops_at_once(capsys, tmp_path, closed_endpoint) -> None:
    code, err, seconds = _generate(capsys, tmp_path)
    assert code == 2 and seconds < 8
    assert pipeline_mod.DEFAULT_MODEL in err and "(the default --model)" in err
    assert "127.0.0.1 is unreachable (Connection refused)" in err
    assert "HF_HUB_OFFLINE=1" in err and "--model a local folder" in err and "tiny-sdxl" in err


def test_explicit_hub_id_with_failing_dns_stops_at_once(capsys, tmp_path, monkeypatch) -> None:
    _use_endpoint(monkeypatch, "https://hub.invalid")

    def no_dns(address: tuple[str, int], *args: object, **kwargs: object) -> socket.socket:
        assert address == ("hub.invalid", 443)
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "create_connection", no_dns)
    code, err, seconds = _generate(capsys, tmp_path, "--model", HUB_ID)
    assert code == 2 and seconds < 8
    assert f"hub model {HUB_ID!r}:" in err and "default" not in err
    assert "hub.invalid is unreachable (DNS lookup failed)" in err and "HF_HUB_OFFLINE=1" in err


def test_hub_that_accepts_but_never_answers_stops_after_the_timeout(capsys, tmp_path, monkeypatch, silent_server):
    """The probe passes (the port is open) but requests time out: no retries, one short line."""
    monkeypatch.setenv("HIRESDIFF_HUB_TIMEOUT", "0.5")
    assert loading.hub_unreachable() is None
    code, err, seconds = _generate(capsys, tmp_path, "--model", HUB_ID)
    assert code == 2 and seconds < 8
    assert f"cannot fetch model_index.json of hub model {HUB_ID!r} (" in err and "HF_HUB_OFFLINE=1" in err


def test_offline_builtin_and_folder_never_probe(capsys, tmp_path, monkeypatch, no_probe) -> None:
    assert loading.resolve_model("tiny-sdxl").source == "builtin"
    folder = tmp_path / "model"
    for name, config in {
        "model_index.json": {"_class_name": "StableDiffusionPipeline"},
        "unet/config.json": {"sample_size": 16},
        "vae/config.json": {"block_out_channels": [8, 8, 8, 8]},
    }.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(json.dumps(config))
    assert loading.resolve_model(str(folder)).source == "folder"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, err, _ = _generate(capsys, tmp_path)
    assert code == 2 and "not in the local cache" in err and "HF_HUB_OFFLINE is set" in err


def test_cached_hub_model_resolves_without_probe(tmp_path, monkeypatch, closed_endpoint, no_probe) -> None:
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = Path(constants.HF_HUB_CACHE) / "models--someone--some-model"
    snapshot = repo / "snapshots" / revision
    for name, config in {
        "model_index.json": {"_class_name": "StableDiffusionXLPipeline"},
        "unet/config.json": {"sample_size": 32},
        "vae/config.json": {"block_out_channels": [8, 8, 8, 8]},
    }.items():
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        (snapshot / name).write_text(json.dumps(config))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    spec = loading.resolve_model(HUB_ID)
    assert (spec.source, spec.family, spec.native_size) == ("hub", "sdxl", 256)


def test_reachable_endpoint_passes_and_is_probed_once(monkeypatch, silent_server) -> None:
    calls: list[tuple[str, int]] = []
    real = socket.create_connection
    monkeypatch.setattr(socket, "create_connection", lambda address, timeout: calls.append(address) or real(address))
    assert loading.hub_unreachable() is None
    assert loading.hub_unreachable() is None
    assert calls == [silent_server.getsockname()]


def test_timeout_env_bounds_a_hanging_lookup(monkeypatch, closed_endpoint) -> None:
    release = threading.Event()
    timeouts: list[float] = []

    def hang(address: tuple[str, int], timeout: float) -> socket.socket:
        timeouts.append(timeout)
        release.wait(10)
        raise OSError("released")

    monkeypatch.setattr(socket, "create_connection", hang)
    monkeypatch.setenv("HIRESDIFF_HUB_TIMEOUT", "0.5")
    begin = time.perf_counter()
    try:
        assert loading.hub_unreachable() == "127.0.0.1 is unreachable (no answer within 0.5 s)"
    finally:
        release.set()
    assert time.perf_counter() - begin < 2 and timeouts == [0.5]


@pytest.mark.parametrize("value", ["soon", "0", "-1", "nan"])
def test_bad_timeout_env_is_one_line(monkeypatch, value: str) -> None:
    monkeypatch.setenv("HIRESDIFF_HUB_TIMEOUT", value)
    with pytest.raises(HiresError, match="HIRESDIFF_HUB_TIMEOUT must be a positive number of seconds"):
        loading.hub_unreachable()


def test_probe_goes_to_the_proxy_unless_bypassed(monkeypatch) -> None:
    _use_endpoint(monkeypatch, "https://hub.invalid")
    monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{_free_port()}")
    assert loading.hub_unreachable() == "the proxy 127.0.0.1 is unreachable (Connection refused)"
    monkeypatch.setattr(loading, "_PROBES", {})
    monkeypatch.setenv("NO_PROXY", "hub.invalid")
    calls: list[tuple[str, int]] = []

    def record(address: tuple[str, int], timeout: float) -> socket.socket:
        calls.append(address)
        raise ConnectionRefusedError(111, "Connection refused")

    monkeypatch.setattr(socket, "create_connection", record)
    assert loading.hub_unreachable() == "hub.invalid is unreachable (Connection refused)"
    assert calls == [("hub.invalid", 443)]
