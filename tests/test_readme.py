"""The README stays true: its set-up commands are what CI runs, and every command and example in it runs."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from hiresdiff.cli import main
from hiresdiff.models.tiny import BUILTIN_MODELS

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def bash_lines() -> list[str]:
    return [line.strip() for block in blocks("bash") for line in block.splitlines() if line.strip()]


def test_exactly_two_setup_commands_and_ci_runs_them() -> None:
    lines = bash_lines()
    install = [line for line in lines if line.startswith("python3 -m venv .venv")]
    tests = [line for line in lines if line.startswith(".venv/bin/python -m pytest")]
    assert len(install) == 1 and len(tests) == 1
    assert "torch==2.13.0" in install[0] and '-e ".[test]"' in install[0]
    assert install[0].endswith(".venv/bin/hiresdiff demo --out demo-out")
    ci = (ROOT / ".ci" / "run").read_text()
    # CI greps these exact patterns out of the README and evaluates the lines found
    found = {
        pattern: [ln for ln in README.splitlines() if re.match(pattern, ln)]
        for pattern in re.findall(r"readme_command '([^']+)'", ci)
    }
    assert [v[0] for v in found.values()] == [install[0], tests[0]]


def test_install_command_demo_part(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The demo that the install command ends with (the install itself is what CI runs)."""
    install = next(line for line in bash_lines() if line.startswith("python3 -m venv"))
    demo = shlex.split(install.split("&&")[-1])
    assert demo[0] == ".venv/bin/hiresdiff"
    monkeypatch.chdir(tmp_path)
    assert main([*demo[1:], "--quiet", "--steps", "3"]) == 0
    assert (tmp_path / "demo-out" / "contact_sheet.png").stat().st_size > 0
    from hiresdiff.methods import METHODS

    names = sorted(p.name for p in (tmp_path / "demo-out").glob("*.png"))
    assert names == sorted(["contact_sheet.png", *(f"{m}.png" for m in METHODS)])  # every method runs


def test_every_cli_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """Examples on built-in models must succeed; examples on hub models stop with the offline error (exit 2)."""
    monkeypatch.chdir(tmp_path)
    examples = [line for line in bash_lines() if line.startswith("hiresdiff ")]
    assert len(examples) >= 4
    for line in examples:
        argv = shlex.split(line)[1:]
        if argv[0] == "serve":  # a server: started without blocking on a free port, asked for its page, closed
            assert _serves(argv), line
            continue
        if argv[0] == "comfyui-install":  # into an empty ComfyUI folder made here
            (tmp_path / argv[1] / "custom_nodes").mkdir(parents=True)
        model = argv[argv.index("--model") + 1] if "--model" in argv else None
        # `cost` maps hub ids to built-in architectures: it needs no weights
        hub = model is not None and model not in BUILTIN_MODELS and argv[0] != "cost"
        code = main(argv)
        err = capsys.readouterr().err
        if argv[0] == "eval" and code != 0:
            # the default networks need the [eval] extra and downloaded weights: a one-line error says so
            assert code == 2 and err.count("\n") == 1 and ("hiresdiff[eval]" in err or "offline" in err), line
        elif hub:
            assert code == 2 and "HF_HUB_OFFLINE" in err, line
        else:
            assert code == 0, f"{line}: {err}"


def _serves(argv: list[str]) -> bool:
    import socket
    import urllib.request

    from hiresdiff.cli import build_parser
    from hiresdiff.web.cli import start

    args = build_parser().parse_args(argv)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    addons = {"controlnets": args.controlnets, "loras": args.loras, "upscalers": args.upscalers}
    page = start(args.model, Path(args.out), host=args.host, port=port, block=False, **addons)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=30) as response:
            return response.status == 200 and b"hiresdiff" in response.read()
    finally:
        page.close()


def test_python_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    first = blocks("python")[0]
    exec(compile(first, "README.md", "exec"), {})
    assert (tmp_path / "lighthouse.png").stat().st_size > 0
    from PIL import Image

    assert Image.open(tmp_path / "lighthouse-2x.png").size == (1024, 1024)  # the upscaled lighthouse


def test_second_python_example_is_valid_code() -> None:
    """It needs real weights and a GPU; here it must at least compile and use only public names."""
    second = blocks("python")[1]
    compile(second, "README.md", "exec")
    import hiresdiff

    assert "HiresPipeline.from_pipe" in second and hasattr(hiresdiff.HiresPipeline, "from_pipe")


def test_ci_script_is_executable_bash() -> None:
    ci = ROOT / ".ci" / "run"
    assert ci.stat().st_mode & 0o111
    subprocess.run(["bash", "-n", str(ci)], check=True)


def test_gpu_bench_examples_run_on_a_tiny_model(tmp_path: Path) -> None:
    """The README's GPU benchmark lines, with a tiny model, the CPU and small sizes appended (the last value wins)."""
    lines = [line for line in bash_lines() if line.startswith("python benchmarks/gpu_bench.py")]
    assert lines
    tiny = ["--model", "tiny-sd", "--sizes", "256x256", "--steps", "2", "--matmul", "64", "--device", "cpu"]
    tiny += ["--dtype", "float32", "--methods", "direct,scalediff", "--out", str(tmp_path)]
    for line in lines:
        argv = [*shlex.split(line)[2:], *tiny]
        done = subprocess.run(
            [sys.executable, str(ROOT / "benchmarks" / "gpu_bench.py"), *argv], capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr
    assert len(json.loads(next(tmp_path.glob("*.json")).read_text())) == 2


def test_device_examples_run_on_the_cpu(tmp_path: Path) -> None:
    """The README's lent-GPU lines with the CPU, tiny models and a small budget appended (the last value wins):
    device_run.py goes through every part (each runs or says the budget is spent), device_parity.py agrees."""
    tiny = {
        "device_run.py": ["--model", "tiny-sd", "--device", "cpu", "--size", "2x", "--dtype", "float32", "--steps",
                          "2", "--budget", "12", "--matmul", "64"],
        "device_parity.py": ["--device", "cpu", "--models", "tiny-sd", "--methods", "direct", "--steps", "2"],
    }  # fmt: skip
    outputs = {}
    for name, extra in tiny.items():
        (line,) = [line for line in bash_lines() if line.startswith(f"python benchmarks/{name}")]
        argv = [*shlex.split(line)[2:], *extra, "--out", str(tmp_path)]
        done = subprocess.run(
            [sys.executable, str(ROOT / "benchmarks" / name), *argv], capture_output=True, text=True, cwd=ROOT
        )
        assert done.returncode == 0, done.stderr[-2000:]
        assert "Traceback" not in done.stdout + done.stderr
        outputs[name] = done.stdout
    heads = [line for line in outputs["device_run.py"].splitlines() if line.startswith("== ")]
    names = ["parity on the tiny models", "core methods", "low VRAM", "profile", "CUDA-only tests", "baselines"]
    assert [any(h.startswith(f"== {n}") for h in heads) for n in names] == [True] * 6
    assert heads[-1].startswith("== done in") and "1 of 1 runs agree" in outputs["device_parity.py"]


def test_torchrun_example_runs_on_two_cpu_ranks(tmp_path: Path) -> None:
    """The README's torchrun line with 2 CPU ranks, the tiny model and a small size appended (the last value wins)."""
    import os
    import socket

    lines = [line for line in bash_lines() if line.startswith("torchrun ")]
    assert lines
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for line in lines:
        argv = shlex.split(line)
        argv[argv.index("--nproc_per_node") + 1] = "2"
        argv[0] = str(Path(sys.executable).parent / "torchrun")
        argv[1:1] = ["--master_port", str(port)]
        argv += ["--model", "tiny-sdxl", "--width", "512", "--height", "512", "--steps", "2", "--quiet"]
        argv += ["--out", str(tmp_path / "out")]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        done = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env)
        assert done.returncode == 0, done.stderr[-2000:]
    assert len(list((tmp_path / "out").glob("*-demofusion-seed0.png"))) == 1
