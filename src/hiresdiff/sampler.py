"""The one denoising loop (SPEC §0.1) and the per-run state methods build on.

Per step: hooks edit ``x`` → ``x_in = scale_model_input(x, t)`` → the strategy's requests are predicted in shared
batches and assembled into **one** prediction for the whole canvas → hooks may edit the prediction → **one**
``scheduler.step``. This works with every diffusers scheduler, multistep solvers included.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Hashable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from tqdm.auto import tqdm

from hiresdiff.config import GenerationSettings
from hiresdiff.control import ControlCondition
from hiresdiff.hooks import StepHook, attentive_guidance
from hiresdiff.models.adapter import ModelAdapter, PromptEmbeds
from hiresdiff.models.upscalers import Upscaler, upscale
from hiresdiff.ops.resample import resize_pixels, upsample_pixels
from hiresdiff.ops.schedule import start_index
from hiresdiff.patches.hidiffusion import hidiffusion_installed
from hiresdiff.schedulers import check_scheduler_eta
from hiresdiff.strategies.base import Denoiser, Strategy
from hiresdiff.strategies.full import FullCanvas

#: ``callback(phase_name, step, total)`` after every denoising step (raising from it stops the run there)
StepCallback = Callable[[str, int, int], None]
#: ``on_preview(images)`` the moment a phase's preview (B, 3, H, W in [−1, 1]) is decoded
PreviewCallback = Callable[[torch.Tensor], None]


class StepReplay(Protocol):
    """The cost model's hook in the loop (:mod:`hiresdiff.cost.replay`): told when a loop of ``total`` steps
    begins, it says which steps repeat one it recorded; those only advance the scheduler (with the last
    prediction), their cost is booked again. ``state`` is what the step hooks make the model compute at the step
    (:meth:`~hiresdiff.hooks.StepHook.signature_at`): a step repeats a record only under the same state."""

    def begin(self, total: int) -> None: ...

    def repeats(self, step: int, state: Hashable = ()) -> bool: ...

    def end(self) -> None: ...


#: set only while the cost model counts a generation; ``None`` in real runs
STEP_REPLAY: ContextVar[StepReplay | None] = ContextVar("hiresdiff_step_replay", default=None)

#: SDEdit strength of ``direct``/``multidiffusion`` on an input image when none is given (diffusers'
#: ``StableDiffusionImg2ImgPipeline`` default)
SDEDIT_STRENGTH = 0.8


@dataclass
class Run:
    """Everything one generation shares: model, prompts, generators, settings, previews, progress.

    ``source`` is the caller's input picture (upscaling), already brought to the target's aspect, (1, 3, H, W) in
    [−1, 1]; methods let it stand for what they would have sampled at its scale (:meth:`source_at`,
    :meth:`encode_source`). ``control`` is the ControlNet condition every denoiser request gets its part of.
    ``upscaler`` (``--upscaler``) is the SR model every pixel-space enlargement goes through (:meth:`upsample_image`).
    """

    adapter: ModelAdapter
    settings: GenerationSettings
    embeds: PromptEmbeds
    rows: list[int]
    generators: list[torch.Generator]
    progress: bool = True
    callback: StepCallback | None = None
    previews: list[torch.Tensor] = field(default_factory=list)
    preview_sizes: list[tuple[int, int]] = field(default_factory=list)
    source: torch.Tensor | None = None
    control: ControlCondition | None = None
    on_preview: PreviewCallback | None = None
    upscaler: Upscaler | None = None

    @property
    def scheduler(self) -> Any:
        return self.adapter.scheduler

    @property
    def batch(self) -> int:
        return len(self.generators)

    def latent_size(self, height: int, width: int) -> tuple[int, int]:
        f = self.adapter.vae_scale_factor
        return height // f, width // f

    @contextmanager
    def use_scheduler(self, scheduler: Any | None) -> Iterator[None]:
        """Sample a stage with another scheduler (APT's scale-aware schedule); ``None`` keeps the current one."""
        if scheduler is None:
            yield
            return
        previous = self.adapter.scheduler
        self.adapter.scheduler = scheduler
        try:
            yield
        finally:
            self.adapter.scheduler = previous

    # --- randomness: always from the caller's generators, one per canvas sample -------------------------
    def noise(self, height: int, width: int) -> torch.Tensor:
        """Standard normal latents for a ``height × width`` pixel canvas, sample ``b`` from ``generators[b]``."""
        h, w = self.latent_size(height, width)
        return self.standard_normal((self.adapter.latent_channels, h, w))

    def standard_normal(self, shape: tuple[int, ...]) -> torch.Tensor:
        """One standard normal draw of ``shape`` per canvas sample, sample ``b`` from ``generators[b]`` (float32, on
        the denoiser's device): image ``b`` of a batch draws what it would draw alone."""
        draws = [torch.randn((1, *shape), generator=g, device=g.device, dtype=torch.float32) for g in self.generators]
        return torch.cat(draws).to(self.adapter.device)

    # --- scheduling ---------------------------------------------------------------------------------------
    def begin(self, start_index: int = 0) -> torch.Tensor:
        """Reset the scheduler for a stage and return the timesteps from step index ``start_index`` on."""
        sched = self.scheduler
        self.adapter.set_timesteps(self.settings.steps)
        first = start_index * int(getattr(sched, "order", 1))
        if hasattr(sched, "set_begin_index"):
            sched.set_begin_index(first)
        return sched.timesteps[first:]

    def add_noise(self, clean: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The clean latent noised to the current timestep ``t``, in the space the scheduler keeps latents in."""
        return self.adapter.add_noise(clean, noise, t)

    def initial_noise(self, height: int, width: int) -> torch.Tensor:
        """Pure-noise start latents of a stage that samples all N steps."""
        return self.noise(height, width) * self.adapter.init_noise_sigma

    def denoiser(self, size: tuple[int, int], **overrides: Any) -> Denoiser:
        """The model for a stage whose SDXL original/target size conditioning is ``size`` (pixels, h × w)."""
        kw: dict[str, Any] = {
            "adapter": self.adapter,
            "embeds": self.embeds,
            "rows": self.rows,
            "guidance": self.settings.guidance,
            "size": size,
            "max_batch": self.settings.rows_per_call,
            "control": self.control,
        }
        kw.update(overrides)
        return Denoiser(**kw)

    def _step_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of every ``scheduler.step`` of a loop: DDIM's η when set (refused in one line for a
        scheduler without it; its noise is drawn per step by :meth:`_step_noise`), else the generator(s)."""
        eta = self.settings.eta
        if eta:
            check_scheduler_eta(eta, self.scheduler)
            return {"eta": eta}
        params = inspect.signature(self.scheduler.step).parameters
        if "generator" not in params:
            return {}
        distinct = len({id(g) for g in self.generators}) > 1
        return {"generator": self.generators if distinct else self.generators[0]}

    def _step_noise(self, x: torch.Tensor, kwargs: dict[str, Any]) -> dict[str, Any]:
        """DDIM's ``variance_noise`` for one step with η > 0: image ``b`` from ``generators[b]`` (as the initial
        noise), so an image of a batch gets the noise it gets alone; nothing when η = 0."""
        if not kwargs.get("eta"):
            return {}
        if x.shape[0] != self.batch:
            raise RuntimeError(f"a {x.shape[0]}-sample canvas stepped with η in a run of {self.batch} image(s)")
        return {"variance_noise": self.standard_normal(tuple(x.shape[1:])).to(x.dtype)}

    # --- the loop -----------------------------------------------------------------------------------------
    def denoise(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        strategy: Strategy,
        den: Denoiser,
        hooks: Sequence[StepHook] = (),
        name: str = "sampling",
    ) -> torch.Tensor:
        """Run ``timesteps`` on ``x``: one fused prediction and one ``scheduler.step`` per timestep."""
        sched = self.scheduler
        kwargs = self._step_kwargs()
        total = len(timesteps)
        bar = tqdm(total=total, desc=name, disable=not self.progress, leave=True)
        replay, pred = STEP_REPLAY.get(), None  # a replayed step advances the scheduler with the last prediction
        if replay is not None:
            replay.begin(total)
        first = len(sched.timesteps) - total  # position of timesteps[0] in the stage's list (SDEdit starts later)
        order = int(getattr(sched, "order", 1))
        for i, t in enumerate(timesteps):
            index = (first + i) // order  # the step index model patches switch on (never a count of model calls)
            state = tuple(hook.signature_at(index) for hook in hooks)
            if replay is not None and replay.repeats(i, state):  # the cost model books a recorded step again
                x = sched.step(pred, t, x, return_dict=False, **kwargs, **self._step_noise(x, kwargs))[0]
                continue
            for hook in hooks:
                hook.at_step(index, t)
            for hook in hooks:
                x = hook.before_step(t, x)
            x_in = self.adapter.scale_input(x, t)
            requests, assemble = strategy.gather(x_in, t, den)
            pred = assemble(den.predict(requests, t))
            for hook in hooks:
                pred = hook.on_prediction(t, x_in, pred)
            x = sched.step(pred, t, x, return_dict=False, **kwargs, **self._step_noise(x, kwargs))[0]
            for hook in hooks:
                x = hook.after_step(t, x)
            bar.update(1)
            if self.callback is not None:
                self.callback(name, i + 1, total)
        if replay is not None:
            replay.end()
        bar.close()
        return x

    def observe(self, clean: torch.Tensor, name: str = "observing") -> None:
        """Model passes on ``clean`` noised (one noise draw) to every timestep of all N steps, without sampling:
        what attention processors record then describes ``clean`` (AccDiffusion's maps of an input picture)."""
        s = self.settings
        h, w = clean.shape[-2] * self.adapter.vae_scale_factor, clean.shape[-1] * self.adapter.vae_scale_factor
        noise = self.noise(h, w)
        den = self.denoiser((s.height, s.width))
        for i in tqdm(range(s.steps), desc=name, disable=not self.progress):
            t = self.begin(i)[0]  # the scheduler positioned at step i (Euler scales inputs by its σ)
            x_in = self.adapter.scale_input(self.add_noise(clean, noise, t), t)
            requests, _ = FullCanvas().gather(x_in, t, den)
            den.predict(requests, t)
            if self.callback is not None:
                self.callback(name, i + 1, s.steps)

    def sample_canvas(
        self,
        height: int,
        width: int,
        size: tuple[int, int] | None = None,
        name: str = "",
        hooks: Sequence[StepHook] = (),
        strategy: Strategy | None = None,
    ) -> torch.Tensor:
        """Ordinary sampling of a whole ``height × width`` canvas from pure noise (all N steps).

        This is every method's native-size first phase; attentive guidance (``ag_lambda > 0``) and the switched
        model patches (:meth:`switched_patches`: ``hidiffusion=true``) apply here.
        ``hooks`` run as well (a model-patch clock); ``strategy`` replaces :class:`FullCanvas` (a per-step rule).
        """
        timesteps = self.begin(0)
        x = self.initial_noise(height, width)
        den = self.denoiser(size or (height, width))
        with self.switched_patches(height, width) as switched:
            hooks = [*hooks, *switched, *(h for h in (attentive_guidance(self.settings),) if h is not None)]
            return self.denoise(x, timesteps, strategy or FullCanvas(), den, hooks, name=name or f"{height}×{width}")

    @contextmanager
    def switched_patches(self, height: int, width: int) -> Iterator[list[StepHook]]:
        """The model patches the settings switch on for a whole-canvas phase of ``height × width`` (installed while
        the block runs) and the step hooks that drive them: HiDiffusion with its default parameters when
        ``settings.hidiffusion`` (the ``hidiffusion`` method refuses the switch: it has it already)."""
        if not self.settings.hidiffusion:
            yield []
            return
        with hidiffusion_installed(self, height, width) as clock:
            yield [clock]

    # --- images -------------------------------------------------------------------------------------------
    def decode(self, latents: torch.Tensor, *, clamp: bool = True) -> torch.Tensor:
        """The final image's decode: tiled above :attr:`GenerationSettings.decode_tile_area` (SPEC §2.4)."""
        return self.adapter.decode(latents, self.settings.decode_tile_area, clamp=clamp)

    @property
    def inner_tile_area(self) -> int | None:
        """Tile area of every other VAE call of the run (previews, pixel-space steps, the input picture).

        The final image's rule, tightened where the final image tiles: then anything larger than the native area
        tiles as well, so that no intermediate call is larger than one of the final decode's tiles (a core of
        ``w/4`` with ``3w/8`` of context on each side spans at most the native ``w × w`` latent). Without it a
        2048² phase preview, decoded whole in float32, set the peak memory of 4096² runs. Runs whose final image
        decodes whole keep every decode whole (each is smaller than the final one).
        """
        s, area = self.settings, self.settings.decode_tile_area
        if area is None or s.height * s.width <= area:
            return area
        return min(area, self.adapter.native_size**2)

    def decode_inner(self, latents: torch.Tensor, *, clamp: bool = True) -> torch.Tensor:
        """Decode latents other than the final image's (:attr:`inner_tile_area`)."""
        return self.adapter.decode(latents, self.inner_tile_area, clamp=clamp)

    def pixel_upsample(
        self,
        latents: torch.Tensor | None,
        size: tuple[int, int],
        pixels: torch.Tensor | None = None,
        resample: Callable[[torch.Tensor, tuple[int, int]], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Decode (unclamped), plain bicubic upsample to ``size`` pixels, clamp, encode (posterior mean) — the
        pixel-space step of AP-LDM (SPEC §5) and ScaleDiff's ``Z_RU`` (SPEC §6). The decoded image is kept as
        a preview. ``pixels`` (the caller's input picture standing for ``latents``) replace the decode; they are
        resized like a photo (antialiased where they shrink). With an SR model both go through it
        (:meth:`upsample_image`); ``resample`` replaces both resizes otherwise (FreeScale: bicubic, no clamp)."""
        with self.adapter.borrowed(self.adapter.vae):  # low-VRAM: one denoiser round trip for decode and encode
            if pixels is None:
                assert latents is not None
                image = self.decode_inner(latents, clamp=False)
                resized = self.upsample_image(image, size, resample=resample)
            else:
                image, resized = pixels, self.upsample_image(pixels, size, photo=True, resample=resample)
            self.keep_preview(image.clamp(-1, 1))
            return self.adapter.encode(resized, self.inner_tile_area)

    # --- the caller's input picture (upscaling) ----------------------------------------------------------
    def source_at(self, height: int, width: int) -> torch.Tensor:
        """The input picture resized to ``height × width`` pixels, one copy per canvas sample."""
        if self.source is None:
            raise RuntimeError("this generation has no input image")
        return self.upsample_image(self.source, (height, width), photo=True).expand(self.batch, -1, -1, -1)

    def upsample_image(
        self,
        images: torch.Tensor,
        size: tuple[int, int],
        *,
        photo: bool = False,
        resample: Callable[[torch.Tensor, tuple[int, int]], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """The run's pixel upsampler, the one seam of every pixel-space enlargement: the SR model of ``--upscaler``
        when there is one and ``size`` is larger (:func:`~hiresdiff.models.upscalers.upscale`: tiled, on the
        denoiser's device and dtype, the remainder resampled), else ``resample`` (a method's own interpolation),
        by default bicubic — plain and clamped after (:func:`upsample_pixels`: the papers' decoded-image upsample)
        or, for a ``photo`` (the input picture), antialiased where it shrinks (:func:`resize_pixels`)."""
        enlarges = size[0] > images.shape[-2] or size[1] > images.shape[-1]
        if self.upscaler is not None and enlarges:
            self.upscaler.place(self.adapter.device, self.adapter.dtype)
            return upscale(images, self.upscaler, size)
        if resample is not None:
            return resample(images, size)
        return resize_pixels(images, size) if photo else upsample_pixels(images, size)

    def encode_source(self, height: int, width: int) -> torch.Tensor:
        """Latents of the input picture at ``height × width`` pixels (VAE posterior mean)."""
        return self.adapter.encode(self.source_at(height, width), self.inner_tile_area)

    def sdedit(
        self, strategy: Strategy, name: str, hooks: Sequence[StepHook] = (), size: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """SDEdit at the target size (``direct``/``multidiffusion`` with an input image): the encoded picture noised
        to step ``⌊N·(1 − strength)⌋`` and denoised with ``strategy`` (default strength
        :data:`SDEDIT_STRENGTH`); a whole-canvas strategy gets the switched patches (:meth:`switched_patches`).
        ``size``: the SDXL size conditioning, as for :meth:`sample_canvas` (default: the target size)."""
        s = self.settings
        strength = s.strength if s.strength is not None else SDEDIT_STRENGTH
        timesteps = self.begin(start_index(s.steps, strength))
        x = self.add_noise(self.encode_source(s.height, s.width), self.noise(s.height, s.width), timesteps[0])
        whole = isinstance(strategy, FullCanvas)  # the switched patches need the whole canvas in every model call
        with self.switched_patches(s.height, s.width) if whole else nullcontext([]) as switched:
            hooks = [*hooks, *switched]
            return self.denoise(x, timesteps, strategy, self.denoiser(size or (s.height, s.width)), hooks, name=name)

    def add_preview(self, latents: torch.Tensor) -> None:
        """Decode and keep a per-phase preview (skipped when previews are off), never in a larger VAE call than
        the final image's (:attr:`inner_tile_area`)."""
        if self.settings.previews:
            self.keep_preview(self.decode_inner(latents))

    def keep_preview(self, images: torch.Tensor) -> None:
        """Keep decoded ``images`` as a preview (when previews are on) and hand them to :attr:`on_preview`."""
        if self.settings.previews:
            self.previews.append(images)
            if self.on_preview is not None:
                self.on_preview(images)
