"""``hiresdiff serve``: the advanced-panel fields, the request checks and the page itself in headless chromium.

The unit tests need no server. The browser tests (marked ``browser``) share one in-process server over tiny-sdxl
and one chromium; each test opens its own tab, so each has its own page session (history, stop switch). Without
``/usr/bin/chromium`` (or playwright, or gradio) they are skipped, unless ``HIRESDIFF_REQUIRE_BROWSER=1`` (CI)
turns the skip into a failure.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import shlex
import socket
import time
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from PIL import Image

from hiresdiff.cli import build_parser
from hiresdiff.config import coerce_params
from hiresdiff.errors import HiresError
from hiresdiff.images import read_png_settings
from hiresdiff.methods import METHODS
from hiresdiff.web.app import Limits, WebApp, command_line
from hiresdiff.web.fields import FieldSpec, changed_values, method_fields
from hiresdiff.web.page import FORM

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

CHROMIUM = Path("/usr/bin/chromium")
PROMPT = "a lighthouse on a cliff at dusk"
#: longest wait for one generation on a slow 2-core CPU (a 512² four-step DemoFusion run takes 8–20 s there)
RUN_TIMEOUT_S = 150.0
POLL_MS = 50
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# --- unit tests: fields, command line, request checks (no server) --------------------------------------------


def _expected_kind(annotation: Any) -> str:
    """The page kind an annotation implies: a plain bool/int/float is a switch or a number, all else is text."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType) and type(None) in typing.get_args(annotation):
        return "text"  # optional values need a way to say "none": a text box
    return {bool: "bool", int: "int", float: "float"}.get(annotation, "text")


def _specs(method: str) -> dict[str, FieldSpec]:
    return {spec.name: spec for spec in method_fields(METHODS[method])}


@pytest.mark.parametrize("method", list(METHODS))
def test_method_fields_mirror_the_parameter_dataclass(method: str) -> None:
    """Every dataclass field becomes exactly one FieldSpec, in order, with its default and the kind its type implies;
    a text box shows its default as a string that ``--set`` parses back to that default."""
    cls = METHODS[method].params
    hints = typing.get_type_hints(cls)
    fields = dataclasses.fields(cls)
    specs = method_fields(METHODS[method])
    assert [s.name for s in specs] == [f.name for f in fields]
    for spec, f in zip(specs, fields, strict=True):
        assert spec.method == method
        assert spec.default == f.default, spec.name
        assert spec.kind == _expected_kind(hints[f.name]), spec.name
        assert spec.elem_id == f"param-{method}-{f.name}"
        if spec.kind in ("bool", "text"):
            assert spec.minimum is None and spec.maximum is None, spec.name
        if spec.kind == "text":
            shown = spec.text_default()
            # the box's text is what --set takes back to the default, and leaving it untouched changes nothing
            assert getattr(coerce_params(cls, {f.name: shown}, method), f.name) == f.default, spec.name
            assert changed_values([spec], [shown]) == {}, spec.name


def test_method_fields_probe_the_checks_for_bounds() -> None:
    """Bounds come from the dataclass's own checks: σ must be > 0 (a tiny positive minimum), ``start_step`` ≥ 0,
    the α exponents ≥ 0, AccDiffusion's ``prompt_threshold`` in [0, 1]; unbounded numbers get no maximum."""
    demo, acc = _specs("demofusion"), _specs("accdiffusion")
    sigma = demo["sigma"]
    assert sigma.minimum is not None and 0 < sigma.minimum < 1e-3
    assert demo["start_step"].minimum == 0 and demo["start_step"].maximum is None
    assert demo["alpha1"].minimum == 0 and demo["alpha1"].maximum is None
    assert acc["prompt_threshold"].minimum == 0 and acc["prompt_threshold"].maximum == 1.0
    # the bounds are the real edges: the dataclass accepts them and rejects just beyond
    params = METHODS["accdiffusion"].params
    params(sigma=sigma.minimum, prompt_threshold=1.0, start_step=0)
    for bad in ({"sigma": 0.0}, {"prompt_threshold": 1.0 + 1e-3}, {"start_step": -1}):
        with pytest.raises(HiresError):
            params(**bad)


@pytest.mark.parametrize(
    ("method", "name", "word"),
    [
        ("demofusion", "sigma", "dilated"),
        ("accdiffusion", "prompt_threshold", "view"),
        ("scalediff", "query_shift", ""),
    ],
)
def test_method_fields_take_help_from_the_docstring(method: str, name: str, word: str) -> None:
    """The help text is the docstring's clause about the field, without reStructuredText markup."""
    text = _specs(method)[name].help
    assert text and "``" not in text
    assert word in text


def test_changed_values_reports_only_edits_as_set_strings() -> None:
    """Defaults (and empty/NaN number boxes) give nothing; each edit becomes the string ``--set`` takes."""
    specs = method_fields(METHODS["demofusion"])
    defaults = [s.text_default() if s.kind == "text" else s.default for s in specs]
    assert changed_values(specs, defaults) == {}
    edited = dict(zip((s.name for s in specs), defaults, strict=True))
    edited.update(window=" 128 ", jitter=False, sigma=0.5, start_step=2.0, alpha1=None, alpha2=math.nan)
    assert changed_values(specs, list(edited.values())) == {
        "window": "128",
        "jitter": "false",
        "sigma": "0.5",
        "start_step": "2",
    }
    # an optional text field left empty or typed "none" stays at its default
    stride = next(s for s in specs if s.name == "stride")
    assert changed_values([stride], [""]) == changed_values([stride], ["none"]) == {}


def test_command_line_is_a_valid_generate_command() -> None:
    """The page's command parses with the CLI's own parser into the same prompt, sizes, steps and parameters."""
    prompt = "a 'quoted' fox; $(rm -rf /)"
    settings: dict[str, Any] = {
        "negative_prompt": "blurry, low quality",
        "width": 768,
        "height": 512,
        "steps": 4,
        "guidance": 7.5,
        "scheduler": "euler",
        "seed": 3,
        "num_images_per_prompt": 2,
        "image": None,
    }
    line = command_line("tiny-sdxl", "accdiffusion", prompt, settings, {"sigma": "0.5", "jitter": "false"})
    argv = shlex.split(line)
    assert argv[:2] == ["hiresdiff", "generate"]
    args = build_parser().parse_args(argv[1:])
    assert args.command == "generate" and args.prompt == [prompt]
    assert (args.model, args.method, args.width, args.height) == ("tiny-sdxl", "accdiffusion", 768, 512)
    assert (args.steps, args.guidance, args.scheduler, args.seed, args.batch) == (4, 7.5, "euler", 3, 2)
    assert args.negative == "blurry, low quality"
    assert args.params == ["sigma=0.5", "jitter=false"]
    assert args.image is None
    # an upscale: the picture becomes INPUT.png and the scale replaces the size
    upscale = {"scale": 2.0, "strength": 0.5, "steps": 4, "image": object()}
    args = build_parser().parse_args(shlex.split(command_line("tiny-sdxl", "demofusion", "x", upscale, {}))[1:])
    assert (args.image, args.scale, args.strength, args.width, args.height) == ("INPUT.png", 2.0, 0.5, None, None)


@pytest.fixture(scope="module")
def webapp(tiny_sdxl_pipe: Any, tmp_path_factory: pytest.TempPathFactory) -> WebApp:
    """The page's logic over tiny-sdxl (native 256 px) with small limits: 512² pixels, 10 steps."""
    from hiresdiff import HiresPipeline

    out = tmp_path_factory.mktemp("web-unit")
    return WebApp(HiresPipeline.from_pipe(tiny_sdxl_pipe, "tiny-sdxl"), out, Limits(max_pixels=512 * 512, max_steps=10))


def _form(**changes: Any) -> dict[str, Any]:
    """The page's form as the generate handler receives it (the page's defaults for tiny-sdxl), with ``changes``."""
    form = {
        "prompt": "a red fox",
        "negative": "",
        "method": "demofusion",
        "preset": "",
        "width": 512,
        "height": 512,
        "image": None,
        "scale": 2.0,
        "strength": 1.0,
        "steps": 4,
        "guidance": 7.5,
        "scheduler": "euler",
        "seed": 0,
        "random_seed": False,
        "batch": 1,
    }
    assert set(form) == set(FORM)
    return {**form, **changes}


def _values(app: WebApp, **changes: Any) -> list[Any]:
    """All methods' parameter boxes at their defaults, in page order; ``changes`` maps ``method.name`` to a value."""
    return [
        changes.get(f"{spec.method}.{spec.name}", spec.text_default() if spec.kind == "text" else spec.default)
        for specs in app.fields.values()
        for spec in specs
    ]


def test_request_validates_the_default_form(webapp: WebApp) -> None:
    """The default form is a valid 512² DemoFusion request with no ``--set`` values; the settings shown to the
    command line are the form's."""
    req, params, shown = webapp.request(_form(), _values(webapp))
    s = req.settings
    assert (req.method.name, s.width, s.height, s.steps, s.seed, s.prompt) == (
        "demofusion",
        512,
        512,
        4,
        0,
        ["a red fox"],
    )
    assert params == {}
    assert req.params == METHODS["demofusion"].params()
    assert shown["width"] == 512 and shown["steps"] == 4 and shown["image"] is None


def test_request_reads_only_the_chosen_methods_parameters(webapp: WebApp) -> None:
    """The flat value list is sliced per method: DemoFusion's edited σ reaches the request, another method's edit
    does not."""
    values = _values(webapp, **{"demofusion.sigma": 0.5, "accdiffusion.sigma": 0.25, "demofusion.window": "128"})
    req, params, _ = webapp.request(_form(), values)
    assert params == {"sigma": "0.5", "window": "128"}
    assert req.params.sigma == 0.5 and req.params.window == 128
    req, params, _ = webapp.request(_form(method="accdiffusion"), values)
    assert params == {"sigma": "0.25"} and req.params.sigma == 0.25 and req.params.window is None


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"width": 500}, "not a multiple of the latent grid"),
        ({"width": 768, "height": 768}, "above this server's limit of 262,144 pixels"),
        ({"steps": 11}, "above this server's limit of 10"),
        ({"prompt": "   "}, "type a prompt first"),
        ({"batch": 5}, "batch must be 1 to 4"),
        ({"method": "nope"}, "unknown method"),
    ],
)
def test_request_rejects_bad_input_in_one_line(webapp: WebApp, changes: dict[str, Any], message: str) -> None:
    """Bad sizes, sizes and steps above the server's limits, an empty prompt: a one-line HiresError each."""
    with pytest.raises(HiresError) as info:
        webapp.request(_form(**changes), _values(webapp))
    text = str(info.value)
    assert message in text and "\n" not in text


def test_generate_shows_bad_input_without_running(webapp: WebApp) -> None:
    """A rejected form streams a single ``error`` update (the ⚠ line) and writes nothing."""
    from hiresdiff.web.app import Session

    updates = list(webapp.generate(Session(), _form(width=500), _values(webapp)))
    assert len(updates) == 1 and set(updates[0]) == {"error"}
    assert updates[0]["error"].startswith("⚠ ") and "width 500" in updates[0]["error"]
    assert not list(webapp.out.glob("*.png"))


# --- browser tests: one server, one chromium --------------------------------------------------------------


def _browser_missing() -> str | None:
    """Why the browser tests cannot run here, or None."""
    if not CHROMIUM.is_file():
        return f"{CHROMIUM} is missing (apt-get install chromium)"
    for module in ("playwright", "gradio"):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed (pip install -e '.[test]')"
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    """The running page: its address and the folder it writes PNGs to."""

    url: str
    out: Path

    def pngs(self) -> set[Path]:
        return set(self.out.glob("*.png"))


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """Headless Debian chromium through playwright; without it: skipped, or failed under HIRESDIFF_REQUIRE_BROWSER=1."""
    reason = _browser_missing()
    if reason is not None:
        if os.environ.get("HIRESDIFF_REQUIRE_BROWSER") == "1":
            pytest.fail(f"HIRESDIFF_REQUIRE_BROWSER=1 but {reason}")
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture(scope="module")
def server(browser: Browser, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """``hiresdiff serve`` over tiny-sdxl, in this process on a free port (started after the browser check)."""
    from hiresdiff.models.tiny_addons import save_tiny_lora
    from hiresdiff.web.cli import start

    out = tmp_path_factory.mktemp("web-out")
    lora = save_tiny_lora("tiny-sdxl", tmp_path_factory.mktemp("web-lora"))
    port = _free_port()
    app = start("tiny-sdxl", out, port=port, block=False, loras=[f"detail={lora}"])  # offered: the add-ons panel
    try:
        yield Server(f"http://127.0.0.1:{port}/", out.resolve())
    finally:
        app.close()


@pytest.fixture
def page(browser: Browser, server: Server) -> Iterator[Page]:
    """A fresh tab on the page (so a fresh page session), loaded and ready."""
    context = browser.new_context(accept_downloads=True, viewport={"width": 1280, "height": 900})
    tab = context.new_page()
    tab.set_default_timeout(30_000)
    try:
        tab.goto(server.url)
        tab.wait_for_selector("#generate")
        yield tab
    finally:
        context.close()


def _select_method(page: Page, method: str) -> None:
    """Pick ``method`` in the ``#method`` dropdown the way a user does: open it, click the option."""
    from playwright.sync_api import expect

    page.click("#method input")
    page.get_by_role("option", name=method, exact=True).click()
    expect(page.locator("#method input")).to_have_value(method)


def _thumbnails(page: Page, gallery: str) -> int:
    return page.locator(f"#{gallery} button.thumbnail-item").count()


def _markdown(page: Page, elem_id: str) -> str:
    """The text of a Markdown output (not of the progress timer gradio overlays on it while a run is pending)."""
    return page.locator(f"#{elem_id} [data-testid='markdown']").inner_text().strip()


def _error_text(page: Page) -> str:
    return _markdown(page, "error")


def _wait_status(page: Page, text: str, timeout_s: float = RUN_TIMEOUT_S) -> None:
    """Wait (polling) until ``#status`` contains ``text``; fail at once with the page's error if one shows up."""
    deadline = time.monotonic() + timeout_s
    while text not in _markdown(page, "status"):
        error = _error_text(page)
        assert not error, f"the page showed an error while waiting for {text!r}: {error}"
        assert time.monotonic() < deadline, f"#status never said {text!r}: {_markdown(page, 'status')!r}"
        page.wait_for_timeout(POLL_MS)


@pytest.mark.browser
def test_page_generates_streams_previews_and_offers_the_png(page: Page, server: Server, tmp_path: Path) -> None:
    """End to end: a 512² four-step DemoFusion run shows its phase-1 preview before the final image, writes one PNG
    with the CLI's metadata (downloadable, identical bytes), prints the equivalent ``hiresdiff generate`` command and
    adds the image to the tab's history."""
    before = server.pngs()
    page.fill("#prompt textarea", PROMPT)
    _select_method(page, "accdiffusion")  # a real change of the dropdown, then back to the default
    _select_method(page, "demofusion")
    assert page.input_value("#width input") == "512" and page.input_value("#height input") == "512"
    page.fill("#steps input", "4")
    page.click("#generate")

    started = time.monotonic()
    first_preview: float | None = None
    final: float | None = None
    while final is None:
        now = time.monotonic()
        if first_preview is None and _thumbnails(page, "previews"):
            first_preview = now
        if _thumbnails(page, "result"):
            final = now
            break
        error = _error_text(page)
        assert not error, f"the run failed: {error}"
        assert now - started < RUN_TIMEOUT_S, f"no result after {RUN_TIMEOUT_S} s: {_markdown(page, 'status')}"
        page.wait_for_timeout(POLL_MS)
    assert first_preview is not None, "the final image appeared but no phase preview ever did"
    assert first_preview < final, (
        f"the phase preview must stream in before the final image (preview at {first_preview - started:.2f} s, "
        f"result at {final - started:.2f} s)"
    )
    _wait_status(page, "done in")
    assert "512×512" in _markdown(page, "status")

    new = server.pngs() - before
    assert len(new) == 1, f"expected one new PNG, got {sorted(p.name for p in new)}"
    written = new.pop()
    with page.expect_download() as info:
        page.click("#download a.download-link")
    downloaded = tmp_path / info.value.suggested_filename
    info.value.save_as(downloaded)
    assert downloaded.name == written.name
    assert downloaded.read_bytes() == written.read_bytes()
    with Image.open(downloaded) as img:
        assert img.format == "PNG" and img.size == (512, 512)
    meta = read_png_settings(downloaded)
    assert (meta["method"], meta["width"], meta["height"], meta["steps"]) == ("demofusion", 512, 512, 4)
    assert meta["prompt"] == PROMPT and meta["model"] == "tiny-sdxl" and meta["seed"] == 0

    command = page.input_value("#command textarea")
    assert command.startswith("hiresdiff generate ")
    assert "--method demofusion" in command and "--steps 4" in command
    args = build_parser().parse_args(shlex.split(command)[1:])
    assert args.prompt == [PROMPT] and (args.width, args.height, args.steps) == (512, 512, 4)

    assert _thumbnails(page, "history") == 1
    shot = tmp_path / "page.png"
    page.screenshot(path=str(shot), full_page=True)
    data = shot.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 10_000


@pytest.mark.browser
def test_page_shows_bad_size_as_one_line(page: Page, server: Server) -> None:
    """Width 500 (not a multiple of the 8 px latent grid) shows the library's one-line message, no traceback, and
    nothing is generated or written."""
    from playwright.sync_api import expect

    before = server.pngs()
    page.fill("#prompt textarea", PROMPT)
    page.fill("#width input", "500")
    page.click("#generate")
    expect(page.locator("#error")).to_contain_text("not a multiple of the latent grid", timeout=30_000)
    error = _error_text(page)
    assert "width 500" in error and "\n" not in error
    assert "Traceback" not in page.content()
    assert _thumbnails(page, "previews") == 0 and _thumbnails(page, "result") == 0
    assert server.pngs() == before


@pytest.mark.browser
def test_page_stop_ends_a_run_and_the_server_stays_usable(page: Page, server: Server) -> None:
    """Stop during a 40-step run ends it between two steps with nothing written; a two-step run right after it in
    the same tab completes and writes its PNG."""
    before = server.pngs()
    page.fill("#prompt textarea", PROMPT)
    page.fill("#steps input", "40")
    page.click("#generate")
    _wait_status(page, "· step ", timeout_s=60)  # a denoising step is running
    page.click("#stop")
    _wait_status(page, "stopped", timeout_s=60)
    assert "nothing was written" in _markdown(page, "status")
    assert _thumbnails(page, "result") == 0
    assert server.pngs() == before, "a stopped run must not write a PNG"

    page.fill("#steps input", "2")
    page.fill("#seed input", "7")  # another file name than the first test's (names carry the second and the seed)
    page.click("#generate")
    _wait_status(page, "done in")
    new = server.pngs() - before
    assert len(new) == 1
    meta = read_png_settings(new.pop())
    assert (meta["steps"], meta["seed"], meta["prompt"]) == (2, 7, PROMPT)
    assert _thumbnails(page, "result") == 1 and _thumbnails(page, "history") == 1


@pytest.mark.browser
def test_page_applies_an_offered_lora_chosen_by_name(page: Page, server: Server) -> None:
    """The server offers a LoRA (``--lora detail=…``): the Add-ons panel lists it by name; chosen with a scale, the
    run applies it and its PNG records the file and the scale."""
    from playwright.sync_api import expect

    before = server.pngs()
    page.fill("#prompt textarea", PROMPT)
    _select_method(page, "direct")
    page.fill("#steps input", "2")
    page.click("#addons button")  # open the panel
    page.click("#loras input")
    page.get_by_role("option", name="detail", exact=True).click()
    page.keyboard.press("Escape")
    page.fill("#lora-scale input", "0.5")
    expect(page.locator("#controlnet")).to_be_hidden()  # no ControlNet offered: no ControlNet controls
    page.click("#generate")
    _wait_status(page, "done in")
    (new,) = server.pngs() - before
    (lora,) = read_png_settings(new)["loras"]
    assert (lora["scale"], Path(lora["path"]).name) == (0.5, "pytorch_lora_weights.safetensors")
    assert "--lora" in page.input_value("#command textarea")
