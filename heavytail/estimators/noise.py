"""Noise tails: ring buffers of sampled gradient-noise deviations, and their calibrated tail reading.

The noise of a stochastic gradient is its deviation from the mean gradient (DESIGN: the noise tail, which the
convergence theory is about, as opposed to the coordinate tail of one step's gradient). Each source provides
draws on the same fixed sample of coordinates per tensor, ``(L, S)`` per push:

- temporal: g_t - EMA(g) per coordinate (every run, every step);
- micro-batch: g_micro,i - mean_i g_micro,i under gradient accumulation;
- rank: g_rank - mean over ranks (the all-reduced gradient) under data parallelism.

Coordinates differ in scale, often by orders of magnitude, and pooling their raw deviations makes a scale mixture,
which is heavy-tailed even when every coordinate's noise is Gaussian (a Student-t is a scale mixture of
Gaussians). :func:`noise_tail` therefore divides each deviation by its own coordinate's scale, the mean absolute
deviation of the coordinate's *other* draws in the window (leave-one-out, so that a draw never shrinks itself),
pools the standardised values of a tensor, and reads their tail with a verdict (:data:`TAIL_CLASSES`).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from heavytail.estimators.hill import MIN_K, default_top_count, hill_regression

LIGHT, POWER, SPARSE = 0, 1, 2
TAIL_CLASSES: dict[int, str] = {LIGHT: "light", POWER: "power", SPARSE: "sparse"}
"""The verdict codes of a tail reading (``noise/tail_class``, ``probe/tail_class``); NaN is "not computed"."""

SPARSE_ACTIVE_FRAC = 0.5
"""A tensor's noise is ``sparse`` when fewer than this fraction of its draws are active (not the atom at zero)."""

SPARSE_MIN_OTHERS = 3
"""A sparse tensor's active draw is standardised only when its coordinate has at least this many other active
draws in the window: with one other, the ratio of two draws of a law with a density at zero (rare-token noise,
Poisson x N(1, 0.3)) has a tail of index 1, which pooled windows read as alpha 2.5-2.8 (see :func:`standardise`)."""

LIGHT_HILL_ALPHA = 3.5
LIGHT_DEDH_ALPHA = 5.0
"""A tail is ``light`` when Hill reads alpha above ``LIGHT_HILL_ALPHA`` and the moment estimator (Dekkers,
Einmahl & de Haan 1989) at Hill's k reads alpha above ``LIGHT_DEDH_ALPHA`` (xi below 1/5, xi <= 0 included)."""

POOLED_K_FRACTION = 20
"""The pooled standardised draws are read at ``k = n // POOLED_K_FRACTION`` of their n positive values (at least
``MIN_K``): docs/estimators.md, "Noise tails", for the measurements behind the choice."""

TALLY_SIZE = 1024
"""The standardised values a tally (:class:`NoiseTally`) keeps per row at most (see :func:`tally_size`): the
reading of several merged windows reads at most ``k = TALLY_SIZE - 1``, a standard error of about 9% of alpha
(``sqrt(9 / k)``), against 21% at one window of the defaults (k = 204)."""

ROUNDING_ALPHA = 1e6
"""Hill's 1/alpha is a mean of log ratios of the top draws: under 1/ROUNDING_ALPHA it is float32 rounding between
tied draws (a tensor whose coordinates all carry one scalar noise, as a bias feeding a one-output head does),
not a tail. Such a reading is inf: light, the same on every machine."""

ATOM_TOLERANCE = 1e-4
"""A draw is the atom at zero when ``|g| <= ATOM_TOLERANCE * max |g|`` over its coordinate's window: far above
the float32 error of the temporal source's reconstruction (:func:`temporal_draws`), far below a continuous law's
mass near zero (a Gaussian coordinate loses about 1e-4 of its draws to it)."""


class NoiseRing(NamedTuple):
    """The last ``W`` pushes of ``(L, S)`` deviations, and which (tensor, push) slots hold data."""

    values: torch.Tensor  # (L, S, W) float32
    valid: torch.Tensor  # (L, W) bool


class NoiseTail(NamedTuple):
    """One tail reading per row, float32 ``(L,)`` each; NaN where not computed (too few draws)."""

    alpha: torch.Tensor  # Hill's tail index of the standardised noise (of its active part when sparse)
    se: torch.Tensor  # its standard error
    kurtosis: torch.Tensor  # mean over coordinates of each coordinate's excess kurtosis over its window
    tail_class: torch.Tensor  # LIGHT, POWER or SPARSE as a float code
    active_frac: torch.Tensor  # the fraction of valid draws that are not the atom at zero
    dedh_alpha: torch.Tensor  # the moment estimator's alpha at Hill's k (inf: xi <= 0)

    def packed(self) -> torch.Tensor:
        """``(L, 6)`` in field order, for one checkpoint slot."""
        return torch.stack(list(self), dim=1)


FIELDS = NoiseTail._fields


def init(num_layers: int, num_samples: int, window: int, device: torch.device | str | None = None) -> NoiseRing:
    """An empty ring; memory ``4 * L * S * W`` bytes."""
    return NoiseRing(
        torch.zeros(num_layers, num_samples, window, device=device, dtype=torch.float32),
        torch.zeros(num_layers, window, device=device, dtype=torch.bool),
    )


def push(ring: NoiseRing, slot: int, deviation: torch.Tensor, valid: torch.Tensor) -> NoiseRing:
    """Write ``deviation`` ``(L, S)`` into slot ``slot % W`` where ``valid`` ``(L,)`` holds; in place."""
    window = ring.values.shape[2]
    index = slot % window
    # A product with the 0/1 validity rather than torch.where: several times cheaper on the CPU (estimators.masks).
    dtype = ring.values.dtype
    ring.values[:, :, index] = torch.nan_to_num(deviation.to(dtype)) * valid.to(dtype)[:, None]
    ring.valid[:, index] = valid
    return ring


def flatten(ring: NoiseRing) -> tuple[torch.Tensor, torch.Tensor]:
    """The ring as ``(L, S * W)`` values and a matching validity mask."""
    num_layers, num_samples, window = ring.values.shape
    mask = ring.valid[:, None, :].expand(-1, num_samples, -1).reshape(num_layers, -1)
    return ring.values.reshape(num_layers, -1), mask


def draw_mask(ring: NoiseRing) -> torch.Tensor:
    """The ring's validity per draw, ``(L, S, W)``."""
    return ring.valid[:, None, :].expand_as(ring.values)


def temporal_offsets(ring: NoiseRing, pushes: int, beta: float) -> torch.Tensor:
    """``g_t - m_T`` ``(L, S, W)`` float32 for a temporal ring of deviations ``d_t = g_t - m_{t-1}``, ``m_T`` the
    current EMA: the gradients less one constant per coordinate, which centring removes (:func:`window_centred`).

    The EMA obeys ``m_t = m_{t-1} + (1 - beta) d_t`` on every valid push (and stays put otherwise), so
    ``m_{t-1} = m_T - (1 - beta) sum_{j >= t} d_j`` and ``g_t - m_T = d_t - (1 - beta) sum_{j >= t} d_j``: a sum
    of deviations only, so float32 keeps the noise's precision however large the mean gradient is (adding ``m_T``
    first would cancel it). ``pushes`` is how many pushes the ring has seen (its newest slot is
    ``(pushes - 1) % W``)."""
    values = ring.values * ring.valid[:, None, :].to(ring.values.dtype)
    window = values.shape[2]
    if pushes % window == 0:  # a full ring, as folds find it: the slots in push order, the newest last
        newer = values.flip(2).cumsum(dim=2).flip(2)
    else:
        age = torch.arange(window, device=values.device)
        ages = torch.remainder(pushes - 1 - age, window)  # the slot of each age, and the age of each slot
        newer = values.index_select(2, ages).cumsum(dim=2).index_select(2, ages)
    return values - (1.0 - beta) * newer


def temporal_draws(
    ring: NoiseRing, mean: torch.Tensor, pushes: int, beta: float, offsets: torch.Tensor | None = None
) -> torch.Tensor:
    """The gradients ``g_t`` ``(L, S, W)`` float32 behind a temporal ring of deviations ``d_t = g_t - m_{t-1}``,
    from the current ``mean`` (:func:`temporal_offsets` plus ``m_T``). Exact up to float32 rounding, about W ulps
    of ``|m|``: a value within ``ATOM_TOLERANCE (|d_t| + |m_T|)`` of zero was a zero gradient and is returned as
    exactly 0. For the noise itself, centre :func:`temporal_offsets` (``offsets``, when already computed), not
    these."""
    offsets = temporal_offsets(ring, pushes, beta) if offsets is None else offsets
    m = mean.to(offsets.dtype)[:, :, None]
    g = offsets + m
    values = ring.values * ring.valid[:, None, :].to(ring.values.dtype)
    return torch.where(g.abs() <= ATOM_TOLERANCE * (values.abs() + m.abs()), 0.0, g)


def temporal_window(ring: NoiseRing, mean: torch.Tensor, pushes: int, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(deviations, draws)`` ``(L, S, W)`` float32 of a temporal ring as its reading takes them: the gradients
    (:func:`temporal_draws`) and their deviations from each coordinate's window median (:func:`window_centred`),
    centred from :func:`temporal_offsets`, so that a small noise on a large mean keeps its precision, with a zero
    gradient's offset exactly ``-m_T``, so that a coordinate whose draws are all zero deviates by exactly 0."""
    offsets = temporal_offsets(ring, pushes, beta)
    draws = temporal_draws(ring, mean, pushes, beta, offsets)
    offsets = torch.where(draws == 0, -mean.to(offsets.dtype)[:, :, None], offsets)
    return window_centred(offsets, ring.valid), draws


def _sort_network(x: torch.Tensor) -> torch.Tensor:
    """``x`` ``(W, ...)`` sorted ascending along dim 0, W a power of two: Batcher's bitonic network in its
    direction-free form (each merge first compares element i of a block with its mirror image, then half-cleans),
    every stage one min and one max over contiguous slices. On the CPU faster than ``sort`` along a last dim of 16
    (whose cost is per row); exact (min and max only)."""
    n, rest = x.shape[0], x.shape[1:]
    k = 2
    while k <= n:
        block = x.reshape(n // k, k, *rest)
        a, b = block[:, : k // 2], block[:, k // 2 :].flip(1)
        x = torch.cat([torch.minimum(a, b), torch.maximum(a, b).flip(1)], dim=1).reshape(n, *rest)
        j = k // 4
        while j >= 1:
            pairs = x.reshape(n // (2 * j), 2, j, *rest)
            a, b = pairs[:, 0], pairs[:, 1]
            x = torch.stack([torch.minimum(a, b), torch.maximum(a, b)], dim=1).reshape(n, *rest)
            j //= 2
        k *= 2
    return x


def window_centred(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """:func:`centred` for a ring, whose validity is per slot (``valid`` ``(L, W)``): ``x`` ``(L, S, W)`` minus
    the median of each coordinate's valid values (the mean of the two middle ones of an even count), 0 where not
    valid, in ``x``'s dtype. The median from a sorting network over the window (invalid slots sort last), gathered
    at each tensor's own count."""
    num_layers, num_samples, window = x.shape
    size = 1 << max(window - 1, 0).bit_length()
    padded = torch.where(valid[:, None, :], x, math.inf).permute(2, 0, 1)
    if size > window:
        padded = torch.cat([padded, padded.new_full((size - window, num_layers, num_samples), math.inf)])
    ordered = _sort_network(padded.contiguous())  # (size, L, S)
    count = valid.sum(dim=1)
    lo = ((count - 1).clamp_min(0) // 2).view(1, num_layers, 1).expand(1, num_layers, num_samples)
    hi = (count // 2).clamp(max=window - 1).view(1, num_layers, 1).expand(1, num_layers, num_samples)
    middle = 0.5 * (ordered.gather(0, lo) + ordered.gather(0, hi))  # (1, L, S)
    middle = middle.permute(1, 2, 0)
    return torch.where(valid[:, None, :], x - torch.where(torch.isfinite(middle), middle, 0.0), 0.0)


def centred(draws: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
    """``draws`` ``(..., W)`` minus the median of each coordinate's ``ok`` draws (0 where not ``ok``).

    The median, not the mean or an EMA: a large draw then moves no other draw's deviation, so it cannot inflate
    its coordinate's scale (:func:`standardise`) and cap its own standardised value."""
    x = torch.where(ok, draws.to(torch.float64), math.nan)
    middle = torch.nanquantile(x, 0.5, dim=-1, keepdim=True)
    return torch.where(ok, x - middle, 0.0)


def standardise(deviations: torch.Tensor, ok: torch.Tensor, min_others: int | torch.Tensor = 1) -> torch.Tensor:
    """``|d| / s`` per draw, ``(..., S, W)``, in the deviations' dtype: ``s`` the mean ``|d|`` of the coordinate's
    other ``ok`` draws, of which there must be at least ``min_others`` (an int, or a tensor broadcasting against
    ``(..., S, W)``).

    Leave-one-out makes the scale independent of the draw it divides, so the standardised value keeps the draw's
    tail index (Breiman 1965: a product with an independent factor whose moments are finite to a higher order)
    and a light tail stays light: a Gaussian coordinate of W draws becomes a Student-t with about W - 1 degrees of
    freedom. The median absolute deviation would be more robust but its small values (half the window small at
    once) give a tail of index about W/2; the root mean square would let one large draw of a heavy tail shrink its
    companions. The scale's own small values set a tail too: a law with a density at zero makes ``1 / s`` a
    power law of index c for a mean of c others, so the sparse path, whose coordinates hold one or two active
    draws, asks for :data:`SPARSE_MIN_OTHERS`. Draws without a positive scale (fewer than ``min_others`` other
    ``ok`` draws, or all zero) are 0: missing.
    """
    dtype = deviations.dtype if deviations.is_floating_point() else torch.float64
    a = torch.where(ok, deviations.abs(), 0.0).to(dtype)
    count = ok.sum(dim=-1, keepdim=True).to(dtype)
    others = (a.sum(dim=-1, keepdim=True) - a) / (count - 1).clamp_min(1)
    need = 1 + (max(min_others, 1) if isinstance(min_others, int) else min_others.clamp_min(1))
    usable = ok & (count >= need) & (others > 0)
    return torch.where(usable, a / torch.where(usable, others, 1.0), 0.0)


def coordinate_kurtosis(deviations: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
    """``(...)``: the mean over coordinates of each coordinate's biased excess kurtosis (``m4 / m2^2 - 3``) over
    its ``ok`` draws in ``(..., S, W)``. Scale-free; Gaussian noise gives about ``-6 / (W + 1)``; a coordinate's
    value cannot exceed about W, so heavy tails show as several units. Coordinates with fewer than 4 draws or
    no spread are left out."""
    total, usable = kurtosis_terms(deviations, ok)
    return total / usable  # 0/0: NaN where no coordinate is usable


def kurtosis_terms(deviations: torch.Tensor, ok: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The sum over usable coordinates of their excess kurtosis and their count (``(...)`` each, in the deviations'
    dtype): the summable halves of :func:`coordinate_kurtosis`."""
    x = deviations if deviations.is_floating_point() else deviations.to(torch.float64)
    w = ok.to(x.dtype)
    n = w.sum(dim=-1)
    mean = (x * w).sum(-1) / n.clamp_min(1)
    c = (x - mean[..., None]) * w
    c2 = c * c
    m2 = c2.sum(-1) / n.clamp_min(1)
    m4 = (c2 * c2).sum(-1) / n.clamp_min(1)
    usable = (n >= 4) & (m2 > 0)
    k = torch.where(usable, m4 / torch.where(usable, m2 * m2, 1.0) - 3.0, 0.0)
    return k.sum(-1), usable.sum(-1).to(x.dtype)


def _dedh_at(top: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The moment estimator's alpha (inf where xi <= 0) from descending ``top`` ``(L, m)`` at a per-row ``k``."""
    logs = torch.where(top > 0, top, 1.0).log()
    kk = k.to(torch.int64).clamp(1, top.shape[1] - 1)
    s1 = logs.cumsum(-1).gather(1, (kk - 1)[:, None])[:, 0]
    s2 = (logs * logs).cumsum(-1).gather(1, (kk - 1)[:, None])[:, 0]
    ref = logs.gather(1, kk[:, None])[:, 0]
    kf = kk.to(logs.dtype)
    m1 = s1 / kf - ref
    m2 = s2 / kf - 2 * ref * s1 / kf + ref * ref
    xi = m1 + 1 - 0.5 / (1 - m1 * m1 / m2)
    # A mean log excess under 1/ROUNDING_ALPHA is rounding between tied values (as for Hill's 1/alpha), where
    # m1^2 / m2 is a ratio of rounding errors: no tail.
    return torch.where((xi > 0) & (m2 > 0) & (m1 > 1.0 / ROUNDING_ALPHA), 1.0 / xi, math.inf)


class NoiseTally(NamedTuple):
    """The summable part of one or more windows' tail readings, per row: what :func:`read` needs and nothing more.

    ``top`` ``(L, M)``: the M largest standardised values (in no order; 0 pads), each window's from the variant its
    own active fraction picks (the deviations', or the active draws' when the window is sparse); ``counts``
    ``(L, 5)`` float64: the positive standardised values behind ``top``, the valid draws, the active draws, and
    the sum and count of the coordinates' excess kurtosis (:func:`kurtosis_terms`).
    """

    top: torch.Tensor
    counts: torch.Tensor


def tally_size(width: int) -> int:
    """How many standardised values a tally keeps per row for windows of ``width`` values: enough for the fixed
    ``k = n // POOLED_K_FRACTION`` of one window (so one window reads as :func:`noise_tail`), and for merged
    windows :data:`TALLY_SIZE`, or a quarter of the window where that is less (float32: the tally then takes at
    most a quarter of the ring's memory, which ``sample_budget`` bounds)."""
    return max(min(default_top_count(width), width), min(TALLY_SIZE, width // 4))


def tally_init(rows: int, size: int, device: torch.device | str | None = None) -> NoiseTally:
    """An empty tally; memory ``4 * rows * size + 40 * rows`` bytes (float32 values: :func:`merge` keeps its
    first argument's dtype, and one window's own tally is float64)."""
    return NoiseTally(
        torch.zeros(rows, size, device=device, dtype=torch.float32),
        torch.zeros(rows, 5, device=device, dtype=torch.float64),
    )


def tally(
    deviations: torch.Tensor,
    valid: torch.Tensor,
    draws: torch.Tensor | None = None,
    size: int | None = None,
    into: NoiseTally | None = None,
) -> NoiseTally:
    """One window's tally (``size``: values kept per row, :func:`tally_size` of the window by default) of the
    deviations ``(L, S, W)``; the arguments as :func:`noise_tail`'s. With ``into``, that tally merged with the
    window's (:func:`merge`, in one top-k, its size and dtype)."""
    num_layers = deviations.shape[0]
    dtype = deviations.dtype if deviations.is_floating_point() else torch.float64
    valid = valid & torch.isfinite(deviations)
    dev = torch.where(valid, deviations.to(dtype), 0.0)
    n_valid = valid.sum(dim=(1, 2)).to(torch.float64)
    if draws is None:
        active = valid & (dev != 0)
        raw = dev
    else:
        raw = torch.where(valid, torch.nan_to_num(draws.to(dtype)), 0.0)
        peak = raw.abs().amax(dim=-1, keepdim=True)
        active = valid & (raw.abs() > ATOM_TOLERANCE * peak)
    n_active = active.sum(dim=(1, 2)).to(torch.float64)
    sparse = (n_active < SPARSE_ACTIVE_FRAC * n_valid)[:, None, None]
    # One standardisation, of the variant each row needs: the active draws where the window is sparse.
    z = standardise(
        torch.where(sparse, raw, dev),
        torch.where(sparse, active, valid & (dev != 0)),
        torch.where(sparse, SPARSE_MIN_OTHERS, 1),
    ).reshape(num_layers, -1)
    positive = (z > 0).sum(dim=1).to(torch.float64)
    kurt_sum, kurt_count = kurtosis_terms(dev, valid)
    counts = [positive, n_valid, n_active, kurt_sum.to(torch.float64), kurt_count.to(torch.float64)]
    counts = torch.stack(counts, dim=1)
    if into is not None:
        size, z = into.top.shape[1], torch.cat([into.top, z.to(into.top.dtype)], dim=1)
        counts = counts + into.counts.to(counts.dtype)
    width = z.shape[1]
    size = tally_size(width) if size is None else size
    top = torch.topk(z, min(size, width), dim=1, sorted=False).values
    if top.shape[1] < size:
        top = torch.nn.functional.pad(top, (0, size - top.shape[1]))
    return NoiseTally(top, counts)


def merge(a: NoiseTally, b: NoiseTally) -> NoiseTally:
    """The tally of both tallies' windows: the largest values of the two, the counts added. Fixed cost (one
    top-k of ``(L, 2M)``), no host synchronisation."""
    top = torch.topk(torch.cat([a.top, b.top.to(a.top.dtype)], dim=1), a.top.shape[1], dim=1, sorted=False).values
    return NoiseTally(top, a.counts + b.counts.to(a.counts.dtype))


def read(t: NoiseTally, min_count: int = 100) -> NoiseTail:
    """The calibrated tail reading of a tally (one window's, or several merged):

    1. **Active fraction**: the share of valid draws that are not the atom at zero (:data:`ATOM_TOLERANCE`).
       Under :data:`SPARSE_ACTIVE_FRAC` the verdict is ``sparse`` and the tail read is that of the active
       draws' magnitudes, each standardised by its coordinate's other active draws (a coordinate with fewer than
       1 + :data:`SPARSE_MIN_OTHERS` active draws in the window is left out).
    2. Otherwise the deviations, each divided by its coordinate's leave-one-out mean absolute deviation
       (:func:`standardise`), pooled over the row.
    3. Hill's alpha and standard error on the pooled values: the bias-reduced regression
       (:func:`heavytail.estimators.hill.hill_regression`) at ``k = n // POOLED_K_FRACTION`` of their n positive
       values (at least ``MIN_K``, at most the tally's size less one), and the verdict: ``light`` when Hill reads
       above :data:`LIGHT_HILL_ALPHA` and the moment estimator (Dekkers, Einmahl & de Haan 1989) at the same k
       above :data:`LIGHT_DEDH_ALPHA`, or Hill reads inf, ``power`` otherwise. ``kurtosis``: the mean over
       coordinates (and windows) of each coordinate's excess kurtosis over its window.

    A fixed k, not the Lepski choice of :func:`heavytail.estimators.hill.hill`: at the few thousand values of
    one window the rule's references are too noisy to stop it (it runs to ``k = n / 10``, where the
    near-Gaussian body of a stable(1.8) law still bends the regression: +24%) except by chance, at a small k
    whose reading is noise (t(3) then reads light). ``n / 20`` keeps the body out at a variance the verdict
    tolerates; merged windows lower the variance (k grows with n up to the tally's size) and, past it, the
    fraction read (docs/estimators.md, "Noise tails").

    Rows with fewer than ``min_count`` valid draws (or, for alpha, standardised values) are NaN: not computed.
    """
    positive, n_valid, n_active, kurt_sum, kurt_count = t.counts.to(torch.float64).unbind(dim=1)
    top = t.top.to(torch.float64).sort(dim=1, descending=True).values  # kept unsorted
    active_frac = n_active / n_valid.clamp_min(1)
    sparse = active_frac < SPARSE_ACTIVE_FRAC
    k = torch.div(positive, POOLED_K_FRACTION, rounding_mode="floor").to(torch.int64)
    k = k.clamp(min=MIN_K, max=top.shape[1] - 1)
    result = hill_regression(top, k)
    alpha, se = result.alpha.to(torch.float64), result.se.to(torch.float64)
    dedh = _dedh_at(top, result.k)
    tied = alpha > ROUNDING_ALPHA
    alpha, se = torch.where(tied, math.inf, alpha), torch.where(tied, math.inf, se)
    kurt = kurt_sum / kurt_count  # 0/0: NaN where no coordinate is usable
    computed = n_valid >= min_count
    has_alpha = computed & (positive >= min_count)
    # Hill's inf (the fit's 1/alpha at or below zero) is no power law whatever the moment estimator says.
    light = torch.isinf(alpha) | ((alpha > LIGHT_HILL_ALPHA) & (dedh > LIGHT_DEDH_ALPHA))
    code = torch.where(sparse, float(SPARSE), torch.where(light, float(LIGHT), float(POWER)))
    code = torch.where(computed & (sparse | has_alpha), code, math.nan)
    nan = torch.full_like(alpha, math.nan)
    return NoiseTail(
        alpha=torch.where(has_alpha, alpha, nan).to(torch.float32),
        se=torch.where(has_alpha, se, nan).to(torch.float32),
        kurtosis=torch.where(computed, kurt, nan).to(torch.float32),
        tail_class=code.to(torch.float32),
        active_frac=torch.where(n_valid > 0, active_frac, nan).to(torch.float32),
        dedh_alpha=torch.where(has_alpha, dedh, nan).to(torch.float32),
    )


def noise_tail(
    deviations: torch.Tensor, valid: torch.Tensor, draws: torch.Tensor | None = None, min_count: int = 100
) -> NoiseTail:
    """The calibrated tail reading (:func:`read`) of each row of noise deviations ``(L, S, W)`` (S coordinates, W
    draws each): one window.

    ``valid`` ``(L, S, W)``: which entries hold data. ``draws`` ``(L, S, W)``: the gradients themselves (before
    centring), which show the atom at zero; None when the deviations are all there is.
    """
    return read(tally(deviations, valid, draws), min_count)
