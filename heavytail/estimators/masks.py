"""Comparisons as 0/1 float masks: what the sample estimators select with, because it is cheap on every device."""

from __future__ import annotations

from typing import Callable

import torch


def float_mask(op: Callable, a: torch.Tensor, b: torch.Tensor | float, dtype: torch.dtype) -> torch.Tensor:
    """``op(a, b)`` (``torch.gt``, ``torch.eq``, ...) written into a ``dtype`` tensor as 1.0 / 0.0.

    Selecting by multiplying with such a mask (or ``torch.lerp`` with it as the weight, which returns either end
    exactly) instead of boolean tensors and ``torch.where``: on the CPU a comparison into a float tensor costs
    about 5 us at 53 x 256 entries, a boolean one 12-15 us and a ``torch.where`` on a boolean mask 55-78 us
    (docs/performance.md); on CUDA they are alike. The products are exact selections where the selected values
    are finite, which each caller makes sure of (``nan_to_num`` first where they may not be).
    """
    return op(a, b, out=torch.empty(a.shape, dtype=dtype, device=a.device))
