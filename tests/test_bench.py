"""``hiresdiff bench``: matrix, validation before model work, resuming, two accelerate processes, report, prompts."""

from __future__ import annotations

import csv
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

import hiresdiff.bench.runner as runner_mod
from hiresdiff.bench.plan import build_plan, parse_seeds, parse_sizes, parse_sweeps, safe_name
from hiresdiff.bench.prompts import BUILTIN_SETS, Prompt, load_prompts
from hiresdiff.bench.sheets import LABEL_WIDTH, THUMB
from hiresdiff.cli import main
from hiresdiff.cost import model_cost
from hiresdiff.errors import HiresError
from hiresdiff.images import read_png_settings
from hiresdiff.models import loading, tiny
from hiresdiff.pipeline import HiresPipeline

TINY = ["bench", "--model", "tiny-sd", "--steps", "2"]
PROGRESS = re.compile(r"\[(?:process (\d)\] \[)?\d+/\d+\] (\S+) ")


def prompt_file(tmp_path: Path, *lines: str) -> str:
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def progress_ids(text: str) -> list[str]:
    return [m[2] for m in PROGRESS.finditer(text)]


def records(out: Path) -> dict[str, dict]:
    loaded = [json.loads(p.read_text()) for p in out.glob("images/*/p*.json")]
    return {r["id"]: r for r in loaded}


def forbid_model_work(monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("model work started")

    monkeypatch.setattr(loading, "load_pipeline", forbidden)
    monkeypatch.setattr(tiny, "build_builtin", forbidden)
    monkeypatch.setattr(HiresPipeline, "from_model", forbidden)


# ------------------------------------------------------------------------------------------------ the matrix


def test_matrix_expands_methods_presets_sizes_prompts_seeds_and_sweeps() -> None:
    prompts = [Prompt("a"), Prompt("b", seed=7), Prompt("c")]
    plan = build_plan(
        "tiny-sd",
        "direct,apt:apt-sas,direct",
        "2x,256x128",
        "0,1",
        prompts,
        sweeps={"sigma": ["0.5", "0.8"], "shortcut_steps": ["1", "2"]},
        fixed={"alpha1": "2.0"},
        settings={"steps": 2},
    )
    # direct takes neither swept parameter: 2 sizes; apt: 2 sigma × 2 shortcut_steps × 2 sizes
    assert [g.slug for g in plan.groups[:2]] == ["direct_256x256", "direct_256x128"]
    assert len(plan.groups) == 2 + 8
    assert plan.groups[2].slug == "apt+apt-sas_256x256_sigma=0.5_shortcut_steps=1"
    assert {g.sweep for g in plan.groups[2:]} == {
        (("sigma", s), ("shortcut_steps", k)) for s in ("0.5", "0.8") for k in ("1", "2")
    }
    # per group: prompts a and c with seeds 0 and 1, prompt b only with its CSV seed 7
    assert len(plan.items) == 10 * 5
    assert len({item.id for item in plan.items}) == len(plan.items)
    first = [(i.prompt_index, i.seed) for i in plan.items if i.group == plan.groups[0]]
    assert first == [(0, 0), (0, 1), (1, 7), (2, 0), (2, 1)]
    # --set applies to the methods that take it, sweeps only to their group
    direct, apt = plan.request_kwargs(plan.groups[0]), plan.request_kwargs(plan.groups[2])
    assert "alpha1" not in direct and "sigma" not in direct and direct["steps"] == 2
    assert apt["alpha1"] == "2.0" and apt["preset"] == "apt-sas" and apt["shortcut_steps"] == "1"
    single = build_plan("tiny-sd", "direct", "2x", "0", prompts, sweeps={}, fixed={}, settings={})
    assert single.to_dict()["items"] == 3 and [i.seed for i in single.items] == [0, 7, 0]


def test_size_seed_and_sweep_parsing() -> None:
    sizes = parse_sizes("2x,1.5x,512x256,256x256", 128)
    assert [(s.label, s.width, s.height) for s in sizes] == [
        ("2x", 256, 256),
        ("1.5x", 192, 192),
        ("512x256", 512, 256),
    ]
    assert parse_seeds("0,3-5,4") == [0, 3, 4, 5]
    assert parse_sweeps(["sigma=0.3,0.5", "progressive=0.5,0.3;0.6,0.4", "sas-eta=2=2.0,3=3.0"]) == {
        "sigma": ["0.3", "0.5"],
        "progressive": ["0.5,0.3", "0.6,0.4"],
        "sas_eta": ["2=2.0", "3=3.0"],
    }
    assert safe_name("sigma=0.5") == "sigma=0.5"
    odd = safe_name("progressive=0.5,0.3")
    assert odd.startswith("progressive=0.5_0.3~") and odd != safe_name("progressive=0.5;0.3")


# ---------------------------------------------------------------------------------------- validation first

BAD: list[tuple[list[str], str]] = [
    (["--methods", "demofusionn"], "unknown method 'demofusionn'"),
    (["--methods", "apt:nope"], "has no preset 'nope'"),
    (["--sizes", "3y"], "neither a scale like 2x nor pixels"),
    (["--sizes", "2x,260x260"], "not a multiple of the latent grid"),
    (["--sizes", "64x64"], "below the model's native size"),
    (["--seeds", "one"], "--seeds: 'one' is not a non-negative integer"),
    (["--methods", "demofusion", "--sweep", "sigma=0.5,abc"], "sigma='abc': expected float"),
    (["--methods", "demofusion", "--sweep", "sigma=0"], "sigma must be > 0"),
    (["--sweep", "sigmaa=1,2"], "none of the methods (direct, demofusion) has a parameter 'sigmaa'"),
    (["--sweep", "seed=1,2"], "set seed with the bench options"),
    (["--set", "sigma=0.5", "--sweep", "sigma=0.6,0.7"], "both --set and --sweep"),
    (
        ["--methods", "apt:apt", "--set", "shortcut_steps=5"],
        "apt:apt at 256x256: shortcut_steps 5 must not exceed steps 2",
    ),
    (["--model", "tiny-foo"], "unknown model 'tiny-foo'"),
    (["--prompts", "builtin:nope"], "unknown built-in prompt set 'nope'"),
    (["--prompts", "/nonexistent/prompts.txt"], "does not exist"),
    (["--prompts", "EMPTY"], "no prompts in"),
]


@pytest.mark.parametrize(("extra", "message"), BAD, ids=[m for _, m in BAD])
def test_whole_matrix_is_validated_before_model_work(
    extra: list[str], message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    forbid_model_work(monkeypatch)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    args = ["--methods", "direct,demofusion", "--prompts", "builtin:smoke", "--sizes", "2x", *extra]
    args = [str(empty) if a == "EMPTY" else a for a in args]
    out = tmp_path / "out"
    assert main([*TINY, *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not out.exists()


def test_missing_options_and_report_without_benchmark(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main([*TINY, "--prompts", "builtin:smoke", "--out", str(tmp_path)]) == 2
    assert "give --methods" in capsys.readouterr().err
    assert main(["bench", "--report-only", "--out", str(tmp_path / "none")]) == 2
    assert "plan.json is missing" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ a run and its report


def test_run_writes_images_records_report_sheets_and_plots(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    calls: list[tuple[str, int, int]] = []

    def counting_cost(method: str, model: str, width: int, height: int, **kwargs: object) -> object:
        calls.append((method, width, height))
        return model_cost(method, model, width, height, **kwargs)

    monkeypatch.setattr(runner_mod, "model_cost", counting_cost)
    out = tmp_path / "bench"
    prompts = prompt_file(tmp_path, "a red fox in the snow", "", "a lighthouse at dusk")
    argv = [*TINY, "--methods", "direct,demofusion", "--prompts", prompts, "--sizes", "2x,256x128", "--seeds", "0,1"]
    assert main([*argv, "--sweep", "sigma=0.5,0.8", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    # 2 direct groups + 2 sigma × 2 demofusion groups, × 2 prompts × 2 seeds
    found = records(out)
    assert len(found) == 6 * 4 and sorted(progress_ids(printed)) == sorted(found)
    assert len(calls) == 6 and len(set(calls)) == 4  # FLOPs counted once per group, not per image
    rec = found["demofusion_256x128_sigma=0.8/p0001-s1"]
    assert rec["prompt"] == "a lighthouse at dusk" and rec["seed"] == 1 and rec["sweep"] == {"sigma": 0.8}
    assert (rec["width"], rec["height"], rec["method"], rec["preset"]) == (256, 128, "demofusion", None)
    assert rec["seconds"] > 0 and rec["peak_memory_gb"] is None and rec["device"]
    assert rec["flops"] == model_cost("demofusion", "tiny-sd", 256, 128, steps=2, sigma=0.8).model_flops > 0
    assert set(rec["versions"]) >= {"hiresdiff", "torch", "diffusers", "python"}
    assert rec["settings"]["params"]["sigma"] == 0.8 and rec["settings"]["steps"] == 2
    png = out / "images" / rec["group"] / rec["image"]
    assert read_png_settings(png) == rec["settings"] and Image.open(png).size == (256, 128)
    assert not list(out.rglob("*.tmp"))

    with open(out / "report.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["group"] for r in table][:2] == ["direct_256x256", "direct_256x128"] and len(table) == 6
    assert all(r["images"] == r["planned"] == "4" and float(r["seconds"]) > 0 for r in table)
    assert all(float(r["tflops"]) > 0 and r["peak_memory_gb"] == "" and r["FID"] == "" for r in table)
    assert [r["sigma"] for r in table] == ["", "", "0.5", "0.5", "0.8", "0.8"]
    md = (out / "report.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| ")]
    assert len(rows) == 1 + 6 and "| demofusion | — | 256x256 (2x) |" in md
    assert "![resolution](plots/resolution.png)" in md
    assert rows[0].split(" | ")[-9:] == ["FID", "KID", "IS", "FIDc", "KIDc", "ISc", "CLIP", "MUSIQ", "CLIPIQA |"]
    for i in range(2):
        sheet = Image.open(out / "sheets" / f"prompt-{i:04d}.png")
        # 3 lines (direct, demofusion × 2 sigma) of a label cell and two thumbnails
        assert sheet.width == LABEL_WIDTH + THUMB + THUMB and sheet.height > 3 * THUMB
    plots = {p.name: Image.open(p).size for p in (out / "plots").iterdir()}
    assert set(plots) == {"resolution.png", "sweep-sigma.png"} and all(w > 300 and h > 200 for w, h in plots.values())
    # each group folder is a captioned image folder, as eval and the prompt loader read it
    folder = load_prompts(str(out / "images" / "direct_256x256"))
    assert [(p.text, p.source) for p in folder] == [
        ("a red fox in the snow", "p0000-s0.png"),
        ("a red fox in the snow", "p0000-s1.png"),
        ("a lighthouse at dusk", "p0001-s0.png"),
        ("a lighthouse at dusk", "p0001-s1.png"),
    ]


def test_metrics_json_fills_columns_on_report_only(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "bench"
    argv = [*TINY, "--methods", "direct,demofusion", "--prompts", prompt_file(tmp_path, "a cat"), "--quiet"]
    assert main([*argv, "--sweep", "sigma=0.5,0.8", "--no-flops", "--sheets", "0", "--out", str(out)]) == 0
    assert not (out / "sheets").exists()
    # as `hiresdiff eval --json` writes it
    metrics = {"fid": 12.5, "kid": 0.012, "kid_std": 0.001, "is": None, "clip": 31.2, "fid_crop": 20.0}
    scores = {"metrics": metrics, "details": {"n_images": 1}, "notes": []}
    (out / "images" / "demofusion_256x256_sigma=0.8" / "metrics.json").write_text(json.dumps(scores))
    assert main(["bench", "--report-only", "--out", str(out)]) == 0
    assert str(out / "report.md") in capsys.readouterr().out
    with open(out / "report.csv", newline="") as f:
        table = {r["group"]: r for r in csv.DictReader(f)}
    row = table["demofusion_256x256_sigma=0.8"]
    assert (row["FID"], row["KID"], row["CLIP"], row["FIDc"], row["IS"]) == ("12.5", "0.012", "31.2", "20", "")
    assert table["direct_256x256"]["FID"] == "" and row["tflops"] == ""
    assert Image.open(out / "sheets" / "prompt-0000.png").height > 3 * THUMB
    sweep = Image.open(out / "plots" / "sweep-sigma.png")
    # panels: time, memory is absent on CPU, FLOPs off; FID, KID, FIDc, CLIP present → 5 panels on two lines
    assert sweep.height > 600 and sweep.width > 1000


def test_bench_scores_each_group_with_eval_and_rescoring_only_when_stale(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:

    from fakes import TinyInception
    from hiresdiff.bench import scoring
    from hiresdiff.evaluation.extractors import Extractors

    built = []

    def tiny(opts: scoring.ScoringOptions) -> Extractors:
        built.append(opts.metrics)
        return Extractors(inception=TinyInception(), input_size=32)

    monkeypatch.setattr(scoring, "default_extractors", tiny)
    monkeypatch.setattr(scoring, "scoring_options", lambda args: None)  # checks need torch-fidelity
    ref = tmp_path / "ref"
    ref.mkdir()
    for i in range(3):
        Image.new("RGB", (256, 256), (40 * i, 90, 200 - 30 * i)).save(ref / f"r{i}.png")
    out = tmp_path / "bench"
    argv = [*TINY, "--methods", "direct,demofusion", "--prompts", prompt_file(tmp_path, "a cat", "a dog"), "--quiet"]
    argv += ["--no-flops", "--sheets", "0", "--out", str(out)]
    assert main(argv) == 0  # no scoring asked for
    assert not list(out.glob("images/*/metrics.json"))
    opts = scoring.ScoringOptions(("fid", "is"), ref, "native", 0, None, "unused", "cpu")
    monkeypatch.setattr(scoring, "scoring_options", lambda args: opts)
    assert main(["bench", "--report-only", "--out", str(out), "--quiet"]) == 0
    assert built == [("fid", "is")]
    with open(out / "report.csv", newline="") as f:
        table = {r["group"]: r for r in csv.DictReader(f)}
    for group in ("direct_256x256", "demofusion_256x256"):
        scores = json.loads((out / "images" / group / "metrics.json").read_text())
        assert scores["metrics"]["fid"] > 0 and scores["metrics"]["fid_crop"] is not None
        assert float(table[group]["FID"]) == pytest.approx(scores["metrics"]["fid"], rel=1e-3)
    stamp = (out / "images" / "direct_256x256" / "metrics.json").stat().st_mtime_ns
    assert main(["bench", "--report-only", "--out", str(out), "--quiet"]) == 0
    assert built == [("fid", "is")]  # nothing stale: no network built, nothing rescored
    assert (out / "images" / "direct_256x256" / "metrics.json").stat().st_mtime_ns == stamp


def test_bench_scoring_options_are_checked_before_generation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    forbid_model_work(monkeypatch)
    base = [*TINY, "--methods", "direct", "--prompts", "builtin:smoke", "--out", str(tmp_path / "b")]
    for extra, message in [
        (["--reference", str(tmp_path / "missing")], "is not a folder"),
        (["--metrics", "fid,sharpness", "--reference", str(tmp_path)], "unknown 'sharpness'"),
        (["--metrics", "is", "--crops", "fixed:10"], "--crops"),
        (["--metrics", "is"], "hiresdiff[eval]"),  # torch-fidelity is not installed here
    ]:
        assert main([*base, *extra]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err


# ---------------------------------------------------------------------------------------------- resuming


def test_resume_after_interrupt_generates_only_missing_images(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "bench"
    argv = [*TINY, "--methods", "direct", "--prompts", prompt_file(tmp_path, "a", "b"), "--seeds", "0-2"]
    argv += ["--no-flops", "--out", str(out)]
    real = runner_mod.timed_run
    runs = {"n": 0}

    def interrupted(*args: object) -> object:
        if runs["n"] == 3:
            raise KeyboardInterrupt
        runs["n"] += 1
        return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(runner_mod, "timed_run", interrupted)
    assert main(argv) == 130
    first = records(out)
    assert len(first) == 3 and len(list(out.glob("images/*/*.png"))) == 3 and not list(out.rglob("*.tmp"))
    assert not (out / "report.md").exists()
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("images/*/p*")}
    capsys.readouterr()

    monkeypatch.setattr(runner_mod, "timed_run", real)
    assert main(argv) == 0
    second = progress_ids(capsys.readouterr().out)
    assert len(second) == 3 and not set(second) & set(first) and len(records(out)) == 6
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())

    # an image without its record, a record without its image: both unfinished, both redone, nothing else
    (out / "images" / "direct_256x256" / "p0000-s1.json").unlink()
    (out / "images" / "direct_256x256" / "p0001-s2.png").unlink()
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("images/*/p*")}
    assert main(argv) == 0
    assert sorted(progress_ids(capsys.readouterr().out)) == ["direct_256x256/p0000-s1", "direct_256x256/p0001-s2"]
    kept = [p for p in stamps if p.stem not in ("p0000-s1", "p0001-s2")]
    assert len(kept) == 8 and all(p.stat().st_mtime_ns == stamps[p] for p in kept)

    # all finished: no model is loaded, the report is rewritten
    forbid_model_work(monkeypatch)
    assert main([*argv, "--quiet"]) == 0 and (out / "report.md").is_file()
    # another matrix in the same folder is refused
    assert main([*argv[:-2], "--seeds", "0-3", "--out", str(out)]) == 2
    assert "different matrix (plan.json differs in: seeds)" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------- two processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_accelerate_processes_generate_every_image_once(tmp_path: Path) -> None:
    """``accelerate launch`` with two CPU processes (``--multi_gpu`` spawns them; ``ACCELERATE_USE_CPU`` keeps them
    on the CPU with gloo — accelerate's ``--cpu`` flag alone starts one process unless run through mpirun)."""
    out = tmp_path / "bench"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    launch += ["--main_process_port", str(free_port()), "-m", "hiresdiff"]
    bench = [*TINY, "--methods", "direct,demofusion", "--prompts", "builtin:smoke", "--limit", "3", "--seeds", "0"]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("ACCELERATE_CONFIG_FILE", None)
    cmd = [*launch, *bench, "--device", "cpu", "--no-flops", "--out", str(out)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [(m[1], m[2]) for m in PROGRESS.finditer(done.stdout)]
    found = records(out)
    assert len(found) == 6 and sorted(i for _, i in lines) == sorted(found)  # each image generated exactly once
    assert {p for p, _ in lines} == {"0", "1"}
    assert all(r["num_processes"] == 2 and r["flops"] is None for r in found.values())
    assert {r["process_index"] for r in found.values()} == {0, 1}
    assert done.stdout.count("report.md") == 1 and (out / "report.csv").is_file()


# ------------------------------------------------------------------------------------------------ prompts


def test_prompt_loaders(tmp_path: Path) -> None:
    assert [p.text for p in load_prompts("builtin:smoke")] == list(BUILTIN_SETS["smoke"])
    assert len(BUILTIN_SETS["smoke"]) == 8
    assert [p.text for p in load_prompts(prompt_file(tmp_path, "one", "", "  two  "))] == ["one", "two"]

    seeded = tmp_path / "seeded.csv"
    seeded.write_text('prompt,seed\n"a cat, sitting",5\na dog,\n')
    assert load_prompts(str(seeded)) == [Prompt("a cat, sitting", 5), Prompt("a dog", None)]

    laion = tmp_path / "laion.csv"
    laion.write_text("url,TEXT,width\nhttp://x/1.jpg,first caption,1024\nhttp://x/2.jpg,,9\nhttp://x/3.jpg,third,8\n")
    assert load_prompts(str(laion), limit=2) == [
        Prompt("first caption", None, "http://x/1.jpg"),
        Prompt("third", None, "http://x/3.jpg"),
    ]
    tsv = tmp_path / "captions.tsv"
    tsv.write_text("key\tcaption\n000\ta tab separated caption\n")
    assert load_prompts(str(tsv)) == [Prompt("a tab separated caption", None, "000")]

    sidecars = tmp_path / "refs"
    sidecars.mkdir()
    for name in ("b.png", "a.jpg", "c.png"):
        Image.new("RGB", (8, 8)).save(sidecars / name)
    (sidecars / "a.txt").write_text("caption of a\n")
    (sidecars / "b.txt").write_text("caption of b")
    assert load_prompts(str(sidecars)) == [Prompt("caption of a", None, "a.jpg"), Prompt("caption of b", None, "b.png")]
    (sidecars / "captions.csv").write_text("file,prompt\nc.png,listed c\n")
    assert load_prompts(str(sidecars)) == [Prompt("listed c", None, "c.png")]


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"p.csv": "url,width\nx,1\n"}, "has no prompt column"),
        ({"p.csv": "prompt,seed\na,-1\n"}, "p.csv line 2: seed '-1' is not an integer"),
        ({"p.csv": "prompt\n"}, "no prompts in"),
        ({"d/x.png": "", "d/y.txt": "orphan caption"}, "has images but no captions"),
        ({"d/notes.md": "x"}, "has no images"),
        ({"d/x.png": "", "d/captions.csv": "file,prompt\nmissing.png,a\n"}, "names images that are not in the folder"),
    ],
)
def test_bad_prompt_sets_are_one_line_errors(files: dict[str, str], message: str, tmp_path: Path) -> None:
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(exist_ok=True)
        if name.endswith(".png"):
            Image.new("RGB", (4, 4)).save(path)
        else:
            path.write_text(text)
    target = tmp_path / next(iter(files)).split("/")[0]
    with pytest.raises(HiresError, match=re.escape(message)):
        load_prompts(str(target))
    with pytest.raises(HiresError, match="--limit must be ≥ 1"):
        load_prompts("builtin:smoke", limit=0)
