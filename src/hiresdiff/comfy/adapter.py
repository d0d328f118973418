"""A second model backend: hiresdiff's methods on the models ComfyUI has loaded (``MODEL``, ``VAE``, ``CONDITIONING``).

:class:`ComfyAdapter` offers the interface the methods already use (:class:`~hiresdiff.models.adapter.ModelAdapter`)
over a ComfyUI ``ModelPatcher`` — so LoRAs and model patches applied by other nodes take part — without loading a
second copy of the model through diffusers. Only the model's own calls change; the sampler, the strategies, the
guidance rules and every method run as with diffusers. The conversions (facts of ComfyUI 0.3.x–0.33):

* **denoiser**: ComfyUI's ``BaseModel.apply_model(x, σ, c_crossattn=…, y=…)`` takes σ-space latents
  ``x = x0 + σ·ε`` and returns x̂0 (it divides by ``√(σ²+1)`` itself and maps σ to the nearest training timestep).
  hiresdiff's model input is the variance-preserving ``x_in = √ᾱ·x0 + √(1−ᾱ)·ε`` (:mod:`hiresdiff.models.
  parametrization`), so a call at timestep ``t`` passes the model's training σ at ``t`` with ``x = x_in·√(σ²+1)``
  (ComfyUI's UNet then sees ``x_in`` and ``t``, as the diffusers one does) and turns the returned x̂0 back into the
  model's raw output (ε or v) with the same σ — in float64, so nothing is lost at small σ;
* **scheduler**: a diffusers Euler scheduler of the model's own training schedule as ComfyUI samples it (the
  patcher's ``model_sampling``, so a ModelSamplingDiscrete node's v-prediction or zero-terminal-SNR counts; ComfyUI's
  ``linear`` β is diffusers' ``scaled_linear`` over the same range; ε or v prediction from the class whose x̂0
  formula the sampling object uses, :func:`sampling_prediction`) with the SD/SDXL
  schedulers' integer ("leading") timesteps, which ComfyUI's nearest-timestep lookup keeps exactly;
* **SDXL conditioning**: the ``y`` vector of each view from the model's own ``encode_adm`` (pooled text, original
  size, crop, target size — per view, as the diffusers backend's ``time_ids``);
* **VAE**: ComfyUI's VAE takes raw latents and pixels as ``(B, H, W, C)`` in ``[0, 1]``; hiresdiff's images are
  ``(B, C, H, W)`` in ``[−1, 1]``, its latents scaled by the model's latent format (``process_latent_in``);
* **prompts**: CONDITIONING tensors (the text encoders' output) given when the adapter is made;
* **FLUX.1** (:class:`ComfyFluxAdapter`): hiresdiff's :class:`~hiresdiff.models.flux.FluxAdapter` (packing, RoPE
  positions, schedule, parametrisation) with only the transformer call replaced. ComfyUI's FLUX takes the unpacked
  ``(B, 16, h, w)`` latents and patchifies inside; its ``apply_model`` returns x̂0 = ``x − σ·v`` (``CONST``) for
  the σ it is given and hands the transformer ``model_sampling.timestep(σ)`` (FLUX-dev: σ itself; schnell's
  discrete flow: ``σ·multiplier``, ``multiplier`` 1), which the transformer scales by 1000 — so a call passes
  ``σ = t/1000/multiplier`` (what the diffusers backend gives its transformer) and recovers the velocity
  ``v = (x − x̂0)/σ`` in float64. The view's canvas position goes in as ComfyUI's RoPE shift
  (``transformer_options["rope_options"]``), FLUX-dev's guidance value as ``guidance``, the pooled CLIP as ``y``.
  The schedule's shift is the model's own (``model_sampling.shift``, which ComfyUI's ModelSamplingFlux node sets):
  ComfyUI's dev σ(t) = ``e^s/(e^s + 1/t − 1)`` is diffusers' exponential time shift with μ = ``s``, and its
  default 1.15 is μ at FLUX.1's native 1024 px (4096 tokens), which hiresdiff uses for every stage; schnell's
  σ(t) = ``s·t/(1 + (s − 1)·t)`` is the static shift ``s``.

* **self-attention patches** (NPA …, :meth:`ComfyAdapter.self_attention_patched`): ComfyUI's ``attn1`` replacement
  on every transformer block of the UNet (:mod:`hiresdiff.comfy.attention`), added to the ``transformer_options``
  each ``apply_model`` call gets; a replacement another node installed stays in force for the calls a patch leaves.
* **cross-attention observers** (AccDiffusion's capture, :meth:`ComfyAdapter.cross_attention_observed`): ComfyUI's
  ``attn2`` replacement on the observed blocks, returning the attention in force unchanged.
* **UNet module patches** (ScaleCrafter, FouriScale, HiDiffusion, FreeU, FreeScale): on ComfyUI's own modules
  through ``unet``, a view of the UNet under diffusers' names (:mod:`hiresdiff.comfy.unet_view`).
* **FLUX neighborhood attention** (ScaleDiff, :meth:`ComfyFluxAdapter.flux_neighborhood_attention`): ComfyUI's
  attention override (:mod:`hiresdiff.comfy.flux_attention`).

ComfyUI is never imported by this module: it works on the objects ComfyUI hands a node; the one function of
ComfyUI it calls (``comfy.model_management.load_models_gpu``) is imported where the model is placed.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from hiresdiff.comfy.attention import cross_attention_observers, self_attention_replacements
from hiresdiff.comfy.flux_attention import FluxCallShape, FluxNPAOverride
from hiresdiff.comfy.text import PromptText
from hiresdiff.comfy.unet_view import ComfyUNetView
from hiresdiff.errors import require
from hiresdiff.models.adapter import (
    Chunk,
    ControlResiduals,
    ControlRows,
    ModelAdapter,
    PromptEmbeds,
    branch_rows,
    call_rows,
)
from hiresdiff.models.flux import SHIFT_DEFAULTS, TIMESTEP_SCALE, FluxAdapter, FluxCall
from hiresdiff.models.guidance import GuidanceRule
from hiresdiff.models.parametrization import prediction_from_x0
from hiresdiff.models.self_attention import (
    ChooseObserver,
    CrossAttentionObserver,
    WrapSelfAttention,
    diffusers_self_attention,
)
from hiresdiff.patches.attention_flux import TOKEN_PATCH
from hiresdiff.patches.processors import NPAState, SelfAttentionKernel

#: ComfyUI model config class name → (hiresdiff family, native size in pixels)
FAMILIES = {
    "SD15": ("sd", 512),
    "SD20": ("sd", 768),  # the v-prediction release; the 512 px base is told apart by its model type below
    "SD21UnclipL": ("sd", 768),
    "SDXL": ("sdxl", 1024),
    "SSD1B": ("sdxl", 1024),
    "Segmind_Vega": ("sdxl", 1024),
    "KOALA_700M": ("sdxl", 1024),
    "KOALA_1B": ("sdxl", 1024),
    "Flux": ("flux", 1024),  # FLUX.1-dev (guidance-distilled)
    "FluxSchnell": ("flux", 1024),
}
#: ComfyUI ``ModelType`` names — also the names of the ``comfy.model_sampling`` classes that hold their x̂0 formula
#: (``calculate_denoised``) — → diffusers ``prediction_type``
PREDICTIONS = {"EPS": "epsilon", "V_PREDICTION": "v_prediction"}
#: ComfyUI ``ModelType`` names of FLUX.1: dev's time-shifted σ (``ModelSamplingFlux``), schnell's discrete flow
FLUX_TYPES = ("FLUX", "FLOW")


def comfy_family(model: Any) -> tuple[str, int]:
    """``(family, native size)`` of a ComfyUI ``BaseModel``, or one line saying why hiresdiff cannot run it."""
    config = type(model.model_config).__name__
    kind = getattr(model.model_type, "name", str(model.model_type))
    known = FAMILIES.get(config)
    if config.startswith("Flux") or "flux" in type(model).__name__.lower():  # inpainting, FLUX.2 …: refused
        require(known is not None, f"hiresdiff runs FLUX.1 dev and schnell text-to-image models, not a {config} model")
        require(kind in FLUX_TYPES, f"hiresdiff cannot run a {kind} FLUX model (FLUX.1's flow matching only)")
        return known  # type: ignore[return-value]
    if known is None:  # an SD/SDXL-class model of another name (custom configs): by its conditioning
        adm = int(getattr(model, "adm_channels", 0) or 0)
        known = ("sdxl", 1024) if adm == 2816 else ("sd", 512) if adm == 0 else None
    require(known is not None, f"hiresdiff cannot run a {config} model (SD 1.x/2.x, SDXL and FLUX.1 only)")
    require(kind in PREDICTIONS, f"hiresdiff cannot run a {kind} model (ε and v prediction only)")
    family, native = known  # type: ignore[misc]
    if config == "SD20" and kind == "EPS":
        native = 512  # SD 2.x base
    return family, native


def sampling_prediction(sampling: Any) -> str:
    """diffusers' ``prediction_type`` of a ComfyUI ``model_sampling`` object — the class that gives it its x̂0
    formula (``calculate_denoised``), so a ModelSamplingDiscrete node's choice wins over the checkpoint's type — or
    one line saying hiresdiff cannot run it (x0, LCM's distilled sampling, EDM …)."""
    owner = next((c for c in type(sampling).__mro__ if "calculate_denoised" in vars(c)), type(sampling))
    name = owner.__name__ if owner.__module__ == "comfy.model_sampling" else f"{owner.__module__}.{owner.__name__}"
    require(
        name in PREDICTIONS,
        f"hiresdiff cannot run a model sampled as {name} (ε or v prediction only: a ModelSamplingDiscrete node set "
        "to eps or v_prediction, or none)",
    )
    return PREDICTIONS[name]


def scheduler_from_sampling(model: Any, sampling: Any) -> Any:
    """A diffusers Euler scheduler over the noise levels ``sampling`` (the patcher's ``model_sampling``) gives the
    model (module docstring): ComfyUI's ``linear`` schedule is diffusers' ``scaled_linear`` over the same β range
    (a diffusers pipeline of the checkpoint has this very config, so methods that rebuild the schedule from it —
    APT's scale-aware β — see the same); any other schedule is taken from the σ table as ``trained_betas``."""
    from diffusers import EulerDiscreteScheduler

    settings = dict(getattr(model.model_config, "sampling_settings", {}) or {})
    common = {"prediction_type": sampling_prediction(sampling), "timestep_spacing": "leading", "steps_offset": 1}
    if settings.get("beta_schedule", "linear") == "linear" and hasattr(sampling, "linear_start"):
        return EulerDiscreteScheduler(
            num_train_timesteps=int(sampling.num_timesteps),
            beta_start=float(sampling.linear_start),
            beta_end=float(sampling.linear_end),
            beta_schedule="scaled_linear",
            rescale_betas_zero_snr=bool(getattr(sampling, "zsnr", settings.get("zsnr", False))),
            **common,
        )
    sigmas = sampling.sigmas.detach().to("cpu", torch.float64)
    abar = 1.0 / (1.0 + sigmas**2)
    betas = 1.0 - abar / torch.cat([abar.new_ones(1), abar[:-1]])
    return EulerDiscreteScheduler(num_train_timesteps=len(sigmas), trained_betas=betas.tolist(), **common)


class ComfyBackend(ModelAdapter):
    """What the ComfyUI adapters share: the ``ModelPatcher`` (``patcher``) and its model, ComfyUI's ``vae`` (``None``:
    no pixel work), the prompts' CONDITIONING as :class:`PromptEmbeds` (``embeds``: one row per prompt; for
    classifier-free guidance the unconditional half), placement and memory left to ComfyUI. ``native_size``: the
    model's training resolution when it is not its family's (:data:`FAMILIES`: a 768 px SD 1.5 fine-tune).

    A family's adapter derives from this class first and from the diffusers backend's adapter of the family second,
    so these members replace the diffusers ones and everything else (packing, schedules, guidance) is shared."""

    def _attach(self, patcher: Any, vae: Any, embeds: PromptEmbeds | None, native_size: int | None) -> None:
        """Set the facts every ComfyUI adapter has (what a diffusers adapter reads from its pipeline)."""
        model = patcher.model
        self.patcher, self.model, self.pipe = patcher, model, None
        self.family, native = comfy_family(model)
        #: the training resolution (pixels): the family's unless given (a ComfyUI model does not record it)
        self.native_size = native_size or native
        self.vae = vae
        self.embeds = embeds
        self.vae_scale_factor = 8
        self.latent_channels = int(model.latent_format.latent_channels)
        self.native_latent = self.native_size // self.vae_scale_factor
        self.vae_dtype = torch.float32
        self.call_info: list[tuple[int, str]] = []
        #: the ``attn1`` replacements of the self-attention patches in force (``ComfyAdapter.self_attention_patched``)
        self.attn1: dict[Any, Any] = {}
        #: the ``attn2`` replacements of the cross-attention observers in force (``cross_attention_observed``)
        self.attn2: dict[Any, Any] = {}
        #: ComfyUI's ``optimized_attention_override`` of a patch in force (FLUX's NPA), else ``None``
        self.attention_override: Any = None
        #: the prompt text and the CLIP that encoded it, when the node has them (AccDiffusion's view prompts)
        self.text: PromptText | None = None

    def _setup_vae(self) -> None:
        """ComfyUI's VAE picks its own device and dtype."""

    @property
    def model_kind(self) -> str:
        """ComfyUI's ``ModelType`` name of the model (``EPS``, ``V_PREDICTION``, ``FLUX`` …)."""
        return str(getattr(self.model.model_type, "name", self.model.model_type))

    @property
    def transformer_options(self) -> dict[str, Any]:
        """The patches other nodes put on the model (attention replacements, block patches …) and hiresdiff's
        attention replacements in force (a fresh dict per call: the UNet writes its block position into it)."""
        options = dict(self.patcher.model_options.get("transformer_options", {}))
        if self.attention_override is not None:
            options["optimized_attention_override"] = self.attention_override
        ours = {name: r for name, r in (("attn1", self.attn1), ("attn2", self.attn2)) if r}
        if ours:
            replace = dict(options.get("patches_replace", {}))
            replace.update({name: {**replace.get(name, {}), **r} for name, r in ours.items()})
            options["patches_replace"] = replace
        return options

    def refresh_placement(self) -> tuple[torch.device, torch.dtype]:
        """Load the model where ComfyUI puts it (its memory manager may have moved it since the last run)."""
        import comfy.model_management

        comfy.model_management.load_models_gpu([self.patcher])
        self._placement = (torch.device(self.patcher.load_device), self.model.get_dtype_inference())
        return self._placement

    # --- text: CONDITIONING from ComfyUI's text encoders -------------------------------------------------
    def encode_prompt(self, prompts: list[str], negatives: list[str] | None, cfg: bool) -> PromptEmbeds:
        """The CONDITIONING given to the adapter (the prompts' text was encoded by ComfyUI's CLIP nodes); FLUX.1
        takes no negative prompt (guidance-distilled or guidance-free), so its unconditional rows are dropped.
        Prompts other than the run's own (AccDiffusion's view prompts) are encoded by the CLIP of :attr:`text`,
        with the negative CONDITIONING's rows as their unconditional half (they share the run's negative prompt)."""
        embeds = self.embeds
        require(embeds is not None, "no conditioning was given to the ComfyUI backend")
        assert embeds is not None
        if self.text is not None and any(p != self.text.text for p in prompts):
            return self._encoded(embeds, prompts, cfg)
        require(embeds.cond.shape[0] == len(prompts), "one conditioning per prompt is needed")
        if self.family == "flux":
            require(embeds.pooled_cond is not None, "FLUX needs the pooled CLIP output of its text encoders")
            return PromptEmbeds(embeds.cond, None, embeds.pooled_cond, None)
        require(not cfg or embeds.uncond is not None, "guidance needs the negative conditioning")
        if self.family == "sdxl":
            require(embeds.pooled_cond is not None, "SDXL needs the pooled output of its text encoders")
        return embeds

    def _encoded(self, embeds: PromptEmbeds, prompts: list[str], cfg: bool) -> PromptEmbeds:
        """View prompts through the CLIP of :attr:`text` (:meth:`encode_prompt`)."""
        assert self.text is not None
        n = len(prompts)
        cond, pooled = self.text.encode(prompts, embeds.cond.shape[1])

        def repeated(t: torch.Tensor | None) -> torch.Tensor | None:  # the negative's one row, for every prompt
            return t[:1].expand(n, *t.shape[1:]) if cfg and t is not None else None

        # the same fields as the run's own embeddings: pooled outputs where the CONDITIONING carries them
        pooled = pooled if embeds.pooled_cond is not None else None
        return PromptEmbeds(cond, repeated(embeds.uncond), pooled, repeated(embeds.pooled_uncond))

    def count_tokens(self, text: str) -> int:
        """Tokens of ``text`` as the CLIP of :attr:`text` counts them (0 without one: ComfyUI encoded the text)."""
        return self.text.count_tokens(text) if self.text is not None else 0

    def truncated(self, prompt: str) -> tuple[int, str] | None:
        return None

    # --- VAE: ComfyUI's, (B, H, W, C) in [0, 1] ----------------------------------------------------------
    def _vae_factors(self) -> tuple[float, float]:
        fmt = self.model.latent_format
        return float(fmt.scale_factor), float(getattr(fmt, "shift_factor", 0.0) or 0.0)

    def _comfy_vae(self) -> Any:
        require(self.vae is not None, "this run decodes or encodes pixels: connect a VAE to the node")
        return self.vae

    def _vae_decode(self, z: torch.Tensor) -> torch.Tensor:
        """ComfyUI's decode (its batching and memory handling) with the VAE's raw output kept: ComfyUI maps it to
        ``[0, 1]`` and clamps (``VAE.process_output``), while hiresdiff clamps only where the method says so
        (pixel-space methods resample the raw output first, as the diffusers backend gives it them)."""
        vae = self._comfy_vae()
        to_unit = vae.process_output
        vae.process_output = _raw
        try:
            pixels = vae.decode(z)  # (B, H, W, C), the raw output in about [−1, 1]
        finally:
            vae.process_output = to_unit
        return pixels.movedim(-1, 1).float().cpu()

    def _vae_encode(self, x: torch.Tensor) -> torch.Tensor:
        pixels = ((x.float() + 1.0) / 2.0).movedim(1, -1)  # ComfyUI maps [0, 1] back to [−1, 1] (no clamp)
        return self._comfy_vae().encode(pixels).float().cpu()

    @contextmanager
    def borrowed(self, *modules: torch.nn.Module) -> Iterator[None]:
        """ComfyUI's memory manager moves its models itself (it loads the VAE for a decode, the model for a call)."""
        yield

    def set_offload(self, on: bool) -> None:
        """Low-VRAM placement is ComfyUI's (its ``--lowvram``/``--novram`` modes); only the setting is kept."""
        self.offload = on


class ComfyAdapter(ComfyBackend):
    """The SD 1.x/2.x and SDXL adapter over a ComfyUI ``ModelPatcher`` (arguments: :class:`ComfyBackend`)."""

    def __init__(
        self, patcher: Any, vae: Any = None, embeds: PromptEmbeds | None = None, native_size: int | None = None
    ) -> None:
        self._attach(patcher, vae, embeds, native_size)
        require(self.family != "flux", "a FLUX model runs through ComfyFluxAdapter (comfy_adapter picks it)")
        #: ComfyUI's UNet, and the same under diffusers' module names for the UNet patches (:mod:`.unet_view`)
        self.diffusion_model = self.model.diffusion_model
        self.unet = ComfyUNetView(self.diffusion_model, self)
        #: SDXL's ``y`` per view of the embeds in use (:meth:`_adm`)
        self._adm_of: PromptEmbeds | None = None
        self._adm_rows: dict[tuple[Any, ...], Any] = {}
        #: the model's σ schedule as ComfyUI samples it (a ModelSamplingDiscrete node's patch included)
        self.sampling = patcher.get_model_object("model_sampling")
        self.scheduler = scheduler_from_sampling(self.model, self.sampling)

    @property
    def text_width(self) -> int | None:
        return int(self.model.model_config.unet_config["context_dim"])

    @property
    def denoiser_module(self) -> torch.nn.Module:
        """ComfyUI's UNet (``unet`` is its diffusers-named view)."""
        return self.diffusion_model

    @contextmanager
    def self_attention_patched(self, wrap: WrapSelfAttention) -> Iterator[None]:
        """Every self-attention (``attn1``) of the UNet's transformer blocks runs ``wrap(model, None, level)`` while
        the block runs. A :class:`~hiresdiff.patches.processors.SelfAttentionKernel` goes through ComfyUI's ``attn1``
        replacement (:mod:`hiresdiff.comfy.attention`: the level from each call's token count and the UNet input's
        shape); calls the patch leaves run the replacement in force before (another node's, an enclosing patch's)
        or ComfyUI's own attention. The patcher's options are not touched. A patch of whole attention calls
        (FreeScale's scale fusion) takes the place of each ``attn1`` module's ``forward`` instead, the level from
        its diffusers name (:class:`~hiresdiff.comfy.unet_view.ComfyUNetView`). ComfyUI calls a ControlNet without
        the transformer options, so a patch cannot reach its layers (the diffusers backend patches both): refused."""
        require(self.controlnet is None, "self-attention patches do not reach a ComfyUI ControlNet's layers")
        if not isinstance(wrap(self.unet, None, 0), SelfAttentionKernel):  # a whole-call patch (FreeScale's)
            with diffusers_self_attention([self.unet], wrap):  # in place of the modules' forward (:mod:`.unet_view`)
                yield
            return
        installed = self.transformer_options.get("patches_replace", {}).get("attn1", {})
        previous = self.attn1
        self.attn1 = self_attention_replacements(wrap, self.diffusion_model, installed)
        try:
            yield
        finally:
            self.attn1 = previous

    @contextmanager
    def cross_attention_observed(self, choose: ChooseObserver) -> Iterator[CrossAttentionObserver]:
        """The cross-attention (``attn2``) of the UNet's input/output transformer blocks at the level ``choose`` picks
        reports each call's projected q, k to its observer while the block runs, through ComfyUI's ``attn2``
        replacement (:mod:`hiresdiff.comfy.attention`); the attention itself is the replacement in force before
        (another node's) or ComfyUI's own, so the output is unchanged. The patcher's options are not touched."""
        installed = self.transformer_options.get("patches_replace", {}).get("attn2", {})
        previous = self.attn2
        observer, self.attn2 = cross_attention_observers(choose, self.diffusion_model, installed)
        try:
            yield observer
        finally:
            self.attn2 = previous

    # --- denoiser ----------------------------------------------------------------------------------------
    def _adm(self, embeds: PromptEmbeds, text: str, row: int, size: tuple[int, int], crop: tuple[int, int]) -> Any:
        """SDXL's ``y`` of one view: pooled text (``embeds``' row ``row`` of branch text ``text``) and (original size,
        crop, target size) embedded by the model — once per run for each distinct view (the same views recur every
        step), kept while the embeds are the same object."""
        if self._adm_of is not embeds:
            self._adm_of, self._adm_rows = embeds, {}
        key = (text, row, size, crop)
        if key not in self._adm_rows:
            (h, w), (top, left) = size, crop
            pooled = getattr(embeds, f"pooled_{text}")[row : row + 1]
            self._adm_rows[key] = self.model.encode_adm(
                pooled_output=pooled, width=w, height=h, crop_w=left, crop_h=top, target_width=w, target_height=h
            )
        return self._adm_rows[key]

    def _forward(self, x: torch.Tensor, t: torch.Tensor, chunk: Chunk, rule: GuidanceRule) -> torch.Tensor:
        """One ``apply_model`` call for the views of ``chunk`` (every branch of ``rule``, rows branch-major): the
        model's raw output (ε or v, float32) recovered from ComfyUI's x̂0 (module docstring)."""
        text, ys = [], []
        for branch, req, i in branch_rows(rule, chunk):
            row = req.rows[i]
            text.append(getattr(req.embeds, branch.text)[row : row + 1])
            if self.family == "sdxl":
                ys.append(self._adm(req.embeds, branch.text, row, tuple(req.size), tuple(req.crops[i])))
        self.call_info = call_rows(rule, chunk)
        x_in = torch.cat([x] * len(rule.branches))
        wide = torch.float32 if x_in.device.type == "mps" else torch.float64  # MPS has no float64
        sigma = self._sigma(t)
        abar = 1.0 / (1.0 + sigma**2)
        sigmas = torch.full((x_in.shape[0],), sigma, dtype=wide, device=x_in.device)
        context = torch.cat(text)
        extra = {"y": torch.cat(ys)} if ys else {}
        # in float64 around the call, x̂0 = x − σ·ε and its inverse lose nothing at small σ (float32 would lose
        # |x|·2⁻²⁴/σ); the model itself runs in its own dtype
        x_sigma = x_in.to(wide) * (sigma**2 + 1.0) ** 0.5
        if self.controlnet is not None:
            sigma_t = torch.tensor(sigma, dtype=wide, device=x_in.device)
            extra.update(self._control_residuals(x_sigma, sigma_t, context, chunk, len(rule.branches), extra))
        options = self.transformer_options
        x0 = self.model.apply_model(x_sigma, sigmas, c_crossattn=context, transformer_options=options, **extra)
        return prediction_from_x0(x0.to(wide), x_in.to(wide), abar, self.prediction_type).float()

    def _controlnet_call(self, rows: ControlRows) -> ControlResiduals:
        """ComfyUI's ControlNet (a ``CONTROL_NET``: :attr:`controlnet`) on σ-space rows at σ ``rows.t``, as ComfyUI's
        samplers call it (``get_control``: it scales the input and maps σ to the timestep itself), with the rows'
        conditions as its hint at strength ``rows.scale`` — on a copy, since a ControlNet keeps the hint it resized
        (the views' crops change every call), over the step range Apply ControlNet gave it (start/end percent; a
        loader's ControlNet: every step). The residuals go to ``apply_model`` as ``control``."""
        span = getattr(self.controlnet, "timestep_percent_range", (0.0, 1.0))
        net = self.controlnet.copy().set_cond_hint(rows.cond, rows.scale, span)  # type: ignore[union-attr]
        net.pre_run(self.model, self.sampling.percent_to_sigma)
        sigmas, cond = rows.t.expand(rows.model_in.shape[0]), {"c_crossattn": rows.context, **rows.kwargs}
        try:
            control = net.get_control(rows.model_in, sigmas, cond, 1, self.transformer_options)
        finally:
            net.cleanup()
        control = control or {}  # None: σ outside the ControlNet's step range (Apply ControlNet's start/end)
        places = [(key, i) for key, items in control.items() for i, r in enumerate(items) if r is not None]

        def pack(residuals: list[torch.Tensor]) -> dict[str, Any]:
            out = {key: list(items) for key, items in control.items()}
            for (key, i), r in zip(places, residuals, strict=True):
                out[key][i] = r
            return {"control": out}

        return [control[key][i] for key, i in places], pack

    @contextmanager
    def use_controlnet(self, controlnet: Any, scale: float) -> Iterator[None]:
        """Denoiser calls add the residuals of ``controlnet`` (ComfyUI's ``CONTROL_NET``) inside the block; its
        model is loaded where ComfyUI loads the UNet."""
        if controlnet is not None:
            import comfy.model_management

            comfy.model_management.load_models_gpu([self.patcher, *controlnet.get_models()])
        with super().use_controlnet(controlnet, scale):
            yield

    def _sigma(self, t: torch.Tensor) -> float:
        """σ of the model call at timestep ``t``: the model's own training σ there, so that ComfyUI, which maps σ
        back to the nearest training timestep, gives the UNet ``t`` — also when a method samples on another
        schedule (APT's scale-aware β) or at a timestep off the step's schedule (Upsample Guidance's τ); the
        model input is hiresdiff's already, and the conversions around the call use this σ both ways."""
        return float(self.sampling.sigma(torch.as_tensor(float(t), dtype=torch.float32)))


class ComfyFluxAdapter(ComfyBackend, FluxAdapter):
    """The FLUX.1 (dev, schnell) adapter over a ComfyUI ``ModelPatcher`` (arguments: :class:`ComfyBackend`):
    hiresdiff's :class:`~hiresdiff.models.flux.FluxAdapter` with the transformer call made through ComfyUI's
    ``apply_model`` (module docstring)."""

    def __init__(
        self, patcher: Any, vae: Any = None, embeds: PromptEmbeds | None = None, native_size: int | None = None
    ) -> None:
        self._attach(patcher, vae, embeds, native_size)
        require(self.family == "flux", "an SD or SDXL model runs through ComfyAdapter (comfy_adapter picks it)")
        self.transformer = self.model.diffusion_model
        #: the model's σ schedule as ComfyUI samples it (a ModelSamplingFlux node's patch included)
        self.sampling = patcher.get_model_object("model_sampling")
        self.guidance_distilled = bool(self.model.model_config.unet_config.get("guidance_embed", False))
        scheduler = flux_scheduler(self.sampling, self.model_kind)
        self._base_scheduler_config = dict(scheduler.config)
        self.scheduler = scheduler
        #: the transformer call in progress (``None`` between calls), for the attention override
        self.flux_call: FluxCallShape | None = None

    @contextmanager
    def flux_neighborhood_attention(
        self, latent_hw: tuple[int, int], generators: list[torch.Generator] | None
    ) -> Iterator[NPAState]:
        """ScaleDiff's neighborhood attention on every attention of ComfyUI's FLUX while a ``latent_hw`` canvas is
        sampled, as ComfyUI's attention override (:mod:`hiresdiff.comfy.flux_attention`; an override another node
        set stays in force for the calls it leaves). The patcher's options are not touched."""
        state = NPAState(self, latent_hw, generators)
        previous = self.attention_override
        installed = previous or self.transformer_options.get("optimized_attention_override")
        self.attention_override = FluxNPAOverride(self, state, self.native_latent // TOKEN_PATCH, installed)
        try:
            yield state
        finally:
            self.attention_override = previous

    def _velocity(self, call: FluxCall) -> torch.Tensor:
        """The velocity from one ``apply_model`` call (module docstring): σ so that the transformer sees the
        diffusers backend's timestep, the rows' canvas position as ComfyUI's RoPE shift, x̂0 turned back into the
        velocity with the same σ in float64 (float32 on MPS)."""
        model_in, t, text, pooled, guidance, offset = call
        wide = torch.float32 if model_in.device.type == "mps" else torch.float64
        multiplier = float(getattr(self.sampling, "multiplier", 1.0))
        sigma = float(t.reshape(-1)[0]) / TIMESTEP_SCALE / multiplier
        x = model_in.to(self.device, wide)
        options = self.transformer_options
        rope = dict(options.get("rope_options") or {})
        rope["shift_y"] = float(rope.get("shift_y", 0.0)) + offset[0]
        rope["shift_x"] = float(rope.get("shift_x", 0.0)) + offset[1]
        options["rope_options"] = rope
        kwargs: dict[str, Any] = {"c_crossattn": text, "y": pooled.to(self.device)}
        if guidance is not None:
            kwargs["guidance"] = guidance
        sigmas = torch.full((x.shape[0],), sigma, dtype=wide, device=x.device)
        self.flux_call = FluxCallShape(x.shape[-2], x.shape[-1], offset, int(text.shape[1]))
        try:
            x0 = self.model.apply_model(x, sigmas, transformer_options=options, **kwargs)
        finally:
            self.flux_call = None
        return ((x - x0.to(wide)) / sigma).float()


def flux_scheduler(sampling: Any, kind: str) -> Any:
    """FLUX's flow-matching Euler scheduler with the shift of the model's ``sampling`` (module docstring): FLUX-dev
    (``kind`` ``FLUX``) shifts by μ = its ``shift`` — given as both ends of the dynamic-shift line, so that
    :meth:`FluxAdapter.set_timesteps` gets that μ whatever sequence length it asks at — and schnell (``FLOW``) by
    its static ``shift``."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    shift = float(sampling.shift)
    if kind == "FLUX":
        lengths = {k: SHIFT_DEFAULTS[k] for k in ("base_image_seq_len", "max_image_seq_len")}
        return FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=1000, use_dynamic_shifting=True, base_shift=shift, max_shift=shift, **lengths
        )
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift, use_dynamic_shifting=False)


def comfy_adapter(
    patcher: Any, vae: Any = None, embeds: PromptEmbeds | None = None, native_size: int | None = None
) -> ComfyBackend:
    """The ComfyUI adapter for the model of ``patcher``: :class:`ComfyFluxAdapter` for FLUX.1, else
    :class:`ComfyAdapter` (one line for a model hiresdiff cannot run)."""
    family, _ = comfy_family(patcher.model)
    return (ComfyFluxAdapter if family == "flux" else ComfyAdapter)(patcher, vae, embeds, native_size)


def _raw(image: torch.Tensor) -> torch.Tensor:
    """The VAE's output as it is (in place of ComfyUI's map to ``[0, 1]`` with clamping)."""
    return image
