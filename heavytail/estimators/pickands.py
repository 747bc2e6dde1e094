"""Pickands' tail index of magnitudes, from three order statistics."""

from __future__ import annotations

import math

import torch

from heavytail.estimators.hill import TOP_CAP, _check_k, _result_dtype, _work_dtype, top_magnitudes

__all__ = ["pickands"]


def pickands(x: torch.Tensor, k: int | None = None) -> torch.Tensor:
    """Tail index ``alpha = 1 / xi`` of ``|x|`` by Pickands (1975), over the last dimension.

    ``xi = log((X(k) - X(2k)) / (X(2k) - X(4k))) / log 2`` with ``X(1) >= X(2) >= ...`` the valid (finite,
    non-zero, as in :func:`~heavytail.estimators.hill.top_magnitudes`) values of ``|x|`` sorted descending,
    1-based. ``alpha = inf`` where ``xi <= 0`` (no power-law tail); NaN where fewer than 4k values are valid or
    ``X(2k) = X(4k)`` (ties, e.g. quantised data, leave the ratio undefined). Location-invariant and valid for
    every extreme-value domain, but its variance is several times Hill's at the same k (docs/estimators.md).
    ``k=None`` uses ``k = n // 100`` (at least 1, at most 2**14), a conventional choice, not an accuracy-tuned one.
    ``x``: ``(..., n)``; result ``(...)`` in float32 (float64 for float64 input), no host-device synchronisation.
    """
    n = x.shape[-1]
    if k is None:
        k = max(1, min(n // 100, TOP_CAP // 4))
    _check_k(k)
    batch = x.shape[:-1]
    out = _result_dtype(x)
    if 4 * k > n:
        return torch.full(batch, math.nan, dtype=out, device=x.device)
    top, count = top_magnitudes(x, 4 * k)
    top = top.to(_work_dtype(x))
    a, b, c = top[..., k - 1], top[..., 2 * k - 1], top[..., 4 * k - 1]
    xi = torch.log((a - b) / (b - c)) / math.log(2)
    alpha = torch.where(xi > 0, 1.0 / xi, math.inf)
    alpha = torch.where((count >= 4 * k) & (b > c), alpha, math.nan)
    return alpha.to(out)
