"""The persistent cache of shape-only traces (:mod:`hiresdiff.cost.store`): a fresh process reuses the traces of
earlier ones with the same numbers, never a trace of another architecture, and survives a corrupt file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import hiresdiff.cost.model as model_mod
from hiresdiff.cost import store
from hiresdiff.cost.meta import Ledger, MetaModule


def _rows(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[int, float]:
    return args[0].shape[0], 0.0


def _mlp(hidden: int) -> torch.nn.Module:
    with torch.device("meta"):
        net = torch.nn.Sequential(torch.nn.Linear(16, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, 8))
    net.config = {"hidden": hidden}  # type: ignore[assignment]  # what store.module_identity reads
    return net


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv(store.ENV, str(tmp_path / "traces"))
    return tmp_path / "traces"


def test_a_fresh_module_reuses_the_stored_trace_without_running(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = Ledger()
    out = MetaModule(_mlp(32), "denoiser", first, _rows)(torch.ones(5, 16))
    assert len(list(cache.glob("*.pt"))) == 1
    again, net = Ledger(), _mlp(32)
    monkeypatch.setattr(net, "forward", lambda *a: pytest.fail("traced again"))  # the stored trace must answer
    out2 = MetaModule(net, "denoiser", again, _rows)(torch.ones(5, 16))
    assert out2.shape == out.shape == (5, 8) and out2.device.type == "cpu" and not out2.any()
    assert first.get("denoiser") == again.get("denoiser") and again.get("denoiser").flops == 2 * 5 * (16 + 8) * 32
    assert again.get("denoiser").peak is not None and again.get("denoiser").peak.activations > 0


def test_other_architectures_signatures_and_off_do_not_share(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ledger = Ledger()
    MetaModule(_mlp(32), "denoiser", ledger, _rows)(torch.ones(5, 16))
    MetaModule(_mlp(64), "denoiser", ledger, _rows)(torch.ones(5, 16))  # another config
    MetaModule(_mlp(32), "denoiser", ledger, _rows)(torch.ones(3, 16))  # another signature
    assert len(list(cache.glob("*.pt"))) == 3
    assert ledger.get("denoiser").flops == 2 * (5 * 32 + 5 * 64 + 3 * 32) * (16 + 8)
    monkeypatch.setenv(store.ENV, "off")
    MetaModule(_mlp(128), "denoiser", ledger, _rows)(torch.ones(5, 16))
    assert len(list(cache.glob("*.pt"))) == 3 and store.folder() is None


def test_a_corrupt_trace_is_traced_again_and_replaced(cache: Path) -> None:
    MetaModule(_mlp(32), "denoiser", Ledger(), _rows)(torch.ones(5, 16))
    (kept,) = cache.glob("*.pt")
    kept.write_bytes(b"not a trace")
    ledger = Ledger()
    MetaModule(_mlp(32), "denoiser", ledger, _rows)(torch.ones(5, 16))
    assert ledger.get("denoiser").flops == 2 * 5 * (16 + 8) * 32
    assert store.load(kept.name) is not None and not list(cache.glob("*.tmp"))


def test_a_new_process_estimates_the_same_from_stored_traces(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole estimate from stored traces (a new counting pipeline, as in a new process) equals the traced one."""
    kw = {"steps": 4, "previews": True}
    monkeypatch.setattr(model_mod, "_PIPES", {})
    monkeypatch.setattr(model_mod, "_CONTROLNETS", {})
    traced = model_mod.model_cost("demofusion", "tiny-sdxl", 512, 512, **kw)
    assert list(cache.glob("*.pt"))
    monkeypatch.setattr(model_mod, "_PIPES", {})  # forget every in-process trace
    loads: list[bool] = []
    real_load = store.load
    monkeypatch.setattr(store, "load", lambda name: loads.append(True) or real_load(name))
    reused = model_mod.model_cost("demofusion", "tiny-sdxl", 512, 512, **kw)
    assert loads and reused.to_dict() == traced.to_dict()


#: set by :class:`_Payload` when it is unpickled (it must never be)
UNPICKLED: list[str] = []


def _unpickled(note: str) -> str:
    UNPICKLED.append(note)
    return note


class _Payload:
    """Runs code when unpickled — what a planted cache file could carry."""

    def __reduce__(self) -> Any:
        return (_unpickled, ("ran",))


def test_stored_traces_are_data_only(cache: Path) -> None:
    """Trace files are read without unpickling objects: a planted file whose pickle would run code is treated as
    absent (and nothing runs); a real trace's outputs (``ModelOutput``s, diffusers' posterior) come back as the
    same structures of ``meta`` tensors from a description of plain data."""
    import io

    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    from hiresdiff.cost.trace import Trace

    planted = io.BytesIO()
    torch.save({"flops": 1.0, "out": _Payload(), "peak": 1, "rise": 0, "trail": torch.zeros(1)}, planted)
    cache.mkdir(parents=True, exist_ok=True)
    (cache / "planted.pt").write_bytes(planted.getvalue())
    assert store.load("planted.pt") is None and UNPICKLED == []

    posterior = DiagonalGaussianDistribution(torch.empty(2, 8, 4, 4, device="meta"))
    text = BaseModelOutputWithPooling(last_hidden_state=torch.empty(2, 77, 32, device="meta"),
                                      pooler_output=torch.empty(2, 32, device="meta"))  # fmt: skip
    out = (text, {"latent_dist": posterior}, [torch.empty(3, 5, device="meta").t(), None, 2, "x"])
    store.save("real.pt", Trace(5.0, out, 7, 1, torch.arange(3)))
    back = store.load("real.pt")
    assert back is not None and (back.flops, back.peak, back.rise) == (5.0, 7, 1)
    text2, dist2, rest = back.out
    assert type(text2) is BaseModelOutputWithPooling and text2.last_hidden_state.shape == (2, 77, 32)
    assert text2["pooler_output"].shape == (2, 32)
    assert type(dist2["latent_dist"]) is DiagonalGaussianDistribution
    assert dist2["latent_dist"].mean.shape == posterior.mean.shape and dist2["latent_dist"].mean.is_meta
    assert rest[0].shape == (5, 3) and rest[0].stride() == (1, 5) and rest[1:] == [None, 2, "x"]
