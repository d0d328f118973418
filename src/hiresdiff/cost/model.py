"""``model_cost``: the model FLOPs of one whole generation, per component, from the real code path on ``meta``.

See :mod:`hiresdiff.cost.meta` for how calls are counted. Hub ids of the supported architectures map to the
built-in random models of the same architecture (FLOPs do not depend on weight values), so costs of SDXL, SD 1.5
and FLUX.1 generations are computed offline in seconds.
"""

from __future__ import annotations

import contextlib
import copy
import math
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any

import torch

from hiresdiff.cost.memory import LiveBytes, module_bytes
from hiresdiff.cost.meta import CallPeak, Ledger, MetaModule, Spatial
from hiresdiff.cost.replay import replaying
from hiresdiff.cost.shapes import COSTING
from hiresdiff.cost.trace import size_bases
from hiresdiff.errors import HiresError, HiresWarning, require
from hiresdiff.parallel import Replicating, Serial, owners

if TYPE_CHECKING:
    from hiresdiff.models.upscalers import Upscaler, UpscalerSpec

#: the prompt an estimate uses when none is given (its text changes no shape: prompts are tokenised to a fixed length)
STAND_IN_PROMPT = "a photograph of a mountain lake at sunrise"
#: Hub ids whose architecture equals a built-in random model's
ARCHITECTURES = {
    "stabilityai/stable-diffusion-xl-base-1.0": "random-sdxl",
    "stabilityai/sdxl-turbo": "random-sdxl",
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "random-sd15",
    "runwayml/stable-diffusion-v1-5": "random-sd15",
    "CompVis/stable-diffusion-v1-4": "random-sd15",
    "black-forest-labs/FLUX.1-dev": "random-flux",
}


@dataclass
class CostReport:
    """Model FLOPs of one generation (all images of the request) and the denoiser's workload.

    ``native_samples`` counts denoiser samples (guidance halves included) weighted by their spatial size relative
    to a native-size sample; ``native_samples_per_step`` divides it by the number of inference steps N.
    Memory (float32, the counting pipelines' dtype): ``weights_bytes`` per component, ``peaks`` per component
    (its largest call: canvas alive + activations), ``canvas_bytes`` the orchestration's own peak.
    """

    method: str
    model: str
    architecture: str
    width: int
    height: int
    steps: int
    images: int
    denoiser_flops: float
    vae_flops: float
    text_encoder_flops: float
    denoiser_calls: int
    denoiser_samples: int
    native_samples: float
    vae_calls: int
    text_encoder_calls: int
    controlnet_flops: float = 0.0
    controlnet_calls: int = 0
    #: the SR model of ``--upscaler`` (its network calls on the tiles)
    upscaler_flops: float = 0.0
    upscaler_calls: int = 0
    #: view-parallel runs (``ranks`` > 1): denoiser (+ ControlNet) FLOPs each rank runs, bytes all-reduced
    ranks: int = 1
    rank_flops: list[float] = field(default_factory=list)
    allreduce_bytes: float = 0.0
    weights_bytes: dict[str, int] = field(default_factory=dict)
    peaks: dict[str, CallPeak] = field(default_factory=dict)
    canvas_bytes: int = 0
    #: the VAE's config forces float32 when the run is float16 (SDXL)
    vae_upcast: bool = False
    #: the most samples (rows) of one denoiser call
    denoiser_rows: int = 0

    @property
    def parallel_speedup(self) -> float:
        """Denoiser-bound speed-up over one device: all denoiser FLOPs over the busiest rank's."""
        busiest = max(self.rank_flops, default=0.0)
        return (self.denoiser_flops + self.controlnet_flops) / busiest if busiest else 1.0

    @property
    def model_flops(self) -> float:
        return (
            self.denoiser_flops + self.vae_flops + self.text_encoder_flops + self.controlnet_flops + self.upscaler_flops
        )

    @property
    def native_samples_per_step(self) -> float:
        return self.native_samples / self.steps

    def seconds_at(self, peak_flops: float) -> float:
        """The FLOP bound: run time at ``peak_flops`` FLOP/s with every FLOP at peak rate."""
        return self.model_flops / peak_flops

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CostReport:
        """The report :meth:`to_dict` wrote (derived values and unknown keys are ignored)."""
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in names}
        values["peaks"] = {name: CallPeak(**peak) for name, peak in values.get("peaks", {}).items()}
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "model_flops": self.model_flops,
            "native_samples_per_step": self.native_samples_per_step,
            "parallel_speedup": self.parallel_speedup,
        }


@dataclass
class CountingParallel(Replicating):
    """Stands in for :class:`~hiresdiff.parallel.ViewParallel` in the cost model: runs every call (shape-only),
    charges each call's denoiser/ControlNet FLOPs to its round-robin rank and adds up the all-reduce volume
    (the float32 predictions of a step)."""

    world: int
    ledger: Ledger
    rank_flops: list[float] = field(default_factory=list)
    allreduce_bytes: float = 0.0
    _offset: int = 0

    def __post_init__(self) -> None:
        self.rank_flops = [0.0] * self.world

    def _spent(self) -> float:
        return self.ledger.get("denoiser").flops + self.ledger.get("controlnet").flops

    def map(self, calls: Any, compute: Any, shape: Any) -> list[torch.Tensor]:
        outs, spent = [], []
        for call in calls:
            before = self._spent()
            outs.append(compute(call))
            spent.append(self._spent() - before)
        reduced = 4.0 * sum(math.prod(shape(c)) for c in calls)
        self.charge(tuple(spent), self._replicate, reduced)
        if self.ledger.journal is not None:
            self.ledger.journal.append(("charge", tuple(spent), self._replicate, reduced))
        return outs

    def charge(self, spent: tuple[float, ...], replicate: bool, reduced: float) -> None:
        """Charge one step's calls (their FLOPs ``spent``) to their round-robin ranks, or to every rank when
        ``replicate``; ``reduced`` bytes are all-reduced after distributed calls."""
        if replicate:  # every rank runs them
            for flops in spent:
                self.rank_flops = [f + flops for f in self.rank_flops]
            return
        for flops, rank in zip(spent, owners(len(spent), self.world, self._offset), strict=True):
            self.rank_flops[rank] += flops
        if spent:
            self._offset += len(spent)
            self.allreduce_bytes += reduced

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor


#: (family, native size) → the built-in full-size architecture that stands in for other checkpoints of it
FAMILY_ARCHITECTURES = {("sdxl", 1024): "random-sdxl", ("sd", 512): "random-sd15", ("flux", 1024): "random-flux"}


def architecture_of(model: str) -> str:
    """The built-in model whose architecture ``model`` has (one-line error when none is known).

    Built-in names stand for themselves and :data:`ARCHITECTURES` maps known hub ids without any look-up; other
    references (fine-tuned checkpoints, local folders, single files) are resolved from their configs
    (:func:`~hiresdiff.models.loading.resolve_model`, no weights) and mapped by family and native size
    (:data:`FAMILY_ARCHITECTURES`: an SD 2.x-base checkpoint is counted as SD 1.5's UNet and text encoder).
    """
    from hiresdiff.models.builtins import BUILTIN_MODELS  # the names only: no model classes imported
    from hiresdiff.models.loading import resolve_model

    if model in BUILTIN_MODELS:
        return model
    if model in ARCHITECTURES:
        return ARCHITECTURES[model]
    spec = resolve_model(model)
    arch = FAMILY_ARCHITECTURES.get((spec.family, spec.native_size))
    if arch is None:
        known = ", ".join(f"{family} at {size} px" for family, size in FAMILY_ARCHITECTURES)
        raise HiresError(
            f"cost: no built-in architecture for {model!r} ({spec.family}, native {spec.native_size} px); "
            f"supported: {known}"
        )
    return arch


def _latent_counter(native_cells: int) -> Any:
    """Samples of a call whose first argument is ``(B, C, h, w)``, and their size in native-size samples."""

    def count(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[int, float]:
        x = args[0] if args else kwargs["sample"]
        b, _c, h, w = x.shape
        return b, b * h * w / native_cells

    return count


def _token_counter(native_tokens: int) -> Any:
    """FLUX: ``hidden_states`` are ``(B, tokens, 64)`` packed latents."""

    def count(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[int, float]:
        b, n, _ = kwargs["hidden_states"].shape
        return b, b * n / native_tokens

    return count


def _grid_spatial(
    keyword: str, bases: tuple[tuple[int, int], ...], multiple: int = 1, entry: str = "__call__"
) -> Spatial:
    """Calls whose spatial input is a latent grid ``(B, C, h, w)`` — the first argument, or ``keyword`` — at other
    sizes (Eq. S1): that grid resized, everything else as it is."""

    def grid(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
        return args[0] if args else kwargs[keyword]

    def size(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[int, ...]:
        return tuple(grid(args, kwargs).shape[2:])

    def resized(args: tuple[Any, ...], kwargs: dict[str, Any], hw: tuple[int, ...]) -> tuple[Any, dict[str, Any]]:
        x = grid(args, kwargs)
        new = torch.empty(*x.shape[:2], *hw, dtype=x.dtype, device="meta")
        return ((new, *args[1:]), kwargs) if args else (args, {**kwargs, keyword: new})

    return Spatial(size, resized, bases, multiple, entry)


def _unet_spatial(unet: Any) -> Spatial:
    """A UNet's calls at other latent sizes: each side a multiple of ``2^upsamplers``, so that every level holds a
    quarter of the cells of the one above (else a level rounds up and the call is traced)."""
    levels = int(getattr(unet, "num_upsamplers", len(unet.config.block_out_channels) - 1))
    return _grid_spatial("sample", size_bases(int(unet.config.sample_size)), 2**levels)


def _decode_spatial(native_latent: int) -> Spatial:
    """A VAE's decodes at other latent sizes: any size (every level doubles both sides)."""
    return _grid_spatial("z", size_bases(native_latent), entry="decode")


def _flux_spatial(native_tokens_side: int) -> Spatial:
    """A FLUX transformer's calls at other numbers of image tokens (Eq. S1): ``hidden_states`` ``(B, n, C)`` and
    ``img_ids`` ``(n, 3)`` resized (no levels: any number of tokens)."""

    def size(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[int, ...]:
        return (int(kwargs["hidden_states"].shape[1]),)

    def resized(args: tuple[Any, ...], kwargs: dict[str, Any], n: tuple[int, ...]) -> tuple[Any, dict[str, Any]]:
        x, ids = kwargs["hidden_states"], kwargs["img_ids"]
        hidden = torch.empty(x.shape[0], n[0], *x.shape[2:], dtype=x.dtype, device="meta")
        ids = torch.empty(n[0], *ids.shape[1:], dtype=ids.dtype, device="meta")
        return args, {**kwargs, "hidden_states": hidden, "img_ids": ids}

    bases = tuple((h * w,) for h, w in size_bases(native_tokens_side))
    return Spatial(size, resized, bases)


def _rows(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[int, float]:
    x = args[0] if args else kwargs["input_ids"]
    return x.shape[0], 0.0


_PIPES: dict[str, tuple[Any, Ledger]] = {}
#: the shape-only ControlNet of each counting pipeline (SD/SDXL architectures), with the pipeline it was made for
_CONTROLNETS: dict[str, tuple[Any, MetaModule]] = {}
#: the reference under which the counting pipelines hold their shape-only ControlNet
COST_CONTROLNET = "controlnet-of-the-architecture"


def counting_pipeline(architecture: str) -> tuple[Any, Ledger]:
    """The built-in pipeline ``architecture`` on ``meta`` with every heavy module wrapped (cached per name)."""
    if architecture in _PIPES:
        return _PIPES[architecture]
    from hiresdiff.models.tiny import BUILTIN_MODELS, build_builtin
    from hiresdiff.pipeline import HiresPipeline

    info = BUILTIN_MODELS[architecture]
    pipe = build_builtin(architecture, torch.float32, "meta")
    ledger = Ledger()
    native = info.native_size // info.vae_scale_factor
    if info.family == "flux":
        denoiser = "transformer"
        counter, spatial = _token_counter((native // 2) ** 2), _flux_spatial(native // 2)
    else:
        denoiser, counter, spatial = "unet", _latent_counter(native * native), _unet_spatial(pipe.unet)
    wrapped = {denoiser: MetaModule(getattr(pipe, denoiser), "denoiser", ledger, counter, spatial=spatial)}
    vae_counter, decodes = _latent_counter(native * native), _decode_spatial(native)
    wrapped["vae"] = MetaModule(pipe.vae, "vae", ledger, vae_counter, ("encode", "decode"), spatial=decodes)
    for name in ("text_encoder", "text_encoder_2"):
        if getattr(pipe, name, None) is not None:
            wrapped[name] = MetaModule(getattr(pipe, name), "text_encoder", ledger, _rows)
    for name, module in wrapped.items():
        object.__setattr__(pipe, name, module)  # bypass DiffusionPipeline's config registration
    hp = HiresPipeline(pipe, architecture)
    wrapped[denoiser].__dict__["branches"] = lambda: tuple(branch for _, branch in hp.adapter.call_info)
    _PIPES[architecture] = (hp, ledger)
    return _PIPES[architecture]


def counting_controlnet(architecture: str) -> MetaModule:
    """The shape-only ControlNet of ``architecture``'s counting pipeline (its UNet's encoder copy + zero
    convolutions), built and handed to that pipeline on first use: a request without a ControlNet never builds it."""
    hp, ledger = counting_pipeline(architecture)
    if (kept := _CONTROLNETS.get(architecture)) is not None and kept[0] is hp:
        return kept[1]
    from diffusers import ControlNetModel

    require(hp.adapter.family != "flux", "ControlNet FLOPs are counted for SD/SDXL architectures (no FLUX ControlNet)")
    with torch.device("meta"):
        controlnet = ControlNetModel.from_unet(hp.adapter.pipe.unet._module, load_weights_from_unet=False)
    counter = hp.adapter.pipe.unet._counter
    net = MetaModule(controlnet, "controlnet", ledger, counter, answer_on_meta=True)  # residuals feed the UNet
    net.__dict__["branches"] = lambda: tuple(branch for _, branch in hp.adapter.call_info)
    hp.provide_controlnet(COST_CONTROLNET, net)
    _CONTROLNETS[architecture] = (hp, net)
    return net


def controlnet_extras(net: Any) -> Any:
    """Extras that run the counting pipeline's ControlNet on a blank control image of the target size."""
    from hiresdiff.extras import Extras
    from hiresdiff.inputs import SourceImage
    from hiresdiff.models.controlnet import ControlNetSpec

    config = dict(net.config)
    blank = SourceImage(torch.zeros(1, 3, 8, 8, device="meta"), "<blank control image>", "0" * 64)  # shapes only
    return Extras(controlnet=ControlNetSpec(COST_CONTROLNET, None, config), control_image=blank)


def _weights(pipe: Any, controlnet: MetaModule | None, upscaler: MetaModule | None = None) -> dict[str, int]:
    """float32 bytes of each component's parameters and buffers (text encoders together)."""
    parts = {"denoiser": ("unet", "transformer"), "vae": ("vae",), "text_encoder": ("text_encoder", "text_encoder_2")}
    held = {name: [getattr(pipe, a, None) for a in attrs] for name, attrs in parts.items()}
    held["controlnet"] = [controlnet]
    held["upscaler"] = [upscaler]
    return {name: sum(module_bytes(m._module) for m in ms if m is not None) for name, ms in held.items()}


#: the shape-only network of each SR model file priced so far (by its bytes' sha256)
_UPSCALERS: dict[str, torch.nn.Module] = {}


def counting_upscaler(spec: UpscalerSpec, ledger: Ledger) -> tuple[Upscaler, MetaModule]:
    """An SR model (``--upscaler``) whose network calls are shape-only and booked as the ``upscaler`` component:
    the network moved to ``meta`` (a copy, kept per file), its tiles' orchestration on the CPU as in a real run.
    ``spec`` comes from a validated request (:func:`~hiresdiff.models.upscalers.resolve_upscaler` applied the
    pickle rule), so the file is loaded as it was checked."""
    from hiresdiff.models.upscalers import Upscaler, load_upscaler

    real = load_upscaler(spec, allow_pickle=True)
    if spec.sha256 not in _UPSCALERS:
        _UPSCALERS.clear()  # one SR model at a time, as its loader keeps them
        _UPSCALERS[spec.sha256] = copy.deepcopy(real.module).to("meta").eval()
    net = MetaModule(_UPSCALERS[spec.sha256], "upscaler", ledger, _rows)
    # no parameters on the wrapper: the tiles run on the CPU canvas, in float32 (what the cost model counts)
    return Upscaler(torch.nn.Module(), net, real.scale, real.arch, real.multiple_of, real.half), net


#: what a run's memory so far is handed to, after each booking that raised a peak: ``(weights, peaks, canvas,
#: vae_upcast)`` as the report will hold them, and the most rows of one denoiser call so far; it may stop the run
#: by raising
Watch = Callable[[dict[str, int], dict[str, CallPeak], int, bool, int], None]


def _peaks(ledger: Ledger) -> dict[str, CallPeak]:
    return {name: t.peak for name, t in ledger.tallies.items() if t.peak is not None}


def model_cost(
    method: str,
    model: str = "random-sdxl",
    width: int | None = None,
    height: int | None = None,
    **kwargs: Any,
) -> CostReport:
    """Model FLOPs of generating with ``method`` on ``model`` at ``width × height`` (default twice native).

    ``kwargs`` are what :func:`hiresdiff.generate` takes (``steps``, ``guidance``, ``preset``, ``paper``,
    ``num_images_per_prompt``, ``max_batch``, method parameters …). Previews are off unless asked for (they
    decode every phase). Everything is validated exactly as for a generation, before anything is built.
    ``controlnet=True`` adds a ControlNet of the architecture's UNet to every denoiser call (its own line).
    The settled steps of each denoising loop are booked again rather than run (:mod:`hiresdiff.cost.replay`) and
    calls of many rows are derived from two traced calls of fewer (:mod:`hiresdiff.cost.trace`); ``exact=True``
    runs every step and traces every call signature (the full trace both are tested against). ``watch`` (a
    :data:`Watch`) sees the memory of the run so far whenever a call raises a peak, and may stop it by raising.
    """
    controlnet = bool(kwargs.pop("controlnet", False))
    upscaler: UpscalerSpec | None = kwargs.pop("upscaler", None)
    exact = bool(kwargs.pop("exact", False))
    watch: Watch | None = kwargs.pop("watch", None)
    ranks = int(kwargs.pop("ranks", 1))
    require(ranks >= 1, f"--ranks must be ≥ 1, got {ranks}")
    from hiresdiff.config import (
        AUTO,
        GenerationSettings,
        as_bool,
        fallback_batch,
        model_sampling_defaults,
        parse_fields,
    )
    from hiresdiff.models.tiny import BUILTIN_MODELS
    from hiresdiff.pipeline import build_request, check_for_model

    arch = architecture_of(model)
    info = BUILTIN_MODELS[arch]
    width, height = width or 2 * info.native_size, height or 2 * info.native_size
    kwargs.setdefault("previews", False)
    if kwargs.get("max_batch", AUTO) == AUTO:  # no device here to fit: the stated default (the plan settles auto)
        low = parse_fields(GenerationSettings, {"low_vram": kwargs.get("low_vram", False)})["low_vram"]  # "true" too
        kwargs["max_batch"] = fallback_batch(as_bool("low_vram", low))
    kwargs.setdefault("prompt", STAND_IN_PROMPT)
    kwargs["model_defaults"] = kwargs.get("model_defaults") or model_sampling_defaults(info.family)
    hp, ledger = counting_pipeline(arch)
    # attentive guidance (PFSA) is non-model work: it changes no call, and on the CPU it costs more than the rest
    kwargs["ag_lambda"] = 0.0
    control = counting_controlnet(arch) if controlnet else None
    extras = controlnet_extras(control) if control is not None else None
    if upscaler is not None:
        from hiresdiff.extras import Extras

        extras = replace(extras or Extras(), upscaler=upscaler)
    req = build_request(kwargs.pop("prompt"), method, width, height, extras=extras, **kwargs)
    check_for_model(req, info.native_size, info.vae_scale_factor * (2 if info.family == "flux" else 1))
    ledger.tallies.clear()
    seed = req.settings.seed if req.settings.seed is not None else 0
    generators = [torch.Generator().manual_seed(seed + i) for i in range(req.settings.batch_size)]
    counting = CountingParallel(ranks, ledger)
    hp.adapter.parallel = counting
    sr, sr_net = counting_upscaler(upscaler, ledger) if upscaler is not None else (None, None)
    hp.upscaler_loader = lambda spec: sr
    weights = _weights(hp.adapter.pipe, control, sr_net)
    upcast = bool(getattr(hp.adapter.pipe.vae.config, "force_upcast", False))
    try:
        with LiveBytes("cpu") as host, warnings.catch_warnings(), contextlib.ExitStack() as stack:
            warnings.simplefilter("ignore", HiresWarning)  # the generation itself says what it has to say
            ledger.host, ledger.derive_rows = host, not exact
            if watch is not None:
                ledger.watch = lambda led: watch(weights, _peaks(led), host.peak, upcast, led.get("denoiser").rows)
            if not exact:
                stack.enter_context(replaying(ledger, host, counting.charge))
            costing = COSTING.set(True)  # value-free operations allocate and compute nothing (cost/shapes.py)
            stack.callback(COSTING.reset, costing)
            hp.run(req, generator=generators, progress=False, pictures=False)
    finally:
        hp.adapter.parallel, ledger.host, ledger.journal, ledger.derive_rows = Serial(), None, None, False
        ledger.watch = None
    den, vae, text, net, sr_tally = (
        ledger.get(c) for c in ("denoiser", "vae", "text_encoder", "controlnet", "upscaler")
    )
    return CostReport(
        method=req.method.name,
        model=model,
        architecture=arch,
        width=width,
        height=height,
        steps=req.settings.steps,
        images=req.settings.batch_size,
        denoiser_flops=den.flops,
        vae_flops=vae.flops,
        text_encoder_flops=text.flops,
        denoiser_calls=den.calls,
        denoiser_samples=den.samples,
        native_samples=den.native_samples,
        vae_calls=vae.calls,
        text_encoder_calls=text.calls,
        controlnet_flops=net.flops,
        controlnet_calls=net.calls,
        upscaler_flops=sr_tally.flops,
        upscaler_calls=sr_tally.calls,
        ranks=ranks,
        rank_flops=counting.rank_flops,
        allreduce_bytes=counting.allreduce_bytes,
        weights_bytes=weights,
        peaks=_peaks(ledger),
        canvas_bytes=host.peak,
        vae_upcast=upcast,
        denoiser_rows=den.rows,
    )
