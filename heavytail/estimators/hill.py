"""Hill's tail index of magnitudes, with a data-driven, bias-reduced default choice of k."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

__all__ = [
    "HillResult",
    "TOP_CAP",
    "MIN_K",
    "default_top_count",
    "top_magnitudes",
    "hill",
    "hill_from_top",
    "hill_regression",
    "HillCurve",
    "HILL_CURVE_POINTS",
    "hill_curve",
]

TOP_CAP = 2**16
"""Most order statistics the default ever needs: huge layers cost one ``topk`` of 65,536 values, not a sort."""

MIN_K = 10
"""Smallest k the default considers; rows with fewer than ``10 * MIN_K`` valid values give NaN."""

# The default's tuning; figures are median errors at n = 100,000 from the prototype sweep in docs/estimators.md.
# Candidates k <= n / 10: at n / 5 the quadratic bias model misfits the stable's body (stable(1.7): 4.2% vs 2.6%).
_KMAX_FRACTION = 10
# Lepski references j >= k_max / 10: noisier references add false alarms (j >= k_max / 100: 2.8-3.5% vs 2.0-3.0%).
_REFERENCE_FRACTION = 10
# Threshold in standard deviations: 2.5 stops early on noise (t(3): 3.3% vs 2.6%); 3.5 is as accurate on the
# targets but stops later on a Gaussian bulk with a thin heavy tail (0.5% Pareto(2) entries: 8.3% vs 6.9%).
_LEPSKI_C = 3.0
_GRID_RATIO = 1.15  # geometric candidate grid: at most 64 candidates per row, whatever n is
HILL_CURVE_POINTS = 64
"""Points of a :func:`hill_curve` row: the candidate grid below ``2**16 - 1`` (63 values) and ``k_max``."""
# Sparse heavy tails (the default's second scan; alone with ``sparse=True``): references below k_max / 10, from k = 60 up, stop the scan only when they read a heavier tail
# (a larger 1/alpha) than the candidate by 3.5 standard deviations of the difference. A heavy component of a few
# hundred entries in a Gaussian bulk (0.1% Pareto(1.2) entries at n = 10^6) lies entirely below k_max / 10 = n / 100,
# where the two-sided references never look: without these it read 200% off, with them 7% (60 seeds, see
# docs/estimators.md). One-sided, because only a heavier small-k reading means "the tail ends before k"; a lighter
# one is noise or the body's bias, which the regression absorbs. From 60 (not 40) and at 3.5 sd (not 3): the
# smallest references are the noisiest, and each false stop costs the targets accuracy (40: t(3) 4.1%, stable
# 3.5%; 60: 3.9%, 3.0%; no sparse references: 3.4%, 2.6%).
_SPARSE_MIN_REF = 60
_SPARSE_C = 3.5
_GUARD_C = 3.0
"""The default takes the second scan's k only where its 1/alpha exceeds the first's by this many standard deviations
of the difference (``sqrt(v_second - v_first)`` times the larger ``|1/alpha|``)."""


class HillResult(NamedTuple):
    """A tail index with its uncertainty, batched like the input rows.

    ``alpha`` is the tail index (``P(|X| > x) ~ x**-alpha``; under 2: infinite variance; under 4: infinite
    kurtosis), ``se`` its asymptotic standard error, ``k`` the number of order statistics used (float tensor,
    so the three pack into one buffer for the checkpoint copy).
    """

    alpha: torch.Tensor
    se: torch.Tensor
    k: torch.Tensor


def default_top_count(n: int) -> int:
    """How many of the largest ``|x|`` the default ``k`` needs from n values: ``min(n, n // 10 + 1, 2**16)``.

    The default searches ``k <= n // 10`` (capped at ``2**16 - 1``), which needs the top ``k + 1`` order
    statistics. Keep this many per layer (``torch.topk``) and pass them to :func:`hill_from_top`.
    """
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    return min(n, n // _KMAX_FRACTION + 1, TOP_CAP)


def top_magnitudes(x: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The m largest valid ``|x|`` per row, descending, and the number of valid entries per row.

    Valid means finite and non-zero: a non-finite entry is bad data (the monitor counts it separately) and a zero
    is an atom (dead units, unused embedding rows) that carries no tail information, so both are missing.
    Missing entries appear as zeros at the end of ``top`` when a row has fewer than m valid values.
    Returns ``(top, count)``: ``top`` is ``(..., min(m, n))`` in x's dtype, ``count`` is int64 ``(...)``.
    """
    a = x.abs()
    valid = torch.isfinite(a) & (a > 0)
    a = a.masked_fill(~valid, 0)
    top = a.topk(min(m, x.shape[-1]), dim=-1, largest=True, sorted=True).values
    return top, valid.sum(-1)


def hill(x: torch.Tensor, k: int | None = None, *, sparse: bool | None = None) -> HillResult:
    """Tail index of ``|x|`` over the last dimension: Hill (1975), or by default a bias-reduced Hill.

    With ``X(1) >= X(2) >= ...`` the valid (finite, non-zero) values of ``|x|`` sorted descending:

    * ``k`` given: ``alpha = 1 / (mean(log X(1..k)) - log X(k+1))``, ``se = alpha / sqrt(k)``
      (Hill 1975; Hall 1982 for the standard error). Needs k + 1 valid values, else NaN.
    * ``k=None``: the exponential-regression estimator of Beirlant, Dierckx, Goegebeur & Matthys (1999) and
      Feuerverger & Hall (1999) with the second-order parameter rho fixed at -1, plus the next-order term:
      the scaled log-spacings ``Z_i = i (log X(i) - log X(i+1))`` are regressed on ``[1, i/k, (i/k)**2]``,
      ``i = 1..k``; ``1/alpha`` is the intercept (the Hill curve's value with its bias extrapolated away).
      k is chosen per row by a Lepski (1990) rule: the largest k in a geometric grid over ``[10, n/10]``
      such that no earlier candidate ``j >= k_max/10`` differs from it by more than 3 standard deviations
      of the difference. ``se = alpha * sqrt(v_k)`` with ``v_k ~ 9/k`` the regression's variance factor.
      Needs ``n >= 100`` valid values, else NaN. A heavy component rarer than about n/100 entries lies below
      every one of those references; so the scan is run a second time with references down to ``j = 60`` that
      stop it only where an earlier candidate reads a heavier tail (a larger ``1/alpha``) by more than 3.5
      standard deviations (one-sided), and that second k is taken only where its reading is heavier than the
      first's by more than 3 standard deviations of the difference: a sparse heavy component, not
      the noise of a few hundred values. Measured over 60 seeds (``benchmarks/tail_accuracy.py --seeds 60
      --sparse``): median absolute relative error at n = 100,000 2.5% (Pareto 1.5), 1.7% (|t(2)|), 3.4%
      (|t(3)|), 2.6% (|stable(1.7)|), each the same as without the second scan; Gaussian data reads alpha ~ 13
      (light); 0.1% and 0.3% of Pareto(1.2) entries in a Gaussian bulk read 6.7% and 9.8% off (203% and 73%
      without the second scan).
    * ``sparse=False``: the first scan alone (the default before the second existed). ``sparse=True``: the
      second alone, whatever the first reads: k can go down to a few tens of order statistics on any tensor
      (the references then read 2.6%, 1.9%, 3.9%, 3.0% off; on the demo's output head k of 60-400 where the
      default picks 3,500-8,000, and alpha 2.8-11 and inf between neighbouring checkpoints, because there the
      small-k readings are lighter, which the default's guard ignores). Details: docs/estimators.md.

    ``alpha`` is ``inf`` where the estimate of ``1/alpha`` is ``<= 0`` (no power-law tail: Gaussian, bounded,
    or all top values tied). In a training run, alpha under 2 means a layer's gradient entries have infinite
    variance. ``x``: ``(..., n)``, any float dtype, CPU or CUDA; results ``(...)`` in float32 (float64 for float64
    input). No host-device synchronisation. Equal to :func:`hill_from_top` on :func:`top_magnitudes` of
    ``default_top_count(n)`` values, which is how it runs (less the re-sort ``topk`` makes unnecessary).
    """
    n = x.shape[-1]
    if k is not None:
        _check_k(k)
    m = default_top_count(n) if k is None else min(k + 1, n)
    top, count = top_magnitudes(x, m)
    return _hill_sorted(top.to(_work_dtype(x)), count, count, k, _result_dtype(x), sparse)


def hill_from_top(
    top: torch.Tensor, n: int | torch.Tensor, k: int | None = None, *, sparse: bool | None = None
) -> HillResult:
    """:func:`hill` from the largest order statistics only: what the monitor keeps at a checkpoint.

    ``top``: ``(..., m)``, the m largest ``|x|`` of each row (descending; merged across ranks is fine). Entries
    that are zero or non-finite are missing, as in :func:`top_magnitudes`; ``top`` is re-sorted after they are
    dropped, so an unsorted merge or a leading ``inf`` does no harm. ``n``: how many valid values each row had
    (int or tensor ``(...)``); it sets the default's largest candidate ``k_max = min(n // 10, m - 1, 2**16 - 1)``,
    so keep ``m = default_top_count(n)`` values. With ``k`` given, ``n`` only bounds it (``k + 1 <= n``).
    Formulas, references and the missing-data rule: :func:`hill`.
    """
    if k is not None:
        _check_k(k)
    t = top.to(_work_dtype(top))
    valid = torch.isfinite(t) & (t > 0)
    # One sort of m <= 65,536 values per layer at a checkpoint: cheap, and it makes merged or dirty tops safe.
    t = t.masked_fill(~valid, 0).sort(dim=-1, descending=True).values
    return _hill_sorted(t, valid.sum(-1), n, k, _result_dtype(top), sparse)


def hill_regression(top: torch.Tensor, k: int | torch.Tensor) -> HillResult:
    """The default's bias-reduced estimate at a given k per row, without its Lepski choice of k.

    With ``X(1) >= X(2) >= ...`` the valid values of ``top`` (``(..., m)``, the largest ``|x|`` of each row, as
    :func:`hill_from_top` takes them) and ``Z_i = i (log X(i) - log X(i+1))``, ``1/alpha`` is the intercept of the
    least-squares fit of ``Z_i`` on ``[1, i/k, (i/k)**2]``, ``i = 1..k`` (Beirlant, Dierckx, Goegebeur & Matthys
    1999; Feuerverger & Hall 1999: the exponential regression with rho fixed at -1, plus the next-order term), and
    ``se = alpha * sqrt(v_k)`` with ``v_k ~ 9/k`` the intercept's variance factor: the point at ``k`` of
    :func:`hill_curve`'s ``default``. ``k``: int or int tensor ``(...)``; a row needs ``3 <= k <= count - 1``
    valid values, else NaN. ``alpha`` is inf where the intercept is ``<= 0`` (no power-law tail). Float32 results
    (float64 for float64 input); ``k`` is returned as given (float). No host-device synchronisation.

    A fixed k trades the Lepski rule's protection against a heavy component rarer than ``k`` values for a known
    variance: :func:`heavytail.estimators.noise.noise_tail` reads its pooled standardised draws at ``k = n / 20``,
    where the rule's references (a few tens of values at n ~ 4,000) are too noisy to stop it anywhere useful.
    """
    t = top.to(_work_dtype(top))
    valid = torch.isfinite(t) & (t > 0)
    t = t.masked_fill(~valid, 0).sort(dim=-1, descending=True).values
    count = valid.sum(-1)
    batch, dev, dt, m = t.shape[:-1], t.device, t.dtype, t.shape[-1]
    kk = torch.as_tensor(k, device=dev).to(torch.int64).expand(batch)
    ok = (kk >= 3) & (kk <= count - 1)
    if m < 2:
        nan = torch.full(batch, math.nan, dtype=_result_dtype(top), device=dev)
        return HillResult(nan, nan.clone(), kk.to(nan.dtype))
    idx = (kk.clamp(min=1, max=m - 1) - 1)[..., None]
    kf = kk.clamp(min=1).to(dt)
    logs = t.log()
    i = torch.arange(1, m, device=dev, dtype=dt)
    z = i * (logs[..., :-1] - logs[..., 1:])
    z = torch.where(torch.isfinite(z), z, 0)  # past a row's valid count (log 0): never read where ``ok``
    sums = torch.stack([torch.cumsum(z * i**p, -1).gather(-1, idx)[..., 0] / kf**p for p in range(3)], dim=-1)
    w, v = _regression_weights(kf)
    gamma = (sums * w).sum(-1)
    alpha = torch.where(gamma > 0, 1.0 / gamma, math.inf)
    alpha = torch.where(ok, alpha, math.nan)
    out = _result_dtype(top)
    return HillResult(alpha.to(out), (alpha * v.sqrt()).to(out), kk.to(out))


class HillCurve(NamedTuple):
    """The Hill plot of each row at the default's candidate k (``(..., HILL_CURVE_POINTS)``, ascending k).

    ``k``: the candidates (float; NaN past the row's ``k_max``, where every field is NaN); ``hill``: Hill's
    (1975) alpha at k, exactly ``hill(x, k).alpha``; ``default``: the default's bias-reduced alpha at k (its
    regression's intercept; inf where that reads ``1/alpha <= 0``). :func:`hill` picks one of these k.
    """

    k: torch.Tensor
    hill: torch.Tensor
    default: torch.Tensor


def hill_curve(top: torch.Tensor, n: int | torch.Tensor) -> HillCurve:
    """Alpha against k for a Hill plot, from the largest order statistics as :func:`hill_from_top` takes them.

    A Hill plot (Drees, de Haan & Resnick 2000) shows whether a tail index is stable over k: a flat stretch of
    ``hill`` is a power-law tail, a drift is the body's bias (which ``default`` extrapolates away), and a
    sparse heavy component shows as low values at small k that rise once k passes its size. The candidates are
    the default's (a geometric grid of ratio 1.15 from 10, then ``k_max``), so the default's k and alpha are
    points of ``k`` and ``default``. Padded with NaN to ``HILL_CURVE_POINTS`` per row; float32 results (float64
    for float64 input). No host-device synchronisation.
    """
    t = top.to(_work_dtype(top))
    valid = torch.isfinite(t) & (t > 0)
    t = t.masked_fill(~valid, 0).sort(dim=-1, descending=True).values
    count = valid.sum(-1)
    if isinstance(n, torch.Tensor):
        n = n.to(device=t.device, dtype=torch.int64)
    out_dtype = _result_dtype(top)
    batch = t.shape[:-1]
    nan = torch.full((*batch, HILL_CURVE_POINTS), math.nan, dtype=out_dtype, device=t.device)
    fits = _fits(t, count, n)
    if fits is None:
        return HillCurve(nan, nan.clone(), nan.clone())
    plain = fits.kf / fits.sums[..., 0]  # Hill at k: 1 / mean of the k scaled spacings
    default = torch.where(fits.gamma > 0, 1.0 / fits.gamma, math.inf)
    fields = [torch.where(fits.admissible, f, math.nan).to(out_dtype) for f in (fits.kf, plain, default)]
    width = fields[0].shape[-1]
    return HillCurve(*(torch.cat([f, nan[..., : HILL_CURVE_POINTS - width]], dim=-1) for f in fields))


def _hill_sorted(
    top: torch.Tensor,
    count: torch.Tensor,
    n: int | torch.Tensor,
    k: int | None,
    out_dtype: torch.dtype,
    sparse: bool | None = None,
) -> HillResult:
    """Dispatch on k; ``top`` is descending with missing entries as trailing zeros, ``count`` the valid count."""
    if isinstance(n, torch.Tensor):
        n = n.to(device=top.device, dtype=torch.int64)
    if k is None:
        alpha, se, k_used = _adaptive(top, count, n, sparse)
    else:
        alpha, se, k_used = _fixed(top, count, n, k)
    return HillResult(alpha.to(out_dtype), se.to(out_dtype), k_used.to(out_dtype))


def _fixed(top: torch.Tensor, count: torch.Tensor, n: int | torch.Tensor, k: int):
    batch, dev, dt = top.shape[:-1], top.device, top.dtype
    k_used = torch.full(batch, float(k), dtype=dt, device=dev)
    if top.shape[-1] < k + 1:
        nan = torch.full(batch, math.nan, dtype=dt, device=dev)
        return nan, nan, k_used
    logs = top[..., : k + 1].log()
    gamma = logs[..., :k].mean(-1) - logs[..., k]
    ok = (count >= k + 1) & (n >= k + 1)
    # gamma == 0 (the top k+1 tied) gives 1/0 = inf: no tail, which is what a constant row has.
    alpha = torch.where(ok, 1.0 / gamma, math.nan)
    return alpha, alpha / math.sqrt(k), k_used


def _candidate_grid(limit: int, device: torch.device) -> torch.Tensor:
    """The shared geometric grid ``round(10 * 1.15**t) < limit``, built on the device: a host list would
    need a synchronising host-to-device copy. Each row appends its own ``k_max`` to it."""
    count = 0
    while math.floor(MIN_K * _GRID_RATIO**count + 0.5) < limit:
        count += 1
    t = torch.arange(count, device=device, dtype=torch.float32 if device.type == "mps" else torch.float64)
    return torch.floor(MIN_K * _GRID_RATIO**t + 0.5).to(torch.int64)


def _regression_weights(k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """First row of ``(X'X)^-1`` for the design ``[1, i/k, (i/k)**2]``, ``i = 1..k``, elementwise in k.

    Returns the intercept's weights on ``sum_i Z_i (i/k)**p``, ``p = 0, 1, 2`` (shape ``k.shape + (3,)``), and
    its variance factor ``v_k = [(X'X)^-1]_00`` (``~ 9/k``): ``Var(1/alpha_k) = v_k / alpha**2`` for exact
    exponential spacings. Closed forms (Faulhaber sums) keep this exact and data-independent; scaling i by k
    keeps ``X'X`` well conditioned for every k.
    """
    g = k
    s0 = g
    s1 = (g + 1) / 2
    s2 = (g + 1) * (2 * g + 1) / (6 * g)
    s3 = (g + 1) ** 2 / (4 * g)
    s4 = (g + 1) * (2 * g + 1) * (3 * g**2 + 3 * g - 1) / (30 * g**3)
    c0 = s2 * s4 - s3 * s3
    c1 = s2 * s3 - s1 * s4
    c2 = s1 * s3 - s2 * s2
    det = s0 * c0 + s1 * c1 + s2 * c2
    w = torch.stack([c0, c1, c2], dim=-1) / det[..., None]
    return w, w[..., 0]


class _Fits(NamedTuple):
    """The default's regression at each candidate k of each row."""

    cand: torch.Tensor  # (..., K) int64 candidates: the shared grid, then the row's k_max
    admissible: torch.Tensor  # (..., K) MIN_K <= k <= k_max
    kf: torch.Tensor  # (..., K) the candidates in the work dtype
    sums: torch.Tensor  # (..., K, 3) sum_i Z_i (i/k)**p, p = 0, 1, 2
    gamma: torch.Tensor  # (..., K) the intercept, the default's 1/alpha at k
    v: torch.Tensor  # (..., K) its variance factor
    k_max: torch.Tensor  # (...)


def _fits(top: torch.Tensor, count: torch.Tensor, n: int | torch.Tensor) -> _Fits | None:
    """The regression at every candidate k (None when the rows keep fewer than ``MIN_K + 1`` values)."""
    batch, dev, dt = top.shape[:-1], top.device, top.dtype
    m = top.shape[-1]
    if m - 1 < MIN_K:
        return None
    k_cap = min(m - 1, TOP_CAP - 1)
    if isinstance(n, torch.Tensor):
        k_max = torch.minimum(n // _KMAX_FRACTION, count - 1).clamp(max=k_cap)
    else:
        k_max = (count - 1).clamp(max=min(n // _KMAX_FRACTION, k_cap))

    # Scaled log-spacings: for a Pareto tail they are i.i.d. exponential with mean 1/alpha (Renyi), and the
    # Hill estimate at k is their mean; a tail that is only asymptotically Pareto bends their mean as powers
    # of i/n, which the regression below absorbs.
    logs = top.log()
    i = torch.arange(1, m, device=dev, dtype=dt)
    z = i * (logs[..., :-1] - logs[..., 1:])
    # Entries past a row's valid count are garbage (log 0); only candidates k <= count - 1 are ever read.
    z = torch.where(torch.isfinite(z), z, 0)

    # Candidates: the shared grid below k_max, then k_max itself, so the result depends on the data and k_max
    # only (not on how many order statistics the caller kept).
    grid = _candidate_grid(k_cap, dev)
    cand = torch.cat([grid.expand(*batch, -1), k_max[..., None]], dim=-1)  # (..., K), ascending where admissible
    admissible = (cand <= k_max[..., None]) & (cand >= MIN_K)
    kf = cand.clamp(min=1).to(dt)
    idx = (cand - 1).clamp(min=0, max=m - 2)
    sums = torch.stack([torch.cumsum(z * i**p, -1).gather(-1, idx) / kf**p for p in range(3)], dim=-1)
    w, v = _regression_weights(kf)
    gamma = (sums * w).sum(-1)  # (..., K): the intercept, 1/alpha, at each candidate k
    return _Fits(cand, admissible, kf, sums, gamma, v, k_max)


def _adaptive(top: torch.Tensor, count: torch.Tensor, n: int | torch.Tensor, sparse: bool | None = None):
    batch, dev, dt = top.shape[:-1], top.device, top.dtype
    fits = _fits(top, count, n)
    if fits is None:
        nan = torch.full(batch, math.nan, dtype=dt, device=dev)
        return nan, nan, nan
    cand, admissible, kf, _, gamma, v, k_max = fits

    # Lepski: accept k while every earlier admissible estimate at j >= k_max / 10 agrees with it within c
    # standard deviations of the difference (and, with ``sparse``, no earlier one at 60 <= j < k_max / 10 reads a
    # heavier tail, a larger 1/alpha, by more than c_sparse of them); for nested least-squares fits
    # Var(g_j - g_k) = (v_j - v_k) g**2.
    j_min = (k_max // _REFERENCE_FRACTION).clamp(min=MIN_K)
    near = cand >= j_min[..., None]
    sd = (v[..., :, None] - v[..., None, :]).clamp(min=0).sqrt()
    earlier = cand[..., :, None] < cand[..., None, :]
    diff = gamma[..., :, None] - gamma[..., None, :]
    bound = sd * gamma.abs()[..., None, :]
    position = torch.arange(cand.shape[-1], device=dev)

    def choose(reference: torch.Tensor, disagree: torch.Tensor) -> torch.Tensor:
        violation = reference[..., :, None] & earlier & disagree
        # Inadmissible candidates (grid points past k_max) neither stop the scan nor get chosen.
        passed = (~(admissible & violation.any(-2))).to(torch.int64).cumprod(-1).bool() & admissible
        return torch.where(passed, position, -1).amax(-1)

    two_sided = diff.abs() > _LEPSKI_C * bound
    if sparse is not False:
        one_sided = torch.where(near[..., :, None], two_sided, diff > _SPARSE_C * bound)
        best_sparse = choose(admissible & (near | (cand >= _SPARSE_MIN_REF)), one_sided)
    if sparse is True:
        best = best_sparse
    else:
        best = choose(admissible & near, two_sided)
        if sparse is None:
            # The sparse references' k only where its reading is heavier than the default's by more than
            # _GUARD_C standard deviations of the difference: a heavy component too rare for the default's
            # references, not the noise of a few hundred values.
            b, bs = best.clamp(min=0)[..., None], best_sparse.clamp(min=0)[..., None]
            g_d, g_s = gamma.gather(-1, b)[..., 0], gamma.gather(-1, bs)[..., 0]
            v_d, v_s = v.gather(-1, b)[..., 0], v.gather(-1, bs)[..., 0]
            scale = torch.maximum(g_d.abs(), g_s.abs())
            heavier = (g_s - g_d) > _GUARD_C * (v_s - v_d).clamp(min=0).sqrt() * scale
            best = torch.where((best_sparse >= 0) & (best >= 0) & heavier, best_sparse, best)
    found = best >= 0
    best = best.clamp(min=0)[..., None]

    g_hat = gamma.gather(-1, best)[..., 0]
    alpha = torch.where(g_hat > 0, 1.0 / g_hat, math.inf)
    alpha = torch.where(found, alpha, math.nan)
    se = alpha * v.gather(-1, best)[..., 0].sqrt()
    return alpha, se, torch.where(found, kf.gather(-1, best)[..., 0], math.nan)


def _check_k(k) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int or None, got {k!r}")


def _work_dtype(t: torch.Tensor) -> torch.dtype:
    # Order statistics are few (<= 65,536 per row), so float64 is cheap and keeps log-spacings of close
    # neighbours exact; MPS has no float64.
    return torch.float32 if t.device.type == "mps" else torch.float64


def _result_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32
