"""``hiresdiff serve``: the web page, on 127.0.0.1 unless ``--host`` says otherwise.

The address is resolved and the port bound (then let go) before the model loads, so a typo or a busy port is one
``hiresdiff: error:`` line at once. gradio's own files (uploads, copies of shown images) go to a ``.gradio-*``
folder inside ``--out`` that the server removes when it stops — never the machine's shared temp folder.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hiresdiff.cli_options import add_memory_check_option
from hiresdiff.config import DTYPES

DEFAULT_PORT = 7860
#: the environment variable gradio reads for its upload and cache folder
GRADIO_TEMP_ENV = "GRADIO_TEMP_DIR"


def register(sub: argparse._SubParsersAction) -> dict[str, Any]:
    p = sub.add_parser("serve", help="the web page and its HTTP API: generate, watch every phase, compare, download")
    p.add_argument("--model", default="tiny-sdxl", help="any model the CLI accepts, loaded once (default tiny-sdxl)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    p.add_argument("--out", default="web-out", help="folder the page writes its PNGs to (and serves them from)")
    p.add_argument(
        "--max-pixels", type=int, default=None, help="largest image area (default: 8192² on CUDA, 1024² on CPU)"
    )
    p.add_argument("--max-steps", type=int, default=None, help="most steps a request may ask for (default 200 / 50)")
    p.add_argument("--dtype", default=None, choices=DTYPES, help="default: float16 on CUDA, float32 on CPU")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda when available)")
    offer = "[NAME=]PATH; repeatable: the page and the API offer it by NAME (default: the file or folder name)"
    p.add_argument("--controlnet", dest="controlnets", action="append", default=[], metavar="ID_OR_FOLDER", help=offer)
    p.add_argument("--lora", dest="loras", action="append", default=[], metavar="FILE", help=offer)
    p.add_argument("--upscaler", dest="upscalers", action="append", default=[], metavar="FILE", help=offer)
    add_memory_check_option(p)
    return {"serve": cmd_serve}


def check_address(host: str, port: int) -> None:
    """Resolve ``host`` and bind ``port`` there as the server will (IPv6 for a host with ``:``), then let it go:
    a one-line :class:`~hiresdiff.errors.HiresError` when either fails."""
    import errno
    import socket

    from hiresdiff.errors import HiresError, require

    require(0 < port < 65536, f"--port must be in 1…65535, got {port}")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        socket.getaddrinfo(host, port, family, socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise HiresError(
            f"--host {host!r} does not resolve ({reason}); use 127.0.0.1, 0.0.0.0 or a name of this machine"
        ) from None
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server does: TIME_WAIT is no conflict
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise HiresError(
                    f"port {port} on {host} is in use; pick another --port or stop what listens there"
                ) from None
            raise HiresError(
                f"cannot listen on {host}:{port} ({exc.strerror or exc}); use an address of this machine"
            ) from None


@dataclass
class Served:
    """A running page: its gradio app, its address and the cache folder it owns; :meth:`close` stops it and removes
    the folder (and gives the process back its former ``GRADIO_TEMP_DIR``)."""

    page: Any
    url: str
    cache: Path
    previous_temp: str | None

    def close(self) -> None:
        import os
        import shutil

        try:
            if self.page is not None:
                self.page.close()
        finally:
            shutil.rmtree(self.cache, ignore_errors=True)
            if self.previous_temp is None:
                os.environ.pop(GRADIO_TEMP_ENV, None)
            else:
                os.environ[GRADIO_TEMP_ENV] = self.previous_temp


def start(
    model: str,
    out: Path,
    *,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    max_pixels: int | None = None,
    max_steps: int | None = None,
    dtype: str | None = None,
    device: str | None = None,
    memory_check: bool = True,
    block: bool = True,
    controlnets: Sequence[str] = (),
    loras: Sequence[str] = (),
    upscalers: Sequence[str] = (),
) -> Served:
    """Check the address and the add-ons offered (``[NAME=]PATH`` each, against the model's configs), load ``model``
    once and serve the page. ``block=False`` returns the running :class:`Served` (call its ``close``);
    ``block=True`` serves until Ctrl-C (or SIGTERM), then cleans up."""
    import os
    import signal
    import tempfile

    from hiresdiff.errors import HiresError, require
    from hiresdiff.models.loading import resolve_model
    from hiresdiff.outputs import check_writable
    from hiresdiff.pipeline import HiresPipeline, ModelFacts, resolve_device
    from hiresdiff.web.addons import AddOns
    from hiresdiff.web.app import DEFAULT_LIMITS, Limits, WebApp
    from hiresdiff.web.page import build_page

    dev = resolve_device(device)
    kind = "cuda" if dev.startswith("cuda") else "cpu"
    pixels, steps = DEFAULT_LIMITS[kind]
    limits = Limits(max_pixels or pixels, max_steps or steps)
    require(limits.max_pixels > 0 and limits.max_steps > 0, "--max-pixels and --max-steps must be positive")
    check_address(host, port)
    out = check_writable(out, "--out", create=True).resolve()
    addons = AddOns()
    if controlnets or loras or upscalers:  # checked against the model's configs before its weights load
        facts = ModelFacts.of_spec(resolve_model(model))
        addons = AddOns.offered(facts, controlnets, loras, upscalers)
    pipe = HiresPipeline.from_model(model, dtype=dtype or ("float16" if kind == "cuda" else "float32"), device=dev)
    served = Served(None, f"http://{host}:{port}/", Path(tempfile.mkdtemp(prefix=".gradio-", dir=out)), None)
    served.previous_temp = os.environ.get(GRADIO_TEMP_ENV)
    os.environ[GRADIO_TEMP_ENV] = str(served.cache)  # read by gradio as it builds the page and its routes
    if block:
        signal.signal(signal.SIGTERM, _interrupt)  # a service manager's stop cleans up like Ctrl-C
    try:
        served.page = build_page(WebApp(pipe, out, limits, memory_check=memory_check, addons=addons))
        served.page.queue(default_concurrency_limit=1)
        served.page.launch(
            server_name=host,
            server_port=port,
            allowed_paths=[str(out)],
            prevent_thread_lock=not block,
            quiet=not block,
            show_error=False,
        )
    except BaseException as exc:
        served.close()
        if isinstance(exc, OSError):  # the port was taken between the check and now
            raise HiresError(f"cannot listen on {host}:{port}: {str(exc).splitlines()[0]}") from None
        raise
    if block:  # launch returned: Ctrl-C (or SIGTERM) stopped the server
        served.close()
    return served


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def cmd_serve(args: argparse.Namespace) -> int:
    start(
        args.model,
        Path(args.out),
        host=args.host,
        port=args.port,
        max_pixels=args.max_pixels,
        max_steps=args.max_steps,
        dtype=args.dtype,
        device=args.device,
        memory_check=not args.skip_memory_check,
        block=True,
        controlnets=args.controlnets,
        loras=args.loras,
        upscalers=args.upscalers,
    )
    return 0
