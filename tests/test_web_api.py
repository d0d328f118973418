"""The web page's HTTP API (``/generate``) through ``gradio_client`` against a real ``hiresdiff serve`` process.

One server over tiny-sdxl for the module, started as a subprocess so that its log (stdout and stderr) can be read:
a valid call writes exactly one PNG into ``--out``, five concurrent submissions all finish, bad input comes back as
hiresdiff's one-line message with no traceback in the server's log, a prompt that looks like a path or a shell
command changes nothing outside ``--out``, and the server keeps gradio's files in a folder of its own that it
removes when it stops. No browser is needed: these tests always run (gradio is a test dependency). The unit tests
below them need no server: the address check, the API's parameter checks, the tabs' sessions, the memory check.
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from hiresdiff.cli import build_parser, main
from hiresdiff.errors import HiresError
from hiresdiff.images import read_png_settings
from hiresdiff.web.api import split_params
from hiresdiff.web.app import Limits, Session, Sessions, WebApp
from hiresdiff.web.cli import check_address

#: longest wait for the server to load tiny-sdxl and listen on a slow shared 2-core CPU
START_TIMEOUT_S = 180.0
#: a valid small request: 256² (tiny-sdxl's native size), direct, two steps
SMALL = {"method": "direct", "width": 256, "height": 256, "steps": 2}
MAX_STEPS = 10


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ApiServer:
    """A ``hiresdiff serve`` subprocess: its address, ``--out``, log file and the temp folder it was given."""

    url: str
    out: Path
    log: Path
    system_temp: Path
    process: subprocess.Popen

    def pngs(self) -> set[Path]:
        return set(self.out.glob("*.png"))

    def gradio_in_system_temp(self) -> list[Path]:
        """What gradio put into the system temp folder (its default ``gradio/`` folder; torch's caches aside)."""
        return [p for p in self.system_temp.iterdir() if "gradio" in p.name]

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> int:
        """SIGTERM (what a service manager sends) and wait; the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return int(self.process.returncode)


def _wait_listening(server: ApiServer) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if server.process.poll() is not None:
            pytest.fail(f"hiresdiff serve exited with {server.process.returncode}:\n{server.log_text()[-3000:]}")
        try:
            with urllib.request.urlopen(server.url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            server.stop()
            pytest.fail(f"hiresdiff serve did not answer in {START_TIMEOUT_S} s:\n{server.log_text()[-3000:]}")
        time.sleep(0.5)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of this module's own: ``out/`` for the server, ``temp/`` as its system temp folder, ``logs/``."""
    return tmp_path_factory.mktemp("web-api")


@pytest.fixture(scope="module")
def server(root: Path) -> Iterator[ApiServer]:
    pytest.importorskip("gradio_client")
    out, temp, logs = root / "out", root / "temp", root / "logs"
    temp.mkdir()
    logs.mkdir()
    port = _free_port()
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TMPDIR": str(temp),  # where gradio would put its files by default: it must stay empty
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "2",
        "GRADIO_ANALYTICS_ENABLED": "False",
    }
    env.pop("GRADIO_TEMP_DIR", None)
    log = logs / "server.log"
    argv = [sys.executable, "-m", "hiresdiff", "serve", "--model", "tiny-sdxl", "--port", str(port), "--out", str(out)]
    argv += ["--max-steps", str(MAX_STEPS)]
    from hiresdiff.models.tiny_addons import save_tiny_addons

    _, lora, canny = save_tiny_addons("tiny-sdxl", root / "addons")  # offered by name (test_api_add_ons_…)
    argv += ["--lora", f"detail={lora}", "--controlnet", f"canny={canny}"]
    with log.open("wb") as sink:
        process = subprocess.Popen(argv, stdout=sink, stderr=subprocess.STDOUT, env=env, cwd=root)
    srv = ApiServer(f"http://127.0.0.1:{port}/", out, log, temp, process)
    try:
        _wait_listening(srv)
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def client(server: ApiServer, tmp_path: Path) -> Any:
    """A gradio_client on the server, downloading into this test's own folder."""
    from gradio_client import Client

    return Client(server.url, verbose=False, download_files=str(tmp_path / "downloads"))


def test_api_describes_one_named_typed_endpoint(client: Any) -> None:
    """``/generate`` is the API: typed parameters; the page's own events are not offered."""
    info = client.view_api(return_format="dict", print_info=False)
    assert list(info["named_endpoints"]) == ["/generate"]
    assert not info["unnamed_endpoints"]
    params = {p["parameter_name"]: p for p in info["named_endpoints"]["/generate"]["parameters"]}
    assert list(params)[:4] == ["prompt", "method", "width", "height"]
    assert params["prompt"]["python_type"]["type"] == "str" and not params["prompt"]["parameter_has_default"]
    assert "int" in params["steps"]["python_type"]["type"]
    assert params["method"]["parameter_default"] == "demofusion"


def test_api_generation_writes_exactly_one_png_into_out(client: Any, server: ApiServer) -> None:
    """A 256² two-step direct run: one new PNG in ``--out`` with the CLI's metadata; the client downloads the same
    bytes; ``info`` carries the plan and a ``hiresdiff generate`` command that parses back to the request."""
    before = server.pngs()
    files, info = client.predict("a red fox in the snow", **SMALL, seed=5, api_name="/generate")
    new = server.pngs() - before
    assert len(new) == 1, sorted(p.name for p in new)
    written = new.pop()
    assert len(files) == 1 and Path(files[0]).read_bytes() == written.read_bytes()
    with Image.open(written) as img:
        assert img.format == "PNG" and img.size == (256, 256)
    meta = read_png_settings(written)
    assert (meta["method"], meta["steps"], meta["seed"], meta["prompt"]) == ("direct", 2, 5, "a red fox in the snow")
    assert info["files"] == [written.name] and info["status"].startswith("done in")
    assert info["plan"].startswith("plan: direct 256×256") and "est. peak" in info["plan"]
    args = build_parser().parse_args(shlex.split(info["command"])[1:])
    assert (args.method, args.width, args.steps, args.seed) == ("direct", 256, 2, 5)
    assert not server.gradio_in_system_temp(), "gradio wrote into the system temp folder"
    caches = [p for p in server.out.iterdir() if p.is_dir()]
    assert len(caches) == 1 and caches[0].name.startswith(".gradio-"), caches


def test_api_five_concurrent_submissions_all_finish(client: Any, server: ApiServer) -> None:
    """Five clients submitting at once: every job finishes with its own PNG (the queue runs them in turn)."""
    from gradio_client import Client

    before = server.pngs()
    clients = [client] + [Client(server.url, verbose=False, download_files=client.output_dir) for _ in range(4)]
    jobs = [
        c.submit(f"a lighthouse, take {i}", **SMALL, seed=100 + i, api_name="/generate") for i, c in enumerate(clients)
    ]
    results = [job.result(timeout=300) for job in jobs]
    new = server.pngs() - before
    assert len(new) == 5
    names = [name for _, info in results for name in info["files"]]
    assert sorted(names) == sorted(p.name for p in new)
    assert sorted(read_png_settings(p)["seed"] for p in new) == [100, 101, 102, 103, 104]
    assert all(job.status().code.name == "FINISHED" for job in jobs)


BAD_INPUT = [
    ({"width": 250}, "not a multiple of the latent grid"),
    ({"width": "wide"}, "width must be a whole number"),
    ({"height": -256}, "height must be a positive number of pixels"),
    ({"width": 4096, "height": 4096}, "above the limit"),
    ({"steps": 0}, "steps must be a positive integer"),
    ({"steps": MAX_STEPS + 1}, f"above this server's limit of {MAX_STEPS}"),
    ({"steps": 2.5}, "steps must be a whole number"),
    ({"seed": -1}, "seed must be an integer in [0, 2^63)"),
    ({"seed": 2**64}, "seed must be an integer in [0, 2^63)"),
    ({"seed": "lucky"}, "seed must be a whole number"),
    ({"method": "nope"}, "unknown method 'nope'; choose one of: direct"),
    ({"method": None}, "unknown method None"),
    ({"guidance": "high"}, "guidance must be a number"),
    ({"images": 9}, "batch must be 1 to 4"),
    ({"scheduler": "fastest"}, "fastest"),
    ({"params": {"image": "/etc/passwd"}}, "has no parameter 'image'"),
    ({"params": "sigma=1"}, "params must be an object"),
    ({"params": {"low_vram": "yes"}}, "low_vram must be true or false"),
    ({"method": "demofusion", "width": 512, "height": 512, "params": {"sigma": -1}}, "sigma"),
    ({"prompt": "   "}, "type a prompt first"),
]


def test_api_bad_input_returns_one_line_and_logs_no_traceback(client: Any, server: ApiServer) -> None:
    """Each bad size, step count, seed, method or parameter comes back as hiresdiff's one-line message (gradio's
    ``gr.Error``, which reaches the client as it is); nothing is written and the server log holds no traceback."""
    from gradio_client.exceptions import AppError

    before = server.pngs()
    log_start = len(server.log_text())
    for changes, message in BAD_INPUT:
        kwargs: dict[str, Any] = {"prompt": "a red fox", **SMALL, **changes}
        with pytest.raises(AppError) as info:
            client.predict(**kwargs, api_name="/generate")
        text = str(info.value)
        assert message in text, (changes, text)
        assert "\n" not in text and "Traceback" not in text and "upstream Gradio app" not in text, text
    assert server.pngs() == before
    log = server.log_text()[log_start:]
    assert "Traceback" not in log and "Error" not in log, log[-3000:]


def test_api_prompt_like_a_path_or_shell_command_changes_nothing_outside_out(
    client: Any, server: ApiServer, root: Path, tmp_path: Path
) -> None:
    """A prompt made of a relative path, a command substitution and a ``rm -rf`` is only text: it lands in the
    PNG's metadata as typed; the one new file is a PNG inside ``--out``; no file appears, changes or goes anywhere
    else under the test's folders."""
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("keep")
    canary = tmp_path / "canary"
    prompt = f"../../{victim.name}/x.png; $(touch {canary}) `touch {canary}` && rm -rf {victim} > /etc/passwd"

    def snapshot() -> dict[Path, tuple[int, int]]:
        files = [*root.rglob("*"), *tmp_path.rglob("*")]
        skip = (server.out, server.log, tmp_path / "downloads")
        return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in files if p.is_file() and not _under(p, skip)}

    outside, before = snapshot(), server.pngs()
    everything_in_out = set(server.out.rglob("*"))
    _, info = client.predict(prompt, **SMALL, api_name="/generate")
    new = server.pngs() - before
    assert len(new) == 1 and read_png_settings(next(iter(new)))["prompt"] == prompt
    assert {p for p in server.out.rglob("*") if p.parent == server.out} - everything_in_out == new
    assert snapshot() == outside
    assert not canary.exists() and (victim / "keep.txt").read_text() == "keep"
    assert prompt in info["command"] or shlex.quote(prompt) in info["command"]


def _under(path: Path, folders: tuple[Path, ...]) -> bool:
    return any(path == f or f in path.parents for f in folders)


def test_api_add_ons_are_chosen_by_name_and_their_records_are_no_downloads(client: Any, server: ApiServer) -> None:
    """``hiresdiff serve --lora detail=… --controlnet canny=…``: an API call names them (AccDiffusion v2 makes its
    own ControlNet condition); the PNG records them; the returned metadata gives their files as ``file`` (a
    ``path`` would make the client try to download a server file); a name not offered is one line."""
    from gradio_client.exceptions import AppError

    before = server.pngs()
    kw = {"method": "accdiffusion-v2", "width": 512, "height": 512, "steps": 2}
    files, info = client.predict(
        "a fox", **kw, controlnet="canny", loras=["detail"], lora_scale=0.5, api_name="/generate"
    )
    (new,) = server.pngs() - before
    record = info["metadata"][0]
    assert record["controlnet"].endswith("controlnet-canny") and record["loras"][0]["scale"] == 0.5
    assert record["loras"][0]["file"].endswith("pytorch_lora_weights.safetensors") and "path" not in record["loras"][0]
    assert "--lora" in info["command"] and "--controlnet" in info["command"] and len(files) == 1
    with pytest.raises(AppError) as refused:
        client.predict("a fox", **SMALL, loras=["other"], api_name="/generate")
    assert (
        str(refused.value).strip()
        == "LoRA 'other' is not offered by this server (offered: detail; hiresdiff serve --lora adds one)"
    )
    assert server.pngs() - before == {new} and "Traceback" not in server.log.read_text()


def test_server_stops_on_sigterm_and_removes_its_gradio_folder(server: ApiServer) -> None:
    """SIGTERM ends the server with status 0, removes its ``.gradio-*`` folder and leaves the PNGs; nothing was
    ever written to the system temp folder; the whole session's log holds no traceback. (Runs last: it stops the
    module's server.)"""
    pngs = server.pngs()
    assert server.stop() == 0, server.log_text()[-3000:]
    assert not [p for p in server.out.iterdir() if p.is_dir()], list(server.out.iterdir())
    assert server.pngs() == pngs
    assert not server.gradio_in_system_temp()
    assert "Traceback" not in server.log_text()


# --- no server ------------------------------------------------------------------------------------------------


def test_serve_checks_a_busy_port_before_loading_the_model(capsys: pytest.CaptureFixture[str]) -> None:
    """A busy ``--port`` is one ``hiresdiff: error:`` line, found before the model (a path that does not exist)
    would have been loaded."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", "--model", "/no/such/model", "--port", str(port), "--out", "/no/such/out"]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err == f"hiresdiff: error: port {port} on 127.0.0.1 is in use; pick another --port or stop what listens there"
    )


@pytest.mark.parametrize(
    ("host", "port", "message"),
    [
        ("no-such-host.invalid", 7860, "--host 'no-such-host.invalid' does not resolve"),
        ("192.0.2.1", 7860, "cannot listen on 192.0.2.1:7860"),  # TEST-NET: not an address of this machine
        ("127.0.0.1", 0, "--port must be in 1…65535, got 0"),
        ("127.0.0.1", 70000, "--port must be in 1…65535, got 70000"),
    ],
)
def test_check_address_says_what_is_wrong_in_one_line(host: str, port: int, message: str) -> None:
    with pytest.raises(HiresError) as info:
        check_address(host, port)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_check_address_accepts_a_free_port_and_leaves_it_free() -> None:
    port = _free_port()
    check_address("127.0.0.1", port)
    check_address("localhost", port)  # bound and let go: free again
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", port))


def test_split_params_separates_settings_from_method_parameters() -> None:
    """Settings keep their JSON values; method parameters become the ``--set`` strings the CLI would take; anything
    else (server paths, unknown names, wrong JSON types) is one line."""
    fields = ["sigma", "window", "jitter", "alpha1"]
    settings, values = split_params(
        "demofusion", fields, {"max_batch": 2, "low_vram": True, "sigma": 0.5, "window": [64, 64], "jitter": False}
    )
    assert settings == {"max_batch": 2, "low_vram": True}
    assert values == {"sigma": "0.5", "window": "64,64", "jitter": "false"}
    assert split_params("demofusion", fields, {"max_batch": "auto", "eta": 1}) == ({"max_batch": "auto", "eta": 1}, {})
    assert split_params("demofusion", fields, None) == ({}, {})
    for bad, message in [
        ({"image": "/etc/passwd"}, "has no parameter 'image'"),
        ({"loras": "x.safetensors"}, "has no parameter 'loras'"),
        ({"max_batch": 2.5}, 'max_batch must be a whole number or "auto"'),
        ({"max_batch": "many"}, 'max_batch must be a whole number or "auto"'),
        ({"eta": "one"}, "eta must be a number"),
        ({"previews": 1}, "previews must be true or false"),
        ({"sigma": {"nested": 1}}, "sigma must be a number, a switch or text"),
        ([1, 2], "params must be an object"),
    ]:
        with pytest.raises(HiresError, match=message):
            split_params("demofusion", fields, bad)


def test_sessions_keep_tabs_apart_and_forget_idle_ones() -> None:
    """Each key has its own session; dropping one stops its run; beyond the limit the least recently used idle
    sessions go, a running one stays."""
    sessions = Sessions(limit=2)
    a = sessions.get("a")
    assert sessions.get("a") is a and sessions.get("b") is not a
    a.running = True
    sessions.get("c")
    sessions.get("d")  # over the limit: b and c are idle and oldest
    assert len(sessions) == 2 and sessions.get("a") is a
    sessions.drop("a")
    assert a.stop.is_set() and sessions.get("a") is not a


@pytest.fixture(scope="module")
def webapp(tiny_sdxl_pipe: Any, tmp_path_factory: pytest.TempPathFactory) -> WebApp:
    from hiresdiff import HiresPipeline

    out = tmp_path_factory.mktemp("web-api-unit")
    return WebApp(HiresPipeline.from_pipe(tiny_sdxl_pipe, "tiny-sdxl"), out, Limits(1024 * 1024, MAX_STEPS))


def _page_form(app: WebApp, method: str, size: int, steps: int = 2) -> tuple[dict[str, Any], list[Any]]:
    """The page's form for ``method`` at ``size``² and all methods' parameter boxes at their defaults."""
    form = {
        **dict.fromkeys(("negative", "preset", "image"), None),
        "prompt": "a red fox",
        "method": method,
        "width": size,
        "height": size,
        "scale": 2.0,
        "strength": 0.0,
        "steps": steps,
        "guidance": 7.5,
        "scheduler": "euler",
        "seed": 0,
        "random_seed": False,
        "batch": 1,
    }
    values = [s.text_default() if s.kind == "text" else s.default for specs in app.fields.values() for s in specs]
    return form, values


def _page_run(app: WebApp, method: str, size: int, session: Session) -> list[dict[str, Any]]:
    return list(app.generate(session, *_page_form(app, method, size)))


def test_page_refuses_a_request_whose_memory_estimate_does_not_fit(
    webapp: WebApp, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With less free memory than the cost model's estimate, a run stops before it starts with one line naming
    what fits, spelled for the page; nothing is written. A request that fits shows its plan line first."""
    import hiresdiff.plan
    import hiresdiff.web.app

    updates = _page_run(webapp, "direct", 256, Session())
    assert updates[0]["status"].startswith("plan: direct 256×256") and "est. peak" in updates[0]["status"]
    assert updates[-1]["status"].startswith("done in")
    before = set(webapp.out.glob("*.png"))
    monkeypatch.setattr(hiresdiff.plan, "free_memory", lambda device: 24 * 2**20)
    monkeypatch.setattr(hiresdiff.web.app, "loaded_bytes", lambda pipe, device: 0)
    updates = _page_run(webapp, "demofusion", 1024, Session())
    error = updates[-1]["error"]
    assert error.startswith("⚠ estimated peak memory") and "exceeds the 24 MiB free" in error, error
    assert "what fits:" in error and "\n" not in error
    assert set(webapp.out.glob("*.png")) == before
    webapp.memory_check = False  # hiresdiff serve --skip-memory-check
    try:
        assert _page_run(webapp, "direct", 256, Session())[-1]["status"].startswith("done in")
    finally:
        webapp.memory_check = True


def test_page_stop_of_one_session_leaves_another_running(webapp: WebApp) -> None:
    """Two tabs' sessions: stopping one (its switch set while it runs) does not touch the other's run."""
    stopped, other = Session(), Session()
    seen: list[dict[str, Any]] = []

    def run_and_stop() -> None:
        for update in webapp.generate(stopped, *_page_form(webapp, "direct", 256, MAX_STEPS)):
            seen.append(update)
            if "· step " in update.get("status", ""):
                stopped.stop.set()

    worker = threading.Thread(target=run_and_stop)
    worker.start()
    worker.join(timeout=120)
    assert seen[-1]["status"].startswith("stopped after")
    assert _page_run(webapp, "direct", 256, other)[-1]["status"].startswith("done in")
    assert not other.running and not stopped.running
