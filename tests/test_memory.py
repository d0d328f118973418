"""Peak-memory estimate: shape-only measurement, the estimate against real runs, and the stop with what fits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import hiresdiff.pipeline as pipeline_mod
import hiresdiff.plan as plan_mod
from hiresdiff import generate
from hiresdiff.cli import main
from hiresdiff.cost.memory import LiveBytes, fused_attention, module_bytes
from hiresdiff.cost.meta import CallPeak
from hiresdiff.cost.model import CostReport
from hiresdiff.memory import MemoryEstimate, free_memory, rows_that_fit, side_scale_that_fits
from hiresdiff.models.tiny import build_builtin
from hiresdiff.pipeline import build_request
from hiresdiff.plan import request_cost

MIB = 2**20
TINY = ["generate", "a red fox", "--model", "tiny-sdxl", "--steps", "2", "--quiet"]


@pytest.fixture
def no_model(monkeypatch):
    monkeypatch.setattr(pipeline_mod.HiresPipeline, "from_model", lambda *a, **k: pytest.fail("a model was loaded"))
    pipeline_mod._CACHE.clear()


def test_live_bytes_counts_allocations_frees_and_no_views():
    weight = torch.empty(1000, device="meta")  # made before: not counted, nor are its views
    with LiveBytes("meta") as live:
        a = torch.empty(1000, device="meta")  # 4000 bytes
        b = a + 1  # 8000 alive
        del a  # 4000
        c = b * 2  # 8000
        view = weight.view(10, 100).t()  # a view allocates nothing
        d = torch.ones(500, device="meta")  # 10000
        cpu = torch.ones(10)  # another device: not counted
    assert (live.peak, live.now()) == (10000, 10000)
    del b, c, view, cpu
    assert live.now() == 2000
    del d
    assert live.now() == 0


def test_fused_attention_same_flops_no_score_matrix():
    q = torch.empty(1, 8, 4096, 64, device="meta")
    counts, peaks = [], []
    for fused in (False, True):
        mode = fused_attention() if fused else torch.no_grad()
        with mode, FlopCounterMode(display=False) as flops, LiveBytes("meta") as live:
            out = F.scaled_dot_product_attention(q, q, q)
        counts.append(flops.get_total_flops())
        peaks.append(live.peak)
        assert out.shape == q.shape
    assert counts[0] == counts[1] > 0
    scores = 8 * 4096 * 4096 * 4
    assert peaks[0] >= scores and peaks[1] < 2 * q.numel() * 4  # the math path builds the scores, fused does not


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32, None])
def test_fused_attention_masks_and_three_dim_inputs(mask_dtype):
    q, k = torch.empty(2, 3, 64, 16, device="meta"), torch.empty(2, 3, 77, 16, device="meta")
    mask = None if mask_dtype is None else torch.zeros(2, 1, 64, 77, dtype=mask_dtype, device="meta")
    original = F.scaled_dot_product_attention
    cpu = torch.randn(1, 2, 8, 4, generator=torch.Generator().manual_seed(0))
    with fused_attention():
        assert F.scaled_dot_product_attention is not original
        assert F.scaled_dot_product_attention(q, k, k, attn_mask=mask).shape == (2, 3, 64, 16)
        assert F.scaled_dot_product_attention(q[:, 0], k[:, 0], k[:, 0], scale=0.5).shape == (2, 64, 16)
        patched = F.scaled_dot_product_attention
        with fused_attention():  # nested: patched once
            assert F.scaled_dot_product_attention is patched
        assert torch.equal(patched(cpu, cpu, cpu, None, 0.0, True), original(cpu, cpu, cpu, None, 0.0, True))
    assert F.scaled_dot_product_attention is original  # restored


def test_report_weights_and_largest_calls():
    pipe = build_builtin("tiny-sdxl", torch.float32, "cpu")
    req = build_request("a fox", "direct", 512, 384, steps=1, previews=False)
    report = request_cost(req, "tiny-sdxl")
    assert report.weights_bytes["denoiser"] == module_bytes(pipe.unet)
    assert report.weights_bytes["vae"] == module_bytes(pipe.vae)
    assert report.weights_bytes["text_encoder"] == module_bytes(pipe.text_encoder) + module_bytes(pipe.text_encoder_2)
    den = report.peaks["denoiser"]
    assert (den.rows, den.cells) == (2, 48 * 64)  # both guidance halves of the 384×512 canvas
    unguided = request_cost(
        build_request("a fox", "direct", 512, 384, steps=1, guidance=1.0, previews=False), "tiny-sdxl"
    )
    assert unguided.peaks["denoiser"].rows == 1
    assert 0.4 < unguided.peaks["denoiser"].activations / den.activations < 0.6  # activations ∝ rows


def test_max_batch_bounds_the_rows_of_a_call():
    rows = {}
    for mb in (2, 8):
        req = build_request("a fox", "demofusion", 768, 768, steps=1, max_batch=mb, previews=False)
        rows[mb] = request_cost(req, "tiny-sdxl").peaks["denoiser"].rows
    assert rows == {2: 2, 8: 8}


@pytest.mark.parametrize(
    ("model", "method", "width", "height", "settings"),
    [
        ("tiny-sd", "direct", 384, 384, {"decode_tile_area": 0}),  # a denoiser call sets the peak
        ("tiny-sdxl", "direct", 768, 512, {}),  # the untiled VAE decode
        ("tiny-sdxl", "direct", 768, 768, {"decode_tile_area": 0}),  # blending decoded tiles
        ("tiny-sdxl", "demofusion", 768, 512, {"max_batch": 2}),
        ("tiny-flux", "direct", 512, 512, {"decode_tile_area": 0, "guidance": 3.5}),
    ],
)
def test_estimate_equals_the_memory_of_a_real_run(model, method, width, height, settings):
    """A real CPU run allocates exactly what the shape-only run predicts (same kernels: fused attention)."""
    kwargs = {"steps": 2, "previews": False, "max_batch": 8, **settings}  # auto would run the cost model too
    generate("a fox", method, model, width, height, progress=False, **kwargs)  # load outside the measurement
    with LiveBytes("cpu") as real:
        generate("a fox", method, model, width, height, progress=False, **kwargs)
    est = MemoryEstimate.of(
        request_cost(build_request("a fox", method, width, height, **kwargs), model), torch.float32, False
    )
    assert est.peak - sum(est.weights.values()) == real.peak


def _report(**peaks: CallPeak) -> CostReport:
    zero = dict.fromkeys(("denoiser_flops", "vae_flops", "text_encoder_flops", "native_samples"), 0.0)
    counts = dict.fromkeys(("denoiser_calls", "denoiser_samples", "vae_calls", "text_encoder_calls"), 0)
    return CostReport(
        "direct", "m", "a", 64, 64, 1, 1, **zero, **counts,
        weights_bytes={"denoiser": 800 * MIB, "vae": 100 * MIB, "text_encoder": 200 * MIB},
        peaks=peaks, canvas_bytes=10 * MIB, vae_upcast=True,
    )  # fmt: skip


def test_estimate_formula_dtype_upcast_and_low_vram():
    report = _report(denoiser=CallPeak(20 * MIB, 400 * MIB, 4, 1024), vae=CallPeak(30 * MIB, 1000 * MIB, 1, 4096))
    fp32 = MemoryEstimate.of(report, torch.float32, low_vram=False)
    assert fp32.at("denoiser") == (1100 + 20 + 400) * MIB and fp32.at("vae") == (1100 + 30 + 1000) * MIB
    assert fp32.largest == "vae" and fp32.peak == 2130 * MIB
    half = MemoryEstimate.of(report, torch.float16, low_vram=False)  # the VAE stays float32 (force_upcast)
    assert half.weights == {"denoiser": 400 * MIB, "vae": 100 * MIB, "text_encoder": 100 * MIB}
    assert half.at("denoiser") == (600 + 20 + 200) * MIB and half.at("vae") == (600 + 30 + 1000) * MIB
    low = MemoryEstimate.of(report, torch.float16, low_vram=True)  # one component on the device at a time
    assert low.at("denoiser") == (400 + 20 + 200) * MIB and low.at("vae") == (100 + 30 + 1000) * MIB
    assert low.at("canvas") == 400 * MIB + 10 * MIB  # the largest set of weights ever on the device
    assert "vae call of 1 × 4,096 cells" in low.describe()


def test_what_fits_helpers():
    report = _report(denoiser=CallPeak(0, 800 * MIB, 8, 4096), vae=CallPeak(0, 10 * MIB, 1, 4096))
    est = MemoryEstimate.of(report, torch.float32, low_vram=False)  # denoiser call: 100 MiB per row
    assert rows_that_fit(est, (1100 + 450) * MIB, cfg=True) == 4
    assert rows_that_fit(est, (1100 + 450) * MIB, cfg=False) == 4
    assert rows_that_fit(est, (1100 + 150) * MIB, cfg=True) is None  # one sample needs both halves
    assert side_scale_that_fits(est, (1100 + 200) * MIB, full_cells=4096) == pytest.approx(0.5)
    assert side_scale_that_fits(est, (1100 + 200) * MIB, full_cells=16384) is None  # views, not the canvas


def test_free_memory_of_the_cpu_is_the_available_ram():
    free = free_memory("cpu")
    assert free is not None and 0 < free < 1 << 50
    assert free_memory("meta") is None


def _tight(monkeypatch, mib: float) -> None:
    monkeypatch.setattr(plan_mod, "free_memory", lambda device: int(mib * MIB))


def test_too_little_memory_stops_before_model_work_and_the_advice_fits(tmp_path, capsys, monkeypatch, no_model):
    _tight(monkeypatch, 30)  # tiny-sdxl at 512×384: ~38 MiB, the untiled VAE decode sets the peak
    size = ["--width", "512", "--height", "384"]
    whole = ["--tile-area", str(1024 * 1024)]  # given: kept (the default tile area would be tiled to fit, below)
    assert main([*TINY, *size, *whole, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("hiresdiff: ") and "Traceback" not in err
    assert "estimated peak memory 38 MiB" in err and "exceeds the 30 MiB free on cpu" in err
    assert "what fits: --tile-area 0 (≈18 MiB)" in err and "--skip-memory-check" in err
    assert not (tmp_path / "o").exists()
    assert main([*TINY, *size, "--tile-area", "0", "--dry-run", "--out", str(tmp_path)]) == 0
    capsys.readouterr()
    assert main([*TINY, *size, "--dry-run", "--out", str(tmp_path)]) == 0  # the default: the plan tiles instead
    assert "VAE tiled to fit" in capsys.readouterr().out


def _offered(err: str) -> list[list[str]]:
    """The flags of each change the stop line says would fit."""
    fits = err.split("what fits: ")[1].split(" — ")[0]
    return [change.split(" (≈")[0].split() for change in fits.split(", ")]


def test_fewer_rows_and_a_smaller_size_are_offered_when_the_denoiser_sets_the_peak(tmp_path, capsys, monkeypatch):
    args = ["generate", "a", "--model", "tiny-sd", "--method", "direct", "--steps", "1", "--tile-area", "0", "--quiet"]
    args += ["--width", "384", "--height", "384", "--batch", "2", "--no-previews", "--dry-run", "--out", str(tmp_path)]
    args += ["--max-batch", "8"]  # auto would settle on rows that fit
    settings = {"steps": 1, "decode_tile_area": 0, "num_images_per_prompt": 2, "previews": False, "max_batch": 8}

    def estimate(**change) -> MemoryEstimate:
        req = build_request("a", "direct", 384, 384, **{**settings, **change})
        return MemoryEstimate.of(request_cost(req, "tiny-sd"), torch.float32, False)

    full, two = estimate(), estimate(max_batch=2)
    assert full.largest == "denoiser" and full.peaks["denoiser"].rows == 4 and two.peak < full.peak
    _tight(monkeypatch, (two.peak + full.peak) / 2 / MIB)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "denoiser call of 4 × 2,304 cells" in err and "--max-batch 2 (≈" in err and "--width " in err, err
    for flags in _offered(err):  # every change offered really fits
        assert main([*args, *flags]) == 0, (flags, capsys.readouterr().err)


def test_skip_memory_check_and_the_plan_line(tmp_path, capsys, monkeypatch, no_model):
    _tight(monkeypatch, 1)
    assert main([*TINY, "--dry-run", "--skip-memory-check", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "memory: est. peak" in printed and "1 MiB free on cpu" in printed
    assert main([*TINY, "--dry-run", "--out", str(tmp_path)]) == 2  # the full plan, then the stop
    captured = capsys.readouterr()
    assert "memory: est. peak" in captured.out and "exceeds the 1 MiB free" in captured.err


def test_default_plan_line_has_flops_and_memory(tmp_path, capsys):
    argv = ["generate", "a", "--model", "tiny-sdxl", "--steps", "1", "--no-previews", "--out", str(tmp_path)]
    assert main(argv) == 0
    line = capsys.readouterr().err.splitlines()[0]
    assert line.startswith("plan: demofusion 512×512") and " TFLOP, est. peak " in line and "free on cpu" in line


def _bench(tmp_path, *extra: str) -> list[str]:
    argv = ["bench", "--model", "tiny-sd", "--steps", "1", "--methods", "direct,demofusion", "--sizes", "2x,4x"]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red fox\n")
    return [*argv, "--prompts", str(prompts), "--seeds", "0", "--sheets", "0", "--quiet", *extra]


def test_bench_stops_before_the_model_when_a_group_does_not_fit(tmp_path, capsys, monkeypatch, no_model):
    """A whole decode asked for explicitly is kept (as ``generate --tile-area``): the group does not fit, and the
    one line names it and what would, spelled as bench takes it."""
    import hiresdiff.bench.runner as runner_mod

    monkeypatch.setattr(runner_mod, "free_memory", lambda device: 20 * MIB)
    out = tmp_path / "b"
    assert main([*_bench(tmp_path, "--set", f"decode_tile_area={2048 * 4096}"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("hiresdiff: ") and "\n" not in err
    assert "demofusion_512x512: estimated peak memory 50 MiB" in err  # the largest group is named
    assert "what fits: --set decode_tile_area=0 (≈9 MiB)" in err  # spelled as bench takes it
    assert not list(out.glob("images/*/*.png"))


def test_bench_plans_each_group_as_generate_does(tmp_path, monkeypatch):
    """Every group is planned as ``hiresdiff generate`` plans its request (:func:`hiresdiff.plan.budget_for`):
    with no room for a whole decode the VAE tiles (``decode_tile_area`` 0) and ``max_batch`` auto is settled, and
    each image of the group runs — and is recorded — with those settings."""
    import json

    import hiresdiff.bench.runner as runner_mod
    from hiresdiff.plan import budget_for

    monkeypatch.setattr(runner_mod, "free_memory", lambda device: 20 * MIB)
    out = tmp_path / "b"
    assert main([*_bench(tmp_path, "--no-flops"), "--out", str(out)]) == 0
    records = [json.loads(f.read_text()) for f in out.glob("images/*/*.json")]
    assert len(records) == 4
    for rec in records:
        req = build_request("a red fox", rec["method"], rec["width"], rec["height"], steps=1, seed=0, previews=False)
        b = budget_for(req, "tiny-sd", "cpu", torch.float32, 20 * MIB)
        assert b.tiled and b.auto
        planned = {k: getattr(req.settings, k) for k in ("max_batch", "decode_tile_area")}
        assert {k: rec["settings"][k] for k in planned} == planned == {"max_batch": 2, "decode_tile_area": 0}


@pytest.mark.parametrize("fix", [["--set", "decode_tile_area=0"], ["--skip-memory-check"]])
def test_bench_runs_with_the_advice_or_the_skip(tmp_path, monkeypatch, fix):
    import hiresdiff.bench.runner as runner_mod

    monkeypatch.setattr(runner_mod, "free_memory", lambda device: 20 * MIB)
    out = tmp_path / "b"
    assert main([*_bench(tmp_path, *fix, "--no-flops"), "--out", str(out)]) == 0
    assert len(list(out.glob("images/*/*.png"))) == 4


def test_low_vram_advice_spells_the_sizes_a_request_set_itself():
    from hiresdiff.plan import GENERATE_FLAGS, _spell, low_vram_overrides

    default = build_request("a", "direct", 512, 512).settings
    assert _spell(low_vram_overrides(default), GENERATE_FLAGS, default) == "--low-vram"
    explicit = build_request("a", "direct", 512, 512, max_batch=6, decode_tile_area=4096 * 4096).settings
    spelled = _spell(low_vram_overrides(explicit), GENERATE_FLAGS, explicit)
    assert spelled == "--low-vram --max-batch 1 --tile-area 1048576"


def test_a_failing_cost_model_does_not_stop_the_generation(tmp_path, capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no meta kernel for some op")

    monkeypatch.setattr(plan_mod, "request_cost", broken)
    argv = ["generate", "a", "--model", "tiny-sdxl", "--steps", "1", "--no-previews", "--out", str(tmp_path)]
    assert main(argv) == 0
    line = capsys.readouterr().err.splitlines()[0]
    assert "no cost estimate (cost model failed: RuntimeError: no meta kernel for some op)" in line
    assert len(list(tmp_path.glob("*.png"))) == 1
