"""Scheduled patches of named UNet modules, installed and restored by one context (SPEC-baselines-unet §0.1 item 1).

A :class:`Patch` changes what some modules compute on the steps its schedule says (``schedule(i, branch)`` → a
setting, ``None`` = plain): :class:`ConvPatch` sets stride/padding/dilation of every conv inside a module for the
call, :class:`OutputPatch` transforms a module's output (pooling, restore, a low-pass),
:class:`InputConvPatch` a conv's input before a conv setting (FouriScale's low-pass),
:class:`InputPatch` any module's input (FreeU on decoder resnets). :func:`patched` resolves
every target by UNet level address (:mod:`hiresdiff.patches.levels`, so tiny test UNets work; absent names are one
:class:`~hiresdiff.errors.HiresError` line before anything changes), replaces each module's ``forward`` by an
instance attribute that reads the step from a :class:`~hiresdiff.patches.clock.PatchClock`, installs attention
processors and root attributes, and restores all of it when the block ends, exceptions included.

Per-branch settings: the rows of a denoiser call carry their guidance branch (:attr:`ModelAdapter.call_info`);
when the rows' settings differ, the call is split by setting, each group runs once, and the outputs go back in row
order. Conv settings reach PEFT LoRA wrappers too: every ``nn.Conv2d`` inside the module changes (``base_layer``
and each ``lora_A``), except the 1×1 ``lora_B`` convs that follow them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from hiresdiff.errors import HiresError
from hiresdiff.models.guidance import COND
from hiresdiff.patches.clock import PatchClock
from hiresdiff.patches.levels import resolve

#: ``schedule(step index, branch)`` → the patch's setting at that step for rows of that branch, ``None`` = plain
Schedule = Callable[[int, str], Hashable | None]
#: the rows of the current denoiser call: ``(canvas sample, branch)`` each (:attr:`ModelAdapter.call_info`)
Rows = Callable[[], Sequence[tuple[int, str]]]
#: PEFT's LoRA up-projection: a 1×1 conv after ``lora_A`` that keeps stride 1
_LORA_UP = "lora_B"

_MISSING = object()
#: clocks of the patch contexts open now (the cost model keys its FLOP cache on their state)
_ACTIVE: ContextVar[tuple[PatchClock, ...]] = ContextVar("hiresdiff_active_patches", default=())


def in_steps(steps: range, setting: Hashable) -> Schedule:
    """A schedule with ``setting`` on the step indices ``steps`` (every branch) and plain elsewhere."""
    return lambda index, branch: setting if index in steps else None


@dataclass
class Patch(ABC):
    """A scheduled change of the modules at ``targets``: level addresses (``ds1``, ``up2.res``), optionally with a
    sub-module path after a colon (``down1:attentions.0``). ``branches`` are the guidance branches whose settings
    make up the patch state (:meth:`signature_at`)."""

    targets: tuple[str, ...]
    schedule: Schedule
    branches: tuple[str, ...] = (COND,)

    def setting(self, index: int | None, branch: str) -> Hashable | None:
        """The setting at step ``index`` for rows of ``branch`` (plain outside a loop)."""
        return None if index is None else self.schedule(index, branch)

    def signature_at(self, index: int) -> Hashable:
        return tuple(self.setting(index, branch) for branch in self.branches)

    @abstractmethod
    def apply(self, module: nn.Module, forward: Callable[..., Any], setting: Any, args: tuple, kwargs: dict) -> Any:
        """Run ``forward`` (the module's own) under ``setting`` — what each kind of patch changes."""


@dataclass(frozen=True)
class ConvSetting:
    """Conv attributes for one call (``None``: unchanged)."""

    stride: int | None = None
    padding: int | None = None
    dilation: int | None = None


def conv_leaves(module: nn.Module) -> list[nn.Conv2d]:
    """Every ``nn.Conv2d`` inside ``module`` (itself included) except PEFT's 1×1 ``lora_B`` up-projections."""
    return [m for n, m in module.named_modules() if isinstance(m, nn.Conv2d) and _LORA_UP not in n.split(".")]


@dataclass
class ConvPatch(Patch):
    """Stride/padding/dilation (a :class:`ConvSetting`) of every conv inside the targets, for the call only."""

    def apply(self, module: nn.Module, forward: Callable[..., Any], setting: Any, args: tuple, kwargs: dict) -> Any:
        convs = conv_leaves(module)
        saved = [(c.stride, c.padding, c.dilation) for c in convs]
        try:
            for conv in convs:
                for name in ("stride", "padding", "dilation"):
                    value = getattr(setting, name)
                    if value is not None:
                        setattr(conv, name, (value, value))
            return forward(*args, **kwargs)
        finally:
            for conv, (stride, padding, dilation) in zip(convs, saved, strict=True):
                conv.stride, conv.padding, conv.dilation = stride, padding, dilation


@dataclass
class InputConvPatch(ConvPatch):
    """``transform(input, setting)`` on the targets' first positional input (a conv's feature map), then the
    conv attributes ``conv(setting)`` (a :class:`ConvSetting`) for the call: FouriScale's low-pass before a dilated
    conv (SPEC-baselines-unet §2.1)."""

    transform: Callable[[torch.Tensor, Any], torch.Tensor] = field(default=lambda x, s: x)
    conv: Callable[[Any], ConvSetting] = field(default=lambda s: s)

    def apply(self, module: nn.Module, forward: Callable[..., Any], setting: Any, args: tuple, kwargs: dict) -> Any:
        x, *rest = args
        return super().apply(module, forward, self.conv(setting), (self.transform(x, setting), *rest), kwargs)


@dataclass
class OutputPatch(Patch):
    """``transform(output, setting)`` on the targets' output (a tensor, or the first element of a tuple)."""

    transform: Callable[[torch.Tensor, Any], torch.Tensor] = field(default=lambda x, s: x)

    def apply(self, module: nn.Module, forward: Callable[..., Any], setting: Any, args: tuple, kwargs: dict) -> Any:
        out = forward(*args, **kwargs)
        if isinstance(out, tuple):
            return (self.transform(out[0], setting), *out[1:])
        return self.transform(out, setting)


@dataclass
class InputPatch(Patch):
    """``transform(module, input, setting)`` on the targets' first positional input before their own forward
    (FreeU edits a decoder resnet's concatenated backbone and skip features); ``module`` tells the transform which
    target it runs on."""

    transform: Callable[[nn.Module, torch.Tensor, Any], torch.Tensor] = field(default=lambda m, x, s: x)

    def apply(self, module: nn.Module, forward: Callable[..., Any], setting: Any, args: tuple, kwargs: dict) -> Any:
        return forward(self.transform(module, args[0], setting), *args[1:], **kwargs)


def _batch(args: tuple, kwargs: dict) -> int:
    first = next(v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor))
    return int(first.shape[0])


def _take(obj: Any, index: torch.Tensor, batch: int) -> Any:
    """``obj`` with the rows ``index`` of every tensor whose first axis is the batch."""
    if isinstance(obj, torch.Tensor):
        return obj.index_select(0, index.to(obj.device)) if obj.dim() and obj.shape[0] == batch else obj
    if isinstance(obj, (list, tuple)):
        return type(obj)(_take(v, index, batch) for v in obj)
    if isinstance(obj, dict):
        return {k: _take(v, index, batch) for k, v in obj.items()}
    return obj


def _merge(parts: list[Any], order: torch.Tensor) -> Any:
    """Outputs of row groups (tensors or tuples of tensors) concatenated and put back in row order."""
    if isinstance(parts[0], tuple):
        return tuple(_merge([p[k] for p in parts], order) for k in range(len(parts[0])))
    merged = torch.cat(parts)
    return merged.index_select(0, torch.argsort(order).to(merged.device))


def _patched_forward(patch: Patch, module: nn.Module, clock: PatchClock, rows: Rows) -> Callable[..., Any]:
    """The instance ``forward`` of a patched module: per-branch settings of the current step, row groups."""
    forward = module.forward

    def call(*args: Any, **kwargs: Any) -> Any:
        batch = _batch(args, kwargs)
        info = rows()
        branches = [branch for _, branch in info] if len(info) == batch else [""] * batch
        settings = [patch.setting(clock.index, branch) for branch in branches]
        distinct = list(dict.fromkeys(settings))
        if len(distinct) == 1:
            setting = distinct[0]
            return forward(*args, **kwargs) if setting is None else patch.apply(module, forward, setting, args, kwargs)
        parts, order = [], []
        for setting in distinct:
            index = torch.tensor([r for r, s in enumerate(settings) if s == setting])
            sub_args, sub_kwargs = _take(args, index, batch), _take(kwargs, index, batch)
            run = forward if setting is None else lambda *a, s=setting, **k: patch.apply(module, forward, s, a, k)
            parts.append(run(*sub_args, **sub_kwargs))
            order.append(index)
        return _merge(parts, torch.cat(order))

    return call


def resolve_targets(unet: Any, targets: Sequence[str]) -> dict[str, list[str]]:
    """Module names of each target (``address`` or ``address:sub.path``); one error line for absent ones."""
    modules = dict(unet.named_modules())
    addresses = resolve(unet, [t.partition(":")[0] for t in targets])
    out: dict[str, list[str]] = {}
    for target in targets:
        address, _, sub = target.partition(":")
        names = [f"{name}.{sub}" if sub else name for name in addresses[address]]
        missing = [n for n in names if n not in modules]
        if missing:
            raise HiresError(f"UNet module {target!r} does not exist in this UNet (no {missing[0]})")
        out[target] = names
    return out


@contextmanager
def patched(
    unet: Any,
    clock: PatchClock,
    rows: Rows,
    patches: Sequence[Patch] = (),
    processors: Mapping[str, Callable[[Any], Any]] | None = None,
    attributes: Mapping[str, Callable[[Any], Any]] | None = None,
) -> Iterator[None]:
    """Install ``patches``, attention ``processors`` (self-attention address → ``factory(current processor)``,
    e.g. ``down1.attn1``) and root ``attributes`` (name → ``new(old value)``) on ``unet`` while the block runs.

    Every target is resolved first (one error line for an absent one, nothing changed); everything is restored on
    exit, exceptions included. ``unet`` may be a cost-model wrapper: modules are reached through
    ``named_modules``/``get_submodule`` and processors through its ``set_attn_processor``.
    """
    targets = resolve_targets(unet, [t for p in patches for t in p.targets])
    processor_names = resolve(unet, list(processors or {}))
    root = unet.get_submodule("")
    installed: list[tuple[nn.Module, Any]] = []
    saved_attributes = {name: getattr(root, name) for name in attributes or {}}
    original_processors = dict(unet.attn_processors) if processors else None
    unsign = clock.sign(lambda index: tuple(p.signature_at(index) for p in patches))
    token = _ACTIVE.set((*_ACTIVE.get(), clock))
    try:
        for patch in patches:
            for target in patch.targets:
                for name in targets[target]:
                    module = unet.get_submodule(name)
                    installed.append((module, module.__dict__.get("forward", _MISSING)))
                    module.forward = _patched_forward(patch, module, clock, rows)
        for name, new in (attributes or {}).items():
            setattr(root, name, new(saved_attributes[name]))
        if processors and original_processors is not None:
            wanted = {f"{n}.processor": processors[a] for a, names in processor_names.items() for n in names}
            unet.set_attn_processor({k: wanted[k](p) if k in wanted else p for k, p in original_processors.items()})
        yield
    finally:
        if original_processors is not None:
            unet.set_attn_processor(original_processors)
        for name, value in saved_attributes.items():
            setattr(root, name, value)
        for module, forward in reversed(installed):
            if forward is _MISSING:
                module.__dict__.pop("forward", None)
            else:
                module.forward = forward
        _ACTIVE.reset(token)
        unsign()


def active_signature() -> Hashable:
    """The state of every patch context open now at its clock's step (the cost model's FLOP-cache key part)."""
    return tuple(clock.signature() for clock in _ACTIVE.get())
