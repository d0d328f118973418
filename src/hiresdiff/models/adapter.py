"""One interface over diffusers SD1.x/2.x and SDXL pipelines.

Methods never touch diffusers internals: they ask the adapter to encode prompts, to predict for a batch of latent
views (classifier-free guidance and per-view SDXL micro-conditioning inside, chunked to a batch budget), to convert
predictions to x̂0 and back, and to encode/decode with the tiling of SPEC §2.4.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from hiresdiff.config import model_sampling_defaults
from hiresdiff.models.parametrization import alpha_bar, prediction_from_x0, x0_from_prediction
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
    """A batch of same-size latent views to predict: model inputs, prompt row per view, crop corner (pixels)."""

    x: torch.Tensor
    rows: list[int]
    crops: list[tuple[int, int]]
    embeds: PromptEmbeds
    guidance: float
    size: tuple[int, int]  # SDXL original/target size (pixels, h × w)
    samples: list[int] = field(default_factory=list)  # canvas sample of each view (attention capture)
    outputs: list[torch.Tensor] = field(default_factory=list)
    control: torch.Tensor | None = None  # ControlNet condition per view (n, 3, h·f, w·f) in [0, 1]


class ModelAdapter:
    """Adapter over a loaded diffusers SD or SDXL pipeline (``family`` decides the conditioning)."""

    #: the denoiser's (device, dtype), read by :meth:`refresh_placement`
    _placement: tuple[torch.device, torch.dtype] | None = None
    #: low-VRAM mode: text encoders and VAE wait on the CPU (:meth:`set_offload`)
    offload: bool = False
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
        #: (canvas sample, conditional branch?) of each row of the denoiser call in progress (attention capture)
        self.call_info: list[tuple[int, bool]] = []
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

    def set_offload(self, on: bool) -> None:
        """Keep the text encoders and the VAE on the CPU, moving each to the denoiser's device only while it runs
        (``on``); turning it off brings them back to the denoiser's device. Placement is left alone while the mode
        does not change, so a pipeline the caller arranged stays as it is."""
        if on == self.offload:
            return
        self.offload = on
        home = torch.device("cpu") if on else self.device
        for module in self._offloadable():
            module.to(home)

    @contextmanager
    def borrowed(self, *modules: torch.nn.Module) -> Iterator[None]:
        """In low-VRAM mode, ``modules`` on the denoiser's device for the block, back on the CPU afterwards."""
        if not self.offload:
            yield
            return
        for module in modules:
            module.to(self.device)
        try:
            yield
        finally:
            for module in modules:
                module.to("cpu")
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def text_encoders(self) -> list[torch.nn.Module]:
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
    def _time_ids(self, size: tuple[int, int], crops: list[tuple[int, int]]) -> torch.Tensor:
        """SDXL ``add_time_ids`` per view: (orig_h, orig_w, crop_top, crop_left, target_h, target_w)."""
        rows = [[size[0], size[1], top, left, size[0], size[1]] for top, left in crops]
        return torch.tensor(rows, dtype=self.dtype, device=self.device)

    def _forward(self, x: torch.Tensor, t: torch.Tensor, reqs: list[tuple[Request, slice]], cfg: bool) -> torch.Tensor:
        """One UNet call for views gathered from several requests (same spatial size)."""
        halves = ["uncond", "cond"] if cfg else ["cond"]
        text, pooled, time_ids = [], [], []
        for half in halves:
            for req, sl in reqs:
                rows = torch.tensor(req.rows[sl], device=self.device)
                text.append(getattr(req.embeds, half).index_select(0, rows))
                if self.family == "sdxl":
                    pooled.append(getattr(req.embeds, f"pooled_{half}").index_select(0, rows))
                    time_ids.append(self._time_ids(req.size, req.crops[sl]))
        self.call_info = [
            (req.samples[i] if req.samples else -1, half == "cond")
            for half in halves
            for req, sl in reqs
            for i in range(*sl.indices(len(req.rows)))
        ]
        model_in = torch.cat([x] * len(halves)).to(self.dtype)
        context = torch.cat(text)
        kwargs: dict[str, Any] = {}
        if self.family == "sdxl":
            kwargs["added_cond_kwargs"] = {"text_embeds": torch.cat(pooled), "time_ids": torch.cat(time_ids)}
        if self.controlnet is not None:
            kwargs.update(self._control_residuals(model_in, t, context, reqs, len(halves), kwargs))
        out = self.unet(model_in, t, encoder_hidden_states=context, return_dict=False, **kwargs)[0]
        return out.float()

    def _control_residuals(
        self,
        model_in: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor,
        reqs: list[tuple[Request, slice]],
        halves: int,
        kwargs: dict[str, Any],
    ) -> dict[str, Any]:
        """ControlNet residuals for the views of one UNet call: each view's own condition (both guidance halves
        see it, as diffusers' ControlNet pipelines without guess mode), scaled by :attr:`control_scale`."""
        missing = [req for req, _ in reqs if req.control is None]
        if missing:
            raise RuntimeError("a denoiser request carries no ControlNet condition while a ControlNet is active")
        cond = torch.cat([req.control[sl] for req, sl in reqs])  # type: ignore[index]
        cond = torch.cat([cond] * halves)
        if not cond.is_meta:  # the cost model's shape-only conditions stay on the meta device
            cond = cond.to(self.device, self.controlnet.dtype)  # type: ignore[union-attr]
        down, mid = self.controlnet(  # type: ignore[misc]
            model_in,
            t,
            encoder_hidden_states=context,
            controlnet_cond=cond,
            conditioning_scale=self.control_scale,
            return_dict=False,
            **kwargs,
        )
        return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}

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
        """Guided predictions for every request, batching views of equal size together.

        Views from different requests (local views, dilated samples, …) share UNet calls when their spatial sizes
        match; each call holds at most ``max_batch`` UNet samples counting both guidance halves.
        """
        cfg = any(r.embeds.uncond is not None for r in requests)
        per_call = max(1, max_batch // (2 if cfg else 1))
        items: dict[tuple[int, int], list[tuple[Request, int]]] = {}
        for req in requests:
            req.outputs = [torch.empty(0)] * req.x.shape[0]
            for i in range(req.x.shape[0]):
                items.setdefault(tuple(req.x.shape[-2:]), []).append((req, i))
        chunks = [group[s : s + per_call] for group in items.values() for s in range(0, len(group), per_call)]

        def compute(chunk: list[tuple[Request, int]]) -> torch.Tensor:
            x = torch.stack([req.x[i] for req, i in chunk])
            out = self._forward(x, t, [(req, slice(i, i + 1)) for req, i in chunk], cfg)
            if cfg:
                uncond, cond = out.chunk(2)
                g = torch.tensor([req.guidance for req, _ in chunk], device=out.device).view(-1, 1, 1, 1)
                out = uncond + g * (cond - uncond)
            return out

        self.run_calls(chunks, chunks, compute)
        return [torch.stack(r.outputs) for r in requests]

    def run_calls(
        self,
        chunks: list[list[tuple[Request, int]]],
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

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, tile_area: int | None, *, clamp: bool = True) -> torch.Tensor:
        """Latents → images (float32, on CPU), clamped to [−1, 1] unless ``clamp=False`` (pixel-space methods
        resample the raw VAE output first); tiled when the image area exceeds ``tile_area`` px."""
        scale, shift = self._vae_factors()
        z = (latents / scale + shift).to(self.device, self.vae_dtype)

        def run(tile: torch.Tensor) -> torch.Tensor:
            return self.vae.decode(tile, return_dict=False)[0].float()

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

        def run(tile: torch.Tensor) -> torch.Tensor:
            return self.vae.encode(tile).latent_dist.mean.float()

        with self.borrowed(self.vae):
            if tile_area is not None and x.shape[-2] * x.shape[-1] > tile_area:
                core, margin = self._tile_geometry()
                f = self.vae_scale_factor
                z = tiled_apply(x, run, core * f, margin * f, 1.0 / f)
            else:
                z = run(x)
        return (z - shift) * scale
