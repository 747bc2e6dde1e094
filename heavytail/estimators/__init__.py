"""Pure, batched, on-device estimators of tail heaviness: tail indices, kurtosis and their references."""

from __future__ import annotations

from typing import Callable

from heavytail.estimators.dedh import dedh
from heavytail.estimators.hill import (
    HILL_CURVE_POINTS,
    MIN_K,
    TOP_CAP,
    HillCurve,
    HillResult,
    default_top_count,
    hill,
    hill_curve,
    hill_from_top,
    hill_regression,
    top_magnitudes,
)
from heavytail.estimators.kurtosis import gaussian_kurtosis_quantile, kurtosis, kurtosis_from_power_sums
from heavytail.estimators.pickands import pickands
from heavytail.estimators.stable import stable_alpha

__all__ = [
    "HILL_CURVE_POINTS",
    "HillCurve",
    "HillResult",
    "MIN_K",
    "TAIL_ESTIMATORS",
    "TOP_CAP",
    "dedh",
    "default_top_count",
    "gaussian_kurtosis_quantile",
    "hill",
    "hill_curve",
    "hill_from_top",
    "hill_regression",
    "kurtosis",
    "kurtosis_from_power_sums",
    "pickands",
    "stable_alpha",
    "tail_estimator",
    "top_magnitudes",
]

TAIL_ESTIMATORS: dict[str, Callable] = {
    "hill": hill,
    "pickands": pickands,
    "dedh": dedh,
    "stable": stable_alpha,
}
"""Tail-index estimators by configuration name; each takes ``x`` of shape ``(..., n)`` and works with defaults.

``hill`` returns a :class:`HillResult` ``(alpha, se, k)``; the others return the alpha tensor ``(...)``.
"""


def tail_estimator(name: str) -> Callable:
    """The tail-index estimator registered under ``name`` in :data:`TAIL_ESTIMATORS`."""
    try:
        return TAIL_ESTIMATORS[name]
    except KeyError:
        known = ", ".join(sorted(TAIL_ESTIMATORS))
        raise ValueError(f"unknown tail estimator {name!r}; known: {known}") from None
