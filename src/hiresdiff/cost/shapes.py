"""One dispatch mode for a shape-only call: FLOPs, live bytes and the meta kernels' results, memoised per operation.

Tracing a full-size denoiser on ``meta`` (:meth:`hiresdiff.cost.meta.MetaModule._trace`) runs thousands of aten
operations, and most of the time goes into PyTorch's Python meta functions (the ``torch._refs`` elementwise rules:
broadcasting, type promotion, strides) and into two stacked dispatch modes (the FLOP counter, :class:`LiveBytes`).
Yet an SDXL UNet call of 5,329 operations has fewer than 200 distinct ones (the same convolution, norm, linear and
attention of a block repeat at every level), and what a meta kernel returns — the shapes, strides and dtypes of
its outputs — and what the FLOP counter books depend only on the operation and its arguments' shapes, strides,
dtypes and constants. :class:`TraceMode` therefore answers an operation seen before from a table: its outputs made
again as empty ``meta`` tensors of the recorded layout and its recorded FLOPs, which makes a trace several times
cheaper. What the mode reports is what :class:`~torch.utils.flop_counter.FlopCounterMode` and
:class:`LiveBytes` stacked (the counter below) report, operation for operation (tested):

* FLOPs: PyTorch's formula registry (``torch.utils.flop_counter``) applied to each operation's overload packet;
  an operation without a formula is decomposed (``OpOverload.decompose``) when it has a composite implementation
  and its parts are counted, as the counter does; metadata queries are not counted;
* live bytes: each operation that reaches the mode is accounted once, by its outputs (the parts of a
  decomposition are the counter's business, as below a :class:`LiveBytes` stacked above it);
* only operations whose outputs are fresh storages are answered from the table: views, in-place and ``out=``
  operations (any alias in the schema), operations found to return an input's storage anyway (``_unsafe_view``),
  outputs on other devices and unhashable arguments run for real.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any, ParamSpec, TypeVar

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_unflatten
from torch.utils.flop_counter import FlopCounterMode

from hiresdiff.cost.memory import LiveBytes

#: what an operation's arguments may hold to be looked up (tensors are described by their layout)
_ATOMS = (int, float, bool, str, type(None), torch.dtype, torch.device, torch.memory_format, torch.layout)
#: metadata queries, which FlopCounterMode passes on uncounted
_QUERIES = frozenset(
    getattr(torch.ops.aten, name).default
    for name in (
        "sym_is_contiguous",
        "is_contiguous",
        "is_strides_like_format",
        "is_non_overlapping_and_dense",
        "size",
        "sym_size",
        "stride",
        "sym_stride",
        "storage_offset",
        "sym_storage_offset",
        "numel",
        "sym_numel",
        "dim",
    )
) | {torch.ops.aten.is_contiguous.memory_format, torch.ops.prim.layout.default}
#: recorded operations kept per process (the table is cleared when it grows past this)
MEMO_SIZE = 100_000
#: (operation, argument descriptions) → (output leaves: layouts or constants, output structure, FLOPs)
_MEMO: dict[Any, tuple[list[Any], Any, int]] = {}
#: :class:`AllocationsOnly`'s table (CPU arguments): the same, kept apart so a trace never rebuilds a CPU result
_CPU_MEMO: dict[Any, tuple[list[Any], Any, int]] = {}
#: per operation: may its result be looked up (no alias in its schema)?
_FRESH: dict[Any, bool] = {}
_REGISTRY = FlopCounterMode(display=False).flop_registry
P = ParamSpec("P")
R = TypeVar("R")


def _describe(value: Any) -> Any:
    """A hashable description of an argument: tensors by shape, strides, dtype, device and offset."""
    if isinstance(value, torch.Tensor):
        return (tuple(value.shape), value.stride(), value.dtype, value.device.type, value.storage_offset())
    if isinstance(value, (list, tuple)):
        return tuple(_describe(v) for v in value)
    if isinstance(value, _ATOMS):
        return value
    raise TypeError(type(value).__name__)


def _key(func: Any, args: Any, kwargs: dict[str, Any]) -> Any:
    """What an operation's result layout depends on, or ``None`` when an argument has no description."""
    try:
        return func, _describe(args), _describe(tuple(sorted(kwargs.items())))
    except TypeError:
        return None


def _remember(memo: dict[Any, Any], key: Any, entry: tuple[list[Any], Any, int]) -> tuple[list[Any], Any, int]:
    """Keep ``entry`` under ``key`` (the table is emptied when it reaches :data:`MEMO_SIZE`)."""
    if len(memo) >= MEMO_SIZE:
        memo.clear()
    memo[key] = entry
    return entry


def _fresh(func: Any) -> bool:
    """Whether ``func`` returns new storages only (no view, no in-place or ``out=`` argument)."""
    known = _FRESH.get(func)
    if known is None:
        schema = func._schema
        aliased = any(r.alias_info is not None for r in schema.returns)
        written = any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments)
        known = _FRESH[func] = not aliased and not written
    return known


def _layouts(out: Any, args: Any, kwargs: dict[str, Any]) -> tuple[list[Any], Any] | str:
    """The output's leaves as layouts or constants, and its structure — or why it cannot be rebuilt: ``"shared"``
    (a tensor on an input's storage although the schema has no alias: ``_unsafe_view`` and kin; or two outputs
    on one storage), ``"elsewhere"`` (a tensor not on a new ``meta`` storage: another device, an offset)."""
    leaves, spec = tree_flatten(out)
    given = {t.untyped_storage()._cdata for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
    described: list[Any] = []
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            if leaf.device.type != "meta" or leaf.storage_offset() != 0:
                return "elsewhere"
            storage = leaf.untyped_storage()._cdata
            if storage in given:
                return "shared"
            given.add(storage)
            described.append((tuple(leaf.shape), leaf.stride(), leaf.dtype))
        else:
            described.append(("constant", leaf))
    return described, spec


def _rebuilt(leaves: list[Any], spec: Any) -> Any:
    made = [
        leaf[1] if leaf[0] == "constant" else torch.empty_strided(leaf[0], leaf[1], dtype=leaf[2], device="meta")
        for leaf in leaves
    ]
    return tree_unflatten(made, spec)


class TraceMode(LiveBytes):
    """FLOPs (``flops``), live ``meta`` bytes, their peak and trail of one shape-only call, in one dispatch mode
    with memoised meta kernels (module docstring)."""

    def __init__(self) -> None:
        super().__init__("meta", trail=True)
        self.flops = 0
        self._decomposing = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = self._run(func, args, kwargs)
        if not self._decomposing:
            self.account(out, args, kwargs)
        return out

    def _run(self, func: Any, args: Any, kwargs: dict[str, Any]) -> Any:
        """``func``'s result and its FLOPs booked: from the table, by decomposition, or by running it."""
        if func in _QUERIES or isinstance(func, torch._ops.HigherOrderOperator):
            return func(*args, **kwargs)
        key = _key(func, args, kwargs) if _fresh(func) else None
        if key is not None and (seen := _MEMO.get(key)) is not None:
            self.flops += seen[2]
            return _rebuilt(seen[0], seen[1])
        packet = func._overloadpacket
        if packet not in _REGISTRY and func is not torch.ops.prim.device.default:
            self._decomposing += 1
            try:
                with self:
                    parts = func.decompose(*args, **kwargs)
            finally:
                self._decomposing -= 1
            if parts is not NotImplemented:
                return parts
        out = func(*args, **kwargs)
        flops = int(_REGISTRY[packet](*args, **kwargs, out_val=out)) if packet in _REGISTRY else 0
        self.flops += flops
        if key is not None:
            layouts = _layouts(out, args, kwargs)
            if layouts == "shared":
                _FRESH[func] = False  # returns its input's storage: always run it
            elif not isinstance(layouts, str):
                _remember(_MEMO, key, (layouts[0], layouts[1], flops))
        return out


# ---------------------------------------------------------------------------------------- value-free operations

#: set while the cost model runs a generation (:func:`hiresdiff.cost.model.model_cost`)
COSTING: ContextVar[bool] = ContextVar("hiresdiff_costing", default=False)
#: set inside a :func:`value_free` operation (one :class:`AllocationsOnly` mode for nested ones)
_FREE: ContextVar[bool] = ContextVar("hiresdiff_value_free", default=False)
#: in-place operations that change a tensor's metadata, not only its values: they always run
_RESHAPING = frozenset(
    {"resize_", "resize_as_", "set_", "as_strided_", "squeeze_", "unsqueeze_", "transpose_", "t_", "swapdims_"}
)


def _on_meta(value: Any) -> Any:
    """``value`` with every tensor replaced by an empty ``meta`` tensor of the same layout."""
    if isinstance(value, torch.Tensor):
        return torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device="meta")
    if isinstance(value, (list, tuple)):
        return type(value)(_on_meta(v) for v in value)
    if isinstance(value, dict):
        return {k: _on_meta(v) for k, v in value.items()}
    return value


def _on_cpu(args: Any, kwargs: dict[str, Any]) -> bool:
    """Whether an operation works on the CPU: every tensor argument there, and no other target ``device``
    (shape-only model calls inside, their moves to ``meta`` included, run as they are)."""
    device = kwargs.get("device")
    if device is not None and torch.device(device).type != "cpu":
        return False
    return all(t.device.type == "cpu" for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor))


class AllocationsOnly(TorchDispatchMode):
    """Inside, CPU operations allocate their outputs (as zeros, through the modes below: the cost model's
    :class:`LiveBytes` counts them as a real run's) but compute nothing: each output's layout comes from the meta
    kernel, looked up like :class:`TraceMode`'s. In-place operations leave their target as it is; views, metadata
    operations, operations on other devices (the shape-only model calls within) and anything this cannot shape
    (scalar outputs such as ``.item()``) run. ``fill=False`` leaves the outputs uninitialised (nothing touches their
    memory): for work whose result nobody reads (:func:`discarded`)."""

    def __init__(self, fill: bool = True) -> None:
        super().__init__()
        self.fill = fill

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func in _QUERIES or isinstance(func, torch._ops.HigherOrderOperator) or not _on_cpu(args, kwargs):
            return func(*args, **kwargs)
        if not _fresh(func):
            name = func._overloadpacket.__name__
            written = func._schema.arguments[:1] and func._schema.arguments[0].alias_info is not None
            if name.endswith("_") and name not in _RESHAPING and written and "out" not in kwargs:
                return args[0]  # its values do not matter here
            return func(*args, **kwargs)
        key = _key(func, args, kwargs)
        if key is None:
            return func(*args, **kwargs)
        seen = _CPU_MEMO.get(key)
        if seen is None:
            try:
                layouts = _layouts(func(*_on_meta(args), **_on_meta(kwargs)), (), {})
            except RuntimeError:  # no meta kernel (PyTorch raises a RuntimeError subclass), or a value it needs
                return func(*args, **kwargs)
            if isinstance(layouts, str) or any(leaf[0] == "constant" for leaf in layouts[0]):
                return func(*args, **kwargs)
            seen = _remember(_CPU_MEMO, key, (layouts[0], layouts[1], 0))
        made = [torch.empty_strided(s, st, dtype=dt, device="cpu") for s, st, dt in seen[0]]
        if self.fill:
            for tensor in made:
                tensor.zero_()
        return tree_unflatten(made, seen[1])


def value_free(fn: Callable[P, R]) -> Callable[P, R]:
    """Marks an operation whose results' values never steer a run — only their shapes and the memory they take
    do (a wavelet transform of decoded pixels on their way back into the VAE): in the cost model's runs it
    allocates what it would and computes nothing (:class:`AllocationsOnly`); elsewhere it is ``fn`` itself.

    Worth it for compute-heavy work on large images (DiffuseHigh's DWT and sharpening at 4096²: 3 s of CPU per
    call computed, a fraction allocated; DemoFusion's blur of the 4096² latents for dilated sampling: 0.7 s of a
    1.6 s estimate); for light elementwise work (tile blending) the per-operation lookup
    costs more than the work it saves (measured: a tiled VAE pass got slower), so such code is left unmarked."""

    @functools.wraps(fn)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        return _allocating(True, fn, *args, **kwargs)

    return run


def _allocating(fill: bool, fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
    """``fn`` under :class:`AllocationsOnly` (``fill``: zero its outputs) in a cost-model run, as it is elsewhere; a
    value-free operation inside another is already value-free (one mode)."""
    if not COSTING.get() or _FREE.get():
        return fn(*args, **kwargs)
    token = _FREE.set(True)
    try:
        with AllocationsOnly(fill=fill):
            return fn(*args, **kwargs)
    finally:
        _FREE.reset(token)


def discarded(fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
    """``fn(*args, **kwargs)`` in a cost-model run when its result is thrown away (the final 8-bit images of an
    estimate): every tensor it would allocate is allocated — the memory counts — and nothing is computed or even
    written (:class:`AllocationsOnly` without zero-filling: 0.16 → 0.1 → ≈0 s for a 4096² image). Outside the cost
    model, ``fn`` runs as it is."""
    return _allocating(False, fn, *args, **kwargs)
