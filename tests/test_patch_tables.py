"""Official ScaleCrafter / FouriScale / HiDiffusion tables by UNet level, and level addressing
(SPEC-baselines-unet §0, §1.2, §2.1–2.2, §3.1, §3.4(e))."""

from __future__ import annotations

import subprocess
import sys

import pytest

from hiresdiff.errors import HiresError
from hiresdiff.ops.redilate import progressive_dilation
from hiresdiff.patches import levels, tables
from hiresdiff.patches.tables import (
    FOURISCALE,
    FOURISCALE_MODELS,
    FREEU_OFFICIAL,
    HIDIFFUSION,
    LEVELS,
    SCALECRAFTER,
    hidiffusion_row,
    hidiffusion_schedule,
    model_kind,
    nearest_config,
    steps_at,
)


@pytest.fixture(scope="module")
def unets():
    """Tiny SD/SDXL UNets (CPU) and full-size SD 1.5/SDXL UNets (meta device), built once."""
    from hiresdiff.models.tiny import build_builtin_unet

    names = ("tiny-sd", "tiny-sdxl", "random-sd15", "random-sdxl")
    return {name: build_builtin_unet(name, device="cpu" if name.startswith("tiny") else "meta") for name in names}


def _addresses(model: str) -> set[str]:
    """Every address the official tables of ``model`` use."""
    found: set[str] = set()
    for config in SCALECRAFTER:
        if config.model == model:
            found |= set(config.dilate) | set(config.ndcfg)
    if model in FOURISCALE_MODELS:
        found |= set(FOURISCALE_MODELS[model].filtered) | set(FOURISCALE_MODELS[model].dilate_only)
    for row in HIDIFFUSION:
        if model in row.models:
            found |= {f"down{row.pool_level}", f"up{row.pool_level}", *row.msw_msa, *([row.rad] if row.rad else [])}
    return found


def test_tables_and_levels_import_no_torch():
    code = "import sys, hiresdiff.patches.tables, hiresdiff.patches.levels; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


@pytest.mark.parametrize("unet_name", ["tiny-sdxl", "random-sdxl"])
def test_sdxl_tables_resolve(unets, unet_name):
    resolved = levels.resolve(unets[unet_name], sorted(_addresses("sdxl")))
    assert all(resolved.values())


@pytest.mark.parametrize("model", ["sd15", "sd21"])
def test_sd_tables_resolve_on_the_full_size_unet(unets, model):
    resolved = levels.resolve(unets["random-sd15"], sorted(_addresses(model)))
    assert all(resolved.values())


def test_sd_hidiffusion_rows_resolve_on_tiny_sd(unets):
    """HiDiffusion's SD placement (ds0, level-1 blocks, level-0 self-attention) exists on the 2-level tiny SD."""
    rows = [row for row in HIDIFFUSION if "sd15" in row.models]
    assert levels.resolve(unets["tiny-sd"], {"ds0", "down1", "up1", *rows[0].msw_msa})


def test_module_names_by_level(unets):
    sdxl, sd15 = unets["random-sdxl"], unets["random-sd15"]
    assert levels.expand(sdxl, {"us2": 2.0}) == {"up_blocks.0.upsamplers.0.conv": 2.0}
    assert levels.resolve(sdxl, ["up0.res"])["up0.res"] == tuple(
        f"up_blocks.2.resnets.{j}.conv{c}" for j in range(3) for c in (1, 2)
    )
    assert levels.resolve(sdxl, ["mid"])["mid"] == tuple(
        f"mid_block.resnets.{j}.conv{c}" for j in (0, 1) for c in (1, 2)
    )
    assert levels.resolve(sd15, ["ds2", "us1", "up3"]) == {
        "ds2": ("down_blocks.2.downsamplers.0.conv",),
        "us1": ("up_blocks.2.upsamplers.0.conv",),
        "up3": ("up_blocks.0",),
    }
    attn = levels.resolve(sdxl, ["down1.attn1", "up1.attn1"])
    assert len(attn["down1.attn1"]) == 2 * 2 and len(attn["up1.attn1"]) == 3 * 2  # HiDiffusion's 4 + 6 blocks
    assert all(name.endswith("attn1") and name.startswith("up_blocks.1.") for name in attn["up1.attn1"])
    # ScaleCrafter SDXL 4096²: the 34 released names minus the 6 SDXL lacks (down_blocks.3, ds2, us0: bug B1)
    assert len(levels.expand(sdxl, SCALECRAFTER[-1].dilate)) == 34 - 6


def test_unknown_addresses_are_refused_in_one_line(unets):
    """The names the official SDXL tables list but SDXL lacks (bug B1), and a malformed one."""
    with pytest.raises(HiresError) as error:
        levels.resolve(unets["random-sdxl"], ["mid", "down3.res", "ds2", "us0", "bogus"])
    message = str(error.value)
    assert "\n" not in message
    assert all(name in message.split(";")[0] for name in ("down3.res", "ds2", "us0", "bogus"))
    assert "it has:" in message and "up2.res" in message and "mid" not in message.split(";")[0]
    with pytest.raises(HiresError, match="ds1"):
        levels.expand(unets["tiny-sd"], {"ds1": 2.0})  # the last down block has no downsampler


def test_sd_tables_adapt_to_tiny_sd_at_the_deepest_level(unets):
    """Tables for 4 levels on the 2-level tiny SD: ℓ → ℓ − 2; what has no counterpart is dropped and reported."""
    strong = SCALECRAFTER[3].dilate  # SD 1.5 2048²
    kept, dropped = levels.adapt(strong, LEVELS["sd15"], unets["tiny-sd"])
    assert kept == {"ds0": 3, "down0.res": 3, "down1.res": 4, "mid": 4, "up1.res": 4, "us1": 4, "up0.res": 3}
    assert set(dropped) == {"down1.res", "ds1", "up1.res", "us1", "us2"}
    assert levels.adapt(SCALECRAFTER[-1].dilate, LEVELS["sdxl"], unets["tiny-sdxl"]) == (
        dict(SCALECRAFTER[-1].dilate),
        (),
    )
    assert levels.shift_level("up3.attn1", -2) == "up1.attn1" and levels.shift_level("ds1", -2) is None


def test_scalecrafter_progressive_tables():
    """§1.2: τ = 35 (SD 1.5 2048²: p 4 → 4/3/2 at 9 and 18, p 3 → 2 at 12) and τ = 37 (SD 2.1 2048²)."""
    sd15 = next(c for c in SCALECRAFTER if (c.model, c.height, c.width) == ("sd15", 2048, 2048))
    assert sd15.progressive and (sd15.dilate_tau, sd15.ndcfg_tau) == (35, 35)
    mid = [progressive_dilation(sd15.dilate["mid"], i, sd15.dilate_tau) for i in range(35)]
    ds2 = [progressive_dilation(sd15.dilate["ds2"], i, sd15.dilate_tau) for i in range(35)]
    assert mid == [4] * 9 + [3] * 9 + [2] * 17 and ds2 == [3] * 12 + [2] * 23
    sd21 = next(c for c in SCALECRAFTER if (c.model, c.height, c.width) == ("sd21", 2048, 2048))
    assert sd21.dilate_tau == 37 and set(sd21.dilate) - set(sd21.ndcfg) == {"up0.res"}
    mid = [progressive_dilation(sd21.dilate["mid"], i, 37) for i in range(37)]
    up1 = [progressive_dilation(sd21.dilate["up1.res"], i, 37) for i in range(37)]
    assert mid == [4] * 10 + [3] * 9 + [2] * 18 and up1 == [3] * 13 + [2] * 24


def test_scalecrafter_tables_hold_the_official_values():
    by_key = {(c.model, c.height, c.width): c for c in SCALECRAFTER}
    assert len(by_key) == 12
    assert by_key["sdxl", 2048, 2048].dilate == {"mid": 2, "up2.res": 2, "us2": 2}
    assert by_key["sdxl", 2560, 2560].dilate_tau == 30 and set(by_key["sdxl", 2560, 2560].dilate.values()) == {2.5}
    assert by_key["sd21", 1024, 1024].dilate_tau == 20 and len(by_key["sd21", 1024, 1024].dilate) == 12
    assert by_key["sd21", 1024, 2048].ndcfg_tau == 0 and by_key["sd15", 1280, 1280].dilate_tau == 35
    assert by_key["sdxl", 2048, 4096].ndcfg == {"mid": 2, "up2.res": 2, "us2": 2}


def test_fouriscale_tables():
    xl, sd = FOURISCALE_MODELS["sdxl"], FOURISCALE_MODELS["sd15"]
    assert (xl.mask_floor, xl.weak_dilation_divisor, sd.mask_floor, sd.weak_dilation_divisor) == (0.6, 1.5, 0.0, None)
    assert "down1.res" not in xl.filtered and xl.dilate_only == ("us2",)
    starts = {(c.model, c.height, c.width): (c.start, c.stop) for c in FOURISCALE}
    assert starts["sd15", 1280, 1280] == (10, 30) and starts["sd21", 2048, 2048] == (20, 35)
    assert {starts[k] for k in starts if k[0] == "sdxl"} == {(20, 35)}
    assert (FREEU_OFFICIAL["sd15"].stage(1), FREEU_OFFICIAL["sdxl"].stage(2)) == ((1.2, 0.9), (1.2, 0.4))


@pytest.mark.parametrize(
    "model, scale, steps, rad, pool",
    [
        ("sdxl", 2, 50, range(0, 8), range(8, 20)),
        ("sdxl", 2, 30, range(0, 4), range(4, 12)),
        ("sdxl", 4, 50, range(0, 15), range(0, 35)),
        ("sdxl", 4, 30, range(0, 9), range(0, 21)),
        ("sd15", 2, 50, range(0, 20), range(0)),
        ("sd15", 2, 30, range(0, 12), range(0)),
        ("sd21", 4, 50, range(0, 35), range(0, 15)),
        ("sd21", 4, 30, range(0, 21), range(0, 9)),
        ("sdxl-turbo", 2, 50, range(0), range(0, 25)),
    ],
)
def test_hidiffusion_schedule_tables(model, scale, steps, rad, pool):
    """§3.4(e): RAD and pooling step ranges, N = 50 and 30."""
    assert hidiffusion_schedule(hidiffusion_row(model, scale), steps) == (rad, pool)


def test_hidiffusion_variants_and_float_steps():
    assert hidiffusion_schedule(hidiffusion_row("sdxl", 2, aggressive=False), 50) == (range(0), range(0, 20))
    assert hidiffusion_schedule(hidiffusion_row("sdxl", 2, controlnet=True), 50) == (range(0, 8), range(8, 25))
    assert hidiffusion_row("sdxl", 4, controlnet=True).name == "sdxl-4x"
    assert (steps_at(90, 0.7), steps_at(170, 0.7), steps_at(100, 0.7)) == (62, 118, 70)  # float int(N·f), not ⌊0.7N⌋
    with pytest.raises(HiresError):
        hidiffusion_row("playground", 2)


def test_nearest_official_config():
    exact, notice = nearest_config(SCALECRAFTER, "sdxl", 1024, 4096, 2048, "ScaleCrafter")
    assert (exact.height, exact.width, notice) == (2048, 4096, None)  # orientation-free
    near, notice = nearest_config(SCALECRAFTER, "sdxl", 1024, 3072, 3072, "ScaleCrafter")
    assert (near.height, near.width) == (2560, 2560)
    assert notice is not None and "3072×3072" in notice and "2560×2560" in notice and "\n" not in notice
    tiny, notice = nearest_config(SCALECRAFTER, "sdxl", 256, 512, 512, "ScaleCrafter")  # tiny-sdxl at 2×
    assert (tiny.height, notice) == (2048, None)
    tiny_sd, _ = nearest_config(FOURISCALE, "sd15", 128, 256, 512, "FouriScale")  # tiny-sd at 2×4
    assert (tiny_sd.height, tiny_sd.width, tiny_sd.start) == (1024, 2048, 20)
    with pytest.raises(HiresError):
        nearest_config(SCALECRAFTER, "flux", 1024, 2048, 2048, "ScaleCrafter")


def test_model_kind():
    assert (model_kind("sdxl"), model_kind("sd", 1024), model_kind("sd", 768), model_kind("sd", 32)) == (
        "sdxl",
        "sd21",
        "sd15",
        "sd15",
    )
    with pytest.raises(HiresError, match="UNet"):
        model_kind("flux")
    assert tables.OFFICIAL_STEPS == 50
