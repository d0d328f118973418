"""direct — the base model sampled at the target size (SPEC §1); recipe: :mod:`hiresdiff.methods.direct`."""

from __future__ import annotations

from dataclasses import dataclass

from hiresdiff.methods.base import Method, Params


@dataclass
class DirectParams(Params):
    """No parameters: the whole canvas is denoised at once."""


METHOD = Method(
    "direct", "base model sampled directly at the target size", "", DirectParams, "hiresdiff.methods.direct:run_direct"
)
