"""``hiresdiff reproduce TABLE``: the tables' data, the dry-run matrix, a scored run writing both columns, resume."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
from PIL import Image

from hiresdiff.bench.rows import METRICS
from hiresdiff.bench.tables import TABLES, parse_value, published_values, row_problem
from hiresdiff.cli import main
from hiresdiff.methods import METHODS


def table_cells(markdown: str, label: str) -> list[list[str]]:
    """The cells of every Markdown table line whose first cell is ``label``."""
    lines = [line for line in markdown.splitlines() if line.startswith(f"| {label} |")]
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines]


# ------------------------------------------------------------------------------------------------ the data


@pytest.mark.parametrize("name", list(TABLES))
def test_rows_name_registry_methods_or_say_why_and_numbers_parse(name: str) -> None:
    table = TABLES[name]
    assert table.name == name and table.rows and table.sizes
    assert all(column in METRICS or column == "Time" for column in table.columns)
    for row in table.rows:
        problem = row_problem(row)
        if problem is None:
            method = METHODS[str(row.method)]
            assert row.preset is None or row.preset in method.presets
        else:
            assert problem.startswith("not runnable"), problem
            own = row.method in METHODS and METHODS[str(row.method)].own_control  # needs a ControlNet bench lacks
            assert row.why is not None or row.method not in METHODS or row.preset is not None or own
        values = published_values(table, row)
        assert set(values) == {s.label for s in table.sizes}, row.label  # every size of the table is transcribed
        numbers = [v for per_size in values.values() for v in per_size.values() if v is not None]
        assert numbers and all(isinstance(v, float) and v > 0 for v in numbers)


def test_published_cells_parse() -> None:
    assert parse_value("0.0297") == pytest.approx(0.0297)
    assert parse_value("55s") == 55 and parse_value("13min") == 780 and parse_value("–") is None
    apt = TABLES["apt-table1"]
    direct = published_values(apt, apt.rows[0])
    assert direct["4096×4096"] == {"MUSIQ": 33.7, "CLIPIQA": 0.549, "FIDc": 86.6, "KIDc": 0.0489, "Time": 780.0}
    fouriscale = next(r for r in apt.rows if r.label == "FouriScale")
    assert published_values(apt, fouriscale)["4096×4096"]["Time"] is None  # printed "–"
    scalediff = TABLES["scalediff-table2"]
    ultra = next(r for r in scalediff.rows if r.label == "UltraPixel")
    assert "training-based" in str(row_problem(ultra))


# ------------------------------------------------------------------------------------------------ the command


def test_dry_run_prints_the_matrix_without_model_work(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from hiresdiff.models import loading, tiny
    from hiresdiff.pipeline import HiresPipeline

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("model work started")

    for owner, name in ((loading, "load_pipeline"), (tiny, "build_builtin"), (HiresPipeline, "from_model")):
        monkeypatch.setattr(owner, name, forbidden)
    out = tmp_path / "out"
    argv = ["reproduce", "apt-table1", "--model", "tiny-sdxl", "--limit", "2", "--steps", "3", "--dry-run"]
    assert main([*argv, "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "groups: 20, images: 40" in text  # 10 rows × 2 sizes × 2 prompts
    assert "apt:accdiffusion-apt" in text and "hidiffusion:official" in text
    # the paper's 2048² and 4096² on SDXL (1024 native) are 2× and 4× tiny-sdxl's 256 px
    assert "2048×2048 → 512x512" in text and "4096×4096 → 1024x1024" in text
    assert text.count("steps 3 ") == 20 and "ddim" in text
    assert not out.exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["reproduce", "apt-table9"], "unknown table 'apt-table9'; choose one of: apt-table1, apt-table2"),
        (["reproduce", "apt-table1", "--rows", "11"], "--rows expects row numbers from 1 to 10"),
        (["reproduce", "apt-table1", "--model", "tiny-foo"], "unknown model 'tiny-foo'"),
    ],
)
def test_bad_inputs_are_one_line_errors(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*argv, "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hiresdiff: error: ") and message in err and err.count("\n") == 1, err


def test_run_scores_writes_both_columns_and_a_rerun_makes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:

    from fakes import TinyInception
    from hiresdiff.bench import scoring
    from hiresdiff.evaluation.extractors import Extractors

    asked: list[argparse.Namespace] = []

    def options(ns: argparse.Namespace) -> scoring.ScoringOptions:  # the real checks need torch-fidelity and pyiqa
        asked.append(ns)
        metrics = tuple(ns.metrics.split(","))
        return scoring.ScoringOptions(metrics, Path(ns.reference), ns.crops, 0, None, "unused", "cpu")

    built: list[tuple[str, ...]] = []

    def extractors(opts: scoring.ScoringOptions) -> Extractors:
        built.append(opts.metrics)
        iqa = {"musiq": lambda x: x.mean((1, 2, 3)) * 100, "clipiqa": lambda x: x.std((1, 2, 3))}
        return Extractors(inception=TinyInception(), input_size=32, iqa=iqa)

    monkeypatch.setattr(scoring, "scoring_options", options)
    monkeypatch.setattr(scoring, "default_extractors", extractors)
    ref = tmp_path / "ref"
    ref.mkdir()
    for i in range(3):
        Image.new("RGB", (256, 256), (40 * i, 90, 200 - 30 * i)).save(ref / f"r{i}.png")
    out = tmp_path / "out"
    argv = ["reproduce", "apt-table1", "--model", "tiny-sd", "--limit", "2", "--steps", "3", "--rows", "1"]
    argv += ["--reference", str(ref), "--crops", "fixed:20x64", "--no-flops", "--quiet", "--out", str(out)]
    assert main(argv) == 0
    # the table's metrics, the crop protocol given instead of APT's 299 px crops (which do not fit 256 px images)
    assert asked[0].metrics == "musiq,clipiqa,fid,kid" and asked[0].crops == "fixed:20x64"
    assert built == [("musiq", "clipiqa", "fid", "kid")]
    images = sorted(out.glob("apt-table1/images/*/*.png"))
    assert [p.parent.name for p in images] == ["direct_256x256"] * 2 + ["direct_512x512"] * 2
    text = (out / "apt-table1.md").read_text()
    (small, large) = table_cells(text, "SDXL Direct Inference")
    assert small[1:3] == ["`direct` 256x256", "2/2"] and large[1] == "`direct` 512x512"
    # MUSIQ, CLIPIQA, FIDc, KIDc, Time: hiresdiff's value then the paper's
    assert small[4::2] == ["58.1", "0.585", "57.7", "0.0297", "55"]
    assert large[4::2] == ["33.7", "0.549", "86.6", "0.0489", "780"]
    assert all(float(v) >= 0 for v in small[3::2])  # every metric was computed, and the time measured
    fouriscale = table_cells(text, "FouriScale")
    assert fouriscale[0][1:4] == ["not run", "—", "—"] and fouriscale[1][-1] == "—"  # no published 4096² time
    assert "- FouriScale: not selected (--rows)" in text and "Notes on the transcription" in text

    stamps = {p: p.stat().st_mtime_ns for p in out.glob("apt-table1/images/*/*") if p.suffix in (".png", ".json")}
    assert main(argv) == 0
    assert built == [("musiq", "clipiqa", "fid", "kid")]  # nothing new: nothing generated, nothing rescored
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert (out / "apt-table1.md").read_text() == text
    # another row selection is another matrix: refused in one line, nothing written
    assert main([*argv[:-2], "--rows", "1,5", "--out", str(out)]) == 2
    assert "different matrix" in capsys.readouterr().err
