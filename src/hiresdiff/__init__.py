"""hiresdiff — training-free high-resolution generation for diffusers models.

``generate(prompt, method=..., model=..., width=..., height=...)`` or ``HiresPipeline.from_pipe(pipe)(...)``.
"""

from __future__ import annotations

__version__ = "0.1.0"

import logging


class _NoImageProcessorFallbackNotice(logging.Filter):
    """Drop transformers' notice that image processors fall back to PIL without torchvision: diffusers' pipeline
    imports trigger it on every CPU-only torch build, and hiresdiff never uses image processors."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed)" not in record.getMessage()


logging.getLogger("transformers.utils.import_utils").addFilter(_NoImageProcessorFallbackNotice())

from hiresdiff.errors import HiresError  # noqa: E402
from hiresdiff.methods import METHODS  # noqa: E402
from hiresdiff.pipeline import GenerationResult, HiresPipeline, generate  # noqa: E402


def available_methods() -> list[str]:
    """Names of the registered methods."""
    return list(METHODS)


__all__ = ["GenerationResult", "HiresError", "HiresPipeline", "__version__", "available_methods", "generate"]
