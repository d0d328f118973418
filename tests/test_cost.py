"""Cost model (issue #6): closed-form denoiser workloads, exact FLOPs of wrapped modules, CLI."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch

from hiresdiff.cli import main
from hiresdiff.cost import model_cost
from hiresdiff.cost.meta import Ledger, MetaModule, host_zeros


def demofusion_native_per_phase(k: int) -> int:
    """Phase 1: one native sample; phase k ≥ 2 (scale k): (2k−1)² local views + k² dilated samples, each of native
    size; ×2 for the guidance halves."""
    return 2 if k == 1 else 2 * ((2 * k - 1) ** 2 + k**2)


@pytest.mark.parametrize("side", [2048, 3072, 4096])
def test_closed_form_native_samples_demofusion_and_apt(side):
    scale, steps, t0 = side // 1024, 3, 2
    phases = [demofusion_native_per_phase(k) for k in range(1, scale + 1)]
    demo = model_cost("demofusion", "random-sdxl", side, side, steps=steps)
    assert demo.native_samples == steps * sum(phases)
    apt = model_cost("apt", "random-sdxl", side, side, steps=steps, shortcut_steps=t0)
    assert apt.native_samples == steps * phases[0] + t0 * sum(phases[1:])
    # every sample is native-size here, so FLOPs are samples × the FLOPs of one native sample
    one = model_cost("direct", "random-sdxl", 1024, 1024, steps=1).denoiser_flops / 2
    assert demo.denoiser_flops == pytest.approx(demo.native_samples * one, rel=1e-9)
    assert apt.denoiser_flops == pytest.approx(apt.native_samples * one, rel=1e-9)
    assert apt.model_flops < demo.model_flops


def test_demofusion_4096_is_226_native_samples_per_step():
    assert sum(demofusion_native_per_phase(k) for k in range(1, 5)) == 226
    report = model_cost("demofusion", "stabilityai/stable-diffusion-xl-base-1.0", 4096, 4096, steps=2)
    assert report.architecture == "random-sdxl"
    assert report.native_samples_per_step == 226
    assert report.to_dict()["native_samples_per_step"] == 226


def test_sdxl_unet_flops_per_native_sample_match_the_published_count():
    """NOTES: 6.761 TFLOP per SDXL UNet sample at a 128² latent (flop_counter on meta)."""
    report = model_cost("direct", "random-sdxl", 1024, 1024, steps=1, guidance=1.0)
    assert report.denoiser_samples == 1 and report.denoiser_calls == 1
    assert report.denoiser_flops / 1e12 == pytest.approx(6.761, rel=1e-3)
    assert report.text_encoder_calls == 2  # CLIP-L and bigG, no negative branch without guidance
    assert report.vae_calls == 1 and report.vae_flops > 0


def test_neighborhood_attention_is_counted_with_its_processors():
    """Same calls and samples with NPA on or off; NPA's windowed self-attention costs less than full attention,
    and the ScaleDiff 2048² stage with full attention costs what direct sampling of its samples costs."""
    kw = {"steps": 2}
    npa = model_cost("scalediff", "random-sdxl", 2048, 2048, **kw)
    full = model_cost("scalediff", "random-sdxl", 2048, 2048, npa=False, **kw)
    assert (npa.denoiser_calls, npa.native_samples) == (full.denoiser_calls, full.native_samples)
    assert npa.denoiser_flops < full.denoiser_flops
    native = model_cost("direct", "random-sdxl", 1024, 1024, steps=1)
    direct = model_cost("direct", "random-sdxl", 2048, 2048, steps=1)
    stage_steps = (full.native_samples - native.native_samples * kw["steps"]) / direct.native_samples
    assert stage_steps == int(stage_steps) > 0
    expected = native.denoiser_flops * kw["steps"] + direct.denoiser_flops * stage_steps
    assert full.denoiser_flops == pytest.approx(expected, rel=1e-9)


def test_flux_cost_counts_tokens_as_native_samples():
    report = model_cost("direct", "random-flux", 1024, 2048, steps=1)
    assert report.denoiser_calls == 1 and report.denoiser_samples == 1
    assert report.native_samples == 2.0  # twice the native token count, no guidance doubling
    native = model_cost("direct", "random-flux", 1024, 1024, steps=1)
    assert native.native_samples == 1.0
    # twice the tokens: linear layers cost twice as much, attention more than twice
    assert 2 * native.denoiser_flops < report.denoiser_flops < 2.5 * native.denoiser_flops


def test_meta_module_books_exact_flops_and_answers_with_zeros():
    with torch.device("meta"):
        linear = torch.nn.Linear(16, 8)
    ledger = Ledger()
    module = MetaModule(linear, "denoiser", ledger, lambda args, kwargs: (args[0].shape[0], 0.0))
    out = module(torch.ones(5, 16))
    assert out.device.type == "cpu" and out.shape == (5, 8) and not out.any()
    module(torch.ones(5, 16))  # cached signature
    module(torch.ones(3, 16))
    tally = ledger.get("denoiser")
    assert tally.calls == 3 and tally.samples == 13
    assert tally.flops == 2 * 16 * 8 * 13
    assert module.device == torch.device("cpu") and module.in_features == 16


def test_host_zeros_keeps_structure():
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    out = BaseModelOutputWithPooling(last_hidden_state=torch.ones(1, 2, 3), hidden_states=(torch.ones(2),))
    z = host_zeros(out)
    assert isinstance(z, BaseModelOutputWithPooling) and not z.last_hidden_state.any()
    assert z.hidden_states[0].shape == (2,) and z[0].shape == (1, 2, 3)
    dist = host_zeros(DiagonalGaussianDistribution(torch.ones(1, 8, 2, 2, device="meta")))
    assert dist.mean.device.type == "cpu" and dist.mean.shape == (1, 4, 2, 2)


def test_cost_cli_json_and_errors(capsys):
    assert (
        main(
            [
                "cost",
                "--method",
                "apt",
                "--model",
                "tiny-sdxl",
                "--width",
                "512",
                "--height",
                "512",
                "--steps",
                "3",
                "--set",
                "shortcut_steps=2",
                "--json",
                "--peak-tflops",
                "100",
            ]
        )
        == 0
    )
    data = json.loads(capsys.readouterr().out)
    assert data["method"] == "apt" and data["native_samples"] == 3 * 2 + 2 * 26
    assert data["model_flops"] == data["denoiser_flops"] + data["vae_flops"] + data["text_encoder_flops"]
    assert data["flop_bound_s"] == pytest.approx(data["model_flops"] / 1e14)
    assert main(["cost", "--method", "demofusion", "--model", "tiny-sd", "--steps", "2"]) == 0
    assert "native-size denoiser samples: 56 (28 per step)" in capsys.readouterr().out
    for argv, message in [
        (["cost", "--model", "some/unknown-model"], "HF_HUB_OFFLINE"),
        (["cost", "--model", "tiny-sd", "--width", "100"], "latent grid (8 px)"),
        (["cost", "--method", "nope", "--model", "tiny-sd"], "unknown method"),
        (["cost", "--model", "tiny-sd", "--peak-tflops", "0"], "--peak-tflops"),
    ]:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err


def test_accdiffusion_capture_runs_on_every_cost_run():
    """The attention capture records per call, so repeated cost runs (cached signatures) must still record."""
    first = model_cost("accdiffusion", "tiny-sdxl", 512, 512, steps=2)
    again = model_cost("accdiffusion", "tiny-sdxl", 512, 512, steps=2)
    demo = model_cost("demofusion", "tiny-sdxl", 512, 512, steps=2)
    assert first.native_samples == again.native_samples == demo.native_samples == 2 * (2 + 26)
    assert first.denoiser_flops == again.denoiser_flops > demo.denoiser_flops  # + the capture's projections


def _diffusers_folder(root, pipeline: str, sample_size: int) -> str:
    (root / "unet").mkdir(parents=True)
    (root / "vae").mkdir()
    (root / "model_index.json").write_text(json.dumps({"_class_name": pipeline}))
    (root / "unet" / "config.json").write_text(json.dumps({"sample_size": sample_size}))
    (root / "vae" / "config.json").write_text(json.dumps({"block_out_channels": [128, 256, 512, 512]}))
    return str(root)


def test_checkpoints_map_to_the_architecture_of_their_family(tmp_path, capsys):
    from hiresdiff.cost import architecture_of

    finetune = _diffusers_folder(tmp_path / "sdxl-finetune", "StableDiffusionXLPipeline", 128)
    assert architecture_of(finetune) == "random-sdxl"
    assert architecture_of("black-forest-labs/FLUX.1-dev") == "random-flux"
    odd = _diffusers_folder(tmp_path / "sd2-768", "StableDiffusionPipeline", 96)
    assert main(["cost", "--model", odd]) == 2
    err = capsys.readouterr().err
    assert "no built-in architecture" in err and "native 768 px" in err and err.count("\n") == 1


def test_low_vram_changes_batching_not_flops():
    plain = model_cost("demofusion", "tiny-sdxl", 512, 512, steps=2)
    low = model_cost("demofusion", "tiny-sdxl", 512, 512, steps=2, low_vram=True)
    assert low.denoiser_calls > plain.denoiser_calls  # two samples per call instead of eight
    assert low.native_samples == plain.native_samples
    assert low.denoiser_flops == pytest.approx(plain.denoiser_flops, rel=1e-9)


def test_controlnet_flops_are_their_own_line_and_equal_its_calls():
    """direct on tiny-sdxl: every UNet call gets one ControlNet call of the same batch; its FLOPs are counted
    separately (the denoiser's stay as without) and equal the ControlNet's own forward FLOPs per call."""
    from diffusers import ControlNetModel
    from torch.utils.flop_counter import FlopCounterMode

    from hiresdiff.models.tiny import build_builtin

    plain = model_cost("direct", "tiny-sdxl", 256, 256, steps=2)
    with_net = model_cost("direct", "tiny-sdxl", 256, 256, steps=2, controlnet=True)
    assert with_net.denoiser_flops == plain.denoiser_flops and plain.controlnet_flops == 0
    assert with_net.controlnet_calls == with_net.denoiser_calls == 2
    assert with_net.model_flops == pytest.approx(plain.model_flops + with_net.controlnet_flops)
    pipe = build_builtin("tiny-sdxl", torch.float32, "meta")
    with torch.device("meta"):
        net = ControlNetModel.from_unet(pipe.unet, load_weights_from_unet=False)
        x, cond = torch.zeros(2, 4, 32, 32), torch.zeros(2, 3, 256, 256)
        text, pooled, ids = torch.zeros(2, 77, 64), torch.zeros(2, 32), torch.zeros(2, 6)
        with FlopCounterMode(display=False) as counter:
            net(
                x,
                torch.tensor(999),
                encoder_hidden_states=text,
                controlnet_cond=cond,
                return_dict=False,
                added_cond_kwargs={"text_embeds": pooled, "time_ids": ids},
            )
    assert with_net.controlnet_flops == 2 * counter.get_total_flops()
    data = with_net.to_dict()
    assert data["controlnet_flops"] == with_net.controlnet_flops


def test_cost_cli_controlnet_line(capsys):
    assert (
        main(
            [
                "cost",
                "--method",
                "direct",
                "--model",
                "tiny-sdxl",
                "--width",
                "256",
                "--height",
                "256",
                "--steps",
                "2",
                "--controlnet",
            ]
        )
        == 0
    )
    assert "ControlNet" in capsys.readouterr().out
    assert main(["cost", "--method", "direct", "--model", "tiny-flux", "--steps", "2", "--controlnet"]) == 2
    assert "no FLUX ControlNet" in capsys.readouterr().err


def test_ranks_split_the_denoiser_flops_round_robin_and_count_the_all_reduce():
    """direct at the native size: one call per step; with 2 ranks the steps alternate between the ranks (the
    round robin continues across steps) and each step all-reduces one float32 prediction (1 × 4 × 32 × 32)."""
    one = model_cost("direct", "tiny-sdxl", 256, 256, steps=2)
    two = model_cost("direct", "tiny-sdxl", 256, 256, steps=2, ranks=2)
    assert two.denoiser_flops == one.denoiser_flops and one.rank_flops == [one.denoiser_flops]
    assert two.rank_flops == [one.denoiser_flops / 2] * 2 and two.parallel_speedup == 2.0
    assert two.allreduce_bytes == 2 * 4 * (1 * 4 * 32 * 32)
    four = model_cost("demofusion", "tiny-sdxl", 1024, 1024, steps=2, ranks=4)
    assert sum(four.rank_flops) == pytest.approx(four.denoiser_flops) and 1 < four.parallel_speedup <= 4


#: (method, model, side, settings): every method, the three tiny architectures, schedulers whose steps differ
#: (multistep warm-up, Heun's alternating predictor/corrector), batches, ranks, ControlNet, low VRAM, previews
REPLAY_CASES = [
    ("direct", "tiny-sd", 256, {"steps": 7}),
    ("resize", "tiny-sdxl", 512, {"steps": 7, "previews": True}),
    ("multidiffusion", "tiny-sdxl", 512, {"steps": 7, "num_images_per_prompt": 2}),
    ("demofusion", "tiny-sd", 512, {"steps": 7, "scheduler": "dpmpp-2m", "controlnet": True, "low_vram": True}),
    ("demofusion", "tiny-sd", 512, {"steps": 8, "scheduler": "heun"}),
    ("demofusion", "tiny-flux", 512, {"steps": 7}),
    ("accdiffusion", "tiny-sdxl", 768, {"steps": 7, "ranks": 2, "previews": True}),
    ("apt", "tiny-sdxl", 768, {"steps": 8, "preset": "apt-sas"}),
    ("apldm", "tiny-sdxl", 768, {"steps": 7}),
    ("scalediff", "tiny-sdxl", 768, {"steps": 7}),
    ("scalediff", "tiny-flux", 512, {"steps": 7}),
    *[
        (m, "random-sdxl", 2048, {"steps": 6})
        for m in ("direct", "accdiffusion", "apt", "apldm", "scalediff", "resize")
    ],
    *[(m, "random-sdxl", 2048, {"steps": 6, "max_batch": 12}) for m in ("demofusion", "multidiffusion")],
    ("hidiffusion", "tiny-sdxl", 512, {"steps": 16, "num_images_per_prompt": 3}),
    ("scalecrafter", "tiny-sd", 512, {"steps": 16}),
    ("fouriscale", "tiny-sdxl", 512, {"steps": 16, "num_images_per_prompt": 2}),
]
#: cases whose calls hold more rows than the traced bases (2 and 3): their cost is derived (cost/trace.py)
DERIVED = {("multidiffusion", "tiny-sdxl"), ("demofusion", "tiny-flux")} | {
    (m, "random-sdxl") for m in ("demofusion", "multidiffusion")
}


@pytest.mark.parametrize(("method", "model", "side", "settings"), REPLAY_CASES)
def test_replayed_steps_equal_the_full_trace(method, model, side, settings, monkeypatch):
    """The fast estimate (settled steps booked again, :mod:`hiresdiff.cost.replay`; calls of many rows derived from
    traces of 2 and 3 rows, :mod:`hiresdiff.cost.trace`) equals running every step and tracing every call: FLOPs,
    calls, samples, per-rank FLOPs, weights and every peak to the byte — and it did skip steps and traces."""
    import hiresdiff.cost.meta as meta_mod
    import hiresdiff.cost.model as model_mod
    from hiresdiff.cost.replay import replaying

    used, derived = [], []

    def counted(*args):
        found = real_derive(*args)
        derived.append(found is not None)
        return found

    real_derive = meta_mod.derive
    monkeypatch.setattr(meta_mod, "derive", counted)
    if (method, model) in DERIVED:  # fresh shape-only pipelines: no trace of an earlier test answers for them
        monkeypatch.setattr(model_mod, "_PIPES", {})
        monkeypatch.setattr(model_mod, "_CONTROLNETS", {})

    @contextlib.contextmanager
    def spy(*args):
        with replaying(*args) as replay:
            used.append(replay)
            yield replay

    monkeypatch.setattr(model_mod, "replaying", spy)
    fast = model_cost(method, model, side, side, **settings)
    full = model_cost(method, model, side, side, exact=True, **settings)
    assert len(used) == 1 and used[0].replayed > 0  # the fast run skipped steps, the exact one ran them all
    assert all(derived)  # every derivation tried lined up
    assert any(derived) or (method, model) not in DERIVED
    assert fast.to_dict() == full.to_dict()
    assert fast.peaks == full.peaks and fast.canvas_bytes == full.canvas_bytes > 0


@pytest.mark.parametrize(
    ("method", "model", "side", "settings"),
    [
        ("demofusion", "tiny-sdxl", 768, {"steps": 5, "previews": True, "decode_tile_area": 256 * 256}),
        ("apldm", "tiny-sdxl", 768, {"steps": 5, "previews": True}),
        ("demofusion", "tiny-flux", 512, {"steps": 5, "previews": True}),
    ],
)
def test_decodes_seen_before_are_booked_again_and_equal_a_fresh_estimate(method, model, side, settings, monkeypatch):
    """A later estimate of the same request at other rows per call (the auto batch search's next probe) books the
    decodes an earlier one recorded (same latents, settings and bytes alive) instead of running them, and its
    report equals a fresh pipeline's estimate to the byte."""
    import hiresdiff.cost.model as model_mod
    from hiresdiff.cost.replay import SegmentReplay

    monkeypatch.setattr(model_mod, "_PIPES", {})
    monkeypatch.setattr(model_mod, "_CONTROLNETS", {})
    hits: list[bool] = []
    real_run = SegmentReplay.run

    def run(self, key, fn, *args):
        hits.append((key, self.host.now()) in self.records)
        return real_run(self, key, fn, *args)

    monkeypatch.setattr(SegmentReplay, "run", run)
    model_cost(method, model, side, side, max_batch=4, **settings)
    assert hits and not any(hits)  # a new pipeline records every decode
    hits.clear()
    again = model_cost(method, model, side, side, max_batch=2, **settings)
    assert any(hits)
    monkeypatch.setattr(model_mod, "_PIPES", {})
    fresh = model_cost(method, model, side, side, max_batch=2, **settings)
    assert again.to_dict() == fresh.to_dict()


@pytest.mark.parametrize(
    ("method", "settings"),
    [
        ("demofusion", {"steps": 4, "previews": True, "decode_tile_area": 256 * 256}),  # tiled decodes
        ("scalediff", {"steps": 4, "decode_tile_area": 256 * 256}),  # tiled encodes of the upsampled pixels too
    ],
)
def test_repeated_tiles_are_booked_again_and_equal_the_full_trace(method, settings, monkeypatch):
    """In a tiled VAE pass most tiles repeat the previous one (same input layout, the previous output alive, the
    same bytes around them): the estimate books them from the first such tile's record instead of running them,
    and its report — FLOPs, calls, every peak, the canvas bytes — equals the full trace's to the byte."""
    import hiresdiff.cost.model as model_mod
    from hiresdiff.cost.replay import SegmentReplay

    monkeypatch.setattr(model_mod, "_PIPES", {})
    monkeypatch.setattr(model_mod, "_CONTROLNETS", {})
    passes: list[SegmentReplay] = []
    real = SegmentReplay.repeating

    def repeating(self, fn):
        passes.append(self)
        return real(self, fn)

    monkeypatch.setattr(SegmentReplay, "repeating", repeating)
    fast = model_cost(method, "tiny-sdxl", 768, 768, **settings)
    booked_again = sum(p.tiles for p in {id(p): p for p in passes}.values())
    assert booked_again > 100  # 12 × 12 tiles a pass at 768²: most are booked again
    full = model_cost(method, "tiny-sdxl", 768, 768, exact=True, **settings)
    assert fast.to_dict() == full.to_dict() and fast.vae_calls == full.vae_calls > 144


def test_replay_books_settled_steps_without_running_them():
    """A loop of 50 alike steps runs two (to see them settle) and the last two; the 46 between are booked again,
    and a new loop starts over."""
    from hiresdiff.cost.memory import LiveBytes
    from hiresdiff.cost.replay import StepReplay

    ledger, host = Ledger(), LiveBytes("cpu")
    replay = StepReplay(ledger, host, lambda *a: None)
    replay.begin(50)
    ran = []
    for step in range(50):
        if not replay.repeats(step):
            ran.append(step)
            ledger.book("denoiser", 10.0, 2, 2.0)
    replay.finish()
    assert ran == [0, 1, 48, 49] and replay.replayed == 46
    tally = ledger.get("denoiser")
    assert (tally.calls, tally.flops, tally.samples) == (50, 500.0, 100)
    replay.begin(3)  # too short to replay anything
    assert [replay.repeats(step) for step in range(3)] == [False] * 3


def test_alternating_steps_replay_as_pairs():
    """Heun-like loops alternate two kinds of step: the pair is booked again, in order."""
    from hiresdiff.cost.memory import LiveBytes
    from hiresdiff.cost.replay import StepReplay

    ledger = Ledger()
    replay = StepReplay(ledger, LiveBytes("cpu"), lambda *a: None)
    replay.begin(12)
    for step in range(12):
        if not replay.repeats(step):
            ledger.book("denoiser", 1.0 if step % 2 else 3.0, 1)
    replay.finish()
    assert replay.replayed == 6 and ledger.get("denoiser").flops == 6 * 1.0 + 6 * 3.0


@pytest.mark.parametrize("method", ["accdiffusion", "scalecrafter"])
def test_calls_of_one_shape_on_other_branches_are_counted_apart(method):
    """max_batch 1 runs a guidance pair as one call per branch: equal shapes, other rows. AccDiffusion's capture
    records the cond call only and ScaleCrafter's light table patches the light row only, so the cache keys on the
    branches — the estimate equals the full trace and keeps the FLOPs of one call of all rows."""
    kw = {"steps": 4, "previews": False}
    split = model_cost(method, "tiny-sdxl", 512, 512, max_batch=1, **kw)
    assert split.model_flops == model_cost(method, "tiny-sdxl", 512, 512, max_batch=1, exact=True, **kw).model_flops
    assert split.model_flops == pytest.approx(model_cost(method, "tiny-sdxl", 512, 512, max_batch=8, **kw).model_flops)
