"""Excess kurtosis of gradient entries, from the values or from streamed power sums, and its Gaussian reference."""

from __future__ import annotations

import math
from statistics import NormalDist

import torch

__all__ = ["kurtosis", "kurtosis_from_power_sums", "gaussian_kurtosis_quantile"]


def kurtosis(x: torch.Tensor) -> torch.Tensor:
    """Excess kurtosis over the last dimension: ``m4 / m2**2 - 3`` with biased central moments.

    ``m_p = mean((x - mean(x))**p)``; this is ``scipy.stats.kurtosis(x, axis=-1)`` (``fisher=True``,
    ``bias=True``; Pearson 1905). 0 for Gaussian data; it is infinite in the population when the tail index is
    under 4, so on a heavy-tailed layer the sample value grows with n: read it beside
    :func:`gaussian_kurtosis_quantile` of the same n. Non-finite entries are missing (the monitor counts them);
    a row with fewer than 2 valid entries, or a constant row, gives NaN. ``x``: ``(..., n)``; result ``(...)`` in
    float32 (float64 for float64 input), no host-device synchronisation.
    """
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    if x.shape[-1] == 0:
        return torch.full(x.shape[:-1], math.nan, dtype=dt, device=x.device)
    xs = x.to(dt)
    valid = torch.isfinite(xs)
    count = valid.sum(-1).to(dt)
    xs = xs.masked_fill(~valid, 0)
    mean = xs.sum(-1) / count
    # Two passes on centred values: the one-pass power-sum form cancels catastrophically when |mean| >> std.
    d = torch.where(valid, xs - mean[..., None], 0)
    # Scale by the row's largest deviation (the ratio is scale-free): raw d**4 under- or overflows float32
    # for gradient entries near 1e-10 or 1e10.
    d = d / d.abs().amax(-1, keepdim=True)
    d2 = d * d
    m2 = d2.sum(-1) / count
    m4 = (d2 * d2).sum(-1) / count
    return torch.where((count >= 2) & (m2 > 0), m4 / (m2 * m2) - 3, math.nan)


def kurtosis_from_power_sums(
    n: torch.Tensor | float,
    s1: torch.Tensor,
    s2: torch.Tensor,
    s3: torch.Tensor,
    s4: torch.Tensor,
) -> torch.Tensor:
    """Excess kurtosis from raw power sums ``s_p = sum(x**p)`` of n values: what the streaming monitor keeps.

    ``mu = s1/n``; ``m2 = s2/n - mu**2``; ``m4 = s4/n - 4 mu s3/n + 6 mu**2 s2/n - 3 mu**4``; result
    ``m4 / m2**2 - 3``, equal to :func:`kurtosis` (scipy's biased, Fisher definition) on the same values.
    Computed in float64 (where the device has it) so the central moments survive the cancellation between
    the raw sums; the relative error still grows like ``eps * (mu / sigma)**4``, harmless for gradient entries,
    whose mean is small against their spread. NaN where ``n < 2`` or ``m2 <= 0``. Tensors broadcast; the
    result is float32, or float64 if any input is float64.
    """
    tensors = [t for t in (n, s1, s2, s3, s4) if isinstance(t, torch.Tensor)]
    out = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    work = torch.float32 if tensors and tensors[0].device.type == "mps" else torch.float64
    n, s1, s2, s3, s4 = (t.to(work) if isinstance(t, torch.Tensor) else t for t in (n, s1, s2, s3, s4))
    mu = s1 / n
    e2, e3, e4 = s2 / n, s3 / n, s4 / n
    m2 = e2 - mu * mu
    m4 = e4 - 4 * mu * e3 + 6 * mu * mu * e2 - 3 * mu**4
    kurt = m4 / (m2 * m2) - 3
    ok = (n >= 2) & (m2 > 0)
    return torch.where(ok, kurt, math.nan).to(out)


def gaussian_kurtosis_quantile(n: int | torch.Tensor, q: float = 0.99) -> float | torch.Tensor:
    """The q-quantile of the sample excess kurtosis of n i.i.d. Gaussian values (normal approximation).

    ``mean = -6 / (n + 1)``, ``var = 24 n (n - 2)(n - 3) / ((n + 1)**2 (n + 3)(n + 5))`` (the exact moments of
    the biased estimator, Fisher 1930; Joanes & Gill 1998), and the quantile ``mean + Phi^-1(q) sqrt(var)``.
    A layer whose kurtosis exceeds it is heavier-tailed than Gaussian at level ``1 - q``. The sampling
    distribution is right-skewed, so the approximation understates the upper quantile for small n; measured
    for q = 0.99 over 20,000 Gaussian rows: empirical quantile 1.40 vs 1.00 at n = 100 (2.8% of Gaussian rows
    exceed it), 0.41 vs 0.35 at n = 1,000 (1.9%), 0.118 vs 0.113 at n = 10,000 (1.2%); at n = 100,000 they agree
    within sampling error. NaN for n < 4. An int n gives a float; a
    tensor n gives a tensor (float32, or float64 for float64 n) on n's device, without synchronisation.
    """
    if not 0.0 < q < 1.0:
        raise ValueError(f"q must be in (0, 1), got {q!r}")
    z = NormalDist().inv_cdf(q)
    if isinstance(n, torch.Tensor):
        out = torch.float64 if n.dtype == torch.float64 else torch.float32
        nf = n.to(torch.float32 if n.device.type == "mps" else torch.float64)
    else:
        if n < 4:
            return math.nan
        nf = float(n)
    mean = -6.0 / (nf + 1)
    var = 24.0 * nf * (nf - 2) * (nf - 3) / ((nf + 1) ** 2 * (nf + 3) * (nf + 5))
    if not isinstance(n, torch.Tensor):
        return mean + z * math.sqrt(var)
    quantile = mean + z * var.clamp(min=0).sqrt()
    return torch.where(nf >= 4, quantile, math.nan).to(out)
