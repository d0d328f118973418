"""Public entry points: :class:`HiresPipeline` (wraps a loaded diffusers pipeline) and :func:`generate`."""

from __future__ import annotations

import dataclasses
import secrets
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from hiresdiff.config import (
    AUTO,
    DEFAULT_MODEL,
    DTYPES,
    PAPER_SETTING,
    GenerationSettings,
    as_bool,
    coerce_params,
    fallback_batch,
    got,
    low_vram_defaults,
    parse_fields,
)
from hiresdiff.control import ControlCondition
from hiresdiff.cost.shapes import discarded
from hiresdiff.errors import HiresError, HiresWarning, require
from hiresdiff.extras import EXTRA_ARGS, Extras, split_extras, typed_extras
from hiresdiff.images import to_pil, to_uint8
from hiresdiff.inputs import fit_to_aspect
from hiresdiff.methods import METHODS, Method, get_method
from hiresdiff.methods.base import Params
from hiresdiff.models.adapter import ModelAdapter
from hiresdiff.models.controlnet import ControlNetSpec, check_controlnet_fits, load_controlnet
from hiresdiff.models.flux import adapter_for
from hiresdiff.models.lora import applied_loras
from hiresdiff.models.upscalers import Upscaler, UpscalerSpec, load_upscaler
from hiresdiff.parallel import Serial, ViewParallel
from hiresdiff.sampler import PreviewCallback, Run, StepCallback
from hiresdiff.schedulers import MODEL_DEFAULT, check_scheduler_eta, make_scheduler
from hiresdiff.stages import check_canvas

SETTING_NAMES = {f.name for f in dataclasses.fields(GenerationSettings)} - {"prompt", "width", "height"}
#: default size limit: (this × the native side)² pixels (8192² for SDXL); ``--max-pixels`` sets another
MAX_SIDE_FACTOR = 8
#: attentive-guidance settings (they change pixels, so the metadata records them)
AG_SETTINGS = ("ag_lambda", "ag_delay", "ag_exponent", "ag_decay")
#: settings that change every method's first phase (they change pixels, so the metadata records them)
PHASE_SETTINGS = (*AG_SETTINGS, "hidiffusion")


@dataclass
class GenerationResult:
    """Final images, previews per phase (``previews[phase][image]``) and each image's settings."""

    images: list[Image.Image]
    previews: list[list[Image.Image]]
    metadata: list[dict[str, Any]]
    latents: torch.Tensor | None = None
    seconds: float = 0.0


@dataclass
class GenerationRequest:
    """A validated generation request: method, common settings, method parameters, non-text inputs."""

    method: Method
    settings: GenerationSettings
    params: Params
    extras: Extras = dataclasses.field(default_factory=Extras)


def build_request(
    prompt: str | list[str],
    method: str,
    width: int,
    height: int,
    *,
    preset: str | None = None,
    paper: bool = False,
    model_defaults: dict[str, Any] | None = None,
    extras: Extras | None = None,
    **kwargs: Any,
) -> GenerationRequest:
    """Validate everything that does not need the model: names, numbers, parameter types.

    ``preset`` fills method parameters from the method's named presets and ``paper`` fills the papers' sampling
    setting (:data:`~hiresdiff.config.PAPER_SETTING`); values given explicitly win over both. ``model_defaults``
    (:func:`~hiresdiff.config.model_sampling_defaults`, e.g. FLUX-dev's 30 steps at guidance 3.5) apply last,
    where nothing else gave a value. ``extras`` (:func:`~hiresdiff.extras.prepare_extras`) carry an input picture,
    ControlNet and LoRAs; with a picture, ``strength`` maps onto the method's own start parameter
    (:attr:`~hiresdiff.methods.base.Method.strength_params`).
    """
    extras = extras or Extras()
    m, settings, specific = _settings(prompt, method, width, height, preset, paper, model_defaults, kwargs)
    m.check_switch(settings.hidiffusion, extras.source is not None)
    m.check_upscaler(extras.upscaler is not None, extras.source is not None, _pixel_upsamplers())
    specific = {**specific, **_strength_params(m, settings, extras.source is not None, specific)}
    params = coerce_params(m.params, specific, m.name)
    return GenerationRequest(m, settings, params, extras)


def _settings(
    prompt: Any,
    method: Any,
    width: Any,
    height: Any,
    preset: Any,
    paper: Any,
    model_defaults: dict[str, Any] | None,
    kwargs: dict[str, Any],
) -> tuple[Method, GenerationSettings, dict[str, Any]]:
    """The method, the typed :class:`GenerationSettings` and the method-specific values (not yet typed) of a
    request: presets, ``--paper``, low-VRAM, model and method defaults merged under the explicit values."""
    require(isinstance(method, str), f"method must be a method name (a string), got {got(method)}")
    m = get_method(method)
    if preset is not None:
        require(isinstance(preset, str), f"preset must be a preset name (a string), got {got(preset)}")
        require(
            preset in m.presets,
            f"method {m.name!r} has no preset {preset!r}; presets: {', '.join(m.presets) or 'none'}",
        )
        kwargs = {**m.presets[preset], **kwargs}
    if as_bool("paper", paper):
        kwargs = {**PAPER_SETTING, **kwargs}
    kwargs = low_vram_defaults(kwargs)
    kwargs = {**(model_defaults or {}), **m.setting_defaults, **kwargs}
    common = parse_fields(GenerationSettings, {k: v for k, v in kwargs.items() if k in SETTING_NAMES})
    specific = {k: v for k, v in kwargs.items() if k not in SETTING_NAMES}
    settings = GenerationSettings(prompt=prompt, width=width, height=height, **common)
    if settings.negative_prompt is None and m.default_negative is not None and settings.cfg:
        settings.negative_prompt = [m.default_negative] * len(settings.prompt)
    return m, settings, specific


def _check_strength(m: Method, settings: GenerationSettings, has_source: bool) -> bool:
    """Whether ``strength`` is set; a one-line error where it cannot be (no input picture, method without one)."""
    if settings.strength is None:
        return False
    require(has_source, "--strength sets how much of an input image is redrawn: it needs --image")
    require(m.strength_params is not None, f"method {m.name!r} does not denoise an input image; drop --strength")
    return True


def _strength_params(
    m: Method, settings: GenerationSettings, has_source: bool, given: dict[str, Any]
) -> dict[str, Any]:
    """The method parameters ``strength`` stands for (input pictures only); a one-line error where it cannot."""
    if not _check_strength(m, settings, has_source):
        return {}
    mapped = m.strength_params(settings.strength, settings)  # type: ignore[misc]
    typed = parse_fields(m.params, {k: given[k] for k in mapped if k in given})

    def same(a: Any, b: Any) -> bool:
        return (tuple(a) if isinstance(a, list) else a) == (tuple(b) if isinstance(b, list) else b)

    clash = sorted(k for k, v in typed.items() if not same(v, mapped[k]))  # equal values (--from-png) agree
    require(not clash, f"--strength sets {', '.join(clash)} of {m.name}: give one of them, not both")
    return mapped


def check_for_model(req: GenerationRequest, native: int, grid: int) -> None:
    """Checks that need only the model's native size and latent grid (no weights)."""
    s = req.settings
    limit = s.max_pixels if s.max_pixels is not None else (MAX_SIDE_FACTOR * native) ** 2
    require(
        s.width * s.height <= limit,
        f"{s.height}×{s.width} is {s.width * s.height:,} pixels, above the limit of {limit:,} "
        f"({'--max-pixels' if s.max_pixels is not None else f'{MAX_SIDE_FACTOR}× the native side squared'}); "
        "ask for a smaller size or raise --max-pixels",
    )
    check_canvas(req.settings.height, req.settings.width, native, grid)
    req.params.check(req.settings, native, grid)


def check_generators(settings: GenerationSettings, generator: Any) -> list[torch.Generator] | None:
    """The caller's generator(s), one per image (one generator serves every image), or ``None``; a one-line error
    for another type or another count. Needs no model, so it runs with the other request checks."""
    if generator is None:
        return None
    n = settings.batch_size
    if isinstance(generator, torch.Generator):
        return [generator] * n
    require(
        isinstance(generator, (list, tuple)) and all(isinstance(g, torch.Generator) for g in generator),
        f"generator must be a torch.Generator or a list of them (or pass seed=…), got {got(generator)}",
    )
    require(len(generator) == n, f"got {len(generator)} generators for {n} images; pass one or one per image")
    return list(generator)


def _generators(settings: GenerationSettings, generator: Any) -> tuple[list[torch.Generator], list[int | None]]:
    """One generator per image: ``seed + i`` (recorded, reproducible) or the caller's generator(s)."""
    n = settings.batch_size
    gens = check_generators(settings, generator)
    if gens is not None:
        return gens, [None] * n
    seed = settings.seed if settings.seed is not None else secrets.randbelow(2**62)
    seeds = [seed + i for i in range(n)]
    return [torch.Generator("cpu").manual_seed(s) for s in seeds], list(seeds)


class HiresPipeline:
    """High-resolution generation with any registered method over one loaded SD, SDXL or FLUX pipeline."""

    def __init__(
        self, pipe: Any, model_name: str = "custom", *, allow_pickle: bool = False, adapter: ModelAdapter | None = None
    ) -> None:
        """``pipe``: a loaded diffusers pipeline; or ``adapter``: another model backend (``pipe`` is then ``None``:
        :class:`~hiresdiff.comfy.adapter.ComfyAdapter` runs the methods on the models ComfyUI has loaded)."""
        self.adapter = adapter if adapter is not None else adapter_for(pipe)
        self.model_name = model_name
        self.allow_pickle = allow_pickle
        self._base_scheduler = self.adapter.scheduler
        self._base_scheduler_config = dict(self.adapter.scheduler.config)
        self._controlnets: dict[str, Any] = {}
        #: how a request's SR model (``--upscaler``) becomes its network (the cost model counts a shape-only one)
        self.upscaler_loader: Callable[[UpscalerSpec], Upscaler] = self._load_upscaler

    @classmethod
    def from_pipe(cls, pipe: Any, model_name: str = "custom") -> HiresPipeline:
        """Use an already-loaded diffusers SD/SDXL (``StableDiffusion[XL]Pipeline``) or ``FluxPipeline``."""
        require(
            (hasattr(pipe, "unet") or hasattr(pipe, "transformer")) and hasattr(pipe, "vae"),
            "from_pipe needs a diffusers SD, SDXL or FLUX pipeline",
        )
        return cls(pipe, model_name)

    @classmethod
    def from_model(
        cls,
        model: str,
        *,
        dtype: str = "float32",
        device: str | None = None,
        allow_pickle: bool = False,
        low_vram: bool = False,
    ) -> HiresPipeline:
        """Load ``model`` (hub id, diffusers folder, ``.safetensors`` file or built-in name) onto ``device`` as a
        run keeps it there: ``low_vram`` only the denoiser, else on an accelerator all but the text encoders, which
        wait on the CPU for the prompt (:meth:`~hiresdiff.models.adapter.ModelAdapter.start_offloaded`)."""
        from hiresdiff.models.loading import load_pipeline, resolve_model
        from hiresdiff.placement import parks_text

        device = resolve_device(device)
        spec = resolve_model(model, allow_pickle=allow_pickle)
        home = "cpu" if low_vram or parks_text(device) else device
        pipe = load_pipeline(spec, dtype=resolve_dtype(dtype), device=home, allow_pickle=allow_pickle)
        hp = cls(pipe, model, allow_pickle=allow_pickle)
        if low_vram or home != device:
            hp.adapter.start_offloaded(device, low_vram)
        return hp

    @property
    def native_size(self) -> int:
        return self.adapter.native_size

    def __call__(
        self,
        prompt: str | list[str],
        method: str = "demofusion",
        width: int | None = None,
        height: int | None = None,
        *,
        generator: torch.Generator | list[torch.Generator] | None = None,
        progress: bool = True,
        callback: StepCallback | None = None,
        **kwargs: Any,
    ) -> GenerationResult:
        """Generate with ``method`` at ``width × height`` (default: twice the native size).

        ``image`` upscales a picture (path or PIL image; the target keeps its aspect: ``scale`` or one side, a
        different aspect needs ``fit="crop"|"pad"``; ``strength`` in ``kwargs`` sets how much is redrawn).
        ``controlnet`` (folder or hub id) with ``control_image`` (default: ``image``) and ``control_scale``;
        ``loras`` as ``[(path, scale), …]`` or ``"path[:scale]"`` strings, applied for this call only; ``upscaler``:
        an SR model file for every pixel-space enlargement (:mod:`hiresdiff.models.upscalers`).
        ``kwargs`` are :class:`~hiresdiff.config.GenerationSettings` fields (steps, guidance, negative_prompt,
        scheduler, seed, num_images_per_prompt, max_batch, decode_tile_area, previews, strength, …) and the method's
        parameters.
        """
        _check_callables(progress=progress, callback=callback)
        model = ModelFacts.of_pipeline(self)
        req = validate_request(
            prompt, method, width, height, model, allow_pickle=self.allow_pickle, generator=generator, **kwargs
        )
        return self.run(req, generator=generator, progress=progress, callback=callback)

    def _load_upscaler(self, spec: UpscalerSpec) -> Upscaler:
        return load_upscaler(spec, allow_pickle=self.allow_pickle)

    def provide_controlnet(self, ref: str, module: Any) -> None:
        """Use ``module`` (already built) whenever a request names the ControlNet ``ref`` (the cost model's
        shape-only ControlNet; a ControlNet the caller loaded itself)."""
        self._controlnets = {ref: module}

    def _controlnet(self, spec: ControlNetSpec) -> Any:
        """The ControlNet of ``spec``, loaded once and kept on the denoiser's device and dtype."""
        ad = self.adapter
        check_controlnet_fits(spec, ad.text_width, ad.family)
        net = self._controlnets.get(spec.ref)
        if net is None:
            self._controlnets.clear()
            net = self._controlnets[spec.ref] = load_controlnet(spec, ad.dtype, ad.device, self.allow_pickle)
        return net

    def _conditions(self, req: GenerationRequest) -> tuple[torch.Tensor | None, ControlCondition | None, Any]:
        """The input picture at the target's aspect, the ControlNet condition and the ControlNet (or ``None``s)."""
        s, ex = req.settings, req.extras
        target = (s.height, s.width)
        grid = self.adapter.pixel_grid
        source = None if ex.source is None else fit_to_aspect(ex.source.pixels, target, ex.fit, grid=grid)
        if ex.controlnet is None:
            return source, None, None
        picture = ex.control_source  # none where the method makes its own (Method.own_control)
        control = None
        if picture is not None:
            pixels = fit_to_aspect(picture.pixels, target, ex.fit, grid=grid)
            control = ControlCondition((pixels + 1.0) / 2.0, self.adapter.vae_scale_factor)
        return source, control, self._controlnet(ex.controlnet)

    def run(
        self,
        req: GenerationRequest,
        *,
        generator: Any = None,
        progress: bool = True,
        callback: StepCallback | None = None,
        on_preview: PreviewCallback | None = None,
        pictures: bool = True,
    ) -> GenerationResult:
        """Run a validated request. ``callback`` follows every step (an exception raised there stops the run and
        leaves the pipeline as it was); ``on_preview`` receives each phase's preview as soon as it is decoded.
        ``pictures=False`` leaves the images and previews out of the result (the cost model's shape-only runs: their
        8-bit conversion still runs on the device, where it allocates, but no PIL image is made)."""
        import time

        s, ad = req.settings, self.adapter
        if s.max_batch == AUTO:  # an API call (the command line, the web page and bench settle it in their plan)
            if BATCH_PLANNER is None:
                s.max_batch = fallback_batch(s.low_vram)
            else:
                BATCH_PLANNER(self, req)
            agree_batch(ad.parallel, req)
        if isinstance(ad.parallel, ViewParallel):
            ad.parallel.check_same_request(describe(req))
        ad.refresh_placement()
        ad.set_offload(s.low_vram)
        if s.scheduler == MODEL_DEFAULT or (ad.family == "flux" and s.scheduler == "euler"):
            ad.scheduler = type(self._base_scheduler).from_config(self._base_scheduler_config)
        else:
            ad.scheduler = make_scheduler(s.scheduler, self._base_scheduler_config)
        check_scheduler_eta(s.eta, ad.scheduler)  # the model's own scheduler is known only now
        gens, seeds = _generators(s, generator)
        seen = {p: cut for p in dict.fromkeys(s.prompt) if (cut := ad.truncated(p)) is not None}
        for prompt, (dropped, _) in seen.items():
            warnings.warn(
                f"the prompt {prompt[:40]!r}… is {dropped} token(s) too long: the text encoder sees only its start "
                "(recorded as prompt_seen)",
                HiresWarning,
                stacklevel=2,
            )
        source, control, net = self._conditions(req)
        begin = time.perf_counter()
        with applied_loras(ad.pipe, req.extras.loras), ad.use_controlnet(net, req.extras.control_scale):
            embeds = ad.encode_prompt(s.prompt, s.negative_prompt, s.cfg)
            rows = [b // s.num_images_per_prompt for b in range(s.batch_size)]
            spec = req.extras.upscaler
            up = None if spec is None else self.upscaler_loader(spec)
            run = Run(ad, s, embeds, rows, gens, progress, callback, source=source, control=control, upscaler=up)
            run.on_preview = on_preview
            out = req.method.run(run, req.params)
            images = out.images if out.images is not None else run.decode(out.latents)
        if s.previews:
            run.previews.append(images)  # the final image closes the list (not a phase preview: no callback)
        seconds = time.perf_counter() - begin
        meta = [self._metadata(req, b, seeds[b]) for b in range(s.batch_size)]
        for m in meta:
            if m["prompt"] in seen:
                m["prompt_seen"] = seen[m["prompt"]][1]
        if not pictures:  # the cost model: the conversion's memory counts, its result is not kept
            for picture in (images, *run.previews):
                discarded(to_uint8, picture)
        return GenerationResult(
            images=to_pil(images) if pictures else [],
            previews=[to_pil(p) for p in run.previews] if pictures else [],
            metadata=meta,
            latents=out.latents,
            seconds=seconds,
        )

    def _metadata(self, req: GenerationRequest, index: int, seed: int | None) -> dict[str, Any]:
        """Everything needed to regenerate image ``index`` alone (``hiresdiff generate --from-png``)."""
        from hiresdiff import __version__

        s = req.settings
        p = index // s.num_images_per_prompt
        return {
            "hiresdiff": __version__,
            "model": self.model_name,
            "dtype": str(self.adapter.dtype).removeprefix("torch."),
            "method": req.method.name,
            "prompt": s.prompt[p],
            "negative_prompt": None if s.negative_prompt is None else s.negative_prompt[p],
            "width": s.width,
            "height": s.height,
            "steps": s.steps,
            "guidance": s.guidance,
            "scheduler": s.scheduler,
            "eta": s.eta,
            "seed": seed,
            "max_batch": s.max_batch,  # the number used, also when it was "auto" (batched calls round differently)
            "decode_tile_area": s.decode_tile_area,
            "strength": s.strength,
            **{name: getattr(s, name) for name in PHASE_SETTINGS},
            "params": dataclasses.asdict(req.params),
            **req.extras.metadata(),
            **({"batch": self._batch_position(req, index, seed)} if s.batch_size > 1 else {}),
        }

    @staticmethod
    def _batch_position(req: GenerationRequest, index: int, seed: int | None) -> dict[str, Any]:
        """Where image ``index`` sat in its batch: batched model calls round differently from single ones, so
        ``--from-png`` regenerates the whole batch from this and keeps image ``index`` (bit for bit)."""
        s = req.settings
        return {
            "index": index,
            "prompts": s.prompt,
            "negative_prompts": s.negative_prompt,
            "images_per_prompt": s.num_images_per_prompt,
            "first_seed": None if seed is None else seed - index,
        }


@dataclass(frozen=True)
class ModelFacts:
    """What validation needs to know of a model without its weights (from a ModelSpec or a loaded adapter).

    ``scheduler_config``: the model's scheduler config (``None``: unknown before loading, :data:`TYPICAL_SCHEDULER`
    is assumed); ``text_width``: the denoiser's ``cross_attention_dim`` a ControlNet must match (``None``: unknown).
    """

    native: int
    grid: int
    family: str
    sampling_defaults: dict[str, Any]
    scheduler_config: dict[str, Any] | None = None
    text_width: int | None = None

    @classmethod
    def of_spec(cls, spec: Any) -> ModelFacts:
        """The facts of a resolved :class:`~hiresdiff.models.loading.ModelSpec` (configs only)."""
        return cls(
            spec.native_size,
            spec.pixel_grid,
            spec.family,
            spec.sampling_defaults,
            spec.scheduler_config,
            spec.cross_attention_dim,
        )

    @classmethod
    def of_pipeline(cls, hp: HiresPipeline) -> ModelFacts:
        """The facts of a loaded pipeline (its base scheduler's config, its UNet's text width)."""
        ad = hp.adapter
        return cls(
            ad.native_size, ad.pixel_grid, ad.family, ad.sampling_defaults, hp._base_scheduler_config, ad.text_width
        )


#: the scheduler settings of the SD/SDXL releases (and the built-in models), assumed where a model's own scheduler
#: config is not known before loading (built-in models, single files, hub models not in the cache)
TYPICAL_SCHEDULER: dict[str, Any] = {"num_train_timesteps": 1000, "timestep_spacing": "leading", "steps_offset": 1}


def _scheduler_for(name: str, family: str, config: dict[str, Any]) -> Any:
    """The scheduler :meth:`HiresPipeline.run` would build for ``name`` from ``config`` (no weights), or ``None``
    where its class is not known before loading."""
    if name == MODEL_DEFAULT or (family == "flux" and name == "euler"):
        import diffusers

        cls = getattr(diffusers, str(config.get("_class_name")), None)
        return None if cls is None else cls.from_config(config)
    return make_scheduler(name, config)


#: ``steps ≤ num_train_timesteps / SAFE_STEP_RATIO`` cannot land on one timestep under any spacing diffusers offers
#: ("leading" puts them ≥ 4 timesteps apart, "linspace" and "trailing" spread them over the whole range), so the
#: step counts people use are checked without building the scheduler — and without importing diffusers
SAFE_STEP_RATIO = 4
#: the timestep spacings whose step counts :data:`SAFE_STEP_RATIO` vouches for (another value is checked by building)
KNOWN_SPACINGS = (None, "leading", "linspace", "trailing")


def _cannot_collapse(name: str, steps: int, limit: int, config: dict[str, Any]) -> bool:
    """Whether ``steps`` surely gives distinct timesteps on hiresdiff's scheduler ``name`` of ``config``
    (:data:`SAFE_STEP_RATIO`; the model's own scheduler may be of any class — an LCM scheduler caps the steps — so
    it is always built)."""
    spaced = config.get("timestep_spacing") in KNOWN_SPACINGS
    return name != MODEL_DEFAULT and spaced and steps * SAFE_STEP_RATIO <= limit


def check_steps(settings: GenerationSettings, family: str, scheduler_config: dict[str, Any] | None) -> None:
    """Refuse step counts the model's scheduler cannot run, in one line, before any weights load.

    Above ``num_train_timesteps`` diffusers' DDIM/DDPM raise, and the others (Euler, Heun, DPM-Solver, UniPC with
    "leading" spacing) silently put every step on the same timestep; DPM-Solver and UniPC do so already at
    ``num_train_timesteps`` itself. The scheduler that will run is built from its config and asked for its
    timesteps, so every such collapse is caught (flow-matching FLUX schedules have continuous σ: no collapse).
    The model's own scheduler (``model-default``) is also asked whether its step takes DDIM's η when η ≠ 0.
    """
    config = {**TYPICAL_SCHEDULER, **(scheduler_config or {})}
    if settings.eta and (own := _scheduler_for(settings.scheduler, family, config)) is not None:
        check_scheduler_eta(settings.eta, own)
    limit, steps = int(config["num_train_timesteps"]), settings.steps
    require(
        steps <= limit,
        f"steps {steps:,} is above the {limit} timesteps the model's scheduler has (num_train_timesteps); use at "
        f"most {limit} (50 is typical)",
    )
    if family == "flux" or steps == 1 or _cannot_collapse(settings.scheduler, steps, limit, config):
        return
    scheduler = _scheduler_for(settings.scheduler, family, config)
    if scheduler is None:
        return
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            scheduler.set_timesteps(steps)
    except (ValueError, TypeError, RuntimeError) as error:
        first = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
        raise HiresError(f"the {settings.scheduler} scheduler cannot run {steps} steps: {first[:200]}") from None
    distinct = len(set(scheduler.timesteps.tolist()))
    require(
        distinct > 1,
        f"steps {steps} collapses the {settings.scheduler} schedule of this model: every step lands on the same "
        f"timestep ({limit} training timesteps, {config.get('timestep_spacing')!r} spacing); use fewer steps",
    )


def _pixel_upsamplers() -> list[str]:
    """The methods whose recipes enlarge decoded images in pixel space (``--upscaler`` does it for them)."""
    return [name for name, m in METHODS.items() if m.pixel_upsampling]


def check_arguments(
    prompt: Any,
    method: Any,
    width: Any,
    height: Any,
    *,
    generator: Any = None,
    preset: Any = None,
    paper: Any = False,
    **kwargs: Any,
) -> None:
    """Every check that needs no model, run before the model is even resolved: names, types and numbers of the
    prompts, settings, method parameters, extras (types only: files are read once the model is known) and the
    generators. A width/height left to the model's default is checked later (:func:`validate_request`)."""
    extras = typed_extras({k: kwargs.pop(k) for k in EXTRA_ARGS if k in kwargs})
    stand_in = 1  # a missing side defaults from the model or the input picture: any positive value checks the rest
    w, h = (stand_in if v is None else v for v in (width, height))
    m, settings, specific = _settings(prompt, method, w, h, preset, paper, None, kwargs)
    _check_strength(m, settings, extras.get("image") is not None)
    m.check_switch(settings.hidiffusion, extras.get("image") is not None)
    m.check_upscaler(extras.get("upscaler") is not None, extras.get("image") is not None, _pixel_upsamplers())
    coerce_params(m.params, specific, m.name)
    check_generators(settings, generator)


def _check_callables(**given: Any) -> None:
    """``progress`` a bool, the callbacks callable or ``None`` (one line naming the argument otherwise)."""
    for name, value in given.items():
        if name == "progress":
            as_bool(name, value)
        else:
            require(value is None or callable(value), f"{name} must be a function or None, got {got(value)}")


def validate_request(
    prompt: str | list[str],
    method: str,
    width: int | None,
    height: int | None,
    model: ModelFacts,
    *,
    allow_pickle: bool = False,
    generator: Any = None,
    **kwargs: Any,
) -> GenerationRequest:
    """Everything checked before any model work, in order: what needs no model (:func:`check_arguments`), then
    what needs the model's configs: inputs and target size (:func:`~hiresdiff.extras.split_extras`, ControlNet and
    LoRA families included), what the family cannot use, settings and parameters (:func:`build_request`), the
    model's limits, the method's families, its parameters against the model's facts (:meth:`Params.check_model`)
    and the scheduler's step limits (:func:`check_steps`)."""
    as_bool("allow_pickle", allow_pickle)
    check_arguments(prompt, method, width, height, generator=generator, **kwargs)
    extras, width, height = split_extras(
        kwargs,
        native=model.native,
        grid=model.grid,
        family=model.family,
        text_width=model.text_width,
        width=width,
        height=height,
        allow_pickle=allow_pickle,
        own_control=get_method(method).own_control,
    )
    require(
        not (model.family == "flux" and kwargs.get("negative_prompt")),
        "FLUX.1 is guidance-distilled and has no negative prompt; drop --negative",
    )
    req = build_request(prompt, method, width, height, model_defaults=model.sampling_defaults, extras=extras, **kwargs)
    check_for_model(req, model.native, model.grid)
    req.method.check_family(model.family, req.params)
    req.params.check_model(req.settings, model)
    req.params.check_controlnet(req.extras.controlnet)
    req.method.check_controlnet(req.extras.controlnet is not None, req.settings.hidiffusion)
    require(
        not (req.settings.hidiffusion and model.family == "flux"),
        "hidiffusion=true patches a UNet (SD 1.x/2.x, SDXL); FLUX has none: drop --set hidiffusion=true",
    )
    check_steps(req.settings, model.family, model.scheduler_config)
    return req


#: settles ``max_batch="auto"`` of a request on a loaded pipeline: :func:`hiresdiff.plan.settle_batch`, which
#: :mod:`hiresdiff.plan` registers when imported (``import hiresdiff``'s public names import it) — the plan needs
#: the cost model, which runs this module's pipeline, so this module cannot import the plan; unset, ``auto`` is
#: :func:`~hiresdiff.config.fallback_batch`
BATCH_PLANNER: Callable[[HiresPipeline, GenerationRequest], None] | None = None


def agree_batch(parallel: Any, req: GenerationRequest) -> None:
    """The smallest ``max_batch`` any rank settled ``auto`` to, on every rank of a view-parallel run (each rank's
    free memory may differ; the ranks must make the same calls)."""
    if isinstance(parallel, ViewParallel):
        req.settings.max_batch = parallel.smallest(int(req.settings.max_batch))


def describe(req: GenerationRequest) -> dict[str, Any]:
    """What a request generates (method, settings, parameters, inputs): equal on every rank of a parallel run."""
    return {
        "method": req.method.name,
        "settings": dataclasses.asdict(req.settings),
        "params": dataclasses.asdict(req.params),
        "extras": req.extras.metadata(),
    }


#: the device types a generation can run on (``meta`` holds no data; others have no diffusers support here)
DEVICE_TYPES = ("cpu", "cuda", "mps")


def resolve_device(device: str | torch.device | None) -> str:
    """``None`` → CUDA when available, else CPU. A device that cannot run a generation (unknown, ``meta``, an
    unavailable CUDA or MPS, a CUDA index beyond the GPUs present) is a one-line error."""
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    ok = isinstance(device, (str, torch.device))
    require(ok, f"device must be a string such as 'cpu', 'cuda' or 'cuda:1', got {got(device)}")
    name = str(device)
    try:
        parsed = torch.device(name)
    except (RuntimeError, ValueError):
        raise HiresError(f"unknown device {name!r}; use cpu, cuda or cuda:N") from None
    require(parsed.type in DEVICE_TYPES, f"device {name!r} cannot run a generation; use cpu, cuda or cuda:N")
    if parsed.type == "cuda":
        require(torch.cuda.is_available(), f"device {name!r} requested but CUDA is not available; use --device cpu")
        count = torch.cuda.device_count()
        require(
            parsed.index is None or parsed.index < count,
            f"device {name!r} does not exist: {count} CUDA device(s) here (cuda:0 … cuda:{count - 1})",
        )
    if parsed.type == "mps":
        require(torch.backends.mps.is_available(), f"device {name!r} requested but MPS is not available")
    return name


def dtype_name(dtype: str | torch.dtype) -> str:
    """The name of a dtype given as a string or a ``torch.dtype``; one line for anything else or another dtype."""
    if isinstance(dtype, torch.dtype):
        dtype = str(dtype).removeprefix("torch.")
    require(
        isinstance(dtype, str) and dtype in DTYPES,
        f"unknown dtype {dtype!r}; choose one of: {', '.join(DTYPES)}",
    )
    return dtype


def resolve_dtype(name: str | torch.dtype) -> torch.dtype:
    """The ``torch.dtype`` of ``name`` (one of :data:`~hiresdiff.config.DTYPES`)."""
    return getattr(torch, dtype_name(name))


_CACHE: dict[tuple[str, str, str, bool], HiresPipeline] = {}


def generate(
    prompt: str | list[str],
    method: str = "demofusion",
    model: str = DEFAULT_MODEL,
    width: int | None = None,
    height: int | None = None,
    *,
    dtype: str | None = None,
    device: str | None = None,
    allow_pickle: bool = False,
    generator: torch.Generator | list[torch.Generator] | None = None,
    progress: bool = True,
    callback: StepCallback | None = None,
    parallel: ViewParallel | None = None,
    before_model: Callable[..., None] | None = None,
    **kwargs: Any,
) -> GenerationResult:
    """Generate ``prompt`` with ``method`` on ``model`` at ``width × height`` pixels.

    Everything is validated before the model is loaded; the last loaded model is kept for the next call.
    ``dtype`` defaults to float16 on CUDA and float32 on CPU. ``image``, ``scale``, ``fit``, ``controlnet``,
    ``control_image``, ``control_scale``, ``loras`` and ``expected`` as for :meth:`HiresPipeline.__call__` (see
    :func:`~hiresdiff.extras.prepare_extras`). ``parallel`` shares every step's denoiser calls out over the ranks
    of a process group (:mod:`hiresdiff.parallel`); all ranks must ask for the same image.
    ``before_model(request, native, grid, device=…, dtype=…)`` runs before any weights load (the CLI checks its
    output folder, prints the plan and checks the memory estimate there).
    """
    from hiresdiff.models.loading import resolve_model

    require(isinstance(model, str), f"model must be a name, path or hub id (a string), got {got(model)}")
    as_bool("allow_pickle", allow_pickle)
    _check_callables(progress=progress, callback=callback, before_model=before_model)
    require(
        parallel is None or isinstance(parallel, ViewParallel),
        f"parallel must be a hiresdiff.parallel.ViewParallel or None, got {got(parallel)}",
    )
    dev = resolve_device(device)
    dtype = dtype_name(dtype or ("float16" if dev.startswith("cuda") else "float32"))
    check_arguments(prompt, method, width, height, generator=generator, **kwargs)  # before the model is resolved
    spec = resolve_model(model, allow_pickle=allow_pickle)
    facts = ModelFacts.of_spec(spec)
    req = validate_request(
        prompt, method, width, height, facts, allow_pickle=allow_pickle, generator=generator, **kwargs
    )
    if parallel is not None:
        parallel.check_same_request({**describe(req), "model": model, "dtype": dtype})  # before any weights load
    if before_model is not None:
        auto = req.settings.max_batch == AUTO
        before_model(req, spec.native_size, spec.pixel_grid, device=dev, dtype=resolve_dtype(dtype))
        if auto and req.settings.max_batch != AUTO:  # the plan settled it (before any weights load)
            agree_batch(parallel, req)
    key = (model, dtype, dev, allow_pickle)
    if key not in _CACHE:
        _CACHE.clear()
        low = req.settings.low_vram  # a low-VRAM request loads the pipeline with only the denoiser on the device
        _CACHE[key] = HiresPipeline.from_model(model, dtype=dtype, device=dev, allow_pickle=allow_pickle, low_vram=low)
    hp = _CACHE[key]
    hp.adapter.parallel = parallel or Serial()
    return hp.run(req, generator=generator, progress=progress, callback=callback)
