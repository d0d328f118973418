"""The model-patch seam (:mod:`hiresdiff.patches.context`): install/restore, level addressing, per-branch
settings, PEFT-wrapped convs, and the step clock."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn

from hiresdiff.errors import HiresError
from hiresdiff.patches.clock import PatchClock
from hiresdiff.patches.context import ConvPatch, ConvSetting, OutputPatch, active_signature, in_steps, patched
from hiresdiff.patches.hidiffusion import RAD


@pytest.fixture(scope="module")
def unet(tiny_sdxl_pipe: Any) -> nn.Module:
    return tiny_sdxl_pipe.unet


def module_state(unet: nn.Module) -> dict[str, Any]:
    """Everything a patch may touch: instance forwards, conv attributes, processors, root attributes."""
    state: dict[str, Any] = {"num_upsamplers": unet.num_upsamplers}
    for name, m in unet.named_modules():
        state[f"{name}.forward"] = m.__dict__.get("forward")
        if isinstance(m, nn.Conv2d):
            state[f"{name}.conv"] = (m.stride, m.padding, m.dilation)
    state["processors"] = {k: id(v) for k, v in unet.attn_processors.items()}
    return state


def identity_processor(inner: Any) -> Any:
    return lambda *a, **k: inner(*a, **k)


def install(unet: nn.Module, clock: PatchClock, extra: tuple = ()) -> Any:
    patches = (
        ConvPatch(("ds1",), in_steps(range(0, 2), RAD)),
        OutputPatch(("down1:attentions.0",), in_steps(range(0, 2), "x2"), transform=lambda x, s: x * 2),
        *extra,
    )
    return patched(unet, clock, lambda: [], patches, {"down1.attn1": identity_processor}, {"num_upsamplers": int})


def test_patches_are_gone_after_the_block_and_after_an_exception(unet: nn.Module) -> None:
    before = module_state(unet)
    clock = PatchClock()
    with install(unet, clock):
        inside = module_state(unet)
        assert inside != before and unet.num_upsamplers == before["num_upsamplers"]  # int(n) keeps the value
        assert inside["down_blocks.1.downsamplers.0.conv.forward"] is not None
        assert active_signature() == (None,)  # outside a loop every patch is plain
        clock.at_step(0, torch.tensor(999))
        assert active_signature() == ((((RAD,), ("x2",)),),)  # clocks → installs → patches → branches
    assert module_state(unet) == before and active_signature() == ()
    with pytest.raises(RuntimeError, match="boom"), install(unet, clock):
        raise RuntimeError("boom")
    assert module_state(unet) == before


def test_unknown_layers_are_refused_in_one_line_before_anything_changes(unet: nn.Module) -> None:
    before = module_state(unet)
    clock = PatchClock()
    with pytest.raises(HiresError) as err, install(unet, clock, (ConvPatch(("ds7",), in_steps(range(1), RAD)),)):
        pass
    assert "ds7" in str(err.value) and "\n" not in str(err.value)
    bad = OutputPatch(("down0:attentions.0",), in_steps(range(1), "x"))  # down0 of SDXL has no attention
    with pytest.raises(HiresError, match=r"down0:attentions\.0"), patched(unet, clock, lambda: [], [bad]):
        pass
    with pytest.raises(HiresError, match=r"up9\.attn1"), patched(unet, clock, lambda: [], (), {"up9.attn1": id}):
        pass
    assert module_state(unet) == before


def test_scheduled_conv_patch_follows_the_clock(unet: nn.Module) -> None:
    conv = unet.get_submodule("down_blocks.1.downsamplers.0.conv")
    x = torch.randn(2, conv.in_channels, 16, 16)
    plain = conv(x)
    clock = PatchClock()
    with patched(unet, clock, lambda: [], [ConvPatch(("ds1",), in_steps(range(2, 4), RAD))]):
        assert torch.equal(conv(x), plain)  # no step yet
        clock.at_step(1, torch.tensor(0))
        assert torch.equal(conv(x), plain)
        clock.at_step(2, torch.tensor(0))
        rad = conv(x)
        assert conv.stride == (2, 2)  # attributes change only for the call
    assert rad.shape[-2:] == (4, 4)
    ref = nn.functional.conv2d(x, conv.weight, conv.bias, stride=4, padding=2, dilation=2)
    assert torch.equal(rad, ref)


def test_per_branch_settings_split_the_call_by_rows(unet: nn.Module) -> None:
    conv = unet.get_submodule("down_blocks.1.downsamplers.0.conv")
    x = torch.randn(3, conv.in_channels, 12, 12)
    light, strong = ConvSetting(padding=2, dilation=2), ConvSetting(padding=3, dilation=3)
    clock = PatchClock()
    schedule = lambda i, branch: strong if branch == "cond" else light  # noqa: E731
    rows = [(0, "uncond"), (0, "cond"), (1, "uncond")]
    with patched(unet, clock, lambda: rows, [ConvPatch(("ds1",), schedule, ("uncond", "cond"))]):
        clock.at_step(0, torch.tensor(0))
        out = conv(x)
        assert clock.signature_at(0) == (((light, strong),),)
    for row, setting in enumerate((light, strong, light)):
        d = setting.dilation
        ref = nn.functional.conv2d(x[row : row + 1], conv.weight, conv.bias, stride=2, padding=d, dilation=d)
        assert torch.allclose(out[row : row + 1], ref, atol=1e-6)


def test_peft_wrapped_conv_gets_stride_and_dilation_on_base_layer_and_lora_a(unet: nn.Module) -> None:
    from peft import LoraConfig, inject_adapter_in_model

    model = copy.deepcopy(unet)
    config = LoraConfig(
        r=2, lora_alpha=2, target_modules=["down_blocks.1.downsamplers.0.conv"], init_lora_weights=False
    )
    inject_adapter_in_model(config, model)
    wrapper = model.get_submodule("down_blocks.1.downsamplers.0.conv")
    seen: dict[str, tuple] = {}
    for name in ("base_layer", "lora_A.default", "lora_B.default"):
        part = wrapper.get_submodule(name)
        part.register_forward_pre_hook(lambda m, a, n=name: seen.__setitem__(n, (m.stride, m.dilation)))
    x = torch.randn(1, wrapper.base_layer.in_channels, 16, 16)
    base_only = wrapper.base_layer(x)
    clock = PatchClock()
    with patched(model, clock, lambda: [], [ConvPatch(("ds1",), in_steps(range(1), RAD))]):
        clock.at_step(0, torch.tensor(0))
        out = wrapper(x)
    assert seen == {
        "base_layer": ((4, 4), (2, 2)),
        "lora_A.default": ((4, 4), (2, 2)),
        "lora_B.default": ((1, 1), (1, 1)),
    }
    assert out.shape[-2:] == (4, 4) and base_only.shape[-2:] == (8, 8)
    base = wrapper.base_layer
    rad_base = nn.functional.conv2d(x, base.weight, base.bias, stride=4, padding=2, dilation=2)
    assert not torch.allclose(out, rad_base)  # the LoRA contributes (not silently dropped)
