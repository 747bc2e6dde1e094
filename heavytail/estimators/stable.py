"""The alpha-stable index of signed noise from block sums (Mohammadi, Mohammadpour & Ogata 2015)."""

from __future__ import annotations

import math

import torch

__all__ = ["stable_alpha"]


def stable_alpha(x: torch.Tensor) -> torch.Tensor:
    """Stable index of centred, signed ``x`` over the last dimension, as in Simsekli et al. (2019).

    Split the n values into ``K1 = n // K2`` consecutive blocks of ``K2 = floor(sqrt(n))`` values (the last
    ``n - K1 K2`` are dropped) and sum each block to ``Y_i``. For i.i.d. symmetric alpha-stable values
    ``Y_i ~ K2**(1/alpha) X``, so ``1/alpha = (mean(log|Y_i|) - mean(log|x_j|)) / log K2`` (Mohammadi, Mohammadpour
    & Ogata 2015, Corollary 2.4; the estimator of "A tail-index analysis of stochastic gradient noise in deep
    neural networks", Simsekli, Sagun & Gurbuzbalaban 2019, who used the largest divisor of n under sqrt(n)
    for K2). The stable family needs ``0 < alpha <= 2``, so the result is clamped there: 2 reads as Gaussian
    (finite variance), under 2 as infinite variance. Unlike Hill it sees the whole distribution, not the tail,
    and it assumes the stable family and independent, centred entries: feed it gradient noise (sample minus
    mean), not raw gradients. Non-finite entries count as 0 in the block sums and are left out of the means,
    as are zeros (``log 0``); NaN for n < 4 or no non-zero values. ``x``: ``(..., n)``; result ``(...)`` in
    float32 (float64 for float64 input), no host-device synchronisation.
    """
    n = x.shape[-1]
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    k2 = math.isqrt(n)
    k1 = n // k2 if k2 else 0
    if k2 < 2 or k1 < 2:
        return torch.full(x.shape[:-1], math.nan, dtype=dt, device=x.device)
    xs = x[..., : k1 * k2].to(dt)
    xs = xs.masked_fill(~torch.isfinite(xs), 0)
    blocks = xs.reshape(*xs.shape[:-1], k1, k2).sum(-1)
    inv_alpha = (_mean_log_abs(blocks) - _mean_log_abs(xs)) / math.log(k2)
    # 1/alpha >= 1/2 is the stable family's range; smaller (or negative, from cancelling sums) means Gaussian.
    return 1.0 / inv_alpha.clamp(min=0.5)


def _mean_log_abs(v: torch.Tensor) -> torch.Tensor:
    a = v.abs()
    nonzero = a > 0
    logs = torch.where(nonzero, a, 1).log()
    return logs.sum(-1) / nonzero.sum(-1)
