"""AccDiffusion (SPEC §3): prompt words, word masks, view prompts, window interaction, attention capture, strategy.

Checks compare against independent computations: hand-made examples, a loop implementation of the binary opening,
attention probabilities recomputed from the layers' own projections, separate runs, and the host method.
"""

from __future__ import annotations

import itertools

import pytest
import torch

import hiresdiff.methods.accdiffusion as acc_module
from hiresdiff import HiresPipeline
from hiresdiff.config import GenerationSettings
from hiresdiff.methods.accdiffusion import AccDiffusion, AccDiffusionParams
from hiresdiff.models.adapter import ModelAdapter
from hiresdiff.ops.dilation import dilated_split
from hiresdiff.ops.geometry import View
from hiresdiff.ops.interaction import permute_lattices
from hiresdiff.ops.prompts import Word, binary_opening, opening_iterations, prompt_words, view_prompt, word_masks
from hiresdiff.patches.attention import attention_level, capture_cross_attention, grid_at_level
from hiresdiff.sampler import Run
from hiresdiff.schedulers import make_scheduler
from hiresdiff.stages import Phase, progressive_phases
from hiresdiff.strategies.views import LocalViews

# ------------------------------------------------------------------------------------------ helpers


def _adapter(pipe) -> ModelAdapter:
    ad = ModelAdapter(pipe)
    ad.scheduler = make_scheduler("ddim", pipe.scheduler.config)
    return ad


def _run(ad: ModelAdapter, prompts: list[str], height: int, width: int, steps: int = 2, seed: int = 0) -> Run:
    settings = GenerationSettings(prompt=prompts, width=width, height=height, steps=steps, scheduler="ddim")
    embeds = ad.encode_prompt(settings.prompt, None, settings.cfg)
    gens = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]
    return Run(ad, settings, embeds, list(range(len(prompts))), gens, progress=False)


def _capture_layers(unet) -> list[str]:
    """Names of the down/up-block cross-attention processors at the capture level (level 2, else the deepest one);
    the mid block is not aggregated (official ``from_where=["up", "down"]``)."""
    n = len(unet.config.down_block_types)
    levels = {
        k: attention_level(k, n)
        for k in unet.attn_processors
        if k.endswith("attn2.processor") and not k.startswith("mid_block")
    }
    target = 2 if 2 in levels.values() else max(levels.values())
    return [k for k, lv in levels.items() if lv == target]


# ------------------------------------------------------------------------------------------ words


def test_prompt_words_merge_subwords_and_count_from_one():
    tokens = {"a": 1, "photograph": 3, "of": 1, "castle,": 2}
    words = prompt_words("a photograph of  castle,", tokens.__getitem__)
    assert words == [Word("a", (1,)), Word("photograph", (2, 3, 4)), Word("of", (5,)), Word("castle,", (6, 7))]
    assert prompt_words("", tokens.__getitem__) == []


def test_prompt_words_past_position_75_are_dropped():
    words = prompt_words(" ".join(f"w{i}" for i in range(80)), lambda w: 1)
    assert len(words) == 75 and words[0] == Word("w0", (1,)) and words[-1] == Word("w74", (75,))
    # a word crossing position 75 keeps its visible tokens; the words after it are dropped
    words = prompt_words(" ".join(["x"] * 73 + ["long", "after"]), lambda w: 4 if w == "long" else 1)
    assert words[-1] == Word("long", (74, 75)) and len(words) == 74


def test_prompt_words_positions_match_the_tokenizer(tiny_sdxl_pipe):
    ad = ModelAdapter(tiny_sdxl_pipe)
    prompt = "a photograph of a castle, misty  sky"
    ids = tiny_sdxl_pipe.tokenizer(prompt).input_ids
    words = prompt_words(prompt, ad.count_tokens)
    assert [w.text for w in words] == prompt.split()
    for w in words:
        assert [ids[p] for p in w.positions] == tiny_sdxl_pipe.tokenizer(w.text, add_special_tokens=False).input_ids
    assert words[-1].positions[-1] == len(ids) - 2  # the end token follows the last word


# ------------------------------------------------------------------------------------------ opening


def _loop_opening(mask: torch.Tensor, iterations: int = 2) -> torch.Tensor:
    """Binary opening with a 3×3 square by explicit loops, with OpenCV's default borders: outside the map counts
    as foreground while eroding and as background while dilating."""
    h, w = mask.shape

    def at(m, y, x, outside):
        return bool(m[y, x]) if 0 <= y < h and 0 <= x < w else outside

    def apply(m, reduce, outside):
        near = [
            [[at(m, y + a, x + b, outside) for a in (-1, 0, 1) for b in (-1, 0, 1)] for x in range(w)] for y in range(h)
        ]
        return torch.tensor([[reduce(cell) for cell in row] for row in near])

    def erode(m):
        return apply(m, all, True)

    def dilate(m):
        return apply(m, any, False)

    m = mask.bool()
    for _ in range(iterations):
        m = erode(m)
    for _ in range(iterations):
        m = dilate(m)
    return m


def test_opening_iterations_follow_the_map_side():
    # official: iterations = map side // 16 — 2 on SDXL's 32×32 maps, 1 on 16×16, none on small maps
    assert [opening_iterations(s, s) for s in (8, 15, 16, 31, 32, 48)] == [0, 0, 1, 1, 2, 3]
    assert opening_iterations(32, 26) == 1  # non-square: the shorter side
    blob = torch.zeros(8, 8, dtype=torch.bool)
    blob[3, 4] = True  # a one-cell word mask on a small map is kept (no opening)
    assert torch.equal(binary_opening(blob), blob)


def test_binary_opening_hand_example():
    mask = torch.zeros(32, 32, dtype=torch.bool)  # default: 32 // 16 = 2 iterations
    mask[1:4, 1:4] = True  # isolated 3×3 blob off the border: two erosions remove it
    mask[0:5, 27:32] = True  # 5×5 block in the top-right corner: survives
    mask[28:32, 0:4] = True  # 4×4 block in a corner: survives, the border does not erode (OpenCV semantics)
    mask[14:16, 10:12] = True  # 2×2 blob inside: removed
    mask[17:23, 17:23] = True  # 6×6 block: survives exactly
    mask[23, 19] = True  # one-pixel spur below it: removed
    expected = torch.zeros_like(mask)
    expected[0:5, 27:32] = True
    expected[28:32, 0:4] = True
    expected[17:23, 17:23] = True
    out = binary_opening(mask)
    assert out.dtype == torch.bool and out.shape == mask.shape
    assert torch.equal(out, expected)
    assert torch.equal(_loop_opening(mask), expected)


@pytest.mark.parametrize("iterations", [1, 2])
def test_binary_opening_equals_loop_implementation(iterations):
    g = torch.Generator().manual_seed(iterations)
    masks = torch.zeros(2, 3, 12, 15, dtype=torch.bool)  # leading dims are kept
    for idx in itertools.product(range(2), range(3)):  # random rectangles plus salt-and-pepper noise
        for _ in range(3):
            top, left = (int(v) for v in torch.randint(-2, 10, (2,), generator=g))
            h, w = (int(v) for v in torch.randint(3, 8, (2,), generator=g))
            masks[idx][max(0, top) : top + h, max(0, left) : left + w] = True
        masks[idx] |= torch.rand(12, 15, generator=g) < 0.1
    out = binary_opening(masks, 3, iterations)
    assert out.shape == masks.shape
    for idx in itertools.product(range(2), range(3)):
        assert torch.equal(out[idx], _loop_opening(masks[idx], iterations)), idx
    assert out.any() and not torch.equal(out, masks)


# ------------------------------------------------------------------------------------------ masks, view prompts


def _synthetic():
    """Six words on a 16×16 attention grid: castle (2 tokens), sky, dog, mist (uniform), tree (tiny blob)."""
    words = prompt_words("castle sky dog mist tree", lambda w: 2 if w == "castle" else 1)
    assert [w.positions for w in words] == [(1, 2), (3,), (4,), (5,), (6,)]
    attn = torch.full((77, 16, 16), 0.01)
    attn[1, :, :8] += 1.0  # castle token 1: left half
    attn[2, :8, :] += 1.0  # castle token 2: top half → mean map above its mean on the top-left quadrant only
    attn[3, :8, :] += 1.0  # sky: top half
    attn[4, 8:, 8:] += 1.0  # dog: bottom-right quadrant
    attn[5] += 0.5  # mist: uniform → nothing above the mean
    attn[6, 10:12, 2:4] += 1.0  # tree: 2×2 blob → removed by the opening
    return words, attn


def test_word_masks_binarise_at_mean_and_open():
    words, attn = _synthetic()
    masks = word_masks(attn, words)
    assert masks.shape == (5, 16, 16) and masks.dtype == torch.bool
    expected = torch.zeros(5, 16, 16, dtype=torch.bool)
    expected[0, :8, :8] = True  # castle: the mean of its two token maps
    expected[1, :8, :] = True
    expected[2, 8:, 8:] = True
    assert torch.equal(masks, expected)
    assert word_masks(attn, []).shape == (0, 16, 16)


@pytest.mark.parametrize(
    ("view", "threshold", "prompt"),
    [
        (View(0, 0, 32, 32), 0.3, "castle sky"),  # top-left
        (View(0, 32, 32, 32), 0.3, "sky"),  # top-right
        (View(32, 0, 32, 32), 0.3, ""),  # bottom-left: no word → empty prompt
        (View(32, 32, 32, 32), 0.3, "dog"),  # bottom-right
        (View(16, 0, 32, 32), 0.3, "castle sky"),  # left: castle 0.5, sky 0.5
        (View(16, 32, 32, 32), 0.3, "sky dog"),  # right: sky 0.5, dog 0.5
        (View(0, 16, 32, 32), 0.3, "castle sky"),  # top: castle 0.5, sky 1
        (View(32, 16, 32, 32), 0.3, "dog"),  # bottom: dog 0.5
        (View(16, 16, 32, 32), 0.3, "sky"),  # centre: castle 0.25, sky 0.5, dog 0.25
        (View(16, 16, 32, 32), 0.25, "castle sky dog"),  # coverage exactly c is kept
        (View(16, 16, 32, 32), 0.25 + 1e-6, "sky"),
        (View(16, 16, 32, 32), 0.5, "sky"),
        (View(16, 16, 32, 32), 0.5 + 1e-6, ""),
        # jittered past the border: coverage over the full window (24·24/32² = 0.5625), as the official code
        (View(-8, -8, 32, 32), 0.5625, "castle sky"),
        (View(-8, -8, 32, 32), 0.5625 + 1e-6, ""),
        (View(40, 40, 32, 32), 0.5625, "dog"),
        (View(40, 40, 32, 32), 0.6, ""),
    ],
)
def test_view_prompts_from_synthetic_attention(view, threshold, prompt):
    words, attn = _synthetic()
    masks = word_masks(attn, words)  # 16×16 grid on a 64×64 latent canvas
    assert view_prompt(words, masks, view, 64, 64, threshold) == prompt


def test_view_prompt_non_square_canvas_and_no_words():
    words, attn = _synthetic()
    masks = word_masks(attn, words)
    # 16×16 grid on a 32×48 canvas: castle covers rows 0..15, cols 0..23
    assert view_prompt(words, masks, View(0, 0, 16, 24), 32, 48, 1.0) == "castle sky"
    assert view_prompt(words, masks, View(16, 24, 16, 24), 32, 48, 1.0) == "dog"
    assert view_prompt([], masks[:0], View(0, 0, 16, 16), 32, 48, 0.0) == ""
    assert AccDiffusionParams().prompt_threshold == 0.3


# ------------------------------------------------------------------------------------------ window interaction


def _lattice(d: int = 3, b: int = 2) -> torch.Tensor:
    return torch.randn(d, d, b, 4, 5, 6, generator=torch.Generator().manual_seed(7))


def test_permute_lattices_is_a_permutation_per_position():
    lattice = _lattice()
    d = lattice.shape[0]
    shuffled, inverse = permute_lattices(lattice, [torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)])
    assert shuffled.shape == lattice.shape
    flat_in, flat_out = lattice.reshape(d * d, -1), shuffled.reshape(d * d, -1)
    assert torch.equal(flat_in.sort(0).values, flat_out.sort(0).values)  # same d² values at every (b, c, y, x)
    assert not torch.equal(shuffled, lattice)
    # independent permutations at different positions (not one permutation for the whole lattice)
    order = (flat_out.unsqueeze(1) == flat_in.unsqueeze(0)).float().argmax(1)  # which sample each slot took
    assert len({tuple(order[:, k].tolist()) for k in range(order.shape[1])}) > 20
    assert torch.equal(inverse(shuffled), lattice)
    pred = shuffled * 2.0 + 1.0  # a position-wise "model" on the shuffled samples
    assert torch.equal(inverse(pred), lattice * 2.0 + 1.0)


def test_permute_lattices_seeds_and_per_sample_generators():
    lattice = _lattice()

    def gens(*seeds):
        return [torch.Generator().manual_seed(s) for s in seeds]

    a, _ = permute_lattices(lattice, gens(1, 2))
    b, _ = permute_lattices(lattice, gens(1, 2))
    c, _ = permute_lattices(lattice, gens(3, 4))
    d, _ = permute_lattices(lattice, gens(1, 5))
    assert torch.equal(a, b)
    assert not torch.equal(a[:, :, 0], c[:, :, 0]) and not torch.equal(a[:, :, 1], c[:, :, 1])
    assert torch.equal(a[:, :, 0], d[:, :, 0])  # sample 0 depends only on generators[0]
    assert not torch.equal(a[:, :, 1], d[:, :, 1])
    single, _ = permute_lattices(lattice[:, :, 1:], gens(2))
    assert torch.equal(single[:, :, 0], a[:, :, 1])


# ------------------------------------------------------------------------------------------ phase-1 capture


@pytest.mark.parametrize(("fixture", "level"), [("tiny_sdxl_pipe", 2), ("tiny_sd_pipe", 1)])
def test_capture_leaves_phase1_unchanged(request, fixture, level):
    pipe = request.getfixturevalue(fixture)
    ad = _adapter(pipe)
    native = ad.native_size
    h, w = native, native * 13 // 16  # non-square base canvas: latent 32×26 (SDXL) or 16×13 (SD)
    prompts = ["a castle on a hill", "misty sky over a dog"]
    before = dict(pipe.unet.attn_processors)
    plain = _run(ad, prompts, h, w).sample_canvas(h, w)
    run = _run(ad, prompts, h, w)
    with capture_cross_attention(ad, run.batch, run.latent_size(h, w)) as rec:
        assert any(p is not before[k] for k, p in pipe.unet.attn_processors.items())
        captured = run.sample_canvas(h, w)
    assert torch.equal(plain, captured)
    after = pipe.unet.attn_processors
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)

    grid = grid_at_level(h // 8, w // 8, level)
    assert grid == (8, 7)
    maps = rec.maps()
    assert maps.shape == (2, 77, *grid)
    torch.testing.assert_close(maps.sum(1), torch.ones(2, *grid), atol=1e-5, rtol=0)
    layers = _capture_layers(pipe.unet)
    # tiny SDXL level 2: down_blocks.2 (1) + up_blocks.0 (2), the mid block left out; tiny SD level 1: 1 + 2
    assert len(layers) == 3 and not any(name.startswith("mid_block") for name in layers)
    assert rec.counts.tolist() == [2.0 * len(layers)] * 2  # steps × layers, conditional branch only
    assert not torch.allclose(maps[0], maps[1])


def test_captured_maps_equal_recomputed_attention(tiny_sdxl_pipe):
    """Average over heads, capture layers and steps of softmax(q·kᵀ/√d) of the conditional rows, per sample."""
    pipe = tiny_sdxl_pipe
    ad = _adapter(pipe)
    prompts = ["a castle on a hill", "misty sky over a dog"]
    run = _run(ad, prompts, 256, 256)
    sums, hooks = torch.zeros(2, 77, 8, 8), []

    def hook(module, args, kwargs):
        hidden, context = args[0], kwargs["encoder_hidden_states"]
        n = hidden.shape[0] // 2  # rows: [uncond samples…, cond samples…]
        q, k = module.to_q(hidden[n:]), module.to_k(context[n:])
        heads = module.heads
        q = q.view(n, q.shape[1], heads, -1).transpose(1, 2)
        k = k.view(n, k.shape[1], heads, -1).transpose(1, 2)
        probs = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1).mean(1)  # (n, N, L)
        sums.add_(probs.transpose(1, 2).reshape(n, 77, 8, 8))

    for name in _capture_layers(pipe.unet):
        module = pipe.unet.get_submodule(name.removesuffix(".processor"))
        hooks.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad(), capture_cross_attention(ad, 2, (32, 32)) as rec:
            run.sample_canvas(256, 256)
    finally:
        for handle in hooks:
            handle.remove()
    torch.testing.assert_close(rec.maps(), sums / (2 * 3), atol=1e-5, rtol=1e-4)


def test_first_phase_captures_words_and_masks_without_changing_the_output(tiny_sdxl_pipe):
    ad = _adapter(tiny_sdxl_pipe)
    prompts = ["a castle on a hill", "misty sky"]
    phase = Phase(256, 208, 256)
    ref = _run(ad, prompts, 256, 208).sample_canvas(256, 208, size=(256, 208))
    acc = AccDiffusion(_run(ad, prompts, 256, 208), AccDiffusionParams())
    z = acc.first_phase(phase, "phase 1")
    assert torch.equal(z, ref)
    assert [[w.text for w in words] for words in acc.words] == [p.split() for p in prompts]
    assert [tuple(m.shape) for m in acc.masks] == [(5, 8, 7), (2, 8, 7)]
    assert all(m.dtype == torch.bool for m in acc.masks)


# ------------------------------------------------------------------------------------------ strategy


def _strategy_setup(pipe, monkeypatch, **params):
    ad = _adapter(pipe)
    run = _run(ad, ["castle sky dog", "a red fox"], 512, 512)
    encoded: list[list[str]] = []
    original = ad.encode_prompt

    def encode(prompts, negatives, cfg):
        encoded.append(list(prompts))
        return original(prompts, negatives, cfg)

    monkeypatch.setattr(ad, "encode_prompt", encode)
    acc = AccDiffusion(run, AccDiffusionParams(**params))
    grid = torch.zeros(8, 8, dtype=torch.bool)
    left, top, bottom_right, top_left = grid.clone(), grid.clone(), grid.clone(), grid.clone()
    left[:, :4], top[:4], bottom_right[4:, 4:], top_left[:4, :4] = True, True, True, True
    acc.words = [prompt_words(p, ad.count_tokens) for p in run.settings.prompt]
    acc.masks = [torch.stack([left, top, bottom_right]), torch.stack([~grid, grid, top_left])]
    return ad, run, acc, encoded


def test_accdiffusion_strategy_fixed_views_view_prompts_and_guidance(tiny_sdxl_pipe, monkeypatch):
    ad, run, acc, encoded = _strategy_setup(tiny_sdxl_pipe, monkeypatch, multi_guidance_scale=5.0)
    phase = Phase(512, 512, 256)
    strategy = acc.strategy(phase)
    local, dilated = strategy.local, strategy.global_
    assert isinstance(local, LocalViews) and local.fixed is not None and len(local.fixed) == 2
    assert all(len(views) == 9 for views in local.fixed)
    expected = [
        [view_prompt(acc.words[b], acc.masks[b], v, 64, 64, 0.3) for v in views] for b, views in enumerate(local.fixed)
    ]
    distinct = set(itertools.chain.from_iterable(expected))
    assert len(distinct) >= 3
    assert len(encoded) == 1 and sorted(encoded[0]) == sorted(distinct)  # each distinct prompt encoded once

    cond = local.conditioning
    assert cond.guidance == 5.0
    assert cond.embeds.cond.shape[0] == len(distinct)
    alone = {p: ModelAdapter.encode_prompt(ad, [p], None, True) for p in distinct}  # each prompt on its own
    for b in range(2):
        for v, row in enumerate(cond.rows[b]):
            ref = alone[expected[b][v]]
            for name in ("cond", "uncond", "pooled_cond", "pooled_uncond"):
                torch.testing.assert_close(getattr(cond.embeds, name)[row], getattr(ref, name)[0], atol=1e-5, rtol=0)

    g = torch.Generator().manual_seed(3)
    den = run.denoiser((512, 512))
    frozen = [list(v) for v in local.fixed]
    for t in (torch.tensor(501), torch.tensor(1)):
        x_in = torch.randn(2, 4, 64, 64, generator=g)
        requests, assemble = strategy.gather(x_in, t, den)
        assert local.last_views == frozen  # the same views at every step of the phase
        local_req, global_req = requests
        assert local_req.guidance == 5.0 and local_req.embeds is cond.embeds
        assert local_req.rows == [r for per_sample in cond.rows for r in per_sample]
        assert global_req.guidance == run.settings.guidance == 7.5 and global_req.embeds is run.embeds
        assert global_req.rows == [0, 1] * 4 and global_req.x.shape == (8, 4, 32, 32)
        # window interaction: the dilated samples are permuted per position, the assembly undoes it
        plain = dilated_split(dilated.blurred(x_in, t), 2).reshape(4, -1)
        shuffled = global_req.x.reshape(4, -1)
        assert torch.equal(plain.sort(0).values, shuffled.sort(0).values) and not torch.equal(plain, shuffled)
        c = strategy.weight(float(t))
        out = assemble([local_req.x, global_req.x])  # identity "model": both paths return their inputs
        torch.testing.assert_close(out, (1 - c) * x_in + c * dilated.blurred(x_in, t), atol=1e-5, rtol=1e-5)

    # a new phase encodes only the view prompts it has not seen
    acc.strategy(Phase(768, 768, 256))
    flat = list(itertools.chain.from_iterable(encoded))
    assert len(flat) == len(set(flat))


def test_accdiffusion_components_off(tiny_sdxl_pipe, monkeypatch):
    _, run, acc, encoded = _strategy_setup(tiny_sdxl_pipe, monkeypatch, content_prompts=False, window_interaction=False)

    def forbidden(*args, **kwargs):
        raise AssertionError("component should be off")

    monkeypatch.setattr(acc_module, "capture_cross_attention", forbidden)
    monkeypatch.setattr(acc_module, "permute_lattices", forbidden)
    monkeypatch.setattr(AccDiffusion, "view_conditioning", forbidden)
    strategy = acc.strategy(Phase(512, 512, 256))
    assert strategy.local.fixed is not None and strategy.local.conditioning is None
    assert strategy.global_.permute is None
    requests, _ = strategy.gather(torch.randn(2, 4, 64, 64), torch.tensor(501), run.denoiser((512, 512)))
    assert requests[0].embeds is run.embeds and requests[0].guidance == 7.5
    assert encoded == []
    acc.words, acc.masks = [], []
    acc.first_phase(Phase(256, 256, 256), "phase 1")  # no capture
    assert acc.words == [] and acc.masks == []


def test_accdiffusion_without_components_and_jitter_is_demofusion(tiny_sd_pipe):
    pipe = HiresPipeline.from_pipe(tiny_sd_pipe, "tiny-sd")
    kw = {"steps": 2, "scheduler": "ddim", "seed": 2, "jitter": False, "previews": False, "progress": False}
    off = {"content_prompts": False, "window_interaction": False}
    acc = pipe(["a red cat", "a dog"], "accdiffusion", 384, 256, **off, **kw).latents
    demo = pipe(["a red cat", "a dog"], "demofusion", 384, 256, **kw).latents
    assert torch.equal(acc, demo)
    full = pipe(["a red cat", "a dog"], "accdiffusion", 384, 256, **kw).latents
    assert not torch.allclose(full, demo, atol=1e-3)


# ------------------------------------------------------------------------------------------ end to end


@pytest.mark.parametrize(("fixture", "width", "height"), [("tiny_sdxl_pipe", 640, 512), ("tiny_sd_pipe", 320, 256)])
def test_accdiffusion_end_to_end_batch(request, monkeypatch, fixture, width, height):
    pipe = HiresPipeline.from_pipe(request.getfixturevalue(fixture))
    captures, permutations, views = [], [], {}
    capture, permute, gather = acc_module.capture_cross_attention, acc_module.permute_lattices, LocalViews.gather

    def spy_capture(adapter, batch, latent_hw):
        captures.append((batch, latent_hw))
        return capture(adapter, batch, latent_hw)

    def spy_permute(lattice, generators):
        permutations.append(tuple(lattice.shape))
        return permute(lattice, generators)

    def spy_gather(self, x_in, t, den):
        out = gather(self, x_in, t, den)
        views.setdefault(tuple(x_in.shape[-2:]), []).append(self.last_views)
        return out

    monkeypatch.setattr(acc_module, "capture_cross_attention", spy_capture)
    monkeypatch.setattr(acc_module, "permute_lattices", spy_permute)
    monkeypatch.setattr(LocalViews, "gather", spy_gather)
    prompts = ["a castle on a hill", "a red fox in the snow"]
    kw = {"steps": 3, "seed": 4, "progress": False}
    res = pipe(prompts, "accdiffusion", width, height, **kw)
    native = pipe.native_size
    phases = progressive_phases(height, width, native, 8)
    assert len(phases) == 3 and len(res.images) == 2
    assert len(res.previews) == 3 and all(len(p) == 2 for p in res.previews)
    assert [p[0].size for p in res.previews] == [(ph.width, ph.height) for ph in phases]
    assert res.images[1].size == (width, height)
    assert torch.isfinite(res.latents).all() and res.latents.shape == (2, 4, height // 8, width // 8)
    assert captures == [(2, (phases[0].height // 8, phases[0].width // 8))]
    assert len(permutations) == 2 * 3 and {s[0] for s in permutations} == {2, 3}
    assert len(views) == 2 and all(len(v) == 3 and v[0] == v[1] == v[2] for v in views.values())

    # the batch is per-sample: image 2 equals the same prompt generated alone with its seed
    alone = pipe(prompts[1:], "accdiffusion", width, height, **{**kw, "seed": 5, "previews": False})
    torch.testing.assert_close(alone.latents[0], res.latents[1], atol=1e-3, rtol=1e-3)
