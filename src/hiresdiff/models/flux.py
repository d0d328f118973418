"""FLUX.1 (dev and schnell) behind the :class:`~hiresdiff.models.adapter.ModelAdapter` interface.

The sampler, strategies and methods keep working on **unpacked** canvas latents ``(B, 16, H/8, W/8)``; only this
adapter knows that the FLUX transformer sees 2×2 latent patches as tokens:

* :meth:`FluxAdapter.predict` packs every view into ``(h/2)·(w/2)`` tokens of ``16·4`` channels, gives them the
  RoPE positions of where the view sits on the canvas (``img_ids`` = ``(0, row + top/16, column + left/16)``
  with the view's crop corner ``(top, left)`` in pixels; whole-canvas views start at ``(0, 0)``), runs the
  transformer and unpacks the predicted flow velocity back to the view's latent layout. ``txt_ids`` are zeros.
* Flow matching (:class:`diffusers.FlowMatchEulerDiscreteScheduler`): ``x_t = (1 − σ)·x0 + σ·ε``, the model
  predicts the velocity ``v = ε − x0``, so ``x0 = x_t − σ·v`` and ``v = (x_t − x0)/σ``. There is no input scaling
  and the initial noise has σ = 1.
* Timestep shift: the sigmas ``linspace(1, 1/N, N)`` are shifted by μ computed (diffusers' ``calculate_shift``)
  from the **native** image sequence length — the same μ for every stage and canvas size (SPEC §6).
* Guidance: FLUX-dev is guidance-distilled: the Request's guidance value goes to the transformer's guidance
  embedding; there is no classifier-free doubling and no negative prompt (``PromptEmbeds.uncond`` is ``None``), so
  requests run the single-branch rule :data:`~hiresdiff.models.guidance.NO_GUIDANCE` through the same rule machinery
  as SD/SDXL (a rule's branches are rows of one call, branch-major). FLUX-schnell (``guidance_embeds`` false) gets
  no guidance input at all.
* VAE: ``decode(z/scale + shift)``, ``encode → (z − shift)·scale`` — the base class's tiled decode/encode already
  applies ``shift_factor``.

diffusers' FluxTransformer2DModel takes **one** ``img_ids`` table for the whole batch, so views are batched
together only when they have the same latent size *and* the same canvas position; views at different positions
need separate transformer calls (at FLUX's native 4096 tokens per view a single view already fills an
accelerator, so little is lost).
"""

from __future__ import annotations

import inspect
from contextlib import AbstractContextManager
from typing import Any, NamedTuple

import numpy as np
import torch

from hiresdiff.errors import HiresError
from hiresdiff.models.adapter import (
    Chunk,
    ModelAdapter,
    PromptEmbeds,
    Request,
    branch_rows,
    call_rows,
    call_timestep,
    gather_rows,
    quiet_text_libraries,
    step_value,
    timestep_key,
)
from hiresdiff.models.guidance import GuidanceRule

#: FLUX packs ``PATCH × PATCH`` latent cells into one transformer token
PATCH = 2
#: FLUX.1's native size in pixels: diffusers' FluxPipeline ``default_sample_size`` 128 × VAE factor 8
FLUX_NATIVE_SIZE = 1024
#: longest T5 prompt FLUX.1 was trained with (``max_sequence_length`` of diffusers' FluxPipeline)
MAX_T5_TOKENS = 512
#: the transformer receives ``t / TIMESTEP_SCALE`` (σ in [0, 1]) as FluxPipeline does; it multiplies by 1000 inside
TIMESTEP_SCALE = 1000.0
#: scheduler config defaults of diffusers' FluxPipeline for the timestep-shift formula
SHIFT_DEFAULTS: dict[str, float] = {
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
    "base_shift": 0.5,
    "max_shift": 1.15,
}


# --------------------------------------------------------------------------------------------- tokens


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """``(B, C, h, w)`` latents → ``(B, (h/2)·(w/2), 4C)`` tokens, row-major over 2×2 patches (FluxPipeline's order).

    A token's channels are ``c·4 + 2·dy + dx`` for channel ``c`` and position ``(dy, dx)`` inside its patch.
    """
    b, c, h, w = latents.shape
    check_even(h, w)
    x = latents.reshape(b, c, h // PATCH, PATCH, w // PATCH, PATCH).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // PATCH) * (w // PATCH), c * PATCH * PATCH)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`pack_latents` for a ``height × width`` latent (in latent cells)."""
    b, n, d = tokens.shape
    hp, wp = height // PATCH, width // PATCH
    if n != hp * wp:
        raise ValueError(f"{n} tokens do not tile a {height}×{width} latent in {PATCH}×{PATCH} patches")
    x = tokens.reshape(b, hp, wp, d // (PATCH * PATCH), PATCH, PATCH).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // (PATCH * PATCH), height, width)


def check_even(height: int, width: int) -> None:
    """FLUX views must have even latent sides (2×2 packing); raise a one-line error otherwise."""
    if height % PATCH or width % PATCH:
        raise HiresError(
            f"FLUX packs 2×2 latent cells into one token, so every latent view needs even sides; got {height}×{width} "
            f"latent cells ({height * 8}×{width * 8} px at VAE factor 8); use sizes that are multiples of 16 px "
            "(and windows/strides that keep views even)"
        )


def image_ids(
    height: int,
    width: int,
    offset: tuple[float, float] = (0.0, 0.0),
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """RoPE positions ``(0, row, column)`` of the packed tokens of a ``height × width`` latent view.

    ``offset`` = the view's top-left corner on the canvas in packed units (pixels / 16); with offset ``(0, 0)``
    this equals FluxPipeline's ``_prepare_latent_image_ids``. Offsets may be fractional (a view jittered by an odd
    number of latent cells); RoPE is defined for any real position.
    """
    hp, wp = height // PATCH, width // PATCH
    ids = torch.zeros(hp, wp, 3, dtype=torch.float64)
    ids[..., 1] = torch.arange(hp, dtype=torch.float64)[:, None] + offset[0]
    ids[..., 2] = torch.arange(wp, dtype=torch.float64)[None, :] + offset[1]
    return ids.reshape(hp * wp, 3).to(device=device, dtype=dtype)


def shift_mu(image_seq_len: int, config: Any) -> float:
    """Timestep-shift μ for ``image_seq_len`` tokens (diffusers' ``calculate_shift``): linear in the sequence
    length from ``base_shift`` at ``base_image_seq_len`` to ``max_shift`` at ``max_image_seq_len``."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    get = config.get if hasattr(config, "get") else lambda key, default: getattr(config, key, default)
    return float(
        calculate_shift(
            image_seq_len,
            get("base_image_seq_len", SHIFT_DEFAULTS["base_image_seq_len"]),
            get("max_image_seq_len", SHIFT_DEFAULTS["max_image_seq_len"]),
            get("base_shift", SHIFT_DEFAULTS["base_shift"]),
            get("max_shift", SHIFT_DEFAULTS["max_shift"]),
        )
    )


# --------------------------------------------------------------------------------------------- adapter


def is_flux_pipe(pipe: Any) -> bool:
    """Whether ``pipe`` looks like a diffusers FluxPipeline (a FLUX transformer with RoPE axes, no UNet)."""
    transformer = getattr(pipe, "transformer", None)
    config = getattr(transformer, "config", None)
    return (
        transformer is not None
        and not hasattr(pipe, "unet")
        and config is not None
        and "axes_dims_rope" in config
        and "guidance_embeds" in config
    )


def adapter_for(pipe: Any) -> ModelAdapter:
    """The adapter for a loaded pipeline: :class:`FluxAdapter` for FLUX, else the SD/SDXL :class:`ModelAdapter`."""
    if is_flux_pipe(pipe):
        return FluxAdapter(pipe)
    if not hasattr(pipe, "unet") and hasattr(pipe, "transformer"):
        raise HiresError(
            f"{type(pipe).__name__} is not supported: hiresdiff runs SD 1.x/2.x, SDXL and FLUX.1 pipelines"
        )
    return ModelAdapter(pipe)


class FluxCall(NamedTuple):
    """What one transformer call of :meth:`FluxAdapter._forward_views` takes: the unpacked latents ``model_in``
    (B, 16, h, w) at timestep ``t``, its rows' T5 ``text`` and pooled CLIP (``pooled``), FLUX's ``guidance`` values
    (``None``: schnell) and the views' canvas position ``offset`` (packed units)."""

    model_in: torch.Tensor
    t: torch.Tensor
    text: torch.Tensor
    pooled: torch.Tensor
    guidance: torch.Tensor | None
    offset: tuple[float, float]


def is_flow_scheduler(scheduler: Any) -> bool:
    """Flow-matching schedulers noise with ``scale_noise`` and keep σ ∈ [0, 1] in ``sigmas``."""
    return hasattr(scheduler, "scale_noise") and hasattr(scheduler, "sigmas")


class FluxAdapter(ModelAdapter):
    """Adapter over a loaded diffusers :class:`~diffusers.FluxPipeline` (FLUX.1-dev, FLUX.1-schnell).

    Same public surface as :class:`ModelAdapter`; see the module docstring for what differs. ``native_size`` is
    the pipeline's ``default_sample_size × vae_scale_factor`` (1024 for FLUX.1; built-in tiny models set their
    own). ``guidance_distilled`` tells FLUX-dev (guidance embedding) from FLUX-schnell.
    """

    family = "flux"

    @property
    def text_width(self) -> int | None:
        return None  # no ControlNet of a UNet's text width applies

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe
        self.transformer = pipe.transformer
        self.vae = pipe.vae
        self._base_scheduler_config = dict(pipe.scheduler.config)
        self.scheduler = pipe.scheduler
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.latent_channels = int(self.vae.config.latent_channels)
        in_channels = int(self.transformer.config.in_channels)
        if in_channels != self.latent_channels * PATCH * PATCH:
            raise HiresError(
                f"FLUX transformer expects {in_channels} input channels but the VAE has {self.latent_channels} latent "
                f"channels (packed: {self.latent_channels * PATCH * PATCH}); the pipeline's parts do not match"
            )
        sample = getattr(pipe, "default_sample_size", None)
        self.native_size = int(sample) * self.vae_scale_factor if sample else FLUX_NATIVE_SIZE
        self.native_latent = self.native_size // self.vae_scale_factor
        self.guidance_distilled = bool(self.transformer.config.guidance_embeds)
        tokenizer_2 = getattr(pipe, "tokenizer_2", None)
        limit = int(getattr(tokenizer_2, "model_max_length", MAX_T5_TOKENS) or MAX_T5_TOKENS)
        #: T5 tokens per prompt: FLUX.1's 512, or fewer when the T5 tokenizer says so (tiny models)
        self.max_sequence_length = max(1, min(MAX_T5_TOKENS, limit))
        self._setup_vae()

    # --- basic facts -------------------------------------------------------------------------------------
    @property
    def unet(self) -> Any:
        raise HiresError(
            "FLUX has a transformer, not a UNet: this method needs UNet attention layers and does not support FLUX"
        )

    @property
    def denoiser_module(self) -> torch.nn.Module:
        return self.transformer

    @property
    def prediction_type(self) -> str:
        """The model predicts the flow velocity ``v = ε − x0`` (diffusers' name ``flow_prediction``)."""
        return "flow_prediction"

    @property
    def pixel_grid(self) -> int:
        """Canvas sides must be multiples of this many pixels (one 2×2-packed token: 16 px for FLUX.1)."""
        return self.vae_scale_factor * PATCH

    @property
    def native_sequence_length(self) -> int:
        """Image tokens of a native-size square canvas, ``(native latent side / 2)²`` (4096 for FLUX.1)."""
        return (self.native_latent // PATCH) ** 2

    @property
    def scheduler(self) -> Any:
        return self._scheduler

    @scheduler.setter
    def scheduler(self, value: Any) -> None:
        """Accept flow-matching schedulers; the SD-style Euler scheduler (``--scheduler euler``, hiresdiff's
        default) becomes the model's own flow-matching Euler; anything else is a one-line error."""
        from diffusers import EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler

        if not is_flow_scheduler(value):
            if not isinstance(value, EulerDiscreteScheduler):
                raise HiresError(
                    f"FLUX samples with flow matching; scheduler {type(value).__name__} does not apply — use "
                    "--scheduler euler or model-default"
                )
            base = self._base_scheduler_config
            value = FlowMatchEulerDiscreteScheduler.from_config(base)
        self._scheduler = value

    # --- scheduler ------------------------------------------------------------------------------------------
    def set_timesteps(self, steps: int) -> None:
        """FluxPipeline's schedule: sigmas ``linspace(1, 1/N, N)`` shifted with μ of the **native** sequence length.

        μ is skipped when the scheduler has no dynamic shifting (FLUX-schnell's static shift), and the sigmas when
        it derives them itself (``use_flow_sigmas``) or takes none.
        """
        sched = self.scheduler
        params = inspect.signature(sched.set_timesteps).parameters
        kwargs: dict[str, Any] = {}
        if "sigmas" in params and not sched.config.get("use_flow_sigmas", False):
            kwargs["sigmas"] = np.linspace(1.0, 1.0 / steps, steps)
        if "mu" in params and sched.config.get("use_dynamic_shifting", False):
            kwargs["mu"] = self.shift_mu
        sched.set_timesteps(steps, device=self.device, **kwargs)

    @property
    def shift_mu(self) -> float:
        """Timestep-shift μ of the native sequence length, used for every stage (SPEC §6)."""
        return shift_mu(self.native_sequence_length, self.scheduler.config)

    def sigma(self, t: torch.Tensor | float) -> float:
        """σ of timestep ``t`` on the current schedule (the current step's σ when ``t`` is the current step)."""
        sched = self.scheduler
        timesteps = sched.timesteps.detach().float().cpu()
        value = float(t)
        index = sched.step_index
        if index is None or index >= len(timesteps) or abs(float(timesteps[index]) - value) > 1e-4:
            index = int(torch.argmin((timesteps - value).abs()))
        return float(sched.sigmas[index])

    def add_noise(self, clean: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``x_t = (1 − σ_t)·clean + σ_t·noise`` — the scheduler's ``scale_noise`` (FlowMatch has no ``add_noise``).

        σ is read from ``t`` itself: diffusers' ``scale_noise`` ignores its timestep once a begin index is set and
        uses the scheduler's current step instead; both agree whenever ``t`` is the current step.
        """
        sigma = self.sigma(t)
        return (1.0 - sigma) * clean + sigma * noise

    def scale_input(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Flow matching feeds the latents to the model unscaled."""
        return x

    @property
    def init_noise_sigma(self) -> float:
        return 1.0

    # --- text --------------------------------------------------------------------------------------------
    def _prompt_limit(self) -> tuple[Any, int]:
        """T5 carries the prompt (CLIP only adds the pooled vector): ``max_sequence_length`` − its end token."""
        return self.pipe.tokenizer_2, self.max_sequence_length - 1

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str], negatives: list[str] | None, cfg: bool) -> PromptEmbeds:
        """T5 sequence embeddings in ``cond``, pooled CLIP in ``pooled_cond``; no unconditional rows.

        FLUX.1 is guidance-distilled (dev) or guidance-free (schnell): ``negatives`` and ``cfg`` are ignored.
        """
        with self.borrowed(*self.text_encoders()), quiet_text_libraries():
            cond, pooled, _text_ids = self.pipe.encode_prompt(
                prompt=prompts,
                prompt_2=None,
                device=self.device,
                num_images_per_prompt=1,
                max_sequence_length=self.max_sequence_length,
            )
        return PromptEmbeds(cond, None, pooled, None)

    # --- denoiser ----------------------------------------------------------------------------------------
    def flux_neighborhood_attention(
        self, latent_hw: tuple[int, int], generators: list[torch.Generator] | None
    ) -> AbstractContextManager[Any]:
        """ScaleDiff's neighborhood attention on every attention of the transformer while a ``latent_hw`` canvas
        is sampled (yields its :class:`~hiresdiff.patches.processors.NPAState`): diffusers processors here
        (:func:`hiresdiff.patches.attention_flux.flux_neighborhood_attention`); another backend hooks it its way."""
        from hiresdiff.patches.attention_flux import flux_neighborhood_attention

        return flux_neighborhood_attention(self, latent_hw, generators)

    def position(self, crop: tuple[int, int]) -> tuple[float, float]:
        """A view's top-left RoPE position in packed units from its crop corner in pixels (``pixels / 16``)."""
        unit = self.vae_scale_factor * PATCH
        return crop[0] / unit, crop[1] / unit

    def _forward_views(
        self, x: torch.Tensor, t: torch.Tensor, chunk: Chunk, offset: tuple[float, float], rule: GuidanceRule
    ) -> torch.Tensor:
        """One transformer call for same-size, same-position views (inputs ``x``): every branch of ``rule`` per
        view, rows branch-major; returns the unpacked velocity of all rows (float32)."""
        rows = list(branch_rows(rule, chunk))
        if any(getattr(req.embeds, f"pooled_{branch.text}") is None for branch, req, _ in rows):
            raise HiresError("FLUX needs pooled CLIP embeddings; encode prompts with the FLUX adapter")
        text = gather_rows([(getattr(req.embeds, branch.text), req.rows[i]) for branch, req, i in rows])
        pooled = gather_rows([(getattr(req.embeds, f"pooled_{b.text}"), req.rows[i]) for b, req, i in rows])
        scales = [req.guidance for _, req, _ in rows]
        text = text.to(self.device, self.dtype)
        self.call_info = call_rows(rule, chunk)
        guidance = None
        if self.guidance_distilled:
            guidance = torch.tensor(scales, device=self.device, dtype=torch.float32)
        model_in = torch.cat([x] * len(rule.branches))
        return self._velocity(FluxCall(model_in, t, text, pooled, guidance, offset))

    def _velocity(self, call: FluxCall) -> torch.Tensor:
        """The one transformer call of :meth:`_forward_views`: the velocity (unpacked, float32) of ``call``;
        another backend (ComfyUI's) replaces only this call."""
        model_in, t, text, pooled, guidance, offset = call
        _b, _c, h, w = model_in.shape
        timestep = t.to(self.device).reshape(-1)[:1].expand(model_in.shape[0]).to(self.dtype) / TIMESTEP_SCALE
        out = self.transformer(
            hidden_states=pack_latents(model_in.to(self.device, self.dtype)),
            timestep=timestep,
            guidance=guidance,
            pooled_projections=pooled.to(self.device, self.dtype),
            encoder_hidden_states=text,
            txt_ids=torch.zeros(text.shape[1], 3, device=self.device, dtype=self.dtype),
            img_ids=image_ids(h, w, offset, device=self.device, dtype=self.dtype),
            return_dict=False,
        )[0]
        return unpack_latents(out.float(), h, w)

    @torch.no_grad()
    def predict(self, requests: list[Request], t: torch.Tensor, max_batch: int) -> list[torch.Tensor]:
        """Velocity predictions for every request's views (canvas layout in and out).

        Views of equal latent size, canvas position, timestep (:attr:`Request.timestep`, default ``t``) and guidance
        rule share transformer calls of at most ``max_batch`` samples counting every branch of the rule (FLUX's
        default rule has one branch: no doubling).
        """
        for req in requests:
            check_even(*req.x.shape[-2:])
        step = step_value(t)

        def key(req: Request, i: int) -> tuple[Any, ...]:
            return (*req.x.shape[-2:], *self.position(req.crops[i]), timestep_key(req, step))

        calls = self.group_calls(requests, max_batch, key)

        def compute(call: tuple[Any, Chunk]) -> torch.Tensor:
            found, chunk = call
            rule = chunk[0][0].guidance_rule
            x = torch.stack([req.x[i] for req, i in chunk])
            at = call_timestep(found[-1], chunk, t)
            return self.guided(rule, chunk, self._forward_views(x, at, chunk, found[2:4], rule))

        self.run_calls([chunk for _, chunk in calls], calls, compute)
        return [torch.stack(r.outputs) for r in requests]

    # --- parametrisation ---------------------------------------------------------------------------------
    def to_x0(self, pred: torch.Tensor, x_in: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``x0 = x_t − σ_t·v`` (flow matching, ``x_in`` = ``x_t``)."""
        return x_in - self.sigma(t) * pred

    def from_x0(self, x0: torch.Tensor, x_in: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``v = (x_t − x0)/σ_t`` (inverse of :meth:`to_x0`)."""
        return (x_in - x0) / self.sigma(t)

    def structure_gamma(self, t: torch.Tensor, first: torch.Tensor) -> float:
        """ScaleDiff's structure-guidance weight for flow matching: ``γ_t = σ_t`` (SPEC §6)."""
        return self.sigma(t)
