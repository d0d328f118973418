"""Guidance rules (issue 23 item 2): exact combine functions, the adapter's branch-major batching under a rule, and
classifier-free guidance through the rule machinery equal — bit for bit — to the fixed (uncond, cond) halves the
adapter used before, for every registered method."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from hiresdiff import HiresPipeline
from hiresdiff.errors import HiresError
from hiresdiff.methods import METHODS
from hiresdiff.models.adapter import ModelAdapter, PromptEmbeds, Request
from hiresdiff.models.guidance import CFG, FOURISCALE, NDCFG, NO_GUIDANCE, Branch, GuidanceRule, default_rule

# ------------------------------------------------------------------------------------------------ combine functions


def _rows(*parts: torch.Tensor) -> torch.Tensor:
    return torch.cat(parts)


@pytest.fixture
def outs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {k: torch.randn(3, 4, 5, 6, generator=g) for k in ("u", "c", "w", "ul")}


GUIDANCE = [1.5, 5.0, 7.5]


def _g(like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(GUIDANCE).view(-1, 1, 1, 1).to(like)


def test_cfg_combines_uncond_plus_scaled_difference(outs):
    u, c = outs["u"], outs["c"]
    assert torch.equal(CFG.apply(_rows(u, c), GUIDANCE), u + _g(u) * (c - u))
    assert CFG.names == ("uncond", "cond") and [b.text for b in CFG.branches] == ["uncond", "cond"]


def test_no_guidance_is_the_cond_row(outs):
    assert torch.equal(NO_GUIDANCE.apply(outs["c"], GUIDANCE), outs["c"])
    assert NO_GUIDANCE.names == ("cond",) and not NO_GUIDANCE.needs_uncond


def test_ndcfg_takes_the_light_uncond_as_base(outs):
    u, c, ul = outs["u"], outs["c"], outs["ul"]
    assert torch.equal(NDCFG.apply(_rows(u, c, ul), GUIDANCE), ul + _g(u) * (c - u))
    assert NDCFG.names == ("uncond", "cond", "uncond_light")
    assert [b.text for b in NDCFG.branches] == ["uncond", "cond", "uncond"]
    # D_nd = D: the light row equals the uncond row, and NDCFG is CFG
    assert torch.equal(NDCFG.apply(_rows(u, c, u), GUIDANCE), CFG.apply(_rows(u, c), GUIDANCE))


def test_fouriscale_guides_towards_the_weak_row(outs):
    u, c, w = outs["u"], outs["c"], outs["w"]
    assert torch.equal(FOURISCALE.apply(_rows(u, c, w), GUIDANCE), u + _g(u) * (w - u))
    assert FOURISCALE.names == ("uncond", "cond", "weak")
    assert [b.text for b in FOURISCALE.branches] == ["uncond", "cond", "cond"]  # weak row: the cond text
    # weak ≡ cond (same patches): FouriScale guidance is CFG
    assert torch.equal(FOURISCALE.apply(_rows(u, c, c), GUIDANCE), CFG.apply(_rows(u, c), GUIDANCE))


def test_rules_validate_their_branches_and_rows(outs):
    with pytest.raises(HiresError, match="repeats a branch"):
        GuidanceRule("x", (Branch("cond", "cond"), Branch("cond", "uncond")), CFG.combine)
    with pytest.raises(HiresError, match="text must be one of"):
        Branch("weak", "negative")
    with pytest.raises(HiresError, match="no branches"):
        GuidanceRule("x", (), CFG.combine)
    with pytest.raises(HiresError, match="3 rows are not 2 branches × 2 views"):
        CFG.apply(outs["u"], [1.0, 2.0])


@pytest.mark.parametrize(("rule", "max_batch", "views"), [(CFG, 8, 4), (CFG, 3, 1), (NDCFG, 8, 2), (NDCFG, 2, 1)])
def test_views_per_call_count_every_branch(rule, max_batch, views):
    assert rule.per_call(max_batch) == views
    assert NO_GUIDANCE.per_call(3) == 3


# ------------------------------------------------------------------------------------------------ adapter batching


@pytest.fixture(scope="module")
def adapter(tiny_sdxl_pipe) -> ModelAdapter:
    return ModelAdapter(tiny_sdxl_pipe)


def _embeds_for(adapter: ModelAdapter, cfg: bool) -> PromptEmbeds:
    return adapter.encode_prompt(["a red fox", "a cat"], ["blurry", ""], cfg)


def test_request_rule_defaults_from_the_embeddings(adapter):
    x = torch.zeros(1, 4, 8, 8)
    assert Request(x, [0], [(0, 0)], _embeds_for(adapter, True), 5.0, (64, 64)).rule is CFG
    assert Request(x, [0], [(0, 0)], _embeds_for(adapter, False), 5.0, (64, 64)).rule is NO_GUIDANCE
    assert default_rule(True) is CFG and default_rule(False) is NO_GUIDANCE
    with pytest.raises(HiresError, match="needs unconditional text embeddings"):
        Request(x, [0], [(0, 0)], _embeds_for(adapter, False), 5.0, (64, 64), rule=NDCFG)
    # the FouriScale rule has no negative-text row besides uncond: it needs CFG embeddings as well
    assert FOURISCALE.needs_uncond


class CallLog:
    """Every UNet call's batch size and the adapter's ``call_info`` at that moment."""

    def __init__(self, adapter: ModelAdapter) -> None:
        self.adapter, self.calls = adapter, []

    def __enter__(self) -> CallLog:
        self.handle = self.adapter.unet.register_forward_pre_hook(self._hook)
        return self

    def _hook(self, module: Any, args: tuple[Any, ...]) -> None:
        self.calls.append((args[0].shape[0], list(self.adapter.call_info)))

    def __exit__(self, *exc: Any) -> None:
        self.handle.remove()


def _requests(adapter: ModelAdapter, rules: list[GuidanceRule]) -> list[Request]:
    """One request per rule: 3 views of 16×16 and (for the first) 2 views of 8×12, samples 0…"""
    g = torch.Generator().manual_seed(2)
    embeds = _embeds_for(adapter, True)
    out = []
    for k, rule in enumerate(rules):
        x = torch.randn(3, 4, 16, 16, generator=g)
        out.append(Request(x, [0, 1, 0], [(0, 0), (8, 0), (0, 8)], embeds, 4.0 + k, (128, 128), [0, 1, 2], rule=rule))
    small = torch.randn(2, 4, 8, 12, generator=g)
    out.append(Request(small, [1, 0], [(0, 0)] * 2, embeds, 6.0, (64, 96), [1, 0], rule=rules[0]))
    return out


def test_rows_are_branch_major_and_rules_never_share_a_call(adapter):
    t = torch.tensor(500)
    requests = _requests(adapter, [NDCFG, CFG])
    with CallLog(adapter) as log:
        adapter.predict(requests, t, 8)
    # groups (16², NDCFG) 3 views, (16², CFG) 3 views, (8×12, NDCFG) 2 views; NDCFG: 3 rows per view → 2 views per
    # call, CFG: 4 views per call
    assert [rows for rows, _ in log.calls] == [6, 3, 6, 6]
    first = log.calls[0][1]
    assert first == [(0, "uncond"), (1, "uncond"), (0, "cond"), (1, "cond"), (0, "uncond_light"), (1, "uncond_light")]
    for _, info in log.calls:
        branches = {b for _, b in info}
        assert branches in ({"uncond", "cond", "uncond_light"}, {"uncond", "cond"})
    assert log.calls[2][1] == [(0, "uncond"), (1, "uncond"), (2, "uncond"), (0, "cond"), (1, "cond"), (2, "cond")]


def test_ndcfg_without_patches_is_cfg(adapter):
    """Without a patch on the light branch its row equals the uncond row: NDCFG predicts what CFG does."""
    t = torch.tensor(700)
    nd = adapter.predict(_requests(adapter, [NDCFG]), t, 8)
    cfg = adapter.predict(_requests(adapter, [CFG]), t, 8)
    for a, b in zip(nd, cfg, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_predictions_do_not_depend_on_chunking(adapter):
    """max_batch 2, 3 and 8 cut the same views into different calls (1, 1 and 2 NDCFG views per call) and give the
    same predictions — up to float rounding, which differs between batch sizes (README: batched and single model
    calls round differently), amplified by the guidance scale; a view combined with another view's rows would be off
    by O(1)."""
    t = torch.tensor(300)
    results = [adapter.predict(_requests(adapter, [NDCFG, CFG]), t, mb) for mb in (2, 3, 8)]
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_branches_beyond_max_batch_run_in_separate_calls(adapter):
    """max_batch 1 (or 2 with NDCFG's three rows): a view's independent branches split into calls of at most
    max_batch rows, combined as one call's would be; FouriScale's coupled rows (weak takes cond's Q/K) stay together."""
    assert [p.names for p in CFG.parts(1)] == [("uncond",), ("cond",)]
    assert [p.names for p in NDCFG.parts(2)] == [("uncond", "cond"), ("uncond_light",)]
    assert CFG.parts(2) == [CFG] and FOURISCALE.parts(3) == [FOURISCALE]
    for size in (1, 2):
        parts = FOURISCALE.parts(size)
        assert [p.names for p in parts] == [("uncond",), ("cond", "weak")]
        assert [p.coupled for p in parts] == [(), (("cond", "weak"),)]
    with pytest.raises(HiresError, match="not consecutive"):
        GuidanceRule("bad", FOURISCALE.branches, FOURISCALE.combine, coupled=(("uncond", "weak"),))
    for bad in ((), ("cond", "nowhere")):  # an empty group, a name that is no branch: one line, not an IndexError
        with pytest.raises(HiresError, match="not consecutive"):
            GuidanceRule("bad", FOURISCALE.branches, FOURISCALE.combine, coupled=(bad,))
    t = torch.tensor(400)
    with CallLog(adapter) as log:
        split = adapter.predict(_requests(adapter, [NDCFG, CFG]), t, 1)
    assert {rows for rows, _ in log.calls} == {1}
    assert [info for _, info in log.calls[:3]] == [[(0, "uncond")], [(0, "cond")], [(0, "uncond_light")]]
    whole = adapter.predict(_requests(adapter, [NDCFG, CFG]), t, 8)
    for a, b in zip(split, whole, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    with CallLog(adapter) as log:
        adapter.predict(_requests(adapter, [FOURISCALE]), t, 1)
    assert [info for _, info in log.calls[:2]] == [[(0, "uncond")], [(0, "cond"), (0, "weak")]]
    assert {rows for rows, _ in log.calls} == {1, 2}


def test_accdiffusion_capture_reads_the_cond_branch_only(adapter):
    """The cross-attention recorder keys on branch ``cond``: a FouriScale call (whose ``weak`` row also carries the
    cond text) records one map per view, not two."""
    from hiresdiff.patches.attention import capture_cross_attention

    x = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(3))
    embeds, t = _embeds_for(adapter, True), torch.tensor(500)
    counts = []
    for rule in (CFG, FOURISCALE):
        with capture_cross_attention(adapter, 2, (32, 32)) as recorder:
            adapter.predict([Request(x, [0, 1], [(0, 0)] * 2, embeds, 5.0, (256, 256), [0, 1], rule=rule)], t, 8)
        counts.append(recorder.counts.clone())
    assert torch.equal(counts[0], counts[1]) and bool((counts[0] > 0).all())


# ------------------------------------------------------------------------------------------------ bit-for-bit CFG


class TwoHalfAdapter(ModelAdapter):
    """The adapter's prediction before guidance rules, kept as the reference: fixed (uncond, cond) halves chosen
    from whether any request has unconditional embeddings, ``u + g(c − u)`` computed inline."""

    @torch.no_grad()
    def predict(self, requests: list[Request], t: torch.Tensor, max_batch: int) -> list[torch.Tensor]:
        cfg = any(r.embeds.uncond is not None for r in requests)
        halves = ["uncond", "cond"] if cfg else ["cond"]
        per_call = max(1, max_batch // len(halves))
        items: dict[tuple[Any, ...], list[tuple[Request, int]]] = {}
        for req in requests:
            req.outputs = [torch.empty(0)] * req.x.shape[0]
            for i in range(req.x.shape[0]):
                own = None if req.timestep is None else float(req.timestep)  # a per-request timestep: own calls
                items.setdefault((*req.x.shape[-2:], own), []).append((req, i))
        for group in items.values():
            for s in range(0, len(group), per_call):
                chunk = group[s : s + per_call]
                at = t if chunk[0][0].timestep is None else chunk[0][0].timestep
                out = self._halves(torch.stack([req.x[i] for req, i in chunk]), at, chunk, halves)
                if cfg:
                    uncond, cond = out.chunk(2)
                    g = torch.tensor([req.guidance for req, _ in chunk], device=out.device).view(-1, 1, 1, 1)
                    out = uncond + g * (cond - uncond)
                for (req, i), pred in zip(chunk, out, strict=True):
                    req.outputs[i] = pred
        return [torch.stack(r.outputs) for r in requests]

    def _halves(self, x: torch.Tensor, t: torch.Tensor, chunk: list[tuple[Request, int]], halves: list[str]) -> Any:
        text, pooled, time_ids = [], [], []
        for half in halves:
            for req, i in chunk:
                rows = torch.tensor(req.rows[i : i + 1], device=self.device)
                text.append(getattr(req.embeds, half).index_select(0, rows))
                pooled.append(getattr(req.embeds, f"pooled_{half}").index_select(0, rows))
                time_ids.append(self._time_ids([(req.size, req.crops[i])]))
        self.call_info = [(req.samples[i] if req.samples else -1, half) for half in halves for req, i in chunk]
        model_in = torch.cat([x] * len(halves)).to(self.dtype)
        kwargs = {"added_cond_kwargs": {"text_embeds": torch.cat(pooled), "time_ids": torch.cat(time_ids)}}
        return self.unet(model_in, t, encoder_hidden_states=torch.cat(text), return_dict=False, **kwargs)[0].float()


@pytest.fixture(scope="module")
def pipelines(tiny_sdxl_pipe) -> tuple[HiresPipeline, HiresPipeline]:
    rules = HiresPipeline.from_pipe(tiny_sdxl_pipe, "tiny-sdxl")
    reference = HiresPipeline.from_pipe(tiny_sdxl_pipe, "tiny-sdxl")
    reference.adapter = TwoHalfAdapter(tiny_sdxl_pipe)
    return rules, reference


@pytest.mark.parametrize("method", [m for m, spec in METHODS.items() if not spec.own_control])  # no ControlNet here
def test_cfg_through_the_rule_equals_the_two_halves_bit_for_bit(pipelines, method):
    """Every registered method on tiny-sdxl (two prompts with negatives, 2 steps, twice the native side, max_batch 3
    so chunks end mid-request): the latents and images are identical to the pre-rule adapter's."""
    kwargs = {
        "steps": 2,
        "seed": 4,
        "guidance": 5.0,
        "negative_prompt": ["blurry", "dark"],
        "max_batch": 3,
        "previews": False,
        "progress": False,
    }
    if method == "fouriscale":  # its own rule adds a weak row the two-half reference cannot run: its CFG variant
        kwargs["guidance_variant"] = "cfg"
    rules, reference = pipelines
    side = 2 * rules.native_size
    new = rules(["a red fox", "a quiet harbour"], method, side, side, **kwargs)
    old = reference(["a red fox", "a quiet harbour"], method, side, side, **kwargs)
    assert (new.latents is None) == (old.latents is None)
    if new.latents is not None:
        assert torch.equal(new.latents, old.latents)
    for a, b in zip(new.images, old.images, strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))
