"""One interface over diffusers SD1.x/2.x and SDXL pipelines.

Methods never touch diffusers internals: they ask the adapter to encode prompts, to predict for a batch of latent
views (the branches of a guidance rule — :mod:`hiresdiff.models.guidance`, classifier-free guidance by default — and
per-view SDXL micro-conditioning inside, chunked to a batch budget), to convert predictions to x̂0 and back, and to
encode/decode with the tiling of SPEC §2.4.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Hashable, Iterator
from contextlib import AbstractContextManager, contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch

from hiresdiff import placement
from hiresdiff.config import model_sampling_defaults
from hiresdiff.errors import HiresError, require
from hiresdiff.models.guidance import Branch, GuidanceRule, default_rule
from hiresdiff.models.parametrization import alpha_bar, prediction_from_x0, x0_from_prediction
from hiresdiff.models.self_attention import (
    ChooseObserver,
    CrossAttentionObserver,
    WrapSelfAttention,
    diffusers_cross_attention,
    diffusers_self_attention,
)
from hiresdiff.ops.tiling import tiled_apply
from hiresdiff.parallel import Serial, ViewParallel


@contextmanager
def quiet_text_libraries() -> Iterator[None]:
    """Silence transformers' and diffusers' over-long-prompt messages (they print the whole text, twice):
    hiresdiff says it once (:meth:`ModelAdapter.truncated`)."""
    import logging

    names = ("transformers", "diffusers")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


@dataclass
class PromptEmbeds:
    """Text conditioning, one row per prompt; ``uncond`` rows are absent without classifier-free guidance."""

    cond: torch.Tensor
    uncond: torch.Tensor | None = None
    pooled_cond: torch.Tensor | None = None
    pooled_uncond: torch.Tensor | None = None


def concat_embeds(parts: list[PromptEmbeds]) -> PromptEmbeds:
    """Stack the rows of several embedding tables into one."""

    def cat(name: str) -> torch.Tensor | None:
        values = [getattr(p, name) for p in parts]
        return None if any(v is None for v in values) else torch.cat(values)

    return PromptEmbeds(cat("cond"), cat("uncond"), cat("pooled_cond"), cat("pooled_uncond"))  # type: ignore[arg-type]


@dataclass
class Request:
    """A batch of same-size latent views to predict: model inputs, prompt row per view, crop corner (pixels).

    ``rule`` says which branches run per view and how they combine (``None``: :data:`~hiresdiff.models.guidance.CFG`
    when ``embeds`` has unconditional rows, else :data:`~hiresdiff.models.guidance.NO_GUIDANCE`; resolved on
    construction). ``timestep`` is the timestep the model is given for these views (``None``: the step's own; Upsample
    Guidance predicts its low-resolution canvas at τ in the same step): requests at other timesteps run in calls of
    their own. ``control_weight`` multiplies the run's ControlNet scale for these views (0: they opt out of the
    ControlNet and need no ``control``; AccDiffusion v2 steers its local views only): requests of other weights still
    share calls, since residuals scale linearly (:meth:`ModelAdapter._control_residuals`).
    """

    x: torch.Tensor
    rows: list[int]
    crops: list[tuple[int, int]]
    embeds: PromptEmbeds
    guidance: float
    size: tuple[int, int]  # SDXL original/target size (pixels, h × w)
    samples: list[int] = field(default_factory=list)  # canvas sample of each view (attention capture)
    outputs: list[torch.Tensor] = field(default_factory=list)
    control: torch.Tensor | None = None  # ControlNet condition per view (n, 3, h·f, w·f) in [0, 1]
    rule: GuidanceRule | None = None
    timestep: torch.Tensor | None = None
    control_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.rule is None:
            self.rule = default_rule(self.embeds.uncond is not None)
        require(
            self.embeds.uncond is not None or not self.rule.needs_uncond,
            f"guidance rule {self.rule.name!r} needs unconditional text embeddings (classifier-free guidance on: "
            "guidance > 1 with an SD/SDXL model)",
        )

    @property
    def guidance_rule(self) -> GuidanceRule:
        """The resolved :attr:`rule`."""
        assert self.rule is not None  # resolved in __post_init__
        return self.rule


#: one chunk of views predicted in one denoiser call: (request, view index) pairs, all under the same rule
Chunk = list[tuple[Request, int]]


def timestep_key(req: Request, step: Callable[[], float]) -> float | None:
    """What a request's timestep adds to its views' batching key: ``None`` at the step's own timestep (given or
    not, so every call is what it is without per-request timesteps), else the value (``step`` is read only then)."""
    if req.timestep is None:
        return None
    value = float(req.timestep)
    return None if value == step() else value


def step_value(t: torch.Tensor) -> Callable[[], float]:
    """``float(t)``, read once and only when asked (it waits for the device)."""
    return functools.cache(lambda: float(t))


def call_timestep(key: float | None, chunk: Chunk, t: torch.Tensor) -> torch.Tensor:
    """The timestep of a denoiser call whose views have timestep key ``key`` (:func:`timestep_key`): the step's
    ``t`` itself, or the views' own timestep."""
    own = chunk[0][0].timestep
    return t if key is None or own is None else own.to(t.device).reshape(t.shape)


def branch_rows(rule: GuidanceRule, chunk: Chunk) -> Iterator[tuple[Branch, Request, int]]:
    """The rows of a denoiser call, branch-major: every view of ``chunk`` for the first branch, then the second…"""
    for branch in rule.branches:
        for req, i in chunk:
            yield branch, req, i


def call_rows(rule: GuidanceRule, chunk: Chunk) -> list[tuple[int, str]]:
    """``(canvas sample or −1, branch name)`` of every row of a call (:attr:`ModelAdapter.call_info`)."""
    return [(req.samples[i] if req.samples else -1, branch.name) for branch, req, i in branch_rows(rule, chunk)]


#: set by the cost model while it estimates (:class:`hiresdiff.cost.replay.SegmentReplay`): a decode it has seen
#: in an earlier estimate of the same request is booked again rather than run (its values steer nothing there)
DECODE_REPLAY: ContextVar[Any] = ContextVar("hiresdiff_decode_replay", default=None)


def gather_rows(pieces: list[tuple[torch.Tensor, int]]) -> torch.Tensor:
    """Row ``row`` of each ``source`` of ``pieces`` (``(source, row)``), stacked in order: the conditioning rows of a
    denoiser call, taken with one ``index_select`` per run of consecutive rows of one tensor rather than one per row
    (a call of many views gathers its prompts in a few operations; the values are the same)."""
    runs: list[tuple[torch.Tensor, list[int]]] = []
    for source, row in pieces:
        if runs and runs[-1][0] is source:
            runs[-1][1].append(row)
        else:
            runs.append((source, [row]))
    parts = [source.index_select(0, torch.tensor(rows, device=source.device)) for source, rows in runs]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


@dataclass
class ControlRows:
    """The rows of one denoiser call that a ControlNet sees: model inputs ``model_in`` at timestep ``t`` (the
    backend's own convention: diffusers' timestep, ComfyUI's σ), text ``context``, conditions ``cond`` in [0, 1]
    (one per row), the residuals' ``scale`` and the call's other conditioning ``kwargs`` (SDXL's)."""

    model_in: torch.Tensor
    t: torch.Tensor
    context: torch.Tensor
    cond: torch.Tensor
    scale: float
    kwargs: dict[str, Any]


#: a ControlNet call's residual tensors and how they become the UNet call's keywords
ControlResiduals = tuple[list[torch.Tensor], Callable[[list[torch.Tensor]], dict[str, Any]]]


def _rows_of(value: Any, rows: torch.Tensor) -> Any:
    """The rows ``rows`` of a call's conditioning: a tensor, or a dict of them (SDXL's ``added_cond_kwargs``:
    pooled text, time ids)."""
    if isinstance(value, torch.Tensor):
        return value.index_select(0, rows.to(value.device))
    return {name: _rows_of(item, rows) for name, item in value.items()}


class ModelAdapter:
    """Adapter over a loaded diffusers SD or SDXL pipeline (``family`` decides the conditioning)."""

    #: the denoiser's (device, dtype), read by :meth:`refresh_placement`
    _placement: tuple[torch.device, torch.dtype] | None = None
    #: low-VRAM mode: text encoders and VAE wait on the CPU (:meth:`set_offload`)
    offload: bool = False
    #: otherwise, on an accelerator: the text encoders wait on the CPU (:func:`~hiresdiff.placement.parks_text`)
    park_text: bool = False
    #: the modules :meth:`borrowed` has on the device now, outermost block first
    _lent: tuple[torch.nn.Module, ...] = ()
    #: how the step's denoiser calls are run: here, or shared out over ranks (:mod:`hiresdiff.parallel`)
    parallel: Serial | ViewParallel = Serial()
    #: ControlNet of the generation in progress and its conditioning scale (:meth:`use_controlnet`)
    controlnet: torch.nn.Module | None = None
    control_scale: float = 1.0

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe
        self.unet = pipe.unet
        self.vae = pipe.vae
        self.scheduler = pipe.scheduler
        self.family = "sdxl" if hasattr(pipe, "text_encoder_2") else "sd"
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.latent_channels = int(self.unet.config.in_channels)
        self.native_size = int(self.unet.config.sample_size) * self.vae_scale_factor
        self.native_latent = int(self.unet.config.sample_size)
        self._setup_vae()

    @property
    def sampling_defaults(self) -> dict[str, Any]:
        """The model's own steps/guidance defaults (FLUX-dev 30/3.5, schnell 4/0; none for SD/SDXL)."""
        return model_sampling_defaults(self.family, bool(getattr(self, "guidance_distilled", True)))

    def _setup_vae(self) -> None:
        """Run the VAE in float32 when its config asks for upcasting (SDXL's fp16 VAE overflows)."""
        upcast = bool(getattr(self.vae.config, "force_upcast", False)) and self.vae.dtype == torch.float16
        self.vae_dtype = torch.float32 if upcast else self.vae.dtype
        #: (canvas sample, guidance branch name) of each row of the denoiser call in progress (attention capture,
        #: branch-aware patches); rows are branch-major (:func:`branch_rows`)
        self.call_info: list[tuple[int, str]] = []
        if upcast:
            self.vae.to(torch.float32)

    # --- basic facts -------------------------------------------------------------------------------------
    @property
    def denoiser_module(self) -> torch.nn.Module:
        """The UNet (FLUX: the transformer)."""
        return self.unet

    def refresh_placement(self) -> tuple[torch.device, torch.dtype]:
        """Read the denoiser's device and dtype again (after the pipeline was moved or cast).

        They are cached because diffusers' ``ModelMixin.dtype`` walks every parameter (~10 ms for SDXL), which
        adds up when read per denoiser call; :meth:`HiresPipeline.run` refreshes them once per generation.
        """
        module = self.denoiser_module
        self._placement = (module.device, module.dtype)
        return self._placement

    def _placed(self) -> tuple[torch.device, torch.dtype]:
        return self._placement or self.refresh_placement()

    @property
    def device(self) -> torch.device:
        return self._placed()[0]

    @property
    def dtype(self) -> torch.dtype:
        return self._placed()[1]

    @property
    def pixel_grid(self) -> int:
        """Canvas sides must be multiples of this many pixels (one latent cell for UNet models)."""
        return self.vae_scale_factor

    @property
    def text_width(self) -> int | None:
        """Width of the text embeddings the denoiser attends to (a ControlNet must take the same); ``None``: FLUX."""
        return int(self.unet.config.cross_attention_dim)

    @property
    def prediction_type(self) -> str:
        return str(self.scheduler.config.get("prediction_type", "epsilon"))

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler.config.num_train_timesteps)

    # --- low-VRAM mode -------------------------------------------------------------------------------------
    def _offloadable(self) -> list[torch.nn.Module]:
        """The text encoders and the VAE (what ``low_vram`` keeps on the CPU between uses)."""
        names = ("text_encoder", "text_encoder_2", "vae")
        return [m for m in (getattr(self.pipe, n, None) for n in names) if isinstance(m, torch.nn.Module)]

    def _denoising(self) -> list[torch.nn.Module]:
        """The modules of a denoiser call — the denoiser and the active ControlNet — which low-VRAM mode moves off
        the device while a borrowed module runs (shape-only stand-ins of the cost model are not modules: skipped)."""
        return [m for m in (self.denoiser_module, self.controlnet) if isinstance(m, torch.nn.Module)]

    def set_offload(self, on: bool) -> None:
        """Low-VRAM mode (``on``): the text encoders and the VAE wait on the CPU and :meth:`borrowed` brings each in
        only while it runs, in place of the denoiser. Otherwise, on an accelerator, only the text encoders wait on
        the CPU and come to the device for the prompt (:func:`~hiresdiff.placement.parks_text`), beside the rest.
        Placement is left alone while the mode does not change, so a pipeline the caller arranged stays as it is."""
        park = not on and placement.parks_text(self.device)
        if (on, park) == (self.offload, self.park_text):
            return
        self.offload, self.park_text = on, park
        waiting = self._waiting()
        for module in self._offloadable():
            module.to("cpu" if any(module is m for m in waiting) else self.device)

    def _waiting(self) -> list[torch.nn.Module]:
        """The modules whose home is the CPU in the current mode (:meth:`set_offload`)."""
        return self._offloadable() if self.offload else self.text_encoders() if self.park_text else []

    def start_offloaded(self, device: str | torch.device, low_vram: bool = True) -> None:
        """A pipeline loaded on the CPU goes to ``device`` as a run in its mode keeps it: low-VRAM mode only the
        denoiser, the text encoders and the VAE stay on the CPU until borrowed; otherwise everything but the text
        encoders where they wait on the CPU (:meth:`set_offload`). Loading the whole pipeline onto the device first
        would put every weight there at once (FLUX.1-dev: 31 GiB in bfloat16, more than the 24 GiB low-VRAM mode
        fits)."""
        moving = "the denoiser"
        try:
            self.denoiser_module.to(device)
            if not low_vram:
                for module in self._offloadable():
                    if not placement.parks_text(device) or module is self.vae:
                        moving = "the VAE" if module is self.vae else "a text encoder"
                        module.to(device)
        except (RuntimeError, AssertionError, ValueError) as error:
            first = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise HiresError(f"cannot move {moving} to device {str(device)!r}: {first}") from error
        self.offload, self.park_text = low_vram, not low_vram and placement.parks_text(device)
        self.refresh_placement()

    @contextmanager
    def borrowed(self, *modules: torch.nn.Module) -> Iterator[None]:
        """In low-VRAM mode, ``modules`` on the denoiser's device for the block and back on the CPU afterwards;
        with :attr:`park_text`, the text encoders among them, beside everything else.

        Only one large component is on the device at a time: the denoiser and the ControlNet step off to the CPU
        for the block and come back after it (SDXL: the 4.8 GiB float16 UNet is not beside the float32 VAE
        decoding a tile; FLUX: the 22 GiB transformer is not beside the 9 GiB T5-XXL). Each round trip copies the
        denoiser over the bus twice, so it is paid once per block — a whole tiled decode, the prompt encoding —
        never per tile. Blocks nest: an inner block moves only what is not on the device yet, so a caller may hold
        the VAE over a decode → resize → encode step and pay one round trip for it.
        """
        if not (self.offload or self.park_text):
            yield
            return
        device = self.device  # the compute device, read before the denoiser leaves it
        outer = not self._lent
        waiting = self._waiting()
        fresh = [
            m
            for m in dict.fromkeys(modules)
            if any(m is w for w in waiting) and all(m is not lent for lent in self._lent)
        ]
        parked = self._denoising() if outer and self.offload else []
        self._lent = (*self._lent, *fresh)
        try:  # a move that fails (out of memory) still puts everything back
            for module in parked:
                module.to("cpu")
            for module in fresh:
                module.to(device)
            yield
        finally:
            self._lent = self._lent[: len(self._lent) - len(fresh)]
            for module in fresh:
                module.to("cpu")
            for module in parked:
                module.to(device)
            if outer and device.type == "cuda":
                torch.cuda.empty_cache()

    def text_encoders(self) -> list[torch.nn.Module]:
        """The pipeline's text encoders (borrowed together while prompts are encoded)."""
        return [m for m in self._offloadable() if m is not self.vae]

    # --- scheduler ------------------------------------------------------------------------------------------
    def set_timesteps(self, steps: int) -> None:
        """Prepare ``self.scheduler`` for ``steps`` inference steps."""
        self.scheduler.set_timesteps(steps, device=self.device)

    def add_noise(self, clean: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``scheduler.add_noise`` at timestep ``t`` (σ-space or VP latents, as the scheduler keeps them)."""
        return self.scheduler.add_noise(clean, noise, t.reshape(1).expand(clean.shape[0]))

    def scale_input(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The model input for latents ``x`` at ``t`` (``scheduler.scale_model_input``)."""
        return self.scheduler.scale_model_input(x, t)

    @property
    def init_noise_sigma(self) -> float:
        return float(self.scheduler.init_noise_sigma)

    # --- text --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompt(self, prompts: list[str], negatives: list[str] | None, cfg: bool) -> PromptEmbeds:
        """Encode prompts (and negatives when ``cfg``) through the pipeline's own ``encode_prompt``."""
        with self.borrowed(*self.text_encoders()), quiet_text_libraries():
            out = self.pipe.encode_prompt(
                prompt=prompts,
                device=self.device,
                num_images_per_prompt=1,
                do_classifier_free_guidance=cfg,
                negative_prompt=negatives,
            )
        if self.family == "sdxl":
            cond, uncond, pooled, pooled_uncond = out
            return PromptEmbeds(cond, uncond if cfg else None, pooled, pooled_uncond if cfg else None)
        cond, uncond = out
        return PromptEmbeds(cond, uncond if cfg else None)

    def count_tokens(self, text: str) -> int:
        """Number of tokens of ``text`` without start/end tokens (the first tokenizer's)."""
        with quiet_text_libraries():
            return len(self.pipe.tokenizer(text, add_special_tokens=False).input_ids)

    def _prompt_limit(self) -> tuple[Any, int]:
        """The tokenizer that truncates prompts and how many content tokens it keeps (CLIP: 77 − start − end)."""
        tokenizer = self.pipe.tokenizer
        return tokenizer, int(tokenizer.model_max_length) - 2

    def truncated(self, prompt: str) -> tuple[int, str] | None:
        """``(tokens dropped, the text the model sees)`` when ``prompt`` is longer than the text encoder takes."""
        tokenizer, keep = self._prompt_limit()
        with quiet_text_libraries():
            ids = tokenizer(prompt, add_special_tokens=False).input_ids
        if len(ids) <= keep:
            return None
        return len(ids) - keep, tokenizer.decode(ids[:keep]).strip()

    # --- denoiser ----------------------------------------------------------------------------------------
    def _time_ids(self, views: list[tuple[tuple[int, int], tuple[int, int]]]) -> torch.Tensor:
        """SDXL ``add_time_ids`` of views given as ``(size, crop)``: (orig_h, orig_w, crop_top, crop_left, target_h,
        target_w) per view."""
        rows = [[size[0], size[1], top, left, size[0], size[1]] for size, (top, left) in views]
        return torch.tensor(rows, dtype=self.dtype, device=self.device)

    def _forward(self, x: torch.Tensor, t: torch.Tensor, chunk: Chunk, rule: GuidanceRule) -> torch.Tensor:
        """One UNet call for the views of ``chunk`` (same spatial size, inputs ``x``): every branch of ``rule`` per
        view, rows branch-major; returns the raw outputs of all rows (float32)."""
        rows = list(branch_rows(rule, chunk))
        context = gather_rows([(getattr(req.embeds, branch.text), req.rows[i]) for branch, req, i in rows])
        kwargs: dict[str, Any] = {}
        if self.family == "sdxl":
            pooled = gather_rows([(getattr(req.embeds, f"pooled_{b.text}"), req.rows[i]) for b, req, i in rows])
            time_ids = self._time_ids([(req.size, req.crops[i]) for _, req, i in rows])
            kwargs["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": time_ids}
        self.call_info = call_rows(rule, chunk)
        model_in = torch.cat([x] * len(rule.branches)).to(self.dtype)
        if self.controlnet is not None:
            kwargs.update(self._control_residuals(model_in, t, context, chunk, len(rule.branches), kwargs))
        out = self.unet(model_in, t, encoder_hidden_states=context, return_dict=False, **kwargs)[0]
        return out.float()

    def _control_residuals(
        self,
        model_in: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor,
        chunk: Chunk,
        branches: int,
        kwargs: dict[str, Any],
    ) -> dict[str, Any]:
        """ControlNet residuals for the views of one UNet call: each view's own condition (every guidance branch
        sees it, as both halves do in diffusers' ControlNet pipelines without guess mode), scaled by
        :attr:`control_scale` times the view's :attr:`Request.control_weight`; returned as the UNet call's keywords.

        The ControlNet multiplies its residuals by the scale it is given, so a per-row weight is the same product
        done row by row: views of one weight pass it in the scale (bit for bit the plain call when every weight is
        1), views of several get the weights applied per row. Views of weight 0 are left out of the ControlNet call
        and get zero residuals (``x + 0`` leaves their UNet rows as without a ControlNet); a call whose views all
        have weight 0 runs no ControlNet. The ControlNet call itself is the backend's (:meth:`_controlnet_call`)."""
        weights = [req.control_weight for req, _ in chunk]
        used = [k for k, w in enumerate(weights) if w != 0.0]
        if not used:
            return {}
        if any(chunk[k][0].control is None for k in used):
            raise RuntimeError("a denoiser request carries no ControlNet condition while a ControlNet is active")
        cond = torch.cat([chunk[k][0].control[chunk[k][1] : chunk[k][1] + 1] for k in used])  # type: ignore[index]
        cond = torch.cat([cond] * branches)
        rows = None
        if len(used) < len(chunk):  # branch-major rows of the views that use the ControlNet
            rows = torch.tensor([b * len(chunk) + k for b in range(branches) for k in used], device=model_in.device)
            model_in, context = model_in.index_select(0, rows), context.index_select(0, rows.to(context.device))
            kwargs = {name: _rows_of(value, rows) for name, value in kwargs.items()}  # SDXL's conditioning rows
        distinct = {weights[k] for k in used}
        scale = self.control_scale * (weights[used[0]] if len(distinct) == 1 else 1.0)
        residuals, pack = self._controlnet_call(ControlRows(model_in, t, context, cond, scale, kwargs))
        if len(distinct) > 1:
            per_row = torch.tensor([weights[k] for _ in range(branches) for k in used], dtype=torch.float32)
            residuals = [(r * per_row.to(r.device).view(-1, 1, 1, 1)).to(r.dtype) for r in residuals]
        if rows is not None:
            total = len(chunk) * branches
            residuals = [r.new_zeros((total, *r.shape[1:])).index_copy_(0, rows.to(r.device), r) for r in residuals]
        return pack(residuals)

    def _controlnet_call(self, rows: ControlRows) -> ControlResiduals:
        """The active ControlNet on ``rows``, its residuals multiplied by ``rows.scale``: the residual tensors and
        how they become the UNet call's keywords (here: diffusers' down-block and mid-block residuals)."""
        cond = rows.cond
        if not cond.is_meta:  # the cost model's shape-only conditions stay on the meta device
            cond = cond.to(self.device, self.controlnet.dtype)  # type: ignore[union-attr]
        down, mid = self.controlnet(  # type: ignore[misc]
            rows.model_in,
            rows.t,
            encoder_hidden_states=rows.context,
            controlnet_cond=cond,
            conditioning_scale=rows.scale,
            return_dict=False,
            **rows.kwargs,
        )

        def pack(residuals: list[torch.Tensor]) -> dict[str, Any]:
            return {"down_block_additional_residuals": residuals[:-1], "mid_block_additional_residual": residuals[-1]}

        return [*down, mid], pack

    def self_attention_patched(self, wrap: WrapSelfAttention) -> AbstractContextManager[None]:
        """Every UNet self-attention layer (``attn1``) runs ``wrap(module, processor, level)`` in place of its
        diffusers processor while the block runs — also the active ControlNet's, whose encoder copy sees the same
        canvas (``module``: the UNet or the ControlNet; :mod:`hiresdiff.models.self_attention`)."""
        require(self.family != "flux", "self-attention patches of UNet layers need an SD or SDXL model")
        return diffusers_self_attention([m for m in (self.unet, self.controlnet) if m is not None], wrap)

    def cross_attention_observed(self, choose: ChooseObserver) -> AbstractContextManager[CrossAttentionObserver]:
        """The UNet's down/up-block cross-attention layers (``attn2``) at the level ``choose`` picks report their calls
        to its observer while the block runs, the model's output unchanged (diffusers processors here;
        :mod:`hiresdiff.models.self_attention`)."""
        require(self.family != "flux", "cross-attention of UNet layers needs an SD or SDXL model")
        return diffusers_cross_attention(self.unet, choose)

    @contextmanager
    def use_controlnet(self, controlnet: torch.nn.Module | None, scale: float) -> Iterator[None]:
        """Denoiser calls add ``controlnet``'s residuals (scaled by ``scale``) inside the block."""
        previous = (self.controlnet, self.control_scale)
        self.controlnet, self.control_scale = controlnet, float(scale)
        try:
            yield
        finally:
            self.controlnet, self.control_scale = previous

    @torch.no_grad()
    def predict(self, requests: list[Request], t: torch.Tensor, max_batch: int) -> list[torch.Tensor]:
        """Guided predictions for every request, batching views of equal size, timestep and guidance rule together.

        Views from different requests (local views, dilated samples, …) share UNet calls when their spatial sizes,
        timesteps (:attr:`Request.timestep`, default ``t``) and rules match; each call holds at most ``max_batch``
        UNet samples counting every branch of the rule (a view whose branches alone exceed it runs them in several
        calls, :meth:`GuidanceRule.parts`).
        """
        step = step_value(t)
        calls = self.group_calls(requests, max_batch, lambda req, i: (*req.x.shape[-2:], timestep_key(req, step)))

        def compute(call: tuple[Any, Chunk]) -> torch.Tensor:
            key, chunk = call
            rule = chunk[0][0].guidance_rule
            x = torch.stack([req.x[i] for req, i in chunk])
            at = call_timestep(key[-1], chunk, t)
            out = torch.cat([self._forward(x, at, chunk, part) for part in rule.parts(max_batch)])
            return self.guided(rule, chunk, out)

        self.run_calls([chunk for _, chunk in calls], calls, compute)
        return [torch.stack(r.outputs) for r in requests]

    @staticmethod
    def group_calls(
        requests: list[Request], max_batch: int, key: Callable[[Request, int], Hashable]
    ) -> list[tuple[Hashable, Chunk]]:
        """The step's denoiser calls: views grouped by ``key(request, view)`` and guidance rule (in first-seen
        order), each group cut into chunks of :meth:`GuidanceRule.per_call` views; clears every request's outputs.
        """
        groups: dict[tuple[Hashable, GuidanceRule], Chunk] = {}
        for req in requests:
            req.outputs = [torch.empty(0)] * req.x.shape[0]
            for i in range(req.x.shape[0]):
                groups.setdefault((key(req, i), req.guidance_rule), []).append((req, i))
        calls = []
        for (group_key, rule), group in groups.items():
            size = rule.per_call(max_batch)
            calls += [(group_key, group[s : s + size]) for s in range(0, len(group), size)]
        return calls

    @staticmethod
    def guided(rule: GuidanceRule, chunk: Chunk, out: torch.Tensor) -> torch.Tensor:
        """One prediction per view of ``chunk`` from the call's branch-major outputs ``out`` (``rule.combine``
        with each view's guidance scale)."""
        return rule.apply(out, [req.guidance for req, _ in chunk])

    def run_calls(
        self,
        chunks: list[Chunk],
        calls: list[Any],
        compute: Callable[[Any], torch.Tensor],
    ) -> None:
        """Run the step's denoiser ``calls`` (one per chunk of views) — shared out over the ranks when
        :attr:`parallel` is a :class:`~hiresdiff.parallel.ViewParallel` — and store each view's prediction."""

        def shape(k: int) -> tuple[int, ...]:
            req, _ = chunks[k][0]
            return (len(chunks[k]), *req.x.shape[1:])

        outs = self.parallel.map(list(range(len(calls))), lambda k: compute(calls[k]), shape)
        for chunk, out in zip(chunks, outs, strict=True):
            for (req, i), pred in zip(chunk, out, strict=True):
                req.outputs[i] = pred

    # --- parametrisation ---------------------------------------------------------------------------------
    def to_x0(self, pred: torch.Tensor, x_in: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x̂0 from the model's output at timestep ``t`` (``x_in`` = scaled model input)."""
        return x0_from_prediction(pred, x_in, alpha_bar(self.scheduler, t), self.prediction_type)

    def from_x0(self, x0: torch.Tensor, x_in: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The model output that corresponds to ``x0`` at timestep ``t`` (inverse of :meth:`to_x0`)."""
        return prediction_from_x0(x0, x_in, alpha_bar(self.scheduler, t), self.prediction_type)

    def structure_gamma(self, t: torch.Tensor, first: torch.Tensor) -> float:
        """ScaleDiff's structure-guidance weight ``γ_t = (1 − ᾱ_t)/(1 − ᾱ_τ)`` (τ = the stage's first timestep)."""
        return (1.0 - alpha_bar(self.scheduler, t)) / (1.0 - alpha_bar(self.scheduler, first))

    # --- VAE ---------------------------------------------------------------------------------------------
    def _vae_factors(self) -> tuple[float, float]:
        cfg = self.vae.config
        return float(cfg.scaling_factor), float(getattr(cfg, "shift_factor", None) or 0.0)

    def _tile_geometry(self) -> tuple[int, int]:
        """Latent core ``w/4`` and context margin ``3w/8`` (SPEC §2.4), ``w`` = native latent side."""
        return max(1, self.native_latent // 4), max(1, (3 * self.native_latent) // 8)

    def _vae_decode(self, z: torch.Tensor) -> torch.Tensor:
        """The VAE's images (B, 3, H·f, W·f) in about [−1, 1], float32, of raw (unscaled) latents ``z``."""
        return self.vae.decode(z, return_dict=False)[0].float()

    def _vae_encode(self, x: torch.Tensor) -> torch.Tensor:
        """Raw latents (the posterior mean, float32) of images ``x`` (B, 3, H, W) in [−1, 1]."""
        return self.vae.encode(x).latent_dist.mean.float()

    @staticmethod
    def _tiles(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
        """The VAE call ``fn`` for one (tiled) pass: in the cost model's estimates, tiles that repeat the previous
        one are booked again rather than run (:meth:`hiresdiff.cost.replay.SegmentReplay.repeating`)."""
        replay = DECODE_REPLAY.get()
        return fn if replay is None else replay.repeating(fn)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, tile_area: int | None, *, clamp: bool = True) -> torch.Tensor:
        """Latents → images (float32, on CPU), clamped to [−1, 1] unless ``clamp=False`` (pixel-space methods
        resample the raw VAE output first); tiled when the image area exceeds ``tile_area`` px.

        In the cost model's estimates a decode seen before (same latents' layout, settings and bytes alive) is
        booked again instead of run (:data:`DECODE_REPLAY`)."""
        replay = DECODE_REPLAY.get()
        if replay is not None:
            key = ("decode", id(self), tuple(latents.shape), latents.dtype, tile_area, clamp, self.vae_dtype)
            return replay.run(key, self._decode, latents, tile_area, clamp)
        return self._decode(latents, tile_area, clamp)

    def _decode(self, latents: torch.Tensor, tile_area: int | None, clamp: bool) -> torch.Tensor:
        scale, shift = self._vae_factors()
        z = (latents / scale + shift).to(self.device, self.vae_dtype)
        run = self._tiles(self._vae_decode)
        area = z.shape[-2] * z.shape[-1] * self.vae_scale_factor**2
        with self.borrowed(self.vae):
            if tile_area is not None and area > tile_area:
                core, margin = self._tile_geometry()
                images = tiled_apply(z, run, core, margin, float(self.vae_scale_factor))
            else:
                images = run(z)
        return (images.clamp(-1, 1) if clamp else images).cpu()

    @torch.no_grad()
    def encode(self, images: torch.Tensor, tile_area: int | None) -> torch.Tensor:
        """Images in [−1, 1] → latents (posterior mean × scaling factor); tiled like :meth:`decode`."""
        scale, shift = self._vae_factors()
        x = images.to(self.device, self.vae_dtype)
        run = self._tiles(self._vae_encode)
        with self.borrowed(self.vae):
            if tile_area is not None and x.shape[-2] * x.shape[-1] > tile_area:
                core, margin = self._tile_geometry()
                f = self.vae_scale_factor
                z = tiled_apply(x, run, core * f, margin * f, 1.0 / f)
            else:
                z = run(x)
        return (z - shift) * scale
