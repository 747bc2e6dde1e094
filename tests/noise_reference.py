"""Slow, obvious float64 NumPy references of the noise-tail readings (heavytail.estimators.noise, heavytail.probe)."""

from __future__ import annotations

import math

import numpy as np

from tests.estimators.test_dedh import ref_dedh
from tests.estimators.test_hill import ref_hill, ref_regression

CODES = {"light": 0.0, "power": 1.0, "sparse": 2.0}


def standardised(a: np.ndarray, ok: np.ndarray, min_others: int = 1) -> np.ndarray:
    """Per coordinate (row), each ok |value| over the mean of the row's other ok |values| (at least
    ``min_others`` of them), in a loop."""
    out = []
    for row, keep in zip(np.abs(a), ok):
        vals = row[keep]
        if len(vals) < 1 + min_others:
            continue
        for j, v in enumerate(vals):
            others = np.delete(vals, j).mean()
            if others > 0 and v > 0:
                out.append(v / others)
    return np.array(out)


def coordinate_kurtoses(dev: np.ndarray, ok: np.ndarray) -> list[float]:
    """Each usable coordinate's (row's) excess kurtosis over its ok draws, in a loop."""
    values = []
    for row, keep in zip(dev, ok):
        x = row[keep]
        if len(x) < 4:
            continue
        c = x - x.mean()
        m2 = np.mean(c**2)
        if m2 > 0:
            values.append(np.mean(c**4) / m2**2 - 3)
    return values


def coordinate_kurtosis(dev: np.ndarray, ok: np.ndarray) -> float:
    values = coordinate_kurtoses(dev, ok)
    return float(np.mean(values)) if values else math.nan


def tail(draws: np.ndarray, ok: np.ndarray, dev: np.ndarray | None = None, min_count: int = 1000) -> dict:
    """The reading of ``draws`` (S coordinates x W draws; ``ok`` which exist), deviations ``dev`` (default: the
    draws minus each coordinate's median)."""
    return tail_windows([(draws, ok, dev)], min_count)


def tail_windows(windows: list, min_count: int = 1000, size: int = 1024) -> dict:
    """The reading of several windows ``(draws, ok, dev)`` pooled (a checkpoint's tally): each window
    standardised on its own (the active draws' variant where the window is sparse), the values pooled, the
    verdict from the total active fraction, k = n // 20 at most ``size - 1``."""
    zs, n_valid, n_active, kurt = [], 0, 0, []
    for draws, ok, dev in windows:
        draws = np.where(ok, draws.astype(np.float64), 0.0)
        if dev is None:
            med = np.array([np.median(r[k]) if k.any() else 0.0 for r, k in zip(draws, ok)])
            dev = draws - med[:, None]
        dev = np.where(ok, dev, 0.0)
        peak = np.abs(draws).max(axis=1, keepdims=True)
        active = ok & (np.abs(draws) > 1e-4 * peak)
        n_valid += ok.sum()
        n_active += active.sum()
        window_sparse = active.sum() < 0.5 * ok.sum()
        zs.append(standardised(draws, active, 3) if window_sparse else standardised(dev, ok & (dev != 0)))
        kurt.extend(coordinate_kurtoses(dev, ok))
    z = np.concatenate(zs)
    active_frac = n_active / n_valid
    sparse = active_frac < 0.5
    k = min(max(len(z) // 20, 10), size - 1)  # read at n / 20, at most the tally's size less one
    alpha, se = ref_regression(z, k)
    dedh = ref_dedh(z, k)
    computed, has_alpha = n_valid >= min_count, len(z) >= min_count
    if not computed or not (sparse or has_alpha):
        verdict = math.nan
    elif sparse:
        verdict = CODES["sparse"]
    else:
        verdict = CODES["light"] if math.isinf(alpha) or (alpha > 3.5 and dedh > 5) else CODES["power"]
    return dict(
        hill_alpha=alpha if has_alpha else math.nan,
        hill_alpha_se=se if has_alpha else math.nan,
        kurtosis=float(np.mean(kurt)) if computed and kurt else math.nan,
        tail_class=verdict,
        active_frac=active_frac,
    )


def per_coordinate_hill(xi: np.ndarray, k: int) -> float:
    """1 / the mean over coordinates (rows) of 1 / (Hill with fixed k over the row)."""
    inv = [1 / ref_hill(row, k) for row in xi]
    inv = [v for v in inv if math.isfinite(v)]
    return 1 / np.mean(inv) if inv and np.mean(inv) > 0 else math.inf


def stable_alpha(xi: np.ndarray) -> float:
    """Mohammadi et al. (2015) with blocks of floor(sqrt(M)) draws of one coordinate (rows: coordinates)."""
    m = xi.shape[1]
    k2 = math.isqrt(m)
    k1 = m // k2
    used = xi[:, : k1 * k2]
    blocks = used.reshape(xi.shape[0], k1, k2).sum(axis=2)

    def mean_log(v):
        a = np.abs(v).ravel()
        return np.mean(np.log(a[a > 0]))

    inv = (mean_log(blocks) - mean_log(used)) / math.log(k2)
    return 1 / max(inv, 0.5)


def moment_fit(x: np.ndarray, p: float) -> tuple[float, float]:
    """Slope and intercept of log mean|xi_odd|^p on log |mean g_even|^p over the resolved coordinates."""
    even, odd = x[:, 0::2], x[:, 1::2]
    g_even = even.mean(axis=1)
    resolved = np.abs(g_even) > 2.0 * even.std(axis=1, ddof=1) / math.sqrt(even.shape[1])
    noise = (np.abs(odd - odd.mean(axis=1, keepdims=True)) ** p).mean(axis=1)
    grad = np.abs(g_even) ** p
    use = resolved & (noise > 0) & (grad > 0)
    if use.sum() < 3:
        return math.nan, math.nan
    slope, intercept = np.polyfit(np.log(grad[use]), np.log(noise[use]), 1)
    return slope, intercept
