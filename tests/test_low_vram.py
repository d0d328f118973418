"""Low-VRAM mode (issue #7 lever, issue 22): text encoders and VAE wait on the CPU and are moved in only while they run,
in place of the denoiser (one large component on the device at a time); the memory estimate books the same."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from hiresdiff import generate
from hiresdiff.cli import main
from hiresdiff.config import LOW_VRAM_DEFAULTS
from hiresdiff.cost import model_cost
from hiresdiff.cost.memory import LiveBytes
from hiresdiff.images import read_png_settings
from hiresdiff.memory import MemoryEstimate
from hiresdiff.models.adapter import ModelAdapter
from hiresdiff.pipeline import HiresPipeline, build_request
from hiresdiff.plan import request_cost

#: a compute device that is not the CPU's plain name, so that moves to it and to the CPU can be told apart
DEVICE = torch.device("cpu", 0)


def on_moves(monkeypatch: pytest.MonkeyPatch, module: torch.nn.Module, note: Callable[[Any], None]) -> None:
    """Call ``note(target)`` on every ``module.to(target)`` (a device or a dtype) before the move itself."""
    original = module.to

    def to(*args: Any, **kwargs: Any) -> Any:
        note(args[0] if args else kwargs.get("device"))
        return original(*args, **kwargs)

    monkeypatch.setattr(module, "to", to)


def spy_moves(monkeypatch: pytest.MonkeyPatch, pipe: Any, names: tuple[str, ...]) -> list[tuple[str, str]]:
    """Record ``(module name, target)`` of every ``.to(device)`` call on the named pipeline modules."""
    moves: list[tuple[str, str]] = []
    for name in names:
        on_moves(monkeypatch, getattr(pipe, name), lambda target, _name=name: moves.append((_name, str(target))))
    return moves


def test_low_vram_defaults_and_explicit_values_win() -> None:
    req = build_request("a cat", "direct", 512, 512, low_vram=True)
    assert req.settings.low_vram and req.settings.max_batch == LOW_VRAM_DEFAULTS["max_batch"] == 1
    assert req.settings.decode_tile_area == LOW_VRAM_DEFAULTS["decode_tile_area"] == 1024 * 1024
    req = build_request("a cat", "direct", 512, 512, low_vram=True, max_batch=6, decode_tile_area=0)
    assert (req.settings.max_batch, req.settings.decode_tile_area) == (6, 0)
    plain = build_request("a cat", "direct", 512, 512)
    assert not plain.settings.low_vram and plain.settings.max_batch == "auto"


def test_modules_are_borrowed_only_while_they_run(tiny_sdxl_pipe: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    names = ("text_encoder", "text_encoder_2", "vae")
    moves = spy_moves(monkeypatch, tiny_sdxl_pipe, names)
    hp = HiresPipeline.from_pipe(tiny_sdxl_pipe, "tiny-sdxl")
    kw = {"steps": 2, "seed": 1, "progress": False, "previews": False, "max_batch": 8, "decode_tile_area": None}
    plain = hp("a cat", "direct", 256, 256, **kw)
    assert moves == []  # the mode is off and unchanged: the caller's placement is left alone
    low = hp("a cat", "direct", 256, 256, low_vram=True, **kw)
    home = [(n, "cpu") for n in names]
    borrow_text = [("text_encoder", "cpu"), ("text_encoder_2", "cpu")] * 2  # to the denoiser's device and back
    assert moves == home + borrow_text + [("vae", "cpu"), ("vae", "cpu")]
    assert torch.equal(low.latents, plain.latents)
    assert low.images[0].tobytes() == plain.images[0].tobytes()
    moves.clear()
    hp("a cat", "direct", 256, 256, **kw)  # off again: everything back on the denoiser's device, once
    assert moves[: len(names)] == [(n, str(hp.adapter.device)) for n in names] and len(moves) == len(names)


def test_flux_t5_is_borrowed(tiny_flux: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    moves = spy_moves(monkeypatch, tiny_flux, ("text_encoder_2",))
    hp = HiresPipeline.from_pipe(tiny_flux, "tiny-flux")
    hp("a cat", "direct", 256, 256, steps=1, guidance=3.5, progress=False, previews=False, low_vram=True)
    assert [m[0] for m in moves] == ["text_encoder_2"] * 3  # home, borrowed, returned
    hp.adapter.set_offload(False)


def test_cli_low_vram(tmp_path: Path) -> None:
    out = tmp_path / "out"
    argv = ["generate", "a cat", "--model", "tiny-sd", "--method", "demofusion", "--width", "256", "--height", "256"]
    assert main([*argv, "--steps", "2", "--low-vram", "--no-previews", "--quiet", "--out", str(out)]) == 0
    meta = read_png_settings(next(out.glob("*.png")))
    assert meta["max_batch"] == 1 and meta["decode_tile_area"] == 1024 * 1024


class Residency:
    """Which watched pipeline modules are on :data:`DEVICE` (followed through their ``.to`` moves; all start
    there, as a loaded pipeline does) at every call of one of them: ``calls`` = ``(called, set on the device)``."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, modules: dict[str, torch.nn.Module]) -> None:
        self.where = dict.fromkeys(modules, "device")
        self.calls: list[tuple[str, frozenset[str]]] = []
        self.moves: list[tuple[str, str]] = []
        self.hooks: list[Any] = []
        for name, module in modules.items():
            self._spy(monkeypatch, name, module)
            called = [module.encoder, module.decoder] if hasattr(module, "decoder") else [module]  # the VAE's halves
            for part in called:
                self.hooks.append(part.register_forward_pre_hook(lambda *_, _name=name: self._called(_name)))

    def _spy(self, monkeypatch: pytest.MonkeyPatch, name: str, module: torch.nn.Module) -> None:
        def note(target: Any) -> None:
            if isinstance(target, (str, torch.device)):  # not a dtype cast
                self.where[name] = "device" if torch.device(target) == DEVICE else "cpu"
                self.moves.append((name, self.where[name]))

        on_moves(monkeypatch, module, note)

    def _called(self, name: str) -> None:
        self.calls.append((name, frozenset(n for n, w in self.where.items() if w == "device")))

    def close(self) -> None:
        for hook in self.hooks:
            hook.remove()

    def round_trips(self, name: str) -> int:
        """How many times ``name`` left the device and came back."""
        places = [where for moved, where in self.moves if moved == name]
        return sum(1 for a, b in itertools.pairwise(places) if (a, b) == ("cpu", "device"))


@pytest.fixture
def residency(monkeypatch: pytest.MonkeyPatch) -> Any:
    """``watch(hp, names) → Residency`` on a HiresPipeline whose compute device reads as :data:`DEVICE`."""
    made: list[Residency] = []

    def watch(hp: HiresPipeline, names: tuple[str, ...]) -> Residency:
        ad = hp.adapter

        def placed() -> tuple[torch.device, torch.dtype]:
            ad._placement = (DEVICE, ad.denoiser_module.dtype)
            return ad._placement

        monkeypatch.setattr(ad, "refresh_placement", placed)
        made.append(Residency(monkeypatch, {n: getattr(hp.adapter.pipe, n) for n in names}))
        return made[-1]

    yield watch
    for r in made:
        r.close()


def _same_result(a: Any, b: Any) -> bool:
    """Bitwise equal latents, final images and previews."""
    same_previews = [[x.tobytes() for x in p] for p in a.previews] == [[y.tobytes() for y in p] for p in b.previews]
    return torch.equal(a.latents, b.latents) and a.images[0].tobytes() == b.images[0].tobytes() and same_previews


def test_one_large_component_on_the_device_per_call_sdxl(tiny_sdxl_pipe: Any, residency: Any) -> None:
    """ScaleDiff with previews: prompt encoding, denoiser calls, preview decodes and the pixel-space step (decode →
    resize → encode) each see only their own module on the device; the UNet steps off once per VAE phase."""
    hp = HiresPipeline.from_pipe(tiny_sdxl_pipe, "tiny-sdxl")
    names = ("unet", "text_encoder", "text_encoder_2", "vae")
    kw = {"steps": 2, "seed": 3, "progress": False, "previews": True, "max_batch": 2, "decode_tile_area": 256 * 256}
    watch = residency(hp, names)
    plain = hp("a cat", "scalediff", 512, 512, **kw)
    assert {on for _, on in watch.calls} == {frozenset(names)} and watch.moves == []  # all there, nothing moved
    watch.calls.clear()
    low = hp("a cat", "scalediff", 512, 512, low_vram=True, **kw)
    alone = {"unet": {"unet"}, "vae": {"vae"}, "text_encoder": {"text_encoder", "text_encoder_2"}}
    alone["text_encoder_2"] = alone["text_encoder"]
    assert {name for name, _ in watch.calls} == set(names)
    for name, on in watch.calls:
        assert on == alone[name], (name, on)
    # the prompt, the pixel-space step (stage 1 decoded — its preview — resized, encoded, tiled), the final image
    assert watch.round_trips("unet") == 3 and watch.where == {"unet": "device", **dict.fromkeys(names[1:], "cpu")}
    assert _same_result(low, plain) and len(low.previews) == len(plain.previews) >= 2
    hp.adapter.set_offload(False)
    assert set(watch.where.values()) == {"device"}


def test_one_large_component_on_the_device_per_call_flux(tiny_flux: Any, residency: Any) -> None:
    """FLUX: the transformer is off the device while T5 and CLIP encode the prompt and while the VAE decodes."""
    hp = HiresPipeline.from_pipe(tiny_flux, "tiny-flux")
    names = ("transformer", "text_encoder", "text_encoder_2", "vae")
    kw = {"steps": 1, "guidance": 3.5, "seed": 2, "progress": False, "previews": False}
    watch = residency(hp, names)
    plain = hp("a cat", "direct", 256, 256, **kw)
    watch.calls.clear()
    low = hp("a cat", "direct", 256, 256, low_vram=True, **kw)
    seen = {name: on for name, on in watch.calls}
    assert seen == {
        "text_encoder": {"text_encoder", "text_encoder_2"},
        "text_encoder_2": {"text_encoder", "text_encoder_2"},
        "transformer": {"transformer"},
        "vae": {"vae"},
    }
    assert watch.round_trips("transformer") == 2  # the prompt, the final decode
    assert _same_result(low, plain)
    hp.adapter.set_offload(False)


def test_text_encoders_wait_on_the_cpu_outside_low_vram_on_an_accelerator(
    tiny_sdxl_pipe: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Default mode on an accelerator (stood in for by the CPU, :func:`parks_text` patched): the text encoders go
    to the CPU, come to the device only for the prompt, and the denoiser and the VAE never move; the image is the
    same. On the CPU itself nothing parks."""
    import hiresdiff.placement as placement

    assert not placement.parks_text("cpu") and placement.parks_text("cuda:0") and placement.parks_text("mps")
    names = ("text_encoder", "text_encoder_2", "vae", "unet")
    moves = spy_moves(monkeypatch, tiny_sdxl_pipe, names)
    hp = HiresPipeline.from_pipe(tiny_sdxl_pipe, "tiny-sdxl")
    kw = {"steps": 2, "seed": 1, "progress": False, "previews": False, "max_batch": 8, "decode_tile_area": None}
    plain = hp("a cat", "direct", 256, 256, **kw)
    assert moves == [] and not hp.adapter.park_text
    monkeypatch.setattr(placement, "parks_text", lambda device: True)
    parked = hp("a cat", "direct", 256, 256, **kw)
    home = [("text_encoder", "cpu"), ("text_encoder_2", "cpu"), ("vae", "cpu")]  # VAE: stays with the UNet
    borrow_text = [("text_encoder", "cpu"), ("text_encoder_2", "cpu")] * 2  # to the device and back
    assert hp.adapter.park_text and not hp.adapter.offload
    assert moves == home + borrow_text
    assert torch.equal(parked.latents, plain.latents)


def test_the_estimate_books_parked_text_encoders_only_for_the_prompt() -> None:
    report = model_cost("demofusion", "tiny-sdxl", 512, 512, steps=1, controlnet=True, previews=True)
    w = report.weights_bytes
    full = MemoryEstimate.of(report, torch.float32, low_vram=False)  # on the CPU: everything in the same memory
    gpu = MemoryEstimate.of(report, torch.float32, low_vram=False, device="cuda")
    assert not full.text_parked and gpu.text_parked
    assert gpu.resident("text_encoder") == full.resident("text_encoder") == sum(w.values())
    for c in ("denoiser", "controlnet", "vae"):
        assert gpu.resident(c) == sum(w.values()) - w["text_encoder"]
        assert gpu.at(c) == full.at(c) - w["text_encoder"]
    assert gpu.at("canvas") == sum(w.values()) - w["text_encoder"] + report.canvas_bytes
    low = MemoryEstimate.of(report, torch.float32, low_vram=True, device="cuda")  # low-VRAM parks more already
    assert not low.text_parked and low.peak == MemoryEstimate.of(report, torch.float32, low_vram=True).peak


def test_controlnet_steps_off_with_the_denoiser_and_blocks_nest(
    tiny_sd_pipe: Any, make_controlnet: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    ad = ModelAdapter(tiny_sd_pipe)
    net = make_controlnet(tiny_sd_pipe.unet)
    moves: list[tuple[str, str]] = []
    for name, module in {"unet": ad.unet, "controlnet": net, "vae": ad.vae}.items():
        on_moves(monkeypatch, module, lambda target, _name=name: moves.append((_name, str(target))))
    with ad.borrowed(ad.vae):
        pass
    assert moves == []  # low-VRAM mode off: nothing moves
    ad.set_offload(True)
    try:
        moves.clear()
        with ad.use_controlnet(net, 1.0), ad.borrowed(ad.vae):
            with ad.borrowed(ad.vae):  # nested: already there, nothing moves again
                assert moves == [("unet", "cpu"), ("controlnet", "cpu"), ("vae", "cpu")]
            assert len(moves) == 3 and ad._lent == (ad.vae,)
        assert moves[3:] == [("vae", "cpu"), ("unet", "cpu"), ("controlnet", "cpu")] and ad._lent == ()
        moves.clear()
        with pytest.raises(RuntimeError, match="boom"), ad.borrowed(ad.vae):  # a failure still puts everything back
            raise RuntimeError("boom")
        assert [n for n, _ in moves] == ["unet", "vae", "vae", "unet"] and ad._lent == ()
    finally:
        ad.set_offload(False)


def test_estimate_books_one_component_at_a_time() -> None:
    report = model_cost("demofusion", "tiny-sdxl", 512, 512, steps=1, controlnet=True, low_vram=True, previews=True)
    w = report.weights_bytes
    assert all(w[c] > 0 for c in ("denoiser", "controlnet", "vae", "text_encoder"))
    low = MemoryEstimate.of(report, torch.float32, low_vram=True)
    assert low.resident("denoiser") == low.resident("controlnet") == w["denoiser"] + w["controlnet"]
    assert (low.resident("vae"), low.resident("text_encoder")) == (w["vae"], w["text_encoder"])
    assert low.at("canvas") == w["denoiser"] + w["controlnet"] + report.canvas_bytes
    full = MemoryEstimate.of(report, torch.float32, low_vram=False)
    assert all(full.resident(c) == sum(w.values()) for c in ("denoiser", "vae", "text_encoder"))
    assert low.at("vae") == full.at("vae") - w["denoiser"] - w["controlnet"] - w["text_encoder"]


@pytest.mark.parametrize(
    ("model", "method", "side", "settings"),
    [("tiny-sdxl", "scalediff", 512, {}), ("tiny-flux", "direct", 256, {"guidance": 3.5})],
)
def test_low_vram_estimate_equals_a_real_run(model: str, method: str, side: int, settings: dict[str, Any]) -> None:
    """A real low-VRAM CPU run allocates, beyond the weights, exactly what the estimate books above the weights
    resident during its largest call."""
    kwargs = {"steps": 2, "previews": True, "low_vram": True, **settings}
    generate("a fox", method, model, side, side, progress=False, **kwargs)  # load outside the measurement
    with LiveBytes("cpu") as real:
        generate("a fox", method, model, side, side, progress=False, **kwargs)
    req = build_request("a fox", method, side, side, **kwargs)
    est = MemoryEstimate.of(request_cost(req, model), torch.float32, low_vram=True)
    assert est.peak - est.resident(est.largest) == real.peak


def test_a_low_vram_load_puts_only_the_denoiser_on_the_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """The first ``low_vram`` request loads the pipeline on the CPU and moves only the denoiser to the device: the
    whole pipeline is never on the device (FLUX.1-dev's 31 GiB would not fit where low-VRAM mode should)."""
    import hiresdiff.models.loading as loading
    import hiresdiff.pipeline as pipeline_mod

    loaded: list[str] = []
    started: list[str] = []
    load, start = loading.load_pipeline, ModelAdapter.start_offloaded
    monkeypatch.setattr(
        loading, "load_pipeline", lambda spec, **kw: (loaded.append(str(kw["device"])), load(spec, **kw))[1]
    )
    monkeypatch.setattr(
        ModelAdapter, "start_offloaded", lambda ad, dev, *a: (started.append(str(dev)), start(ad, dev, *a))[1]
    )
    pipeline_mod._CACHE.clear()
    generate("a cat", "direct", "tiny-sd", 128, 128, steps=1, progress=False, device="cpu", low_vram=True)
    hp = next(iter(pipeline_mod._CACHE.values()))
    assert (loaded, started, hp.adapter.offload) == (["cpu"], ["cpu"], True)
    pipeline_mod._CACHE.clear()
    generate("a cat", "direct", "tiny-sd", 128, 128, steps=1, progress=False, device="cpu")
    assert loaded == ["cpu", "cpu"] and started == ["cpu"]  # a plain request loads everything onto the device
    pipeline_mod._CACHE.clear()


def test_a_denoiser_that_cannot_move_is_one_line(tiny_sd_pipe: Any) -> None:
    from hiresdiff.errors import HiresError

    ad = ModelAdapter(tiny_sd_pipe)
    with pytest.raises(HiresError, match=r"^cannot move the denoiser to device 'nowhere:0': [^\n]+$"):
        ad.start_offloaded("nowhere:0")
    assert not ad.offload and ad.unet.device.type == "cpu"


def test_a_vae_that_cannot_move_is_named_in_its_one_line(tiny_sd_pipe: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Outside low-VRAM mode the VAE follows the denoiser: when it is the one that cannot move, the line names it."""
    from hiresdiff.errors import HiresError

    ad = ModelAdapter(tiny_sd_pipe)

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("out of memory\nsecond line")

    monkeypatch.setattr(ad.vae, "to", refuse)
    with pytest.raises(HiresError, match=r"^cannot move the VAE to device 'cpu': out of memory$"):
        ad.start_offloaded("cpu", low_vram=False)


def test_loras_and_controlnet_give_the_same_image_in_low_vram_mode(
    tiny_sdxl_pipe: Any, make_lora: Any, make_controlnet: Any, tmp_path: Path
) -> None:
    """A LoRA applied to the UNet and a ControlNet ride along when the denoiser steps off and back: bitwise equal."""
    lora = make_lora("tiny-sdxl", 0, tmp_path / "lora")
    net = tmp_path / "net"
    make_controlnet(tiny_sdxl_pipe.unet).save_pretrained(net)
    hp = HiresPipeline.from_pipe(tiny_sdxl_pipe, "tiny-sdxl")
    pixels = torch.randint(0, 256, (256, 256, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    picture = Image.fromarray(pixels.numpy())
    kw = {"steps": 2, "seed": 5, "progress": False, "previews": False, "max_batch": 2, "loras": [str(lora)]}
    kw |= {"controlnet": str(net), "control_image": picture}
    plain = hp("a cat", "direct", 256, 256, **kw)
    low = hp("a cat", "direct", 256, 256, low_vram=True, **kw)
    hp.adapter.set_offload(False)
    assert _same_result(low, plain)
