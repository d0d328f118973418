"""hiresdiff — training-free high-resolution generation for diffusers models.

``generate(prompt, method=..., model=..., width=..., height=...)`` or ``HiresPipeline.from_pipe(pipe)(...)``.
"""

from __future__ import annotations

__version__ = "0.1.0"

from hiresdiff.errors import HiresError
from hiresdiff.methods import METHODS
from hiresdiff.pipeline import GenerationResult, HiresPipeline, generate


def available_methods() -> list[str]:
    """Names of the registered methods."""
    return list(METHODS)


__all__ = ["GenerationResult", "HiresError", "HiresPipeline", "__version__", "available_methods", "generate"]
