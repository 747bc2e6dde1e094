"""The moment (Dekkers-Einmahl-de Haan) tail index of magnitudes."""

from __future__ import annotations

import math

import torch

from heavytail.estimators.hill import TOP_CAP, _check_k, _result_dtype, _work_dtype, top_magnitudes

__all__ = ["dedh"]


def dedh(x: torch.Tensor, k: int | None = None) -> torch.Tensor:
    """Tail index ``alpha = 1 / xi`` of ``|x|`` by the moment estimator of Dekkers, Einmahl & de Haan (1989).

    With ``X(1) >= X(2) >= ...`` the valid (finite, non-zero) values of ``|x|`` sorted descending and
    ``M_j = mean_{i=1..k} (log X(i) - log X(k+1))**j``: ``xi = M1 + 1 - 0.5 / (1 - M1**2 / M2)``. ``M1`` is the
    Hill estimate of ``xi``; the second term corrects it so that the estimator is consistent in every
    extreme-value domain, not only for power-law tails. ``alpha = inf`` where ``xi <= 0`` (a light or bounded
    tail) or the top k+1 values are tied; NaN where fewer than k+1 values are valid. ``k=None`` uses
    ``k = n // 100`` (at least 1, at most 2**16 - 1), a conventional choice, not an accuracy-tuned one.
    ``x``: ``(..., n)``; result ``(...)`` in float32 (float64 for float64 input), no host-device synchronisation.
    """
    n = x.shape[-1]
    if k is None:
        k = max(1, min(n // 100, TOP_CAP - 1))
    _check_k(k)
    batch = x.shape[:-1]
    out = _result_dtype(x)
    if k + 1 > n:
        return torch.full(batch, math.nan, dtype=out, device=x.device)
    top, count = top_magnitudes(x, k + 1)
    logs = top.to(_work_dtype(x)).log()
    excess = logs[..., :k] - logs[..., k : k + 1]
    m1 = excess.mean(-1)
    m2 = (excess * excess).mean(-1)
    xi = m1 + 1 - 0.5 / (1 - m1 * m1 / m2)
    alpha = torch.where((xi > 0) & (m2 > 0), 1.0 / xi, math.inf)
    return torch.where(count >= k + 1, alpha, math.nan).to(out)
