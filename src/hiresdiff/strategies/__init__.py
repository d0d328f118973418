"""Spatial strategies: one prediction for the whole canvas per step."""

from hiresdiff.strategies.base import Denoiser, Strategy
from hiresdiff.strategies.full import FullCanvas
from hiresdiff.strategies.views import Blend, DilatedSampling, LocalViews

__all__ = ["Blend", "Denoiser", "DilatedSampling", "FullCanvas", "LocalViews", "Strategy"]
