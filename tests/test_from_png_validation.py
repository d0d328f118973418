"""A PNG's settings are input: ``--from-png`` refuses a tampered record in one line naming the PNG and the field,
before any weights load, and plans and checks memory against the PNG's own model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import typing
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from hiresdiff import pipeline
from hiresdiff.cli import main
from hiresdiff.errors import HiresError
from hiresdiff.from_png import SETTINGS_RECORD, field_named, kinds_of, read_request
from hiresdiff.images import read_png_settings, save_png
from hiresdiff.methods import METHODS
from hiresdiff.models import loading

#: the run every case tampers with: two prompts on tiny-sdxl (each PNG records its batch)
ARGV = ["a red fox", "a blue whale", "--model", "tiny-sdxl", "--width", "256", "--height", "256", "--steps", "1"]
DELETE = object()  # a case value: the field is removed


@pytest.fixture(scope="module")
def batch_record(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The settings of image 1 of a real two-prompt batch (hiresdiff's own record, untampered)."""
    out = tmp_path_factory.mktemp("batch")
    assert main(["generate", *ARGV, "--quiet", "--out", str(out)]) == 0
    return read_png_settings(out / "001-demofusion-seed1.png")


@pytest.fixture
def no_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading weights fails the test (and no pipeline is kept from an earlier test)."""

    def spy(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("load_pipeline was called: weights loaded before the settings were checked")

    monkeypatch.setattr(loading, "load_pipeline", spy)
    monkeypatch.setattr(pipeline, "_CACHE", {})


def _single(record: dict[str, Any]) -> dict[str, Any]:
    """The record of a one-image run: what hiresdiff writes for a batch of one (no ``batch`` field)."""
    return {k: v for k, v in record.items() if k != "batch"}


IMAGE = {"name": "photo.png", "width": 128, "height": 128, "sha256": "0" * 64, "notes": []}
LORA = {"name": "style", "path": "style.safetensors", "sha256": "0" * 64, "scale": 0.8}

#: (case id, base record ("batch" or "single"), the changes made to it in order (dotted path → new value or DELETE;
#: the last one is the tampering, those before it make the record reach that field), the field the refusal names)
CASES: list[tuple[str, str, dict[str, Any], str]] = [
    # top-level fields: JSON type
    ("model-number", "batch", {"model": 5}, "model"),
    ("dtype-number", "batch", {"dtype": 16}, "dtype"),
    ("method-list", "batch", {"method": ["demofusion"]}, "method"),
    ("prompt-number", "batch", {"prompt": 7}, "prompt"),
    ("negative-number", "batch", {"negative_prompt": 3}, "negative_prompt"),
    ("width-list", "batch", {"width": [256]}, "width"),
    ("width-string", "single", {"width": "256"}, "width"),
    ("height-float", "single", {"height": 256.0}, "height"),
    ("steps-list", "single", {"steps": [1]}, "steps"),
    ("steps-bool", "single", {"steps": True}, "steps"),
    ("guidance-string", "single", {"guidance": "7.5"}, "guidance"),
    ("scheduler-number", "single", {"scheduler": 1}, "scheduler"),
    ("seed-string", "single", {"seed": "0"}, "seed"),
    ("max-batch-null", "single", {"max_batch": None}, "max_batch"),
    ("tile-area-string", "single", {"decode_tile_area": "big"}, "decode_tile_area"),
    ("strength-string", "single", {"strength": "0.5"}, "strength"),
    ("ag-lambda-list", "single", {"ag_lambda": [0.1]}, "ag_lambda"),
    ("ag-delay-float", "single", {"ag_delay": 1.5}, "ag_delay"),
    ("ag-exponent-string", "single", {"ag_exponent": "3"}, "ag_exponent"),
    ("ag-decay-number", "single", {"ag_decay": 0}, "ag_decay"),
    ("version-number", "single", {"hiresdiff": 1}, "hiresdiff"),
    ("prompt-seen-list", "single", {"prompt_seen": ["a"]}, "prompt_seen"),
    ("fit-number", "single", {"fit": 3}, "fit"),
    ("controlnet-number", "single", {"controlnet": 1}, "controlnet"),
    ("control-scale-string", "single", {"controlnet": "net", "control_scale": "1"}, "control_scale"),
    # top-level fields: range and names (checked as the command line checks them)
    ("model-unknown", "single", {"model": "no-such-model"}, "model"),
    ("dtype-unknown", "single", {"dtype": "float8"}, "dtype"),
    ("method-unknown", "single", {"method": "nope"}, "method"),
    ("width-negative", "single", {"width": -256}, "width"),
    ("width-off-grid", "single", {"width": 250}, "width"),
    ("steps-zero", "single", {"steps": 0}, "steps"),
    ("guidance-negative", "single", {"guidance": -1}, "guidance"),
    ("scheduler-unknown", "single", {"scheduler": "nope"}, "scheduler"),
    ("seed-negative", "single", {"seed": -1}, "seed"),
    ("seed-null", "single", {"seed": None}, "seed"),
    ("max-batch-zero", "single", {"max_batch": 0}, "max_batch"),
    ("tile-area-negative", "single", {"decode_tile_area": -1}, "decode_tile_area"),
    ("strength-without-image", "single", {"strength": 0.5}, "strength"),
    ("ag-lambda-negative", "single", {"ag_lambda": -1}, "ag_lambda"),
    ("ag-delay-negative", "single", {"ag_delay": -1}, "ag_delay"),
    ("ag-decay-unknown", "single", {"ag_decay": "nope"}, "ag_decay"),
    ("fit-without-image", "single", {"fit": "crop"}, "fit"),
    # the record's own structure: missing and unknown fields
    ("steps-missing", "single", {"steps": DELETE}, "steps"),
    ("params-missing", "single", {"params": DELETE}, "params"),
    ("model-missing", "batch", {"model": DELETE}, "model"),
    ("control-scale-missing", "single", {"controlnet": "net"}, "control_scale"),
    ("unknown-field", "single", {"colour": "red"}, "colour"),
    # params: a non-object, entries of another type or range, unknown entries
    ("params-list", "single", {"params": [1]}, "params"),
    ("params-string", "single", {"params": "sigma=1"}, "params"),
    ("param-list", "single", {"params.sigma": [0.8]}, "params.sigma"),
    ("param-string", "single", {"params.sigma": "0.8"}, "params.sigma"),
    ("param-bool-string", "single", {"params.jitter": "yes"}, "params.jitter"),
    ("param-int-float", "single", {"params.start_step": 1.5}, "params.start_step"),
    ("param-optional-list", "single", {"params.window": [128]}, "params.window"),
    ("param-unknown", "single", {"params.nope": 1}, "params.nope"),
    ("param-range", "single", {"params.start_step": -1}, "params.start_step"),
    # batch: a non-object, its sub-fields in type and range, missing and unknown sub-fields, its index
    ("batch-string", "batch", {"batch": "2"}, "batch"),
    ("batch-list", "batch", {"batch": [1]}, "batch"),
    ("batch-index-string", "batch", {"batch.index": "1"}, "batch.index"),
    ("batch-index-outside", "batch", {"batch.index": 5}, "batch.index"),
    ("batch-index-negative", "batch", {"batch.index": -1}, "batch.index"),
    ("batch-prompts-string", "batch", {"batch.prompts": "a red fox"}, "batch.prompts"),
    ("batch-prompts-numbers", "batch", {"batch.prompts": [1, 2]}, "batch.prompts"),
    ("batch-prompts-empty", "batch", {"batch.negative_prompts": None, "batch.prompts": []}, "batch.prompts"),
    ("batch-negatives-number", "batch", {"batch.negative_prompts": 3}, "batch.negative_prompts"),
    ("batch-negatives-count", "batch", {"batch.negative_prompts": ["x"]}, "batch.negative_prompts"),
    ("batch-per-prompt-string", "batch", {"batch.images_per_prompt": "1"}, "batch.images_per_prompt"),
    ("batch-per-prompt-zero", "batch", {"batch.images_per_prompt": 0}, "batch.images_per_prompt"),
    ("batch-first-seed-string", "batch", {"batch.first_seed": "0"}, "batch.first_seed"),
    ("batch-first-seed-negative", "batch", {"batch.first_seed": -1}, "batch.first_seed"),
    ("batch-first-seed-null", "batch", {"batch.first_seed": None}, "batch.first_seed"),
    ("batch-index-missing", "batch", {"batch.index": DELETE}, "batch.index"),
    ("batch-unknown", "batch", {"batch.rows": 2}, "batch.rows"),
    ("batch-contradicts-prompt", "batch", {"prompt": "a green frog"}, "prompt"),
    ("batch-contradicts-seed", "batch", {"seed": 7}, "seed"),
    # image / control_image / loras records
    ("image-string", "single", {"image": "photo.png"}, "image"),
    ("image-width-string", "single", {"image": IMAGE, "image.width": "128"}, "image.width"),
    ("image-sha-number", "single", {"image": IMAGE, "image.sha256": 5}, "image.sha256"),
    ("image-notes-string", "single", {"image": IMAGE, "image.notes": "resized"}, "image.notes"),
    ("image-name-missing", "single", {"image": IMAGE, "image.name": DELETE}, "image.name"),
    ("image-unknown", "single", {"image": IMAGE, "image.path": "/x"}, "image.path"),
    ("image-not-passed", "single", {"image": IMAGE}, "image"),
    ("control-image-list", "single", {"control_image": [1]}, "control_image"),
    ("control-image-name", "single", {"control_image": IMAGE, "control_image.name": 1}, "control_image.name"),
    ("loras-object", "single", {"loras": LORA}, "loras"),
    ("loras-numbers", "single", {"loras": [1]}, "loras"),
    ("lora-scale-string", "single", {"loras": [LORA], "loras.0.scale": "0.8"}, "loras[0].scale"),
    ("lora-path-missing", "single", {"loras": [LORA], "loras.0.path": DELETE}, "loras[0].path"),
    ("lora-unknown", "single", {"loras": [LORA], "loras.0.weight": 1}, "loras[0].weight"),
    ("lora-missing-file", "single", {"loras": [LORA], "loras.0.path": "missing.safetensors"}, "loras"),
]


def _tampered(record: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """A deep copy of ``record`` with each dotted path of ``changes`` (list items by number) set to its value, or
    removed for :data:`DELETE`."""
    out = json.loads(json.dumps(record))
    for path, value in changes.items():
        *parents, last = path.split(".")
        holder: Any = out
        for key in parents:
            holder = holder[int(key)] if isinstance(holder, list) else holder[key]
        if value is DELETE:
            del holder[last]
        else:
            holder[last] = json.loads(json.dumps(value))
    return out


@pytest.mark.parametrize(("base", "changes", "field"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_a_tampered_record_is_one_line_naming_png_and_field(
    batch_record: dict[str, Any],
    no_weights: None,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    base: str,
    changes: dict[str, Any],
    field: str,
) -> None:
    record = batch_record if base == "batch" else _single(batch_record)
    png = save_png(Image.new("RGB", (8, 8)), tmp_path / "tampered.png", _tampered(record, changes))
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(["generate", "--from-png", str(png), "--quiet", "--out", str(out)]) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"hiresdiff: error: --from-png {str(png)!r}: field {field!r}: "), lines[0]
    assert "Traceback" not in captured.err and captured.out == ""
    assert not out.exists()


def test_every_record_is_accepted_untampered(batch_record: dict[str, Any], no_weights: None, tmp_path: Path) -> None:
    """The baselines of the cases are valid: each case fails for its own field."""
    for name, record in (("batch", batch_record), ("single", _single(batch_record))):
        png = save_png(Image.new("RGB", (8, 8)), tmp_path / f"{name}.png", record)
        request = read_request(str(png))
        assert request.kwargs["model"] == "tiny-sdxl"
        assert request.keep == (1 if name == "batch" else None)


def test_a_string_batch_is_one_line_at_the_entry_point(batch_record: dict[str, Any], tmp_path: Path) -> None:
    png = save_png(Image.new("RGB", (8, 8)), tmp_path / "x.png", {**batch_record, "batch": "2"})
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "hiresdiff.cli", "generate", "--from-png", str(png), "--out", str(tmp_path / "o")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == (
        f"hiresdiff: error: --from-png {str(png)!r}: field 'batch': must be an object, got \"2\""
    )


def test_a_model_flag_is_not_blamed_on_the_png(batch_record: dict[str, Any], no_weights: None, tmp_path: Path) -> None:
    png = save_png(Image.new("RGB", (8, 8)), tmp_path / "x.png", batch_record)
    with pytest.raises(HiresError) as info:
        read_request(str(png), model="no-such-model")
    assert not str(info.value).startswith("--from-png")


def test_an_input_file_the_png_does_not_name_is_refused(batch_record: dict[str, Any], tmp_path: Path) -> None:
    png = save_png(Image.new("RGB", (8, 8)), tmp_path / "x.png", batch_record)
    with pytest.raises(HiresError, match="made without --image; drop it"):
        read_request(str(png), image=str(png))


def test_every_field_type_has_a_json_kind() -> None:
    """Each method parameter's annotation maps onto JSON kinds (a new annotation would otherwise fail at run time)."""
    for method in METHODS.values():
        for name, hint in typing.get_type_hints(method.params).items():
            assert kinds_of(hint), (method.name, name)
    assert {"steps", "seed", "params", "batch", "loras", "image", "control_image"} <= set(SETTINGS_RECORD)


def test_field_named_picks_the_first_setting_the_message_names() -> None:
    sources = {"strength": "strength", "image": "image", "seed": "batch.first_seed", "max_batch": "max_batch"}
    assert field_named("--strength sets how much … it needs --image", sources) == "strength"
    assert field_named("seed must be an integer in [0, 2^63), got -1", sources) == "batch.first_seed"
    assert field_named("--max-batch must be ≥ 1", sources) == "max_batch"
    assert field_named("size 128×128 is below the model's native size", sources) is None
    assert field_named("the seedling is", sources) is None
    assert field_named("Seed must be …", sources) == "batch.first_seed"


@pytest.fixture
def fixed_free(monkeypatch: pytest.MonkeyPatch) -> Any:
    """``set(bytes)``: the free memory the plan sees (the real one changes from call to call)."""
    from hiresdiff import plan

    def set_free(free: int) -> None:
        monkeypatch.setattr(plan, "free_memory", lambda device: free)

    return set_free


def test_the_plan_is_made_for_the_pngs_own_model(
    batch_record: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str], fixed_free: Any
) -> None:
    """The dry run of a tiny-sdxl PNG is the dry run of the command line that made it: the tiny model's FLOPs and
    memory, not the default SDXL's."""
    fixed_free(64 * 2**30)
    png = save_png(Image.new("RGB", (8, 8)), tmp_path / "x.png", batch_record)
    capsys.readouterr()
    assert main(["generate", *ARGV, "--dry-run", "--out", str(tmp_path / "a")]) == 0
    direct = capsys.readouterr().out
    assert main(["generate", "--from-png", str(png), "--dry-run", "--out", str(tmp_path / "b")]) == 0
    again = capsys.readouterr().out
    assert again == direct.replace(" (auto)", "")  # the PNG's recorded number is explicit
    assert "cost model (tiny-sdxl)" in again and "est. peak" in again


def test_the_memory_check_runs_against_the_pngs_model(
    batch_record: dict[str, Any],
    no_weights: None,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    fixed_free: Any,
) -> None:
    """With 1 MiB free the tiny model's estimate does not fit: the plan line shows its estimate and the memory check
    stops the run before any weights load."""
    fixed_free(2**20)
    png = save_png(Image.new("RGB", (8, 8)), tmp_path / "x.png", batch_record)
    capsys.readouterr()
    out = tmp_path / "out"
    assert main(["generate", "--from-png", str(png), "--out", str(out)]) == 2
    plan_line, error = capsys.readouterr().err.splitlines()
    peak = plan_line.split("est. peak ")[1].split(",")[0]
    assert plan_line.startswith("plan: demofusion 256×256") and "2 image(s)" in plan_line
    assert error.startswith(f"hiresdiff: error: estimated peak memory {peak} (")
    assert "exceeds the 1 MiB free on cpu" in error and "MiB" in peak
    assert not out.exists()
