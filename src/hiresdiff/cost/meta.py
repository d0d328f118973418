"""Count model FLOPs of a real generation without running the models (DESIGN "Measuring").

The heavy modules of a pipeline (denoiser, VAE, text encoders) are built on the ``meta`` device and wrapped in a
:class:`MetaModule`. Everything else — the method's phases, views, dilated samples, blending, scheduler steps and
noise — runs for real on the CPU with the actual canvas sizes. Each call of a wrapped module:

1. moves its tensor arguments to ``meta`` and runs the real module under :class:`~hiresdiff.cost.shapes.TraceMode`
   (PyTorch's FLOP formulas and the live bytes, meta kernels memoised; attention processors installed by the method
   included, so NPA windows or attention capture are counted as they run);
2. books the FLOPs, the number of samples and the call's peak memory (:mod:`hiresdiff.cost.memory`: activations
   on top of the canvas bytes alive on the CPU when the call starts) in a :class:`Ledger`;
3. returns zeros of the output's shapes and dtypes on the CPU, so the orchestration goes on.

Calls with the same argument shapes, the same installed attention processors and the same state of the scheduled
model patches (:func:`hiresdiff.patches.context.active_signature`: RAU-Net changes FLOPs at equal input shapes) cost
the same, so the FLOP count and the activation peak of a signature are computed once and reused.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from hiresdiff.cost import store
from hiresdiff.cost.memory import LiveBytes, fused_attention
from hiresdiff.cost.shapes import TraceMode
from hiresdiff.cost.trace import BASES, Trace, derive, derive_size, map_tensors, take_rows
from hiresdiff.patches.context import active_signature

HOST = torch.device("cpu")


@dataclass
class Tally:
    """FLOPs, calls and samples (batch rows) booked for one component."""

    flops: float = 0.0
    calls: int = 0
    samples: int = 0
    #: denoiser only: samples weighted by their spatial size relative to a native-size sample
    native_samples: float = 0.0
    #: the most samples (batch rows) of one call
    rows: int = 0
    #: the call with the largest footprint: canvas bytes alive when it started + its own activations (float32)
    peak: CallPeak | None = None


@dataclass(frozen=True)
class CallPeak:
    """Memory of one shape-only call: ``canvas`` bytes alive around it, its ``activations``, its ``rows`` (batch)
    and the spatial ``cells`` of its input (latent pixels or tokens)."""

    canvas: int
    activations: int
    rows: int
    cells: int

    @property
    def total(self) -> int:
        return self.canvas + self.activations


@dataclass
class Ledger:
    """Per-component tallies of one generation (``denoiser``, ``vae``, ``text_encoder``)."""

    tallies: dict[str, Tally] = field(default_factory=dict)
    #: the live CPU bytes of the orchestration (the canvas state) while a generation is counted
    host: LiveBytes | None = None
    #: while set, every booking (and the view-parallel accounting, :class:`~hiresdiff.cost.model.CountingParallel`)
    #: is also appended here, so a denoising step can be recorded and booked again (:mod:`hiresdiff.cost.replay`)
    journal: list[tuple[Any, ...]] | None = None
    #: price a call of more rows than :data:`~hiresdiff.cost.trace.BASES` from the traces of its 2- and 3-row cuts
    #: (:func:`~hiresdiff.cost.trace.derive`) instead of tracing it; off: every signature is traced (exact mode)
    derive_rows: bool = False
    #: called whenever a booking raises a component's peak (a probe of the auto batch search may stop the run
    #: there: :func:`hiresdiff.plan.choose_max_batch`)
    watch: Callable[[Ledger], None] | None = None
    #: whole calls recorded in earlier estimates of this pipeline (:class:`hiresdiff.cost.replay.SegmentReplay`)
    segments: dict[Any, Any] = field(default_factory=dict)

    def book(
        self, component: str, flops: float, samples: int, native: float = 0.0, peak: CallPeak | None = None
    ) -> None:
        if self.journal is not None:
            self.journal.append(("book", component, flops, samples, native, peak))
        t = self.tallies.setdefault(component, Tally())
        t.flops += flops
        t.calls += 1
        t.samples += samples
        t.native_samples += native
        t.rows = max(t.rows, samples)
        if peak is not None and (t.peak is None or peak.total > t.peak.total):
            t.peak = peak
            if self.watch is not None:
                self.watch(self)

    def canvas_now(self) -> int:
        """Bytes of the orchestration's tensors alive now (0 when not tracked)."""
        return self.host.now() if self.host is not None else 0

    def get(self, component: str) -> Tally:
        return self.tallies.get(component, Tally())


def to_device(obj: Any, device: torch.device) -> Any:
    """``obj`` with every tensor inside (tuples, lists, dicts) moved to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


def host_zeros(obj: Any) -> Any:
    """A copy of a (meta) output with every tensor replaced by CPU zeros of the same shape and dtype (structures as
    :func:`~hiresdiff.cost.trace.map_tensors` walks them: tuples, dicts, ``ModelOutput``s, objects holding
    tensors such as diffusers' ``DiagonalGaussianDistribution``)."""
    return map_tensors(lambda t: torch.zeros(t.shape, dtype=t.dtype, device=HOST), obj)


def signature(obj: Any) -> Any:
    """Hashable description of a call's arguments: tensor shapes and dtypes, other values as they are."""
    if isinstance(obj, torch.Tensor):
        return ("T", tuple(obj.shape), str(obj.dtype))
    if isinstance(obj, (list, tuple)):
        return tuple(signature(v) for v in obj)
    if isinstance(obj, dict):
        return tuple(sorted((k, signature(v)) for k, v in obj.items()))
    return obj if isinstance(obj, (int, float, str, bool, type(None))) else type(obj).__name__


#: one token per installation of recording processors (:meth:`MetaModule._note_processors`)
_INSTALLS = itertools.count()


def _recording(processors: Any) -> bool:
    return isinstance(processors, tuple) and len(processors) == 2 and processors[0] == "recording"


def processor_signature(module: torch.nn.Module) -> tuple[Any, ...] | None:
    """What the installed attention processors do: their types, the canvas size they were set up for and their
    ``cost_key`` (settings that change their work at equal shapes, e.g. FreeScale's global branch and blur).

    ``None`` when a processor records something per call (``cost_cacheable = False``, e.g. AccDiffusion's
    attention capture): such calls must really run every time.
    """
    processors = getattr(module, "attn_processors", None)
    if not isinstance(processors, dict):
        return ()
    if not all(getattr(p, "cost_cacheable", True) for p in processors.values()):
        return None
    return tuple(
        (type(p).__name__, getattr(getattr(p, "state", None), "latent_hw", None), getattr(p, "cost_key", None))
        for p in processors.values()
    )


#: How many samples a call has and how many native-size samples they are worth: ``(args, kwargs) -> (n, native)``
SampleCounter = Callable[[tuple[Any, ...], dict[str, Any]], tuple[int, float]]


def _cells(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    """Spatial size of a call's first tensor: ``h·w`` of ``(B, C, h, w)``, the tokens of ``(B, L, …)``."""
    x = next((v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor)), None)
    if x is None or x.dim() < 2:
        return 0
    return int(x.shape[2:].numel()) if x.dim() == 4 else int(x.shape[1])


def _no_branches() -> tuple[str, ...]:
    return ()


@dataclass(frozen=True)
class Spatial:
    """How a module's calls scale with their spatial size (the denoiser's: Eq. S1 of :mod:`hiresdiff.cost.trace`).

    ``size`` reads a call's spatial size (a UNet's latent ``(h, w)``, a FLUX transformer's ``(tokens,)``),
    ``resized`` makes the same call at another size (its spatial inputs as empty ``meta`` tensors), ``bases`` are
    the three sizes every other is derived from and ``multiple`` what each side of a derived size must divide by
    (``2^levels`` of a UNet); ``entry`` is the entry point the rule is for (a VAE's ``decode``)."""

    size: Callable[[tuple[Any, ...], dict[str, Any]], tuple[int, ...]]
    resized: Callable[[tuple[Any, ...], dict[str, Any], tuple[int, ...]], tuple[tuple[Any, ...], dict[str, Any]]]
    bases: tuple[tuple[int, ...], ...]
    multiple: int = 1
    entry: str = "__call__"


class MetaModule:
    """A shape-only (``meta``) module that books FLOPs per call and answers with CPU zeros.

    ``branches`` (set by the cost model for the denoiser and the ControlNet) gives the guidance branch of each row
    of the call in progress: part of the cache key, because equal shapes with other branches differ — per-branch
    model patches (ScaleCrafter's light table), and a recording processor that records only ``cond`` rows (a CFG
    pair split into one call per branch has two calls of one signature).

    Attribute access is forwarded to the wrapped module (``config``, ``dtype``, ``attn_processors``,
    ``set_attn_processor`` …); ``device`` reports the CPU so the orchestration runs there. ``methods`` lists the
    entry points besides ``__call__`` to count (the VAE's ``encode``/``decode``). ``answer_on_meta`` returns the
    shape-only output itself: for modules whose output only feeds another :class:`MetaModule` (the ControlNet's
    residuals go to the UNet), which saves materialising large zero tensors on every call.
    """

    def __init__(
        self,
        module: torch.nn.Module,
        component: str,
        ledger: Ledger,
        counter: SampleCounter,
        methods: tuple[str, ...] = (),
        answer_on_meta: bool = False,
        spatial: Spatial | None = None,
    ) -> None:
        self.__dict__.update(_module=module, _component=component, _ledger=ledger, _counter=counter)
        self.__dict__.update(_traces={}, _derived=set(), _identity=store.module_identity(module))
        self.__dict__["branches"] = _no_branches
        self.__dict__["_answer"] = (lambda out: out) if answer_on_meta else host_zeros
        self._note_processors()
        #: sizes are derived only for calls through the module's own attention processors (a method's may work
        #: by windows or canvas sizes: not a polynomial of the cells)
        self.__dict__.update(_spatial=spatial, _plain=self._processors)
        for name in methods:
            self.__dict__[name] = self._counted(getattr(module, name), name)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["_module"], name)

    @property
    def device(self) -> torch.device:
        return HOST

    def to(self, *args: Any, **kwargs: Any) -> MetaModule:
        """Moving a shape-only module means nothing (low-VRAM offloading, VAE upcast): stays on ``meta``."""
        return self

    def set_attn_processor(self, processor: Any) -> None:
        """Install processors on the wrapped module and remember what they are (part of the call signature)."""
        self._module.set_attn_processor(processor)
        self._note_processors()

    def _note_processors(self) -> None:
        """Remember the installed processors' signature. Recording processors (AccDiffusion's capture) get a new
        token per installation: the first call of each argument signature runs for real and records, later ones
        reuse its count (their records would be zeros again); counts of earlier installations are dropped."""
        found = processor_signature(self._module)
        if found is None:
            found = ("recording", next(_INSTALLS))
            for key in [k for k in self._traces if _recording(k[3])]:
                del self._traces[key]
        self.__dict__["_processors"] = found

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._counted(self._module, "__call__")(*args, **kwargs)

    def _key(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any], branches: tuple[str, ...]) -> Any:
        """What a call's cost depends on: its entry point, argument shapes, processors, patch state, branches."""
        return (name, signature(args), signature(kwargs), self._processors, active_signature(), branches)

    def _trace(
        self, fn: Callable[..., Any], key: tuple[Any, ...], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Trace:
        """The trace of a call of a new signature: from the persistent store (:mod:`hiresdiff.cost.store`; its host
        rise is then bumped as for a call seen before) or by running it on ``meta``, which stores the trace. Calls
        with recording processors always run (their records are the point)."""
        host, name = self._ledger.host, None
        if not _recording(key[3]):
            name = store.trace_name(self._identity, key)
            if (kept := store.load(name)) is not None:
                if host is not None:
                    host.bump(kept.rise)
                return kept
        meta_args, meta_kwargs = to_device(args, torch.device("meta")), to_device(kwargs, torch.device("meta"))
        rise = host.rise() if host is not None else contextlib.nullcontext([0])
        with torch.no_grad(), fused_attention(), TraceMode() as live, rise as up:
            out = fn(*meta_args, **meta_kwargs)
        trail = torch.tensor(live.trail, dtype=torch.int64)
        trace = Trace(float(live.flops), out, live.peak, up[0], trail)
        if name is not None:
            store.save(name, trace)
        return trace

    def _derived_trace(
        self, fn: Callable[..., Any], name: str, args: tuple[Any, ...], kwargs: dict[str, Any], rows: int
    ) -> Trace | None:
        """The trace of a call of ``rows`` rows derived from its cuts to :data:`~hiresdiff.cost.trace.BASES` rows
        (each traced once, or found in memory or the store); ``None`` when they do not line up."""
        branches = self.branches()
        bases = []
        for k in BASES:
            part, kw = take_rows(args, rows, k), take_rows(kwargs, rows, k)
            key = self._key(name, part, kw, branches[:k])
            if (base := self._traces.get(key)) is None or base.trail is None:
                base = self._traces[key] = self._sized_or_traced(fn, name, key, part, kw)
            bases.append(base)
        found = derive(bases[0], bases[1], rows)
        if found is not None and self._ledger.host is not None:
            self._ledger.host.bump(found.rise)
        return found

    def _priced(
        self, fn: Callable[..., Any], name: str, key: tuple[Any, ...], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Trace:
        """The trace of a call not priced yet (or only derived, in exact mode): derived from fewer rows where the
        ledger allows it and nothing but shapes decides the call's work (no recording processor, no model patch
        switched on), else traced."""
        rows = self._counter(args, kwargs)[0]
        derivable = self._ledger.derive_rows and rows > max(BASES) and not _recording(key[3]) and not key[4]
        if derivable and (found := self._derived_trace(fn, name, args, kwargs, rows)) is not None:
            self._derived.add(key)
            return found
        return self._sized_or_traced(fn, name, key, args, kwargs)

    def _sized_or_traced(
        self, fn: Callable[..., Any], name: str, key: tuple[Any, ...], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Trace:
        """The trace of a call derived from its size bases (:meth:`_sized`), or else traced; the keys of derived
        traces are noted (exact mode prices them again)."""
        found = self._sized(fn, name, key, args, kwargs)
        if found is not None:
            self._derived.add(key)
            return found
        self._derived.discard(key)
        return self._trace(fn, key, args, kwargs)

    def _sized(
        self, fn: Callable[..., Any], name: str, key: tuple[Any, ...], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Trace | None:
        """The trace of a call of a new size from the same call at the three size bases (each traced once, or found
        in memory or the store; Eq. S1), when the ledger derives, the module has :class:`Spatial` rules, the
        call goes through the module's own processors with no model patch switched on and its sides divide by
        the rule's multiple; else ``None``."""
        rule = self._spatial
        if rule is None or name != rule.entry or not self._ledger.derive_rows or key[4] or key[3] != self._plain:
            return None
        size = rule.size(args, kwargs)
        if size in rule.bases or any(side % rule.multiple for side in size):
            return None
        bases = []
        for base in rule.bases:
            part, kw = rule.resized(args, kwargs, base)
            base_key = self._key(name, part, kw, key[5])
            if (trace := self._traces.get(base_key)) is None or trace.trail is None:  # none, or rows-derived
                trace = self._traces[base_key] = self._trace(fn, base_key, part, kw)
                self._derived.discard(base_key)
            bases.append(trace)
        found = derive_size(bases, list(rule.bases), size)
        if found is not None and self._ledger.host is not None:
            self._ledger.host.bump(found.rise)
        return found

    def _counted(self, fn: Callable[..., Any], name: str) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            key = self._key(name, args, kwargs, self.branches())
            host, trace = self._ledger.host, self._traces.get(key)
            if trace is None or (key in self._derived and not self._ledger.derive_rows):
                trace = self._traces[key] = self._priced(fn, name, key, args, kwargs)
            elif host is not None:  # what the call allocates on the CPU (a recorder's maps) while it runs
                host.bump(trace.rise)
            samples, native = self._counter(args, kwargs)
            peak = CallPeak(self._ledger.canvas_now(), trace.peak, samples, _cells(args, kwargs))
            self._ledger.book(self._component, trace.flops, samples, native, peak)
            return self._answer(trace.out)

        return call
