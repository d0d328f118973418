"""hiresdiff eval: crop protocols, FID/KID/IS/CLIP against hand computations with tiny networks, offline errors, CLI."""

from __future__ import annotations

import copy
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from hiresdiff.cli import build_parser, main
from hiresdiff.errors import HiresError
from hiresdiff.evaluation import (
    ClipScorer,
    CropBox,
    Extractors,
    crop_boxes,
    evaluate,
    parse_crop_spec,
    plan_evaluation,
)
from hiresdiff.evaluation import weights as weights_mod
from hiresdiff.evaluation.cli import run_eval
from hiresdiff.evaluation.extractors import CLIP_MEAN, CLIP_STD, clip_scorer, complete_extractors
from hiresdiff.evaluation.views import ViewRequest, prefetch, prepare
from hiresdiff.images import save_png
from hiresdiff.models.tokenizer import BYTE_VOCAB_SIZE, byte_level_clip_tokenizer

NOISE_LEVELS = (0, 20, 40, 80)


class TinyInception(nn.Module):
    """Deterministic stand-in for Inception: uint8 (B, 3, S, S) → (8 tanh features, 5 logits)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 4, stride=4)
        self.fc = nn.Linear(8, 5)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        assert x.dtype == torch.uint8
        features = torch.tanh(self.conv(x.float() / 127.5 - 1)).mean((2, 3))
        return features, self.fc(features)


def brightness(x: torch.Tensor) -> torch.Tensor:
    """A no-reference 'quality metric' for tests: mean pixel value in [0, 1]."""
    return x.mean(dim=(1, 2, 3))


def write_set(folder: Path, arrays: list[np.ndarray], model: str | None = "tiny-sd") -> Path:
    for i, arr in enumerate(arrays):
        settings = {"prompt": f"photo number {i}", "model": model} if model else None
        save_png(Image.fromarray(arr), folder / f"{i:03d}.png", settings)
    return folder


def noisy(base: list[np.ndarray], sigma: float) -> list[np.ndarray]:
    out = []
    for i, b in enumerate(base):
        noise = np.random.default_rng(100 + i).normal(0.0, 1.0, b.shape) * sigma
        out.append(np.clip(b + noise, 0, 255).astype(np.uint8))
    return out


def random_images(n: int, height: int, width: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for _ in range(n)]


def as_input(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(arr).permute(2, 0, 1)[None]


def tiny_clip() -> ClipScorer:
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={
            "vocab_size": BYTE_VOCAB_SIZE,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "max_position_embeddings": 77,
            "bos_token_id": 0,
            "eos_token_id": 1,
            "pad_token_id": 1,
        },
        vision_config={
            "image_size": 32,
            "patch_size": 8,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
        },
        projection_dim=16,
    )
    return ClipScorer(CLIPModel(config).eval(), byte_level_clip_tokenizer())


@pytest.fixture(scope="module")
def sets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A reference set of 12 random 64×48 images and copies with growing noise (σ in NOISE_LEVELS)."""
    root = tmp_path_factory.mktemp("sets")
    base = random_images(12, 48, 64)
    out = {"ref": write_set(root / "ref", base)}
    for sigma in NOISE_LEVELS:
        out[f"noise{sigma}"] = write_set(root / f"noise{sigma}", noisy(base, sigma))
    return out


@pytest.fixture(scope="module")
def clip() -> ClipScorer:
    return tiny_clip()


TINY = Extractors(inception=TinyInception(), input_size=32)


def run(images: Path, **kwargs: object) -> dict[str, float | None]:
    kwargs.setdefault("extractors", TINY)
    return evaluate(images, progress=False, workers=0, **kwargs).metrics  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------- crop protocol


def test_crop_specs_counts_and_sizes() -> None:
    native = parse_crop_spec("native")
    assert (native.kind, native.size, native.counts(3)) == ("native", None, [1, 1, 1])
    assert native.with_native(1024).size == 1024
    windows = parse_crop_spec("windows:10")
    assert windows.counts(4) == [10] * 4 and windows.with_native(512).spec == "windows:10x512"
    assert parse_crop_spec("windows:3x256").size == 256
    fixed = parse_crop_spec("fixed:10x299")
    assert (fixed.size, fixed.counts(4), fixed.spec) == (299, [3, 3, 3, 1], "fixed:10x299")
    assert fixed.with_native(1024).size == 299  # explicit size wins
    assert parse_crop_spec("fixed:5x16").counts(4) == [2, 2, 1, 0]
    assert sum(parse_crop_spec("fixed:50000x299").counts(1000)) == 50000
    for bad in (
        "",
        "native:2",
        "windows",
        "windows:0",
        "fixed:10",
        "fixed:0x16",
        "fixed:10x0",
        "random:3",
        "fixed:ax3",
    ):
        with pytest.raises(HiresError, match="--crops"):
            parse_crop_spec(bad)


def test_crop_boxes_are_pure_seeded_in_bounds_and_prefix_stable() -> None:
    boxes = crop_boxes(200, 120, 64, 50, seed=3)
    assert boxes == crop_boxes(200, 120, 64, 50, seed=3)
    assert boxes != crop_boxes(200, 120, 64, 50, seed=4)
    assert boxes != crop_boxes(200, 121, 64, 50, seed=3)  # positions depend on the image size
    assert all(isinstance(b, CropBox) and b.size == 64 for b in boxes)
    assert all(0 <= b.left <= 200 - 64 and 0 <= b.top <= 120 - 64 for b in boxes)
    assert {b.left for b in boxes} != {boxes[0].left}  # not degenerate
    assert crop_boxes(200, 120, 64, 7, seed=3) == boxes[:7]
    assert crop_boxes(64, 64, 64, 3, seed=0) == [CropBox(0, 0, 64)] * 3
    # pinned: the protocol must not drift between versions, or old and new results stop being comparable
    assert crop_boxes(4096, 4096, 1024, 2, seed=0) == [CropBox(2921, 2096, 1024), CropBox(31, 79, 1024)]
    with pytest.raises(HiresError, match="does not fit"):
        crop_boxes(63, 200, 64, 1, seed=0)


def test_crop_positions_shared_by_methods_and_reference(tmp_path: Path) -> None:
    a = write_set(tmp_path / "a", random_images(4, 48, 64, seed=1))
    b = write_set(tmp_path / "b", random_images(4, 48, 64, seed=2))
    ref = write_set(tmp_path / "ref", random_images(6, 48, 64, seed=3))
    other = write_set(tmp_path / "other", random_images(4, 40, 64, seed=4))
    kwargs = {"reference": ref, "metrics": "fid,is", "crops": "windows:3", "native": 24, "seed": 7}
    pa, pb, po = (plan_evaluation(x, **kwargs) for x in (a, b, other))  # type: ignore[arg-type]
    assert pa.generated.boxes == pb.generated.boxes
    assert pa.reference is not None and pa.reference.boxes[:4] == pa.generated.boxes
    assert all(boxes == pa.generated.boxes[0] for boxes in pa.reference.boxes)  # same size → same positions
    assert po.generated.boxes[0] != pa.generated.boxes[0]  # another size → other positions
    assert plan_evaluation(a, **{**kwargs, "seed": 8}).generated.boxes != pa.generated.boxes  # type: ignore[arg-type]
    assert pa.generated.n_crops == 12 and pa.crops is not None and pa.crops.size == 24
    fixed = plan_evaluation(a, **{**kwargs, "crops": "fixed:10x16"})  # type: ignore[arg-type]
    assert [len(x) for x in fixed.generated.boxes] == [3, 3, 3, 1]
    assert fixed.reference is not None and [len(x) for x in fixed.reference.boxes] == [2] * 5 + [0]
    views = prepare(pa.generated.records[0], pa.generated.boxes[0], ViewRequest(input_size=32))
    assert views.whole is not None and views.whole.shape == (3, 32, 32) and views.whole.dtype == torch.uint8
    assert views.crops is not None and views.crops.shape == (3, 3, 32, 32)


def test_native_crop_size_from_png_model_or_flag(tmp_path: Path) -> None:
    imgs = write_set(tmp_path / "tiny_sd", random_images(2, 130, 160))  # tiny-sd: native 128 px
    assert plan_evaluation(imgs, metrics="is", crops="native").crops.size == 128  # type: ignore[union-attr]
    assert plan_evaluation(imgs, metrics="is", crops="native", native=64).crops.size == 64  # type: ignore[union-attr]
    small = write_set(tmp_path / "small", random_images(2, 48, 64))
    with pytest.raises(HiresError, match=r"128 px crop does not fit 000\.png \(64×48\)"):
        plan_evaluation(small, metrics="is", crops="native")
    plain = write_set(tmp_path / "plain", random_images(2, 48, 64), model=None)
    with pytest.raises(HiresError, match=r"000.png names no model\); pass --native PX"):
        plan_evaluation(plain, metrics="is", crops="windows:2")
    unknown = write_set(tmp_path / "unknown", random_images(2, 48, 64), model="no/such-model")
    with pytest.raises(HiresError, match=r"native size of model 'no/such-model'.*pass --native PX"):
        plan_evaluation(unknown, metrics="is", crops="native")


def test_prefetch_keeps_order() -> None:
    def slow_square(i: int) -> int:
        time.sleep(0.002 * ((7 * i) % 5))
        return i * i

    assert list(prefetch(slow_square, range(20), workers=3)) == [i * i for i in range(20)]
    assert list(prefetch(slow_square, range(5), workers=0)) == [0, 1, 4, 9, 16]


# ------------------------------------------------------------------------------------------- metric values


def test_fid_is_zero_for_identical_sets_and_grows_with_noise(sets: dict[str, Path]) -> None:
    results = [run(sets[f"noise{s}"], reference=sets["ref"], metrics="fid", crops="fixed:30x16") for s in NOISE_LEVELS]
    fid = [r["fid"] for r in results]
    fid_crop = [r["fid_crop"] for r in results]
    assert abs(fid[0]) < 1e-9 and abs(fid_crop[0]) < 1e-9  # type: ignore[arg-type]
    assert fid == sorted(fid) and len(set(fid)) == len(fid), fid
    assert fid_crop == sorted(fid_crop) and len(set(fid_crop)) == len(fid_crop), fid_crop  # type: ignore[type-var]
    assert fid[-1] > 5 * fid[1]  # type: ignore[operator]


def _unbiased_mmd2(x: torch.Tensor, y: torch.Tensor) -> float:
    """Bińkowski et al. 2018, unbiased MMD² with k(a, b) = (aᵀb / d + 1)³, by hand."""
    m, d = x.shape
    k = lambda a, b: (a @ b.T / d + 1) ** 3  # noqa: E731
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    off = lambda g: (g.sum() - g.diagonal().sum()) / (m * (m - 1))  # noqa: E731
    return float(off(kxx) + off(kyy) - 2 * kxy.mean())


def test_kid_with_fewer_images_than_subset_size(tmp_path: Path) -> None:
    gen = random_images(5, 32, 32, seed=1)
    ref = random_images(5, 32, 32, seed=2)
    result = evaluate(
        write_set(tmp_path / "gen", gen),
        reference=write_set(tmp_path / "ref", ref),
        metrics="kid",
        extractors=TINY,
        progress=False,
    )
    assert result.details["kid_subset_size"] == {"kid": 5}
    assert result.notes == ["kid: subset size 1000 clamped to 5 (only 5 images)"]
    net = TinyInception()
    with torch.no_grad():
        fx = torch.cat([net(as_input(a))[0] for a in ref]).double()
        fy = torch.cat([net(as_input(a))[0] for a in gen]).double()
    # every subset holds all five samples: the mean is the full-set estimator, the spread zero
    assert result.metrics["kid"] == pytest.approx(_unbiased_mmd2(fx, fy), rel=1e-9, abs=1e-12)
    assert result.metrics["kid_std"] == pytest.approx(0.0, abs=1e-12)
    one = write_set(tmp_path / "one", gen[:1])
    with pytest.raises(HiresError, match="KID need at least 2 generated and 2 reference images"):
        evaluate(one, reference=tmp_path / "ref", metrics="kid", extractors=TINY, progress=False)


def test_inception_score_equals_formula_for_one_split(tmp_path: Path) -> None:
    arrays = random_images(7, 32, 32, seed=5)
    folder = write_set(tmp_path / "gen", arrays)
    value = evaluate(folder, metrics="is", is_splits=1, extractors=TINY, progress=False, workers=2).metrics
    with torch.no_grad():
        logits = torch.cat([TinyInception()(as_input(a))[1] for a in arrays]).double()
    p = logits.softmax(dim=1)
    marginal = p.mean(dim=0, keepdim=True)
    kl = (p * (p.log() - marginal.log())).sum(dim=1)
    assert value["is"] == pytest.approx(math.exp(float(kl.mean())), rel=1e-9)
    assert value["is_std"] is None  # one split has no spread


def test_clip_score_equals_hand_computation(tmp_path: Path, clip: ClipScorer) -> None:
    arrays = random_images(3, 32, 32, seed=6)
    folder = write_set(tmp_path / "gen", arrays)
    prompts = {"000.png": "a", "001.png": "a much longer prompt, padded in its batch", "002.png": "photo"}
    value = evaluate(folder, metrics="clip", prompts=prompts, extractors=Extractors(clip=clip), batch_size=2)
    tokenizer, model = byte_level_clip_tokenizer(), clip.model
    cosines = []
    with torch.no_grad():
        for arr, prompt in zip(arrays, prompts.values(), strict=True):
            x = torch.from_numpy(arr / 255.0).permute(2, 0, 1).float()
            x = (x - torch.tensor(CLIP_MEAN).view(3, 1, 1)) / torch.tensor(CLIP_STD).view(3, 1, 1)
            image = model.visual_projection(model.vision_model(pixel_values=x[None]).pooler_output)
            ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
            text = model.text_projection(model.text_model(input_ids=ids).pooler_output)
            cosines.append(float(torch.cosine_similarity(image, text)))
    assert min(cosines) < 0 < max(cosines)  # both branches of max(cos, 0) are exercised
    expected = sum(100 * max(c, 0.0) for c in cosines) / len(cosines)
    assert value.metrics["clip"] == pytest.approx(expected, rel=1e-4)
    flipped = copy.deepcopy(clip.model)
    with torch.no_grad():
        flipped.visual_projection.weight.neg_()  # every cosine changes sign
    negative = ClipScorer(flipped, tokenizer)
    pixels = torch.stack([negative.pixels(Image.fromarray(a)) for a in arrays])
    got = negative(pixels, list(prompts.values())).tolist()
    assert got == pytest.approx([100 * max(-c, 0.0) for c in cosines], rel=1e-4, abs=1e-6)


def test_prompts_csv_overrides_png_prompts_and_previews_are_skipped(tmp_path: Path) -> None:
    folder = write_set(tmp_path / "gen", random_images(2, 32, 32))
    save_png(Image.new("RGB", (32, 32)), folder / "000-demofusion-seed0-phase1of2.png", {"prompt": "x"})
    csv_path = tmp_path / "prompts.csv"
    csv_path.write_text('file,prompt\n000.png,"a red, round apple"\n', encoding="utf-8")
    plan = plan_evaluation(folder, metrics="clip", prompts=csv_path)
    assert [r.path.name for r in plan.generated.records] == ["000.png", "001.png"]
    assert plan.prompts == ["a red, round apple", "photo number 1"]
    bare = write_set(tmp_path / "bare", random_images(1, 32, 32), model=None)
    with pytest.raises(HiresError, match=r"no prompt for 000\.png"):
        plan_evaluation(bare, metrics="clip")


# ------------------------------------------------------------------------------------------- missing weights


def one_line(exc: pytest.ExceptionInfo[HiresError]) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


def test_offline_inception_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(HiresError) as exc:
        weights_mod.inception_weights(None)
    message = one_line(exc)
    assert weights_mod.INCEPTION_WEIGHTS in message and str(tmp_path / "torch" / "hub" / "checkpoints") in message
    assert "--inception-weights" in message
    cached = tmp_path / "torch" / "hub" / "checkpoints" / weights_mod.INCEPTION_WEIGHTS
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"x")
    assert weights_mod.inception_weights(None) == str(cached)
    with pytest.raises(HiresError, match=r"--inception-weights '/no/such\.pth' is not a file"):
        weights_mod.inception_weights("/no/such.pth")


def test_offline_pyiqa_and_clip_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(HiresError) as exc:
        weights_mod.check_pyiqa_weights("musiq")
    assert "musiq_koniq_ckpt-e95806b9.pth" in one_line(exc) and str(tmp_path / "torch" / "hub" / "pyiqa") in one_line(
        exc
    )
    with pytest.raises(HiresError, match=r"CLIPIQA weights RN50\.pt are missing"):
        weights_mod.check_pyiqa_weights("clipiqa")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    with pytest.raises(HiresError) as exc:
        clip_scorer("openai/clip-vit-large-patch14")
    message = one_line(exc)
    assert "'openai/clip-vit-large-patch14'" in message and str(tmp_path / "hf") in message and "offline" in message
    with pytest.raises(HiresError, match="is not a folder"):
        clip_scorer(str(tmp_path / "no-such-clip"))


def test_offline_switches(monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("HIRESDIFF_OFFLINE", raising=False)
    assert not weights_mod.offline()
    monkeypatch.setenv("HIRESDIFF_OFFLINE", "1")
    assert weights_mod.offline()


def test_unimportable_metric_packages_fail_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)
    monkeypatch.setitem(sys.modules, "pyiqa", None)
    cpu = torch.device("cpu")
    for metric, package in (("fid", "torch_fidelity"), ("musiq", "pyiqa")):
        with pytest.raises(HiresError) as exc:
            complete_extractors(None, [metric], cpu)
        assert package in one_line(exc) and "pip install 'hiresdiff[eval]'" in one_line(exc)
    monkeypatch.setitem(sys.modules, "torchmetrics.image.kid", None)
    folder = write_set(tmp_path / "gen", random_images(2, 32, 32))
    with pytest.raises(HiresError) as exc:
        evaluate(folder, reference=folder, metrics="kid", extractors=TINY, progress=False)
    assert "FID/KID/IS: torchmetrics cannot be imported" in one_line(exc)


# ------------------------------------------------------------------------------------------- command line


@pytest.fixture()
def no_networks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if evaluation gets as far as building networks."""

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("networks built before the input checks failed")

    monkeypatch.setattr("hiresdiff.evaluation.evaluator.complete_extractors", forbidden)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["{missing}"], "is not a folder"),
        (["{empty}"], "holds no images"),
        (["{gen}", "--metrics", "fid,sharpness"], "unknown 'sharpness'"),
        (["{gen}", "--crops", "fixed:10"], "--crops: expected"),
        (["{gen}", "--metrics", "fid,kid"], "FID/KID compare against real images: pass --reference DIR"),
        (["{gen}", "--metrics", "is", "--crop-seed", "-1"], "--crop-seed must not be negative"),
        (["{gen}", "--reference", "{gen}", "--metrics", "fid", "--crops", "fixed:3x99"], "does not fit"),
        (["{bare}", "--metrics", "is", "--crops", "native"], "pass --native PX"),
        (["{bare}", "--metrics", "clip"], "no prompt for 000.png"),
        (["{gen}", "--metrics", "is", "--json", "{empty}"], "is a folder"),
        (["{gen}", "--metrics", "is", "--device", "tpu9"], "--device"),
        (["{gen}", "--metrics", "is", "--batch-size", "0"], "--batch-size"),
        (["{gen}", "--metrics", "clip", "--prompts", "{missing}"], "is not a file"),
    ],
)
def test_cli_errors_are_one_line_before_any_network(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_networks: None, args: list[str], message: str
) -> None:
    paths = {
        "missing": str(tmp_path / "missing"),
        "empty": str(tmp_path / "empty"),
        "gen": str(write_set(tmp_path / "gen", random_images(2, 32, 32))),
        "bare": str(write_set(tmp_path / "bare", random_images(2, 32, 32), model=None)),
    }
    (tmp_path / "empty").mkdir()
    assert main(["eval", *(a.format(**paths) for a in args)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("hiresdiff: error: ") and message in err[0], err


def test_cli_code_path_with_injected_networks_writes_json_and_table(
    sets: dict[str, Path], clip: ClipScorer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "metrics.json"
    argv = ["eval", str(sets["noise20"]), "--reference", str(sets["ref"]), "--metrics", "fid,kid,is,clip,musiq"]
    argv += ["--crops", "windows:2", "--native", "24", "--crop-seed", "5", "--json", str(out), "--quiet"]
    ext = Extractors(inception=TinyInception(), input_size=32, clip=clip, iqa={"musiq": brightness})
    assert run_eval(build_parser().parse_args(argv), extractors=ext) == 0
    data = json.loads(out.read_text())
    keys = ["fid", "kid", "kid_std", "is", "is_std", "clip", "musiq", "fid_crop", "kid_crop", "kid_crop_std"]
    assert list(data["metrics"]) == [*keys, "is_crop", "is_crop_std"]
    d = data["details"]
    assert (d["n_images"], d["n_reference"], d["n_crops"], d["n_reference_crops"]) == (12, 12, 24, 24)
    assert (d["crops"], d["crop_size"], d["crop_seed"]) == ("windows:2x24", 24, 5)
    assert d["is_splits"] == {"is": 6, "is_crop": 8}  # torch.chunk: 12 in 10 → 6 × 2; 24 in 10 → 8 × 3
    assert d["kid_subset_size"] == {"kid": 12, "kid_crop": 24}
    api = evaluate(
        sets["noise20"],
        reference=sets["ref"],
        metrics="fid,kid,is,clip,musiq",
        crops="windows:2",
        native=24,
        crop_seed=5,
        extractors=ext,
        progress=False,
    )
    assert api.metrics == pytest.approx(data["metrics"])
    arrays = [np.asarray(Image.open(p)) for p in sorted(sets["noise20"].glob("*.png"))]
    assert data["metrics"]["musiq"] == pytest.approx(float(np.mean([a.mean() / 255 for a in arrays])), rel=1e-6)
    captured = capsys.readouterr()
    assert "fid_crop" in captured.out and str(out) in captured.out
    assert "kid: subset size 1000 clamped to 12" in captured.err
    assert not list(tmp_path.glob(".*.tmp"))


def test_cli_end_to_end_with_local_clip_folder(tmp_path: Path, clip: ClipScorer) -> None:
    model_dir = tmp_path / "clip"
    clip.model.save_pretrained(model_dir)
    byte_level_clip_tokenizer().save_pretrained(model_dir)
    folder = write_set(tmp_path / "gen", random_images(3, 40, 48, seed=9))
    out = tmp_path / "out.json"
    argv = ["eval", str(folder), "--metrics", "clip", "--clip-model", str(model_dir), "--json", str(out)]
    assert main([*argv, "--device", "cpu", "--quiet"]) == 0
    data = json.loads(out.read_text())
    expected = evaluate(folder, metrics="clip", extractors=Extractors(clip=clip), progress=False).metrics["clip"]
    assert list(data["metrics"]) == ["clip"] and data["metrics"]["clip"] == pytest.approx(expected, rel=1e-5)
