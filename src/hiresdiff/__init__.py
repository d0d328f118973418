"""hiresdiff — training-free high-resolution generation for diffusers models.

``generate(prompt, method=..., model=..., width=..., height=...)`` or ``HiresPipeline.from_pipe(pipe)(...)``.
"""

from __future__ import annotations

__version__ = "0.1.0"

import importlib
import logging
from typing import TYPE_CHECKING, Any


class _NoImageProcessorFallbackNotice(logging.Filter):
    """Drop transformers' notice that image processors fall back to PIL without torchvision: diffusers' pipeline
    imports trigger it on every CPU-only torch build, and hiresdiff never uses image processors."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed)" not in record.getMessage()


logging.getLogger("transformers.utils.import_utils").addFilter(_NoImageProcessorFallbackNotice())

from hiresdiff.errors import HiresError  # noqa: E402
from hiresdiff.methods import METHODS  # noqa: E402

if TYPE_CHECKING:
    from hiresdiff.pipeline import GenerationResult, HiresPipeline, generate

#: public names of :mod:`hiresdiff.pipeline`, imported on first access (PEP 562): ``import hiresdiff`` and the
#: command line's start stay free of torch and diffusers
_PIPELINE_NAMES = ("GenerationResult", "HiresPipeline", "generate")


def __getattr__(name: str) -> Any:
    if name in _PIPELINE_NAMES:
        importlib.import_module("hiresdiff.plan")  # registers the plan's max_batch="auto" for API runs
        return getattr(importlib.import_module("hiresdiff.pipeline"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def available_methods() -> list[str]:
    """Names of the registered methods."""
    return list(METHODS)


__all__ = ["GenerationResult", "HiresError", "HiresPipeline", "__version__", "available_methods", "generate"]
