"""FreeU as a patch (SPEC-baselines-unet §0 "FreeU"): diffusers' rule equals ``enable_freeu`` bitwise, the channel
rule differs from it exactly where the SPEC says, and the UNet is restored."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch

from hiresdiff.errors import HiresError
from hiresdiff.models.adapter import ModelAdapter
from hiresdiff.patches.clock import PatchClock
from hiresdiff.patches.context import patched
from hiresdiff.patches.freeu import freeu_patch, freeu_sites
from hiresdiff.patches.tables import FREEU_OFFICIAL

KW: dict[str, Any] = {"steps": 3, "progress": False, "previews": False, "seed": 3}


def unet_inputs(pipe: Any, side: int = 32, batch: int = 2) -> tuple[tuple, dict]:
    g = torch.Generator().manual_seed(0)
    unet = pipe.unet
    x = torch.randn(batch, 4, side, side, generator=g)
    kwargs: dict[str, Any] = {
        "encoder_hidden_states": torch.randn(batch, 5, unet.config.cross_attention_dim, generator=g),
        "return_dict": False,
    }
    if unet.config.addition_embed_type == "text_time":
        dim = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        added = {"text_embeds": torch.randn(batch, dim, generator=g), "time_ids": torch.full((batch, 6), 256.0)}
        kwargs["added_cond_kwargs"] = added
    return (x, torch.tensor(500)), kwargs


def run_patched(pipe: Any, family: str, rule: str, args: tuple, kwargs: dict) -> torch.Tensor:
    ad = ModelAdapter(pipe)
    clock = PatchClock()
    with patched(pipe.unet, clock, lambda: ad.call_info, [freeu_patch(ad, family, rule)]):
        clock.at_step(0, torch.tensor(500))
        return pipe.unet(*args, **kwargs)[0]


@pytest.mark.parametrize(
    ("fixture", "family", "kind"), [("tiny_sdxl_pipe", "sdxl", "sdxl"), ("tiny_sd_pipe", "sd", "sd15")]
)
@torch.no_grad()
def test_diffusers_rule_equals_enable_freeu_bitwise(fixture: str, family: str, kind: str, request: Any) -> None:
    pipe = request.getfixturevalue(fixture)
    args, kwargs = unet_inputs(pipe)
    plain = pipe.unet(*args, **kwargs)[0]
    f = FREEU_OFFICIAL[kind]
    pipe.unet.enable_freeu(s1=f.s1, s2=f.s2, b1=f.b1, b2=f.b2)
    try:
        reference = pipe.unet(*args, **kwargs)[0]
    finally:
        pipe.unet.disable_freeu()
    ours = run_patched(pipe, family, "diffusers", args, kwargs)
    assert not torch.equal(reference, plain)
    assert torch.equal(ours, reference)
    assert torch.equal(pipe.unet(*args, **kwargs)[0], plain)  # restored
    assert not any("forward" in m.__dict__ for m in pipe.unet.modules())


def layout_unet(block_out_channels: list[int]) -> Any:
    """Only the config FreeU's placement reads (the full-size UNets' facts, NOTES.md)."""
    dim = 2048 if len(block_out_channels) == 3 else 768
    return SimpleNamespace(
        config=SimpleNamespace(block_out_channels=block_out_channels, layers_per_block=2, cross_attention_dim=dim)
    )


def test_rules_differ_where_the_spec_says() -> None:
    """SDXL: up_blocks.1 resnet 0 is stage 1 by channels (1280 in), stage 2 by index; up_blocks.2 resnet 0 (640 in)
    is stage 2 by channels, untouched by index. SD 1.5: 7 resnets differ."""
    f = FREEU_OFFICIAL["sdxl"]
    xl = layout_unet([320, 640, 1280])
    channels, index = freeu_sites(xl, "channels", f), freeu_sites(xl, "diffusers", f)
    differ = {k for k in channels.keys() | index.keys() if channels.get(k) != index.get(k)}
    assert differ == {"up1:resnets.0", "up0:resnets.0"}
    assert (channels["up1:resnets.0"].b, index["up1:resnets.0"].b) == (f.b1, f.b2)
    assert channels["up0:resnets.0"].backbone == 640 and "up0:resnets.0" not in index
    sd = layout_unet([320, 640, 1280, 1280])
    f15 = FREEU_OFFICIAL["sd15"]
    channels, index = freeu_sites(sd, "channels", f15), freeu_sites(sd, "diffusers", f15)
    assert len({k for k in channels.keys() | index.keys() if channels.get(k) != index.get(k)}) == 7


@torch.no_grad()
def test_channel_rule_fires_on_tiny_unets_and_differs_from_diffusers_rule(tiny_sdxl_pipe: Any) -> None:
    args, kwargs = unet_inputs(tiny_sdxl_pipe)
    plain = tiny_sdxl_pipe.unet(*args, **kwargs)[0]
    channels = run_patched(tiny_sdxl_pipe, "sdxl", "channels", args, kwargs)
    index = run_patched(tiny_sdxl_pipe, "sdxl", "diffusers", args, kwargs)
    assert not torch.equal(channels, plain) and not torch.equal(channels, index)
    ad = ModelAdapter(tiny_sdxl_pipe)
    clock = PatchClock()  # outside a loop (no step index) the patch is plain
    with patched(tiny_sdxl_pipe.unet, clock, lambda: ad.call_info, [freeu_patch(ad, "sdxl")]):
        assert torch.equal(tiny_sdxl_pipe.unet(*args, **kwargs)[0], plain)


def test_unknown_rule_is_one_line(tiny_sdxl_pipe: Any) -> None:
    with pytest.raises(HiresError, match="unknown FreeU rule 'middle'") as err:
        freeu_patch(tiny_sdxl_pipe.unet, "sdxl", "middle")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("method", ["direct", "hidiffusion"])
def test_freeu_option_on_direct_and_hidiffusion(sdxl: Any, method: str) -> None:
    off = sdxl("a cat", method, 512, 512, **KW).latents
    on = sdxl("a cat", method, 512, 512, freeu=True, **KW)
    assert not torch.equal(on.latents, off)
    assert on.metadata[0]["params"]["freeu"] is True and on.metadata[0]["params"]["freeu_rule"] == "channels"
    index = sdxl("a cat", method, 512, 512, freeu=True, freeu_rule="diffusers", **KW).latents
    assert not torch.equal(index, on.latents)
    assert torch.equal(sdxl("a cat", method, 512, 512, **KW).latents, off)  # nothing left installed


def test_bad_freeu_rule_parameter_is_one_line(sdxl: Any) -> None:
    with pytest.raises(HiresError, match="freeu_rule") as err:
        sdxl("a cat", "direct", 512, 512, freeu=True, freeu_rule="middle", **KW)
    assert "\n" not in str(err.value)


def test_cost_replay_is_exact_with_freeu() -> None:
    from hiresdiff.cost.model import model_cost

    fast = model_cost("direct", "tiny-sdxl", 512, 512, steps=4, freeu=True)
    full = model_cost("direct", "tiny-sdxl", 512, 512, steps=4, freeu=True, exact=True)
    assert fast.to_dict() == full.to_dict() and fast.peaks == full.peaks
