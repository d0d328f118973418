"""AccDiffusion (Lin et al., ECCV 2024) — SPEC §3: DemoFusion with content-aware view prompts and window interaction.

Algorithm, on top of DemoFusion's phase loop:
  1. phase 1: record the conditional cross-attention maps of the down/up-block layers (not mid) whose query grid
     is w/4 × w/4 (heads, layers, steps averaged); one mask per prompt word: binarise at its mean, open (3×3,
     ``map side // 16`` iterations, OpenCV borders) — as the official ``get_multidiffusion_prompts``;
  2. every later phase: draw the local views once; a view's prompt keeps the words whose mask covers ≥ c of its
     full window;
     local predictions use those prompts with ``multi_guidance_scale``; the dilated samples use the full prompt;
  3. window interaction: the d² dilated samples are permuted independently at every latent position before the
     prediction and un-permuted after it.
"""

from __future__ import annotations

from functools import partial

import torch

from hiresdiff.methods.base import MethodOutput
from hiresdiff.methods.demofusion import Progressive
from hiresdiff.methods.multidiffusion import local_views
from hiresdiff.methods.specs.accdiffusion import AccDiffusionParams
from hiresdiff.models.adapter import PromptEmbeds, concat_embeds
from hiresdiff.ops.interaction import permute_lattices
from hiresdiff.ops.prompts import Word, prompt_words, view_prompt, word_masks
from hiresdiff.ops.schedule import cosine_factor
from hiresdiff.patches.attention import capture_cross_attention
from hiresdiff.sampler import Run
from hiresdiff.stages import Phase
from hiresdiff.strategies.base import Strategy
from hiresdiff.strategies.views import Blend, DilatedSampling, ViewConditioning


class AccDiffusion(Progressive):
    """DemoFusion's loop with AccDiffusion's phase-1 capture and later-phase strategy."""

    params: AccDiffusionParams

    def __init__(self, run: Run, params: AccDiffusionParams) -> None:
        super().__init__(run, params)
        self.words: list[list[Word]] = []
        self.masks: list[torch.Tensor] = []
        self._encoded: dict[tuple[str, str | None], PromptEmbeds] = {}

    def first_phase(self, phase: Phase, name: str) -> torch.Tensor:
        if not self.params.content_prompts:
            return super().first_phase(phase, name)
        run = self.run
        with capture_cross_attention(run.adapter, run.batch, run.latent_size(phase.height, phase.width)) as rec:
            z = super().first_phase(phase, name)
        self.record_masks(rec.maps())
        return z

    def phase_from_source(self, phases: list[Phase], index: int) -> torch.Tensor:
        """An input picture: the phase-1 cross-attention maps come from conditional UNet passes on its phase-1
        encoding noised to each phase-1 timestep (one noise draw; the predictions are discarded, nothing is
        sampled), so the word masks describe the picture itself."""
        if self.params.content_prompts:
            run, base = self.run, phases[0]
            latent_hw = run.latent_size(base.height, base.width)
            with capture_cross_attention(run.adapter, run.batch, latent_hw) as rec:
                run.observe(run.encode_source(base.height, base.width), name="phase 1 attention (input image)")
            self.record_masks(rec.maps())
        return super().phase_from_source(phases, index)

    def record_masks(self, maps: torch.Tensor) -> None:
        """One mask per prompt word of every canvas sample from the averaged maps (B, tokens, gh, gw)."""
        run = self.run
        for b in range(run.batch):
            words = prompt_words(run.settings.prompt[run.rows[b]], run.adapter.count_tokens)
            self.words.append(words)
            self.masks.append(word_masks(maps[b], words))

    def _negative(self, b: int) -> str | None:
        negatives = self.run.settings.negative_prompt
        return None if negatives is None else negatives[self.run.rows[b]]

    def _table(self, keys: list[tuple[str, str | None]]) -> tuple[PromptEmbeds, dict[tuple[str, str | None], int]]:
        """Embeddings of the distinct view prompts (each encoded once per run) and each one's row."""
        missing = [k for k in dict.fromkeys(keys) if k not in self._encoded]
        if missing:
            negatives = None if any(n is None for _, n in missing) else [n for _, n in missing]
            embeds = self.run.adapter.encode_prompt([p for p, _ in missing], negatives, self.run.settings.cfg)
            for i, key in enumerate(missing):
                self._encoded[key] = _row(embeds, i)
        order = list(dict.fromkeys(keys))
        return concat_embeds([self._encoded[k] for k in order]), {k: i for i, k in enumerate(order)}

    def view_conditioning(self, views: list[list], height: int, width: int) -> ViewConditioning:
        """Each view's prompt (SPEC §3) as rows of an embedding table."""
        p = self.params
        keys = [
            [
                (view_prompt(self.words[b], self.masks[b], v, height, width, p.prompt_threshold), self._negative(b))
                for v in vs
            ]
            for b, vs in enumerate(views)
        ]
        table, index = self._table([k for per_sample in keys for k in per_sample])
        return ViewConditioning(table, [[index[k] for k in per_sample] for per_sample in keys], p.multi_guidance_scale)

    def strategy(self, phase: Phase) -> Strategy:
        run, p = self.run, self.params
        big_t = run.adapter.num_train_timesteps
        local = local_views(run, p)
        h, w = run.latent_size(phase.height, phase.width)
        views = local.freeze(h, w, run.batch)
        if p.content_prompts:
            local.conditioning = self.view_conditioning(views, h, w)
        permute = partial(permute_lattices, generators=run.generators) if p.window_interaction else None
        dilated = DilatedSampling(phase.dilation, p.sigma, p.alpha3, big_t, permute=permute)
        return Blend(local, dilated, lambda t: cosine_factor(t, big_t) ** p.alpha2)


def _row(embeds: PromptEmbeds, i: int) -> PromptEmbeds:
    def pick(x: torch.Tensor | None) -> torch.Tensor | None:
        return None if x is None else x[i : i + 1]

    return PromptEmbeds(
        embeds.cond[i : i + 1], pick(embeds.uncond), pick(embeds.pooled_cond), pick(embeds.pooled_uncond)
    )


def run_accdiffusion(run: Run, params: AccDiffusionParams) -> MethodOutput:
    return MethodOutput(latents=AccDiffusion(run, params)())
