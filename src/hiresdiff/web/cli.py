"""``hiresdiff serve``: the web page, on 127.0.0.1 unless ``--host`` says otherwise."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from hiresdiff.config import DTYPES

DEFAULT_PORT = 7860


def register(sub: argparse._SubParsersAction) -> dict[str, Any]:
    p = sub.add_parser("serve", help="the web page: generate, watch every phase, compare, download")
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
    return {"serve": cmd_serve}


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
    block: bool = True,
) -> Any:
    """Load ``model`` once and serve the page (returns the gradio app; ``block=False`` returns while it serves)."""
    from hiresdiff.errors import require
    from hiresdiff.pipeline import HiresPipeline, resolve_device
    from hiresdiff.web.app import DEFAULT_LIMITS, Limits, WebApp

    dev = resolve_device(device)
    kind = "cuda" if dev.startswith("cuda") else "cpu"
    pixels, steps = DEFAULT_LIMITS[kind]
    limits = Limits(max_pixels or pixels, max_steps or steps)
    require(limits.max_pixels > 0 and limits.max_steps > 0, "--max-pixels and --max-steps must be positive")
    require(0 < port < 65536, f"--port must be in 1…65535, got {port}")
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    pipe = HiresPipeline.from_model(model, dtype=dtype or ("float16" if kind == "cuda" else "float32"), device=dev)
    page = WebApp(pipe, out, limits).build()
    page.queue(default_concurrency_limit=1)
    page.launch(
        server_name=host,
        server_port=port,
        allowed_paths=[str(out)],
        prevent_thread_lock=not block,
        quiet=not block,
        show_error=False,
    )
    return page


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
    )
    return 0
