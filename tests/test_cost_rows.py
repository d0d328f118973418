"""Calls of many rows priced from two traced calls and calls of new sizes from three (:mod:`hiresdiff.cost.trace`,
Eqs. R1, R2, S1), and the estimates kept for later processes (:mod:`hiresdiff.cost.store`): equal to tracing,
stable across processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hiresdiff.cost.model as model_mod
from hiresdiff.cost import store
from hiresdiff.cost.meta import Ledger, MetaModule
from hiresdiff.cost.trace import Trace, derive, derive_size, size_bases, take_rows
from hiresdiff.models.tiny import build_builtin


def _rows(args, kwargs):
    x = args[0] if args else kwargs["hidden_states"]
    return x.shape[0], 0.0


def _unet_call(rows: int) -> tuple[tuple, dict]:
    return (torch.zeros(rows, 4, 16, 24), torch.tensor(500.0)), {
        "encoder_hidden_states": torch.zeros(rows, 77, 64),
        "added_cond_kwargs": {"text_embeds": torch.zeros(rows, 32), "time_ids": torch.zeros(rows, 6)},
        "return_dict": False,
    }


@pytest.fixture(scope="module")
def unet():
    return build_builtin("tiny-sdxl", torch.float32, "meta").unet


@pytest.mark.parametrize("rows", [4, 7, 16])
def test_a_derived_call_equals_its_trace(unet, rows):
    """The tiny SDXL UNet at 4, 7 and 16 rows: FLOPs, activation peak, host rise and output shapes derived from
    the 2- and 3-row traces equal the call traced itself."""
    derived_ledger, traced_ledger = Ledger(derive_rows=True), Ledger()
    derived = MetaModule(unet, "denoiser", derived_ledger, _rows)
    traced = MetaModule(unet, "denoiser", traced_ledger, _rows)
    args, kwargs = _unet_call(rows)
    (a,) = derived(*args, **kwargs)
    (b,) = traced(*args, **kwargs)
    assert a.shape == b.shape == (rows, 4, 16, 24)
    assert derived_ledger.get("denoiser") == traced_ledger.get("denoiser")
    assert len(derived.__dict__["_traces"]) == 3  # the two bases and the derived call: no trace of `rows` rows
    assert derived.__dict__["_derived"] and not traced.__dict__["_derived"]


def test_few_rows_are_traced_and_a_mismatch_is_traced_too(unet):
    """Calls of up to 3 rows are traced as they are; two traces that do not line up derive nothing."""
    ledger = Ledger(derive_rows=True)
    module = MetaModule(unet, "denoiser", ledger, _rows)
    args, kwargs = _unet_call(3)
    module(*args, **kwargs)
    assert not module.__dict__["_derived"]
    two = Trace(10.0, torch.empty(2, 4, device="meta"), 5, 0, torch.tensor([1, 5, 2]))
    three = Trace(15.0, torch.empty(3, 4, device="meta"), 7, 0, torch.tensor([1, 7]))
    assert derive(two, three, 9) is None  # another number of operations
    three = Trace(15.0, torch.empty(3, 4, 2, device="meta"), 7, 0, torch.tensor([1, 7, 3]))
    assert derive(two, three, 9) is None  # another output structure
    three = Trace(15.0, torch.empty(3, 4, device="meta"), 7, 0, torch.tensor([1, 7, 3]))
    found = derive(two, three, 9)
    assert found is not None and found.flops == 45.0 and found.out.shape == (9, 4)
    assert found.peak == max(1, 5 + 7 * 2, 2 + 7 * 1) == 19  # Eq. R2: the peak of the derived timeline


def test_take_rows_cuts_only_tensors_of_the_call_rows():
    """FLUX's position ids (tokens, 3) and a 0-d timestep stay whole; the rows of every batched tensor are cut."""
    call = {"hidden_states": torch.zeros(6, 64, 4), "img_ids": torch.zeros(64, 3), "timestep": torch.tensor(1.0)}
    cut = take_rows(call, 6, 2)
    assert cut["hidden_states"].shape == (2, 64, 4) and cut["img_ids"].shape == (64, 3)
    assert cut["timestep"].shape == ()


def test_flux_transformer_rows_are_derived_exactly():
    """tiny-flux's transformer (position ids not batched) at 5 rows: derived equals traced."""
    transformer = build_builtin("tiny-flux", torch.float32, "meta").transformer
    cfg = transformer.config
    tokens, text = 16, 8

    def call(rows):
        return {
            "hidden_states": torch.zeros(rows, tokens, cfg.in_channels),
            "encoder_hidden_states": torch.zeros(rows, text, cfg.joint_attention_dim),
            "pooled_projections": torch.zeros(rows, cfg.pooled_projection_dim),
            "timestep": torch.zeros(rows),
            "guidance": torch.zeros(rows) if cfg.guidance_embeds else None,
            "img_ids": torch.zeros(tokens, 3),
            "txt_ids": torch.zeros(text, 3),
            "return_dict": False,
        }

    derived_ledger, traced_ledger = Ledger(derive_rows=True), Ledger()
    MetaModule(transformer, "denoiser", derived_ledger, _rows)(**call(5))
    MetaModule(transformer, "denoiser", traced_ledger, _rows)(**call(5))
    assert derived_ledger.get("denoiser") == traced_ledger.get("denoiser")


def _sized_call(family: str, module, rows: int, size: tuple[int, int]) -> tuple[tuple, dict]:
    """A denoiser call of ``rows`` rows at latent ``size`` (FLUX: its packed tokens) on ``module``'s widths."""
    cfg = module.config
    if family == "flux":
        tokens = (size[0] // 2) * (size[1] // 2)
        return (), {
            "hidden_states": torch.zeros(rows, tokens, cfg.in_channels),
            "encoder_hidden_states": torch.zeros(rows, 8, cfg.joint_attention_dim),
            "pooled_projections": torch.zeros(rows, cfg.pooled_projection_dim),
            "timestep": torch.zeros(rows),
            "guidance": torch.zeros(rows) if cfg.guidance_embeds else None,
            "img_ids": torch.zeros(tokens, 3),
            "txt_ids": torch.zeros(8, 3),
            "return_dict": False,
        }
    kwargs = {"encoder_hidden_states": torch.zeros(rows, 77, cfg.cross_attention_dim), "return_dict": False}
    if cfg.addition_embed_type == "text_time":
        text = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.zeros(rows, text), "time_ids": torch.zeros(rows, 6)}
    return (torch.zeros(rows, cfg.in_channels, *size), torch.tensor(500.0)), kwargs


def _spatial(family: str, module, native: int):
    return model_mod._flux_spatial(native // 2) if family == "flux" else model_mod._unet_spatial(module)


@pytest.mark.parametrize(
    ("model", "rows", "sizes"),
    [
        ("tiny-sdxl", 2, [(20, 28), (40, 8), (64, 64)]),  # sides multiples of 4 (2 downsamplers)
        ("tiny-sd", 3, [(6, 10), (30, 2)]),
        ("tiny-flux", 1, [(10, 14), (6, 40)]),  # any number of tokens
        ("random-sdxl", 2, [(100, 128), (256, 320)]),  # and far beyond the bases (2048×2560 px in one call)
        ("random-sd15", 1, [(40, 72)]),
        ("random-flux", 1, [(90, 122)]),
    ],
)
def test_a_call_of_a_new_size_equals_its_trace(model, rows, sizes):
    """Eq. S1: the denoiser at sizes other than its three size bases, derived from the bases' traces, books what
    the call traced itself books — FLOPs, samples, the activation peak to the byte — and answers with the same
    output shapes; only the bases are traced. Full-size SD 1.5, SDXL and FLUX.1 included."""
    from hiresdiff.models.builtins import BUILTIN_MODELS

    info = BUILTIN_MODELS[model]
    pipe = build_builtin(model, torch.float32, "meta")
    family = info.family
    module = pipe.transformer if family == "flux" else pipe.unet
    spatial = _spatial(family, module, info.native_size // info.vae_scale_factor)
    derived_ledger = Ledger(derive_rows=True)
    derived = MetaModule(module, "denoiser", derived_ledger, _rows, spatial=spatial)
    for size in sizes:
        traced_ledger = Ledger()
        args, kwargs = _sized_call(family, module, rows, size)
        out = derived(*args, **kwargs)
        want = MetaModule(module, "denoiser", traced_ledger, _rows)(*args, **kwargs)
        assert derived_ledger.tallies.pop("denoiser") == traced_ledger.get("denoiser")
        assert [t.shape for t in out] == [t.shape for t in want]
    assert len(derived.__dict__["_traces"]) == 3 + len(sizes)  # the bases, and each size derived
    assert len(derived.__dict__["_derived"]) == len(sizes)


@pytest.mark.parametrize(("model", "sizes"), [("tiny-sdxl", [(20, 28), (13, 31)]), ("random-sdxl", [(97, 123)]),
                                             ("random-flux", [(68, 128)])])  # fmt: skip
def test_a_decode_of_a_new_size_equals_its_trace_and_encodes_are_traced(model, sizes):
    """Eq. S1 for the VAE: a decode of any latent size (odd sides too: every level doubles both) derived from the
    three size bases books what the traced decode books, and answers with its pixels (8 per cell); an encode is
    not a quadratic of the cells (its downsampling pads a row and a column) and is traced."""
    from hiresdiff.models.builtins import BUILTIN_MODELS

    info = BUILTIN_MODELS[model]
    vae = build_builtin(model, torch.float32, "meta").vae
    native = info.native_size // info.vae_scale_factor
    ledger = Ledger(derive_rows=True)
    derived = MetaModule(vae, "vae", ledger, _rows, ("encode", "decode"), spatial=model_mod._decode_spatial(native))
    traced_ledger = Ledger()
    traced = MetaModule(vae, "vae", traced_ledger, _rows, ("encode", "decode"))
    channels = vae.config.latent_channels
    for size in sizes:
        (a,) = derived.decode(torch.zeros(1, channels, *size), return_dict=False)
        (b,) = traced.decode(torch.zeros(1, channels, *size), return_dict=False)
        assert a.shape == b.shape == (1, 3, 8 * size[0], 8 * size[1])
        assert ledger.tallies.pop("vae") == traced_ledger.tallies.pop("vae")
    assert len(derived.__dict__["_derived"]) == len(sizes)
    derived.encode(torch.zeros(1, 3, 8 * sizes[0][0], 8 * sizes[0][1]))
    assert len(derived.__dict__["_derived"]) == len(sizes)  # the encode was traced


def test_sizes_that_round_at_a_level_are_traced(unet):
    """tiny-sdxl's UNet halves twice: a side that is not a multiple of 4 rounds up at a level (not Eq. S1), so the
    call is traced; so is a base size itself and any call outside the fast mode."""
    spatial = model_mod._unet_spatial(unet)
    assert spatial.multiple == 4 and spatial.bases == size_bases(32) == ((16, 24), (24, 32), (32, 32))
    for size, derive_rows in [((18, 24), True), ((24, 32), True), ((20, 28), False)]:
        module = MetaModule(unet, "denoiser", Ledger(derive_rows=derive_rows), _rows, spatial=spatial)
        args, kwargs = _sized_call("sdxl", unet, 2, size)
        module(*args, **kwargs)
        assert not module.__dict__["_derived"] and len(module.__dict__["_traces"]) == 1


def test_derive_size_is_exact_or_refuses():
    """Eq. S1 through three points: a quadratic of the cells comes out exactly, in integers; a value that is not
    whole (no such quadratic), trails of other lengths or an output dimension that follows nothing refuse."""
    sizes = [(2, 3), (3, 4), (4, 4)]

    def trace(n, h, w, tail=()):
        flops = 7 * n * n + 3 * n + 11
        return Trace(float(flops), torch.empty(2, h, w, device="meta"), 0, 0, torch.tensor([n, 5 * n * n, 9, *tail]))

    bases = [trace(h * w, h, w) for h, w in sizes]
    found = derive_size(bases, sizes, (10, 6))
    assert found is not None and found.flops == 7 * 3600 + 3 * 60 + 11 and found.out.shape == (2, 10, 6)
    assert found.trail.tolist() == [60, 5 * 3600, 9] and found.peak == 18000
    odd = [*bases[:2], Trace(bases[2].flops + 1, bases[2].out, 0, 0, bases[2].trail)]
    assert derive_size(odd, sizes, (10, 6)) is None  # 1/24 of a FLOP at 60 cells: not a quadratic of the cells
    assert derive_size([*bases[:2], trace(16, 4, 4, tail=(1,))], sizes, (10, 6)) is None
    fixed = [Trace(b.flops, torch.empty(2, 5 + i, device="meta"), 0, 0, b.trail) for i, b in enumerate(bases)]
    assert derive_size(fixed, sizes, (10, 6)) is None  # 5, 6, 7: neither constant nor a side


def test_module_identity_is_the_same_in_every_process():
    """The stored traces are found again by a new process: the identity of a module does not follow the order of
    a set (diffusers' ``_use_default_values``), which changes with the hash seed."""
    code = (
        "import torch; from hiresdiff.models.tiny import build_builtin; from hiresdiff.cost import store; "
        "p = build_builtin('tiny-sdxl', torch.float32, 'meta'); "
        "print(store.module_identity(p.unet) + store.module_identity(p.text_encoder))"
    )
    seen = {
        subprocess.run(
            [sys.executable, "-c", code], env={**os.environ, "PYTHONHASHSEED": seed}, capture_output=True, text=True
        ).stdout
        for seed in ("1", "2", "3")
    }
    assert len(seen) == 1 and next(iter(seen))


def test_a_later_process_reuses_the_report_of_the_same_request(tmp_path: Path, monkeypatch):
    """The plan's report is kept on disk: the same request in a new process (in-memory caches emptied) is read
    back without running the cost model, and equals the computed one; another request is computed."""
    import hiresdiff.plan as plan_mod
    from hiresdiff.pipeline import build_request

    monkeypatch.setenv(store.ENV, str(tmp_path / "traces"))
    monkeypatch.setattr(plan_mod, "_PRICED", plan_mod.OrderedDict())
    req = build_request("a lake", "demofusion", 512, 512, steps=4, max_batch=4)
    first = plan_mod.request_cost(req, "tiny-sdxl")
    assert list((tmp_path / "traces" / "reports").glob("*.json"))
    monkeypatch.setattr(plan_mod, "_PRICED", plan_mod.OrderedDict())
    monkeypatch.setattr(model_mod, "model_cost", lambda *a, **k: pytest.fail("computed again"))
    again = plan_mod.request_cost(req, "tiny-sdxl")
    assert again == first and again.peaks == first.peaks
    other = build_request("a lake", "demofusion", 512, 512, steps=5, max_batch=4)
    with pytest.raises(pytest.fail.Exception, match="computed again"):
        plan_mod.request_cost(other, "tiny-sdxl")
