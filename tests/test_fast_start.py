"""Instant start: ``--help``, ``methods`` and argument errors import no torch; settings errors are refused before
diffusers/transformers load; the method registry resolves its recipes lazily; Ctrl-C during start-up is one line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from hiresdiff.errors import HiresError
from hiresdiff.methods import METHODS, Method, Params
from hiresdiff.schedulers import SCHEDULER_CLASSES, make_scheduler, scheduler_names

HEAVY = ("torch", "diffusers", "transformers")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}

#: runs ``main`` on each argv of a JSON list in one fresh interpreter; prints, per argv, its exit status and which
#: of :data:`HEAVY` were imported by then (so a later argv cannot hide an earlier one's import)
_PROBE = textwrap.dedent(
    """
    import json, sys
    from hiresdiff.cli import main
    report = []
    for argv in json.loads(sys.argv[1]):
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code
        loaded = sorted({m.split(".")[0] for m in sys.modules} & set(sys.argv[2].split(",")))
        report.append([argv, code, loaded])
    print(json.dumps(report))
    """
)


def probe(argvs: list[list[str]], cwd: Path) -> list[tuple[list[str], int, list[str]]]:
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, json.dumps(argvs), ",".join(HEAVY)],
        capture_output=True,
        text=True,
        env=ENV,
        cwd=cwd,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return [tuple(row) for row in json.loads(done.stdout.splitlines()[-1])]


def run_json(code: str) -> Any:
    """The JSON value ``code`` prints last, run in a fresh interpreter."""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def test_help_methods_and_argument_errors_import_no_torch(tmp_path: Path) -> None:
    commands = ["generate", "demo", "make-tiny", "cost", "bench", "eval", "dataset", "serve", "comfyui-install"]
    argvs = [
        ["--help"],
        ["methods"],
        *[[command, "--help"] for command in commands],
        ["generate", "x", "--width", "abc"],  # a bad --width is refused by the parser
        ["generate", "x", "--wdith", "512"],
        ["generate", "x", "--dtype", "float8"],
    ]
    report = probe(argvs, tmp_path)
    assert [(argv, code) for argv, code, _ in report] == [(argv, 2 if "x" in argv else 0) for argv in argvs]
    assert [(argv, loaded) for argv, _, loaded in report] == [(argv, []) for argv in argvs]


def test_settings_errors_are_refused_before_diffusers(tmp_path: Path) -> None:
    base = ["generate", "x", "--model", "tiny-sd", "--out", str(tmp_path / "out")]
    argvs = [
        [*base, "--width", "500"],  # not a multiple of the latent grid
        [*base, "--method", "nope"],
        [*base, "--set", "sigma=abc"],
        [*base, "--set", "nope=1"],
        [*base, "--method", "apt", "--set", "sas_eta=zz"],
    ]
    report = probe(argvs, tmp_path)
    assert [code for _, code, _ in report] == [2] * len(argvs)
    for argv, _, loaded in report:
        assert "diffusers" not in loaded and "transformers" not in loaded, (argv, loaded)


def test_a_valid_request_is_checked_without_diffusers(tmp_path: Path) -> None:
    """The whole request check of a typical generation (steps far below the schedule's length, one of hiresdiff's
    schedulers) builds no scheduler: diffusers is not imported before a plan or the weights need it."""
    code = (
        "import json, sys\n"
        "from hiresdiff.pipeline import ModelFacts, validate_request\n"
        "validate_request('x', 'demofusion', 2048, 2048, ModelFacts(1024, 8, 'sdxl', {}), steps=50)\n"
        "validate_request('x', 'apt', 1024, 1536, ModelFacts(512, 8, 'sd', {}), steps=250, scheduler='dpmpp-2m')\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules} & {'diffusers', 'transformers'})))\n"
    )
    assert run_json(code) == []


def test_import_hiresdiff_is_light_and_its_public_names_still_resolve() -> None:
    code = (
        "import json, sys, hiresdiff\n"
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'diffusers', 'transformers'})\n"
        "recipes = sorted(m for m in sys.modules if m.startswith('hiresdiff.methods.') and '.specs' not in m)\n"
        "from hiresdiff import GenerationResult, HiresPipeline, generate\n"
        "print(json.dumps([heavy, recipes, HiresPipeline.__name__, generate.__name__, GenerationResult.__name__]))\n"
    )
    heavy, recipes, *names = run_json(code)
    assert heavy == [] and recipes == ["hiresdiff.methods.base"]  # no recipe module before a method runs
    assert names == ["HiresPipeline", "generate", "GenerationResult"]


def test_every_method_names_its_recipe_in_its_own_module() -> None:
    for name, method in METHODS.items():
        module = name.replace("-", "_")  # a hyphenated method name (upsample-guidance) has an underscored module
        assert method.recipe.partition(":")[0] == f"hiresdiff.methods.{module}"
        recipe = method.recipe_function()
        assert callable(recipe) and recipe.__module__ == f"hiresdiff.methods.{module}"
        assert type(method.params()).__module__ == f"hiresdiff.methods.specs.{module}"


def test_a_recipe_reference_must_name_module_and_function() -> None:
    with pytest.raises(HiresError, match="recipe must be 'module:function'"):
        Method("broken", "", "", Params, "hiresdiff.methods.direct")


def test_scheduler_table_matches_the_classes_it_builds() -> None:
    import diffusers

    from hiresdiff.models.tiny import make_scheduler as tiny_scheduler
    from hiresdiff.schedulers import SCHEDULERS

    assert scheduler_names() == [*SCHEDULER_CLASSES, "model-default"]
    assert {name: (cls.__name__, overrides) for name, (cls, overrides) in SCHEDULERS.items()} == SCHEDULER_CLASSES
    config = tiny_scheduler().config
    for name, (class_name, overrides) in SCHEDULER_CLASSES.items():
        built = make_scheduler(name, config)
        assert type(built) is getattr(diffusers, class_name)
        assert all(built.config[key] == value for key, value in overrides.items())


@pytest.mark.parametrize("library", ["torch", "diffusers"])
def test_ctrl_c_while_importing_is_one_line_and_exit_130(library: str, tmp_path: Path) -> None:
    """A real SIGINT sent while ``hiresdiff generate`` imports ``library`` (``-X importtime`` reports each module
    as its import finishes: the first ``library`` submodule means that library is being imported)."""
    cmd = [sys.executable, "-X", "importtime", "-m", "hiresdiff", "generate", "x", "--model", "tiny-sd"]
    proc = subprocess.Popen(
        [*cmd, "--steps", "1", "--quiet", "--out", str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
        cwd=tmp_path,
    )
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            if line.startswith("import time:") and line.rsplit("|", 1)[-1].strip().startswith(f"{library}."):
                proc.send_signal(signal.SIGINT)
                break
        rest = proc.stderr.read()
        code = proc.wait(timeout=120)
    finally:
        proc.kill()
    printed = [line for line in rest.splitlines() if not line.startswith("import time:")]
    assert code == 130, rest[-2000:]
    assert len(printed) == 1 and printed[0].startswith("hiresdiff: interrupted"), printed


def test_output_piped_into_a_closing_reader_ends_quietly() -> None:
    """``hiresdiff methods | head -1``: the reader is gone before the output is written; no BrokenPipeError
    traceback, exit 0."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "hiresdiff.cli", "methods"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    proc.stdout.close()  # every write of the child now fails with EPIPE
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "BrokenPipe" not in err
