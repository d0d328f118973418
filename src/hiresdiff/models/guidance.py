"""Guidance rules: which branches of a view the denoiser runs, and how their outputs become one prediction.

A :class:`GuidanceRule` names its branches — each a row of the denoiser call per view, conditioned on the
unconditional or the conditional text — and a combine function ``(outputs by branch, guidance per view) →
prediction``. The adapter runs every branch of a chunk of views in **one** batched call, rows branch-major (all
views of the first branch, then all views of the second, …), and hands the outputs to the rule. Classifier-free
guidance is one rule among others (SPEC-baselines-unet §0.1 item 2):

* :data:`CFG` — ``(uncond, cond) → ε_u + g·(ε_c − ε_u)`` (Ho & Salimans), the default with a negative text;
* :data:`NO_GUIDANCE` — ``(cond) → ε_c`` (guidance ≤ 1, and FLUX's guidance-distilled models);
* :data:`NDCFG` — ScaleCrafter's noise-damped CFG ``(uncond, cond, uncond_light) → ε_u^light + g·(ε_c − ε_u)``,
  where a method's model patches give ``uncond_light`` a lighter re-dilation (SPEC-baselines-unet §1.1);
* :data:`FOURISCALE` — ``(uncond, cond, weak@cond text) → ε_u + g·(ε_weak − ε_u)``; the ``cond`` row only lends
  its attention queries and keys to the ``weak`` row (SPEC-baselines-unet §2.1).

Branch names are the keys other code reads: ``ModelAdapter.call_info`` gives ``(canvas sample, branch name)`` per
row of the call in progress, so model patches and attention processors can treat branches differently (AccDiffusion
records the ``cond`` rows only). The module is torch-light: tensors are only combined here, never created by a model.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from hiresdiff.errors import require

#: the text embeddings a branch can be conditioned on (the rows of :class:`~hiresdiff.models.adapter.PromptEmbeds`)
TEXTS = ("uncond", "cond")
#: branch names used by the built-in rules (any other name is allowed)
UNCOND, COND, WEAK, UNCOND_LIGHT = "uncond", "cond", "weak", "uncond_light"

#: ``combine(outputs by branch name, guidance scale per view broadcastable to the outputs) → prediction``
Combine = Callable[[Mapping[str, torch.Tensor], torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Branch:
    """One denoiser row per view: its ``name`` (what :attr:`ModelAdapter.call_info` reports) and its ``text``."""

    name: str
    text: str

    def __post_init__(self) -> None:
        require(bool(self.name), "a guidance branch needs a name")
        require(self.text in TEXTS, f"branch {self.name!r}: text must be one of {', '.join(TEXTS)}, got {self.text!r}")


@dataclass(frozen=True)
class GuidanceRule:
    """Named branches run together for every view, and the function that combines their outputs.

    Rules compare and hash by their fields (the combine function by identity), so requests can be grouped by rule:
    requests with different rules never share a denoiser call.
    """

    name: str
    branches: tuple[Branch, ...]
    combine: Combine
    #: groups of branches that see each other inside the call (FouriScale's weak row takes the cond row's Q/K),
    #: each of consecutive branches: a group is never split over calls
    coupled: tuple[tuple[str, ...], ...] = ()

    def __post_init__(self) -> None:
        require(len(self.branches) > 0, f"guidance rule {self.name!r} has no branches")
        names = [b.name for b in self.branches]
        require(len(set(names)) == len(names), f"guidance rule {self.name!r} repeats a branch name: {names}")
        for group in self.coupled:
            at = [names.index(n) for n in group if n in names]
            require(
                bool(group) and len(at) == len(group) and at == list(range(at[0], at[0] + len(at))),
                f"guidance rule {self.name!r}: coupled branches {group} are not consecutive branches of {names}",
            )

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(b.name for b in self.branches)

    @property
    def needs_uncond(self) -> bool:
        """Whether a branch is conditioned on the unconditional (negative) text."""
        return any(b.text == "uncond" for b in self.branches)

    def per_call(self, max_batch: int) -> int:
        """Views per denoiser call when a call holds at most ``max_batch`` rows (every branch of a view together;
        at least one view, even when its branches alone exceed the budget)."""
        return max(1, max_batch // len(self.branches))

    def parts(self, max_batch: int) -> list[GuidanceRule]:
        """The calls one view's branches take: all together while they fit ``max_batch`` rows, else consecutive
        groups of at most ``max_batch`` branches — a :attr:`coupled` group whole, even when it alone exceeds the
        budget — each a rule of its own whose outputs, concatenated in order, are this rule's branch-major rows
        (low-memory runs: ``max_batch=1`` runs a CFG pair as two calls of one row; FouriScale's three rows run as
        ``uncond`` and ``cond + weak`` under 2 or 1). Rows are independent inside the denoiser unless coupled, so
        only rounding differs."""
        size = max(1, max_batch)
        if len(self.branches) <= size:
            return [self]
        groups: list[tuple[Branch, ...]] = []
        for unit in self._units():
            if groups and len(groups[-1]) + len(unit) <= size:
                groups[-1] = (*groups[-1], *unit)
            else:
                groups.append(unit)
        if len(groups) == 1:
            return [self]
        return [
            GuidanceRule(f"{self.name}[{','.join(b.name for b in g)}]", g, _unsplit, self._coupled_in(g))
            for g in groups
        ]

    def _units(self) -> list[tuple[Branch, ...]]:
        """The branches in order, each coupled group as one unit."""
        units: list[tuple[Branch, ...]] = []
        i = 0
        while i < len(self.branches):
            group = next((g for g in self.coupled if g[0] == self.branches[i].name), (self.branches[i].name,))
            units.append(self.branches[i : i + len(group)])
            i += len(group)
        return units

    def _coupled_in(self, branches: tuple[Branch, ...]) -> tuple[tuple[str, ...], ...]:
        names = {b.name for b in branches}
        return tuple(g for g in self.coupled if set(g) <= names)

    def apply(self, out: torch.Tensor, guidance: Sequence[float]) -> torch.Tensor:
        """The prediction per view from one call's output ``out`` (rows branch-major, ``len(guidance)`` views)."""
        views = len(guidance)
        require(
            out.shape[0] == views * len(self.branches),
            f"guidance rule {self.name!r}: {out.shape[0]} rows are not {len(self.branches)} branches × {views} views",
        )
        by_branch = dict(zip(self.names, out.split(views), strict=True))
        g = torch.tensor(list(guidance), device=out.device).view(-1, *[1] * (out.dim() - 1))
        return self.combine(by_branch, g)


def _unsplit(out: Mapping[str, torch.Tensor], g: torch.Tensor) -> torch.Tensor:
    """A part of a split rule (:meth:`GuidanceRule.parts`) is never combined on its own."""
    raise RuntimeError("a part of a split guidance rule has no combine function of its own")


def _cfg(out: Mapping[str, torch.Tensor], g: torch.Tensor) -> torch.Tensor:
    """Classifier-free guidance ``ε_u + g·(ε_c − ε_u)``."""
    return out[UNCOND] + g * (out[COND] - out[UNCOND])


def _cond_only(out: Mapping[str, torch.Tensor], g: torch.Tensor) -> torch.Tensor:
    """The conditional output itself (no guidance, or guidance inside the model: FLUX-dev's embedding)."""
    return out[COND]


def _ndcfg(out: Mapping[str, torch.Tensor], g: torch.Tensor) -> torch.Tensor:
    """Noise-damped CFG ``ε_u^light + g·(ε_c − ε_u)`` (ScaleCrafter)."""
    return out[UNCOND_LIGHT] + g * (out[COND] - out[UNCOND])


def _fouriscale(out: Mapping[str, torch.Tensor], g: torch.Tensor) -> torch.Tensor:
    """FouriScale guidance ``ε_u + g·(ε_weak − ε_u)``; the strong ``cond`` row only lends attention Q/K."""
    return out[UNCOND] + g * (out[WEAK] - out[UNCOND])


CFG = GuidanceRule("cfg", (Branch(UNCOND, "uncond"), Branch(COND, "cond")), _cfg)
NO_GUIDANCE = GuidanceRule("none", (Branch(COND, "cond"),), _cond_only)
NDCFG = GuidanceRule("ndcfg", (Branch(UNCOND, "uncond"), Branch(COND, "cond"), Branch(UNCOND_LIGHT, "uncond")), _ndcfg)
FOURISCALE = GuidanceRule(
    "fouriscale",
    (Branch(UNCOND, "uncond"), Branch(COND, "cond"), Branch(WEAK, "cond")),
    _fouriscale,
    coupled=((COND, WEAK),),
)


def default_rule(has_uncond: bool) -> GuidanceRule:
    """:data:`CFG` when unconditional embeddings exist (guidance > 1 with SD/SDXL), else :data:`NO_GUIDANCE`."""
    return CFG if has_uncond else NO_GUIDANCE
