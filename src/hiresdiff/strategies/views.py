"""Local windows with jitter (MultiDiffusion, SPEC §2.2), dilated lattices with blur (SPEC §2.3), blending."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from hiresdiff.control import ControlCondition
from hiresdiff.models.adapter import PromptEmbeds, Request
from hiresdiff.ops.blur import gaussian_blur
from hiresdiff.ops.dilation import dilated_merge, dilated_pad, dilated_split
from hiresdiff.ops.geometry import View, jitter_views, views_for
from hiresdiff.ops.schedule import cosine_factor
from hiresdiff.ops.stats import renormalise, scalar_stats
from hiresdiff.strategies.base import Assembler, Denoiser, Strategy


@dataclass
class ViewConditioning:
    """Per-view prompts (AccDiffusion): a table of prompt embeddings, each view's row in it, the local guidance."""

    embeds: PromptEmbeds
    rows: list[list[int]]  # rows[b][v]: table row of view v of canvas sample b
    guidance: float


@dataclass
class LocalViews:
    """Overlapping ``window × window`` latent views, ``stride`` apart, fused by a uniform average (SPEC §2.2).

    With ``jitter`` every step shifts each view by an integer in ``[−j, j]``, ``j = (window − stride) // 4``, on a
    canvas zero-padded by ``j`` (predictions on the padding are discarded); ``generators[b]`` draws sample ``b``'s
    shifts. ``vae_scale_factor`` converts view corners to the pixel crop coordinates of SDXL conditioning.
    ``fixed`` views (set by :meth:`freeze`) are reused at every step; ``conditioning`` gives views their own
    prompts and guidance.
    """

    window: int
    stride: int
    jitter: bool
    generators: list[torch.Generator]
    vae_scale_factor: int = 8
    last_views: list[list[View]] = field(default_factory=list)
    fixed: list[list[View]] | None = None
    conditioning: ViewConditioning | None = None

    @property
    def max_jitter(self) -> int:
        return (self.window - self.stride) // 4 if self.jitter else 0

    def views(self, height: int, width: int, sample: int) -> list[View]:
        """This step's views of canvas sample ``sample`` (jittered when enabled)."""
        base = views_for(height, width, self.window, self.stride)
        return jitter_views(base, height, width, self.max_jitter, self.generators[sample])

    def freeze(self, height: int, width: int, batch: int) -> list[list[View]]:
        """Draw every sample's views once and keep them for all later steps (AccDiffusion: jitter once per phase)."""
        self.fixed = [self.views(height, width, s) for s in range(batch)]
        return self.fixed

    def gather(self, x_in: torch.Tensor, t: torch.Tensor, den: Denoiser) -> tuple[list[Request], Assembler]:
        b, _c, h, w = x_in.shape
        j = self.max_jitter
        xp = F.pad(x_in, (j, j, j, j)) if j else x_in
        self.last_views = self.fixed if self.fixed is not None else [self.views(h, w, s) for s in range(b)]
        patches, samples, crops = [], [], []
        f = self.vae_scale_factor
        for s, views in enumerate(self.last_views):
            for v in views:
                patches.append(xp[s, :, v.top + j : v.top + j + v.height, v.left + j : v.left + j + v.width])
                samples.append(s)
                crops.append((max(0, v.top) * f, max(0, v.left) * f))
        cond = self.conditioning
        views = [v for per_sample in self.last_views for v in per_sample]

        def control(c: ControlCondition) -> torch.Tensor:
            return c.crops((h, w), views, j, samples)  # the control image under each view (SPEC §2.2 geometry)

        if cond is None:
            req = den.request(torch.stack(patches), samples, crops, control=control)
        else:
            rows = [row for per_sample in cond.rows for row in per_sample]
            req = den.request(
                torch.stack(patches),
                samples,
                crops,
                embeds=cond.embeds,
                rows=rows,
                guidance=cond.guidance,
                control=control,
            )

        def assemble(preds: list[torch.Tensor]) -> torch.Tensor:
            value = torch.zeros_like(xp)
            count = torch.zeros_like(xp[:, :1])
            k = 0
            for s, views in enumerate(self.last_views):
                for v in views:
                    sl = (slice(v.top + j, v.top + j + v.height), slice(v.left + j, v.left + j + v.width))
                    value[s, :, sl[0], sl[1]].add_(preds[0][k])  # in place on the slice (no write-back)
                    count[s, :, sl[0], sl[1]].add_(1)
                    k += 1
            value, count = value[:, :, j : j + h, j : j + w], count[:, :, j : j + h, j : j + w]
            return value / count

        return [req], assemble


@dataclass
class DilatedSampling:
    """Global paths by dilated sampling with dilation ``d`` (SPEC §2.3 step 3).

    As the official DemoFusion (dilated-sampling block of ``DemoFusionSDXLPipeline.__call__``, PRIS-CV/DemoFusion
    ``pipeline_demofusion_sdxl.py``): the canvas is zero-padded at the top/left to multiples of ``d``
    (:func:`~hiresdiff.ops.dilation.dilated_pad`), the *padded* canvas is blurred with a ``(2d−1)``-Gaussian of
    standard deviation ``σ·c3``, ``c3 = 0.99·cf(t)^α3 + 0.01``, with a zero border, and renormalised to the scalar
    statistics of the padded canvas; its ``d²`` sub-lattices are predicted and scattered back, and the padding is
    cropped. ``permute`` (AccDiffusion window interaction) may shuffle the lattices before prediction and must
    return the inverse shuffle.
    """

    dilation: int
    sigma: float
    alpha3: float
    num_train_timesteps: int = 1000
    permute: Callable[[torch.Tensor], tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]] | None = None

    def blurred(self, x_in: torch.Tensor, t: torch.Tensor, multiple: int = 1) -> torch.Tensor:
        """The padded, blurred, renormalised canvas the dilated samples are cut from (sides multiples of
        ``d·multiple``)."""
        d = self.dilation
        padded = dilated_pad(x_in, d, multiple)
        if d == 1:
            return padded
        c3 = 0.99 * cosine_factor(float(t), self.num_train_timesteps) ** self.alpha3 + 0.01
        return renormalise(gaussian_blur(padded, 2 * d - 1, self.sigma * c3), *scalar_stats(padded))

    def gather(self, x_in: torch.Tensor, t: torch.Tensor, den: Denoiser) -> tuple[list[Request], Assembler]:
        b, c, h, w = x_in.shape
        d = self.dilation
        cells = den.adapter.pixel_grid // den.adapter.vae_scale_factor  # latent cells per token side (FLUX: 2)
        lattice = dilated_split(self.blurred(x_in, t, cells), d, cells)
        unpermute = None
        if self.permute is not None:
            lattice, unpermute = self.permute(lattice)
        hd, wd = lattice.shape[-2:]
        req = den.request(lattice.reshape(d * d * b, c, hd, wd), list(range(b)) * (d * d))

        def assemble(preds: list[torch.Tensor]) -> torch.Tensor:
            out = preds[0].view(d, d, b, c, hd, wd)
            if unpermute is not None:
                out = unpermute(out)
            return dilated_merge(out, h, w, cells)

        return [req], assemble


@dataclass
class Blend:
    """``P = (1 − c)·P_local + c·P_global`` with ``c = weight(t)`` (DemoFusion ``c2 = cf(t)^α2``).

    Both strategies' requests go to the model together. A weight of exactly 0 skips the global requests.
    """

    local: Strategy
    global_: Strategy
    weight: Callable[[float], float]

    def gather(self, x_in: torch.Tensor, t: torch.Tensor, den: Denoiser) -> tuple[list[Request], Assembler]:
        c = self.weight(float(t))
        local_reqs, local_asm = self.local.gather(x_in, t, den)
        if c == 0.0:
            return local_reqs, local_asm
        global_reqs, global_asm = self.global_.gather(x_in, t, den)
        n = len(local_reqs)

        def assemble(preds: list[torch.Tensor]) -> torch.Tensor:
            return (1.0 - c) * local_asm(preds[:n]) + c * global_asm(preds[n:])

        return local_reqs + global_reqs, assemble
