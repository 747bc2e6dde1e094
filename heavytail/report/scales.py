"""Colour scales of the heatmaps: the tail index's (with its hard change at 2), and log scales for magnitudes."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np


def _hex(c: str) -> tuple[int, int, int]:
    return int(c[1:3], 16), int(c[3:5], 16), int(c[5:7], 16)


@dataclass(frozen=True)
class ColorScale:
    """Piecewise-linear colours over a linear or log axis, with an optional break (a hard colour change).

    ``lo``, ``hi`` and the stops are on the scale's axis, which is the value plus ``shift``: excess kurtosis
    (Gaussian 0, never under -2) is coloured on a log axis of ``excess + 3``, the Pearson kurtosis, so negative
    values have a place. Values under ``break_at`` (value units) take the ``below`` stops, the others the
    ``stops``; values outside ``[lo, hi]`` are clamped; NaN takes ``missing``.
    """

    lo: float
    hi: float
    stops: tuple[tuple[float, str], ...]
    log: bool = False
    below: tuple[tuple[float, str], ...] = ()
    break_at: float | None = None
    missing: str = "#d3d8e0"
    shift: float = 0.0

    def _axis(self, a: np.ndarray) -> np.ndarray:
        a = np.clip(a, self.lo, self.hi)
        return np.log10(a) if self.log else a

    def _t(self, v: np.ndarray) -> np.ndarray:
        return self._axis(v + self.shift)

    def value_at(self, f: float) -> float:
        """The value (not the axis position) at fraction ``f`` of the legend bar."""
        if self.log:
            a = 10 ** (math.log10(self.lo) + f * (math.log10(self.hi) - math.log10(self.lo)))
        else:
            a = self.lo + f * (self.hi - self.lo)
        return a - self.shift

    def pos(self, v: float) -> float:
        """Where ``v`` sits on the legend bar, 0 at ``lo`` and 1 at ``hi``."""
        t = self._t(np.asarray([v], dtype=np.float64))[0]
        t0, t1 = self._axis(np.asarray([self.lo, self.hi], dtype=np.float64))
        return float((t - t0) / (t1 - t0)) if t1 > t0 else 0.0

    def _interp(self, t: np.ndarray, stops: tuple[tuple[float, str], ...]) -> np.ndarray:
        xs = self._axis(np.asarray([s[0] for s in stops], dtype=np.float64))
        cols = np.asarray([_hex(s[1]) for s in stops], dtype=np.float64)
        return np.stack([np.interp(t, xs, cols[:, k]) for k in range(3)], axis=-1)

    def rgb(self, values: np.ndarray) -> np.ndarray:
        """uint8 colours, shape ``values.shape + (3,)``."""
        v = np.asarray(values, dtype=np.float64)
        nan = ~np.isfinite(v) & ~np.isinf(v)
        t = self._t(np.where(nan, self.lo - self.shift, v))
        out = self._interp(t, self.stops)
        if self.break_at is not None and self.below:
            under = v < self.break_at
            out[under] = self._interp(t[under], self.below)
        out[nan] = _hex(self.missing)
        return np.clip(np.rint(out), 0, 255).astype(np.uint8)

    def css(self, v: float) -> str:
        """One colour as ``#rrggbb``."""
        r, g, b = self.rgb(np.asarray([v]))[0]
        return f"#{r:02x}{g:02x}{b:02x}"


# Tail index: red under 2 (infinite variance), orange to pale between 2 and 4 (finite variance, infinite
# kurtosis), blue above 4; the hard change at 2 makes a dip visible at a glance.
ALPHA_SCALE = ColorScale(
    lo=1.0,
    hi=8.0,
    log=True,  # each doubling of alpha gets the same width: 1-2, 2-4 and 4-8 a third of the bar each
    below=((1.0, "#4a0018"), (1.5, "#9b0d26"), (1.999, "#dd2a25")),
    break_at=2.0,
    stops=((2.0, "#fca55d"), (3.0, "#fee090"), (4.0, "#e3f2f7"), (5.66, "#8fbfdc"), (8.0, "#3b6fb0")),
)

_MAGNITUDE_COLOURS = {
    "kurtosis": ("#fcfdbf", "#feb47b", "#f1605d", "#b5367a", "#6a1c81", "#2b1160"),
    "ratio": ("#f7fcf0", "#c7e9c0", "#7bccc4", "#2b8cbe", "#0c4a8c", "#081d58"),
}


def log_scale(kind: str, lo: float, hi: float, shift: float = 0.0) -> ColorScale:
    """A log colour scale from pale (``lo``) to dark (``hi``) in the palette ``kind`` (kurtosis or ratio).

    ``lo`` and ``hi`` are on the axis ``value + shift`` (see :class:`ColorScale`).
    """
    colours = _MAGNITUDE_COLOURS[kind]
    n = len(colours) - 1
    stops = tuple((lo * (hi / lo) ** (i / n), c) for i, c in enumerate(colours))
    return ColorScale(lo=lo, hi=hi, stops=stops, log=True, shift=shift)


KURTOSIS_SHIFT = 3.0
"""Excess kurtosis is coloured on a log axis of ``excess + 3`` (Pearson's kurtosis: 1 at the least possible
value, 3 for a Gaussian)."""


def kurtosis_scale(matrices: Sequence[np.ndarray]) -> ColorScale:
    """The colour scale of excess kurtosis: log of ``excess + 3`` from 1 (excess -2) to the decade above the
    largest value (at least 100)."""
    shifted = [np.asarray(m, dtype=np.float64) + KURTOSIS_SHIFT for m in matrices]
    return log_scale("kurtosis", 1.0, decade_hi(shifted, 100.0), shift=KURTOSIS_SHIFT)


def magnitude_scale(matrices: Sequence[np.ndarray]) -> ColorScale:
    """A log scale (the ratio palette) from the decade under the smallest positive finite value to the decade
    above the largest: for a positive quantity with no natural threshold, such as a batch size."""
    positive = [m[np.isfinite(m) & (m > 0)] for m in matrices]
    values = np.concatenate(positive) if positive else np.zeros(0)
    if values.size == 0:
        return log_scale("ratio", 1.0, 10.0)
    lo = float(10 ** math.floor(math.log10(values.min()) + 1e-9))
    hi = max(decade_hi([values], lo), lo * 10)
    return log_scale("ratio", lo, hi)


def decade_hi(matrices: Sequence[np.ndarray], floor: float) -> float:
    """The upper end of a log scale: the decade above the largest finite value, at least ``floor``."""
    top = floor
    for m in matrices:
        finite = m[np.isfinite(m)]
        if finite.size:
            top = max(top, float(finite.max()))
    return float(10 ** math.ceil(math.log10(top) - 1e-9))
