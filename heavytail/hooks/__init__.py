"""Taps into the training step: backward hooks on parameters, step hooks on the optimizer, parameter selection."""

from heavytail.hooks.gradients import BackwardTap, LocalSampleTap
from heavytail.hooks.optimizer import OptimizerTap, denominators
from heavytail.hooks.selection import select_parameters

__all__ = ["BackwardTap", "LocalSampleTap", "OptimizerTap", "denominators", "select_parameters"]
