"""Prompt text in ComfyUI: AccDiffusion's content-aware view prompts through the workflow's CLIP.

ComfyUI hands a node CONDITIONING — the text encoders' output, no text. AccDiffusion's view prompts are words of the
prompt text kept per view, each encoded like a prompt of its own, so the node takes the text and the CLIP that
encoded the positive conditioning (:class:`PromptText`): the view prompts are encoded by that CLIP (``tokenize`` then
``encode_from_tokens``, as ComfyUI's CLIP Text Encode does), the words' token counts come from its first (CLIP-L)
tokenizer, and the positive/negative CONDITIONING stay the run's own prompt embeddings.
"""

from __future__ import annotations

from typing import Any

import torch

from hiresdiff.errors import require


def pad_tokens(t: torch.Tensor, length: int) -> torch.Tensor:
    """``t`` (n, tokens, c) extended to ``length`` tokens by repeating its last token (CLIP's padding embedding)."""
    extra = length - t.shape[1]
    return t if extra <= 0 else torch.cat([t, t[:, -1:].expand(-1, extra, -1)], dim=1)


def _first_chunk(tokens: dict[str, Any]) -> list[int]:
    """The token ids of the first 77-token chunk of the CLIP-L tokenizer (any tokenizer when there is no CLIP-L)."""
    chunks = tokens.get("l") or next(iter(tokens.values()))
    return [int(t[0]) for t in chunks[0]]


class PromptText:
    """The positive prompt's ``text`` and ComfyUI's ``clip`` that encoded it (module docstring)."""

    def __init__(self, clip: Any, text: str) -> None:
        self.clip, self.text = clip, text
        self._end: int | None = None

    def count_tokens(self, text: str) -> int:
        """Tokens of ``text`` without the start and end tokens (the CLIP-L tokenizer's; the first chunk's)."""
        if self._end is None:
            self._end = _first_chunk(self.clip.tokenize(""))[1]  # start, end, padding
        ids = _first_chunk(self.clip.tokenize(text))
        return ids.index(self._end, 1) - 1 if self._end in ids[1:] else len(ids) - 1

    def encode(self, prompts: list[str], length: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The CLIP's ``(cond, pooled)`` of each prompt, tokens padded to ``length`` (the run's conditioning); one
        line when a prompt is longer (its text is not the positive conditioning's)."""
        conds, pooled = [], []
        for prompt in prompts:
            cond, pool = self.clip.encode_from_tokens(self.clip.tokenize(prompt), return_pooled=True)
            require(
                cond.shape[1] <= length,
                f"the prompt text is longer than the positive conditioning ({cond.shape[1]} > {length} tokens): "
                "connect the text the positive conditioning was encoded from",
            )
            conds.append(pad_tokens(cond.float(), length))
            pooled.append(None if pool is None else pool.float().reshape(1, -1))
        joined = None if any(p is None for p in pooled) else torch.cat(pooled)  # type: ignore[arg-type]
        return torch.cat(conds), joined
