"""ESRGAN's RRDBNet (Wang et al. 2018, "ESRGAN", §3.1), written here for the ESRGAN family of SR files.

Why it exists next to spandrel: spandrel (:mod:`hiresdiff.models.upscalers` loads every architecture through it)
imports torchvision when the package is imported (its LaMa and RestoreFormer architectures), and a torch build
without a matching torchvision — the CPU torch this project tests on — cannot import it. ESRGAN, BSRGAN and
Real-ESRGAN files (the papers' "SDXL + BSRGAN" baseline, the everyday upscalers) then still load through this
module; other architectures need spandrel.

The network: ``conv_first`` → ``nb`` residual-in-residual dense blocks (three 5-conv dense blocks each, residuals
scaled by 0.2) → ``conv_body`` + the long skip → per ×2: nearest upsample, ``conv_up{k}``, LeakyReLU(0.2) →
``conv_hr``, LeakyReLU → ``conv_last``. Real-ESRGAN's ×2/×1 files put a pixel-unshuffle (×2/×4) in front of a
×4 network; it shows as ``in_channels = out_channels · r²``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

#: LeakyReLU slope and residual scaling of ESRGAN
_SLOPE = 0.2
_RESIDUAL = 0.2
#: BSRGAN / early ESRGAN names → the BasicSR names this module uses
_BSRGAN_NAMES = (
    (r"^RRDB_trunk\.", "body."),
    (r"\.RDB(\d)\.", r".rdb\1."),
    (r"^trunk_conv\.", "conv_body."),
    (r"^upconv(\d)\.", r"conv_up\1."),
    (r"^HRconv\.", "conv_hr."),
)
_OLD_BODY = re.compile(r"^model\.1\.sub\.(\d+)\.RDB(\d)\.conv(\d)\.0\.(weight|bias)$")
_OLD_LAYER = re.compile(r"^model\.(\d+)\.(weight|bias)$")


def _lrelu(x: torch.Tensor) -> torch.Tensor:
    return F.leaky_relu(x, _SLOPE)


class _DenseBlock(nn.Module):
    """Five 3×3 convs, each seeing the block input and every earlier output; ``x + 0.2·conv5(…)``."""

    def __init__(self, features: int, growth: int) -> None:
        super().__init__()
        for i in range(5):
            self.add_module(f"conv{i + 1}", nn.Conv2d(features + i * growth, growth if i < 4 else features, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [x]
        for i in range(1, 5):
            feats.append(_lrelu(getattr(self, f"conv{i}")(torch.cat(feats, 1))))
        return x + _RESIDUAL * self.conv5(torch.cat(feats, 1))


class _RRDB(nn.Module):
    """Three dense blocks in a row with a scaled residual around them."""

    def __init__(self, features: int, growth: int) -> None:
        super().__init__()
        self.rdb1, self.rdb2, self.rdb3 = (_DenseBlock(features, growth) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + _RESIDUAL * self.rdb3(self.rdb2(self.rdb1(x)))


class RRDBNet(nn.Module):
    """RRDBNet on images in [0, 1]: (B, in, H, W) → (B, out, H·scale, W·scale), ``scale = 2^ups / unshuffle``."""

    def __init__(
        self, in_ch: int, out_ch: int, features: int, growth: int, blocks: int, ups: int, unshuffle: int = 1
    ) -> None:
        super().__init__()
        self.unshuffle = unshuffle
        self.scale = 2**ups // unshuffle
        self.conv_first = nn.Conv2d(in_ch, features, 3, 1, 1)
        self.body = nn.Sequential(*(_RRDB(features, growth) for _ in range(blocks)))
        self.conv_body = nn.Conv2d(features, features, 3, 1, 1)
        for k in range(ups):
            self.add_module(f"conv_up{k + 1}", nn.Conv2d(features, features, 3, 1, 1))
        self.ups = ups
        self.conv_hr = nn.Conv2d(features, features, 3, 1, 1)
        self.conv_last = nn.Conv2d(features, out_ch, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.unshuffle > 1:
            x = F.pixel_unshuffle(x, self.unshuffle)
        feat = self.conv_first(x)
        feat = feat + self.conv_body(self.body(feat))
        for k in range(self.ups):
            feat = _lrelu(getattr(self, f"conv_up{k + 1}")(F.interpolate(feat, scale_factor=2, mode="nearest")))
        return self.conv_last(_lrelu(self.conv_hr(feat)))


def _from_old_names(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The original ESRGAN layout (``model.0``, ``model.1.sub.N.RDBk.convj.0``, ``model.3``, …): the shortcut's
    last entry is ``conv_body``; after it, every conv but the last two is an upsampling conv."""
    out: dict[str, torch.Tensor] = {}
    layers: dict[int, dict[str, torch.Tensor]] = {}
    body = {int(m.group(1)) for k in state if (m := _OLD_BODY.match(k))}
    for key, value in state.items():
        if m := _OLD_BODY.match(key):
            out[f"body.{m.group(1)}.rdb{m.group(2)}.conv{m.group(3)}.{m.group(4)}"] = value
        elif m := _OLD_LAYER.match(key):
            layers.setdefault(int(m.group(1)), {})[m.group(2)] = value
        elif key.startswith(f"model.1.sub.{len(body)}."):
            out["conv_body." + key.rsplit(".", 1)[1]] = value
        else:
            out[key] = value  # left over: load_state_dict reports it
    order = sorted(i for i in layers if i != 0)
    names = [*(f"conv_up{k + 1}" for k in range(len(order) - 2)), "conv_hr", "conv_last"]
    for name, index in zip(names, order, strict=False):
        out.update({f"{name}.{p}": v for p, v in layers[index].items()})
    out.update({f"conv_first.{p}": v for p, v in layers.get(0, {}).items()})
    return out


def esrgan_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """``state`` in this module's names when it is an ESRGAN-family state dict (BasicSR/Real-ESRGAN, BSRGAN or the
    original ESRGAN layout), else ``None``."""
    if "conv_first.weight" in state and "body.0.rdb1.conv1.weight" in state:
        return dict(state)
    if "conv_first.weight" in state and "RRDB_trunk.0.RDB1.conv1.weight" in state:
        renamed = {}
        for key, value in state.items():
            for pattern, repl in _BSRGAN_NAMES:
                key = re.sub(pattern, repl, key)
            renamed[key] = value
        return renamed
    if "model.0.weight" in state and "model.1.sub.0.RDB1.conv1.0.weight" in state:
        return _from_old_names(state)
    return None


def build_rrdbnet(state: Mapping[str, torch.Tensor]) -> RRDBNet:
    """An :class:`RRDBNet` shaped by a state dict in this module's names (:func:`esrgan_state`), weights loaded
    (strict: a tensor that fits nowhere raises ``RuntimeError``/``KeyError``)."""
    first = state["conv_first.weight"]
    out_ch = int(state["conv_last.weight"].shape[0])
    in_ch = int(first.shape[1])
    ratio = in_ch // out_ch if in_ch % out_ch == 0 else 1
    unshuffle = {4: 2, 16: 4}.get(ratio, 1)
    blocks = len({k.split(".")[1] for k in state if k.startswith("body.")})
    ups = sum(1 for k in state if re.fullmatch(r"conv_up\d+\.weight", k))
    growth = int(state["body.0.rdb1.conv1.weight"].shape[0])
    net = RRDBNet(in_ch, out_ch, int(first.shape[0]), growth, blocks, ups, unshuffle)
    net.load_state_dict(dict(state), strict=True)
    return net.eval()
