"""Cost model: model FLOPs of whole generations counted on the ``meta`` device (``hiresdiff cost``)."""

from hiresdiff.cost.model import CostReport, architecture_of, model_cost

__all__ = ["CostReport", "architecture_of", "model_cost"]
