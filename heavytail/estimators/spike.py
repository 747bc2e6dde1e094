"""Streaming spike detection for the loss and gradient norms: robust Holt forecasts, thresholds calibrated to a
false-alarm rate by peaks over threshold, and a CUSUM for slow divergence, batched over streams."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch

__all__ = [
    "SpikeConfig",
    "SpikeState",
    "SpikeSummary",
    "TailState",
    "Cooldown",
    "init",
    "update",
    "compute",
    "tail_init",
    "tail_update",
    "tail_threshold",
    "DetectorState",
    "Detection",
    "detector_init",
    "detect",
    "detector_compute",
    "skip_factor",
    "pooled_threshold",
    "CALIBRATED_WARMUP",
    "DRIFT_START",
    "REFIT_EVERY",
]

# E|X - mu| = sigma * sqrt(2/pi) for a Gaussian: scaling the mean absolute deviation by sqrt(pi/2) makes the
# score read as a Gaussian z-score, so thresholds compare with the usual "k sigma" intuition.
_MAD_TO_SIGMA = math.sqrt(math.pi / 2.0)
# A stream that has been exactly constant has zero scale; a relative floor keeps its score finite, so a real
# jump still scores huge while float rounding (~1e-7 relative) scores well under 1.
_SCALE_FLOOR = 1e-6
_DOMAINS = ("auto", "log", "linear")
# Range of the generalized Pareto shape a calibrated threshold may use: 0 is an exponential (Gaussian-like) tail,
# 0.5 a Student-t with 2 degrees of freedom. A shape fitted to a few dozen excesses varies by +-0.2; clamping it
# keeps one stream's unlucky fit from giving it a threshold far too low (false alerts) or far too high.
XI_MIN = 0.0
XI_MAX = 0.5
# The shape a calibrated threshold assumes before its stream has shown its own tail, and how many excesses that
# assumption is worth: 0.5 (Student-t with 2 degrees of freedom, heavier than any noise measured) keeps the
# first few hundred steps' thresholds high, and the stream's own fit takes over as its excesses outnumber 32.
XI_PRIOR = 0.5
XI_PRIOR_WEIGHT = 32.0
# Order statistics each stream keeps for its calibrated threshold, and the fraction of its scores that count as
# peaks over the threshold u while it has seen fewer than TAIL_SIZE / TAIL_FRACTION of them.
TAIL_SIZE = 256
TAIL_FRACTION = 0.1
# The detector's fit (``pooled_threshold``) winsorizes the largest ceil(TAIL_TRIM * n) kept scores of the upper tail
# to the next one: spikes under the threshold (unflagged, so kept) sit in the top few order statistics and would
# teach the fit that spikes are normal; their count still enters, their size does not.
TAIL_TRIM = 0.002
# The shape prior's weight in the detector's fit, in excesses: the pooled shape of both tails rests on up to
# 2 * (TAIL_SIZE - 1) excesses, whose probability-weighted-moment estimate under Student-t noise reads low
# (0.29 for t(3), whose shape is 1/3, at the 2-5% level the fit starts from); 256 excesses of 0.5 bring it back
# to about 0.36.
POOLED_PRIOR_WEIGHT = 256.0
# While a stream has shown fewer excesses than POOLED_PRIOR_WEIGHT, the prior weighs as much as its excesses, and
# at least this much: a full weight of 256 against the 58 excesses of a stream's 300th step held its shape at
# about 0.4 whatever the noise (a Gaussian's is 0), and its threshold so high that spikes in the first ~600
# steps were missed under 5% noise. 128 keeps the first few hundred steps conservative (a shape fitted to a few
# dozen excesses varies by +-0.2); 64 caught more early spikes but gave more false alerts (docs/spike-detection.md).
POOLED_PRIOR_MIN_WEIGHT = 128.0
# The detector's fit aims at false_alarm_rate / RATE_MARGIN. A threshold extrapolated from a few hundred excesses
# spreads (about +-20% on 10,000 Student-t scores), and a false-alarm rate is convex in it (a threshold 20% low
# more than doubles the rate under t(3) noise, one 20% high does not halve it), so a fit aimed at the rate itself
# measured 1.6-1.9 false alerts per 10^4 steps under heavy-tailed noise at rate 1e-4. 1.6 rather than 1.5 pays for
# the lighter early shape prior (POOLED_PRIOR_MIN_WEIGHT): together they measured fewer false alerts than 1.5 with
# the full prior, and no fewer spikes caught (docs/spike-detection.md).
RATE_MARGIN = 1.6
# ``detect`` refits its thresholds every this many steps when the caller says so (``refit``): the fit (a sort of
# the two tails) is most of the detector's cost and a threshold moves little in a few steps.
REFIT_EVERY = 8
# The detector's fit winsorizes its lower tail at LOWER_FENCE times that tail's (ceil(TAIL_TRIM * n) + 1)-th
# largest score: only a gross outlier reaches it (one healthy Student-t(2.5) draw 980 standard deviations below
# the curve, a loss of 1e-8 for one step, scored -1626 and, kept in the tail for the rest of the run, floored its
# threshold at 150-180 instead of about 26). The lower tail is otherwise not winsorized: doing so as the upper
# one lowered every threshold and raised false alerts under heavy tails (docs/spike-detection.md).
LOWER_FENCE = 20.0
# Scores before this many accepted values are left out of the calibrated tail: the scale then rests on a handful
# of values, so its scores are not the stream's noise (one of them in the top K would stay there for the run).
TAIL_START = 10
# Warm-up of the calibrated detector (``detect``): values a stream must see before it can flag.
CALIBRATED_WARMUP = 50
# Scores the slow-divergence rule's CUSUM must have seen before it may flag: its limit comes from the running
# moments of its increments, which rest on too few values before (a short test warm-up must not make it fire).
DRIFT_START = 20
# Half-life in steps of the slow level (an EWMA without trend, a running mean for its first 1 / rate values) the
# CUSUM scores values against. Measured on issue 14's ramps (24 per condition and seed; docs/spike-detection.md),
# fraction flagged before half done with the allowance 1.0: 0.94 at 50 and 100 (0.87, 0.87, 0.86, 0.84 and 0.78
# at 30, 50, 100, 200 and 400 with the allowance 0.5; 0.82 against the forecast); no false alert more.
DRIFT_HALFLIFE = 50.0


def _rate(halflife: float) -> float:
    # The EWMA weight whose memory halves every `halflife` steps (pandas' ewm(halflife=) convention).
    return 1.0 - 2.0 ** (-1.0 / halflife)


def _sigma(scale: torch.Tensor, forecast: torch.Tensor, log_domain: torch.Tensor) -> torch.Tensor:
    # The score's denominator. Relative floor in either domain (see _SCALE_FLOOR); `tiny` keeps an all-zero
    # linear stream off 0/0.
    floor = _SCALE_FLOOR * torch.where(log_domain, 1.0, forecast.abs()) + torch.finfo(scale.dtype).tiny
    return torch.maximum(_MAD_TO_SIGMA * scale, floor)


def _gate(baseline: torch.Tensor, config: SpikeConfig) -> torch.Tensor:
    # How far above (or below) the baseline a value must also be to flag, in the input's units.
    return config.atol + config.rtol * baseline.abs()


@dataclass(frozen=True, kw_only=True)
class SpikeConfig:
    """Parameters of the spike detector; defaults were chosen with ``benchmarks/spike_detection.py``.

    See ``docs/spike-detection.md`` for the measured recall and false-alert figures behind each default.
    """

    warmup: int = 100
    """Accepted (finite, in-domain) values a stream must see before it can flag. During warm-up nothing is
    winsorized and the trend and scale start as running means, so they are usable when it ends."""

    halflife: float = 8.0
    """Half-life in steps of the level (the smoothed value). Short, so the forecast follows the loss curve;
    the trend term removes the lag a decaying loss would otherwise cause."""

    trend_halflife: float = 20.0
    """Half-life in steps of the trend (the EWMA of the level's change per step); ``math.inf`` disables it.
    Short enough to follow the bending of an early loss curve, whose curvature is otherwise read as noise."""

    scale_halflife: float = 200.0
    """Half-life in steps of the scale (mean absolute one-step forecast error). Long, because heavy-tailed
    noise makes a short-memory scale estimate itself noisy, and a low scale estimate means false alerts."""

    threshold: float = 18.0
    """Flag when the robust z-score (forecast error over scale, in Gaussian-sigma units) exceeds this. Far
    above the Gaussian habit of 3-4 because healthy noise is heavy-tailed: Student-t noise with 3 degrees of
    freedom exceeds 18 of these (winsorized-MAD) sigmas with probability 1.1e-4 per step, about one false
    alert per 10^4 steps; Gaussian noise essentially never does."""

    clip: float = 2.0
    """Winsorization bound in scale units (Huber's k): every forecast error updates the state only after
    clipping to [-clip, clip] * scale, so a spike moves the baseline by at most a healthy step's worth and
    cannot hide the next spike. Not applied during warm-up."""

    rtol: float = 0.1
    """A flag also needs ``x - baseline > atol + rtol * abs(baseline)`` (numpy ``isclose`` style), so a
    stream whose scale has collapsed (a near-constant series) does not flag rounding-sized moves."""

    atol: float = 0.0
    """Absolute part of the gate above, in the input's units."""

    two_sided: bool = False
    """Flag downward deviations too. Loss and gradient-norm spikes of interest are upward, and a loss drops
    abruptly for healthy reasons (a learning-rate decay, an epoch boundary), so the default is one-sided."""

    domain: str = "auto"
    """``"log"``: work on log(x) (multiplicative noise, relative spikes); values <= 0 are skipped.
    ``"linear"``: work on x (additive noise; for a loss that is often <= 0).
    ``"auto"``: log domain while a stream's values are positive; the first negative value switches that
    stream to the linear domain for good (its state is converted, so it does not re-warm). Zero is skipped
    while in the log domain: for a norm it means no gradient this step (a frozen layer, an unused expert)."""

    false_alarm_rate: float = 1e-4
    """Used by ``detect`` only: the rate of false flags per step and stream its calibrated threshold aims at
    (1e-4: one per 10,000 steps). ``update`` uses ``threshold`` instead."""

    calibrated: bool = True
    """Used by ``detect`` only: compare the score with the threshold calibrated to ``false_alarm_rate`` from the
    stream's own score tail (True), or with the fixed ``threshold`` (False, the rule of ``update``)."""

    drift_allowance: float = 1.0
    """Used by ``detect`` only: the CUSUM's allowance k, in score units. Each step adds clip(z_slow, +-drift_clip) - k
    to the drift statistic (z_slow: the value's distance from the slow level), so healthy noise (mean about 0) drains
    it and a run of values more than k above the level fills it. 1.0 rather than 0.5 (the classic half of a
    one-sigma shift): a ramp's distance passes 1 within a few steps, and the limit, set from the noise's increments
    whose mean falls with k, halves; on issue 14's ramps (``drift_clip`` 2) 0.87 were flagged before half done at
    0.5, 0.94 at 0.75 and 1.0, 0.83 at 1.5, with the same false alerts (docs/spike-detection.md)."""

    drift_clip: float = 3.0
    """Used by ``detect`` only: the largest step the CUSUM takes, in score units (z_slow is clipped to
    [-drift_clip, drift_clip] before the allowance is taken off), so one spike adds at most ``drift_clip -
    drift_allowance``, and the limit is at least that much: only a run of raised values fills it; one value far
    below its level takes at most ``drift_clip + drift_allowance`` off (unclipped below, a downward outlier
    emptied a filling CUSUM and, entering the limit's moments, raised the limit from about 8 to over 70 for
    hundreds of steps: 3 of issue 14's ramps under 1% t(2.5) noise were missed so; clipped, none).

    3 rather than the forecast's ``clip`` of 2: a ramp's distance passes 2 within a few steps, and from there the
    CUSUM gained at most 1 a step against a limit of about 4.6; on issue 14's ramps 0.944 were flagged before half
    done at 2 and 0.995 at 3, with one false-alert cell of that table lower and none higher, and drift flags on the
    loss noise model's healthy wandering curves rose from 0.26 to 0.41 per 10^4 steps (0.027 since a drift flag
    needs two values in a row over the gate; docs/spike-detection.md)."""

    drift_streams: int | None = None
    """Used by ``detect`` only: the slow-divergence rule watches the first this many streams (``None``: all). The
    monitor watches the loss alone: a gradient norm that creeps up for hundreds of steps is common in healthy
    training, a loss that does is not."""

    def __post_init__(self) -> None:
        if not (isinstance(self.warmup, int) and self.warmup >= 2):
            raise ValueError(f"warmup must be an int >= 2 (a scale needs two values), got {self.warmup!r}")
        if not self.halflife > 0 or math.isinf(self.halflife):
            raise ValueError(f"halflife must be positive and finite, got {self.halflife!r}")
        if not self.trend_halflife > 0:
            raise ValueError(f"trend_halflife must be positive (math.inf: no trend), got {self.trend_halflife!r}")
        if not self.scale_halflife > 0 or math.isinf(self.scale_halflife):
            raise ValueError(f"scale_halflife must be positive and finite, got {self.scale_halflife!r}")
        if not self.threshold > 0:
            raise ValueError(f"threshold must be positive, got {self.threshold!r}")
        if not self.clip > 0:
            raise ValueError(f"clip must be positive, got {self.clip!r}")
        if not self.rtol >= 0:
            raise ValueError(f"rtol must be >= 0, got {self.rtol!r}")
        if not self.atol >= 0:
            raise ValueError(f"atol must be >= 0, got {self.atol!r}")
        if self.domain not in _DOMAINS:
            raise ValueError(f"domain must be one of {_DOMAINS}, got {self.domain!r}")
        if not 0.0 < self.false_alarm_rate < 1.0:
            raise ValueError(f"false_alarm_rate must be in (0, 1), got {self.false_alarm_rate!r}")
        if not 0.0 < self.drift_allowance < self.drift_clip:
            raise ValueError(
                f"drift_allowance must be in (0, drift_clip), got {self.drift_allowance!r} "
                f"(drift_clip {self.drift_clip!r})"
            )
        if self.drift_streams is not None and not (isinstance(self.drift_streams, int) and self.drift_streams >= 0):
            raise ValueError(f"drift_streams must be an int >= 0 or None, got {self.drift_streams!r}")


class SpikeState(NamedTuple):
    """Per-stream detector state, all tensors of shape (S,) on the input's device.

    ``level``, ``trend`` and ``scale`` are in the stream's working domain (log or linear, per ``log_domain``).
    """

    count: torch.Tensor  # int64: accepted values so far; drives warm-up and the running-mean start
    level: torch.Tensor  # smoothed value
    trend: torch.Tensor  # smoothed change of level per step
    scale: torch.Tensor  # EWMA of the winsorized absolute one-step forecast error
    log_domain: torch.Tensor  # bool: the stream is worked on in the log domain


class SpikeSummary(NamedTuple):
    """What ``compute`` reports per stream: the forecast for the next step, the band outside which that step
    flags, and how settled the detector is. All in the input's units except ``scale``."""

    baseline: torch.Tensor  # the next value the detector expects
    scale: torch.Tensor  # noise scale in Gaussian-sigma units: relative in the log domain, absolute in linear
    warmed_up: torch.Tensor  # bool: the stream can flag
    upper: torch.Tensor  # a warmed-up stream flags when its next value is above this
    lower: torch.Tensor  # ... or below this, with ``two_sided`` (in the log domain it may be 0: no lower flag)


def init(
    num_streams: int,
    device: torch.device | str | None = None,
    config: SpikeConfig = SpikeConfig(),
    *,
    dtype: torch.dtype = torch.float32,
) -> SpikeState:
    """A fresh detector for ``num_streams`` streams (one loss, one global norm, one norm per layer, ...)."""
    if num_streams < 0:
        raise ValueError(f"num_streams must be >= 0, got {num_streams!r}")
    zeros = torch.zeros(num_streams, device=device, dtype=dtype)
    return SpikeState(
        count=torch.zeros(num_streams, device=device, dtype=torch.int64),
        level=zeros,
        trend=zeros.clone(),
        scale=zeros.clone(),
        log_domain=torch.full((num_streams,), config.domain != "linear", device=device, dtype=torch.bool),
    )


def update(
    state: SpikeState,
    x: torch.Tensor,
    config: SpikeConfig = SpikeConfig(),
    threshold: torch.Tensor | None = None,
) -> tuple[SpikeState, torch.Tensor, torch.Tensor]:
    """Score one new value per stream against its forecast, flag spikes, and fold the value into the state.

    Robust Holt (level + trend) exponential smoothing with Huber-winsorized errors (Holt 1957; Gelper, Fried &
    Croux 2010, "Robust forecasting with exponential and Holt-Winters smoothing"), on y = log(x) by default:

        f = level + trend                          forecast of y
        r = y - f                                  one-step forecast error
        z = r / (sqrt(pi/2) * scale)               robust z-score (Gaussian-sigma units)
        flag = warmed up and z > threshold and x - baseline > atol + rtol * |baseline|,  baseline = exp(f)
        c = clamp(r, -clip * s, clip * s)          winsorized error, s = sqrt(pi/2) * scale
        level' = f + a * c
        trend' = (1 - b) * trend + b * (level' - level)
        scale' = (1 - g) * scale + g * |c|

    with a, b, g the EWMA weights 1 - 2^(-1/half-life) of ``halflife``, ``trend_halflife`` and
    ``scale_halflife``; b and g are at least 1/n on the n-th value (running means first), the first value
    sets the level, and nothing is clipped before ``warmup`` values.

    A flag means this step's value is far above what the stream's own recent level, trend and noise predict:
    a loss spike or a gradient-norm spike. Non-finite values, and values <= 0 in the log domain, leave that
    stream's state untouched, score 0 and never flag (the non-finite rule reports them). About 70 elementwise
    ops on (S,) tensors; ``torch.compile(update, fullgraph=True)`` fuses them.

    Args:
        state: from ``init`` or a previous ``update``, on ``x``'s device.
        x: shape (S,) (or any shape with S elements), any float dtype; not synchronized with the host.
        config: the same config every step.
        threshold: optional (S,) tensor used in place of ``config.threshold`` (a calibrated threshold from
            ``tail_threshold``); a tensor, so it never reaches the host.

    Returns:
        ``(new_state, flags, score)``: flags bool (S,), score (S,) in the state's dtype.
    """
    count, level, trend, scale, log_domain = state
    x = x.detach().reshape(level.shape).to(level.dtype)

    if config.domain == "auto":
        # The first negative value moves a stream to the linear domain for good. The state is carried over to
        # first order (d exp(y) = exp(y) dy), so the stream keeps its warm-up and does not re-learn its level.
        switch = log_domain & torch.isfinite(x) & (x < 0)
        base = torch.exp(level)
        factor = torch.where(switch, base, 1.0)
        level = torch.where(switch, base, level)
        trend = trend * factor
        scale = scale * factor
        log_domain = log_domain & ~switch

    if config.domain == "linear":
        y = x
    else:
        y = torch.where(log_domain, torch.log(x), x)
    # Non-finite x, and x <= 0 in the log domain (log gives nan or -inf), are skipped.
    valid = torch.isfinite(y)
    started = count > 0  # a forecast exists only after the first value
    warmed = count >= config.warmup

    forecast = level + trend
    residual = y - forecast
    sigma = _sigma(scale, forecast, log_domain)
    score = torch.where(valid & started, residual / sigma, 0.0)

    baseline = torch.where(log_domain, torch.exp(forecast), forecast)
    excess = x - baseline
    gate = _gate(baseline, config)
    limit = config.threshold if threshold is None else threshold.reshape(level.shape).to(level.dtype)
    if config.two_sided:
        flags = valid & warmed & (score.abs() > limit) & (excess.abs() > gate)
    else:
        flags = valid & warmed & (score > limit) & (excess > gate)

    # Winsorize only once warmed: early scales rest on a handful of values and would freeze the level.
    bound = torch.where(warmed, config.clip * sigma, math.inf)
    clipped = torch.clamp(residual, -bound, bound)

    # The first value sets the level; the scale is a running mean until its EWMA weight takes over (the bias
    # correction Adam does with 1 - beta^t, in its simplest form), so it is usable when warm-up ends. The
    # trend starts at 0: a running-mean start for it measured no better on the benchmark.
    new_level = torch.where(started, forecast + _rate(config.halflife) * clipped, y)
    if math.isinf(config.trend_halflife):
        new_trend = trend
    else:
        b = torch.clamp(1.0 / count.clamp_min(1).to(level.dtype), min=_rate(config.trend_halflife))
        new_trend = torch.where(started, trend + b * (new_level - level - trend), trend)
    g = torch.clamp(1.0 / count.clamp_min(1).to(level.dtype), min=_rate(config.scale_halflife))
    new_scale = torch.where(started, scale + g * (clipped.abs() - scale), scale)

    new_state = SpikeState(
        count=count + valid.to(count.dtype),
        level=torch.where(valid, new_level, level),
        trend=torch.where(valid, new_trend, trend),
        scale=torch.where(valid, new_scale, scale),
        log_domain=log_domain,
    )
    return new_state, flags, score


def compute(
    state: SpikeState, config: SpikeConfig = SpikeConfig(), threshold: torch.Tensor | None = None
) -> SpikeSummary:
    """Each stream's forecast for the next step, the band outside which that step flags, and its noise scale.

    With f = level + trend and s = sqrt(pi/2) * scale (floored as in ``update``), in the log domain:

        baseline = exp(f)
        upper = max(exp(f + threshold * s), baseline + atol + rtol * |baseline|)
        lower = min(exp(f - threshold * s), baseline - atol - rtol * |baseline|)

    and in the linear domain the same with f + threshold * s and f - threshold * s in place of the exponentials.
    A warmed-up stream's next value x flags exactly when x > upper (or x < lower with ``two_sided``): the two
    conditions of ``update``, z > threshold and the rtol/atol gate, solved for x. ``scale`` is the noise scale
    in Gaussian-sigma units (relative in the log domain). Called on the state before a step, this is what that
    step was compared with: an alert's expected value and threshold; for dashboards, the loss with its band.
    ``threshold``: an (S,) tensor in place of ``config.threshold`` (the calibrated one of ``detect``).
    """
    forecast = state.level + state.trend
    log_domain = state.log_domain
    baseline = torch.where(log_domain, torch.exp(forecast), forecast)
    limit = config.threshold if threshold is None else threshold.reshape(forecast.shape).to(forecast.dtype)
    reach = limit * _sigma(state.scale, forecast, log_domain)
    gate = _gate(baseline, config)
    high = torch.where(log_domain, torch.exp(forecast + reach), forecast + reach)
    low = torch.where(log_domain, torch.exp(forecast - reach), forecast - reach)
    return SpikeSummary(
        baseline=baseline,
        scale=_MAD_TO_SIGMA * state.scale,
        warmed_up=state.count >= config.warmup,
        upper=torch.maximum(high, baseline + gate),
        lower=torch.minimum(low, baseline - gate),
    )


class TailState(NamedTuple):
    """Per-stream record of the detector's own score tail, for a threshold calibrated to a false-alarm rate.

    ``top`` keeps the largest scores seen so far (``-inf`` until filled), unsorted; ``seen`` counts every score
    folded in, so ``top``'s smallest entry is an empirical quantile at rate about ``K / seen``.
    """

    seen: torch.Tensor  # int64 (S,): scores folded in
    top: torch.Tensor  # (S, K): the K largest of them


def tail_init(
    num_streams: int,
    size: int = TAIL_SIZE,
    device: torch.device | str | None = None,
    *,
    dtype: torch.dtype = torch.float32,
) -> TailState:
    """An empty score tail of ``size`` order statistics per stream (``size`` >= 3: a scale and a shape)."""
    if not (isinstance(size, int) and size >= 3):
        raise ValueError(f"size must be an int >= 3, got {size!r}")
    return TailState(
        seen=torch.zeros(num_streams, device=device, dtype=torch.int64),
        top=torch.full((num_streams, size), -math.inf, device=device, dtype=dtype),
    )


def tail_update(tail: TailState, score: torch.Tensor, include: torch.Tensor) -> TailState:
    """Fold this step's score into each stream's tail where ``include`` (bool (S,)) holds.

    The caller leaves out flagged steps (as SPOT does: an anomaly must not teach the model that anomalies are
    normal) and steps without a score. Fixed cost: one min over K, one scatter; no host synchronization.
    """
    score = score.reshape(tail.seen.shape).to(tail.top.dtype)
    low, where = tail.top.min(dim=1, keepdim=True)
    replace = include.reshape(low.shape) & (score.reshape(low.shape) > low)
    top = tail.top.scatter(1, where, torch.where(replace, score.reshape(low.shape), low))
    return TailState(seen=tail.seen + include.reshape(tail.seen.shape).to(tail.seen.dtype), top=top)


def tail_threshold(
    tail: TailState,
    rate: float,
    *,
    fraction: float = TAIL_FRACTION,
    prior_shape: float = XI_PRIOR,
    prior_weight: float = XI_PRIOR_WEIGHT,
) -> torch.Tensor:
    """The score each stream exceeds with probability ``rate`` per step, from a generalized Pareto tail.

    Peaks over threshold (Pickands 1975; SPOT, Siffer et al. 2017): of the n scores seen, the k largest with
    k = clamp(ceil(fraction * n), 3, K) are kept as peaks, u is the smallest of them and e_1 >= ... >= e_m
    (m = k - 1) the excesses of the others over u. The generalized Pareto shape and scale come from
    probability-weighted moments (Hosking & Wallis 1987),

        a0 = mean(e),  a1 = (1/m) sum_j e_j * j / (m - 1)        (j = 0 for the largest)
        xi_hat = 2 - a0 / (a0 - 2 a1)

    valid for xi < 1 (PWMs need a finite mean; a Student-t with nu > 1 degrees of freedom has xi = 1/nu). The shape
    is shrunk towards ``prior_shape`` as if ``prior_weight`` more excesses had shown it,
    xi = (m xi_hat + w0 xi0) / (m + w0), clamped to [XI_MIN, XI_MAX], the scale refitted to it through the mean
    excess (E[e] = sigma / (1 - xi)), and

        z_rate = u + sigma / xi * ((rate * n / m) ^ -xi - 1)     (u + sigma * log(m / (rate * n)) at xi = 0)

    The shrinkage keeps the first few hundred steps, whose fit rests on a few excesses, conservative; after about
    a thousand scores the stream's own shape dominates. ``fraction`` = 1 and ``prior_weight`` = 0 give the plain
    SPOT fit on all K kept scores. A stream with fewer than 3 scores gets ``inf`` (it cannot flag). A fixed-cost
    tensor computation (one sort of (S, K)), batched over streams, with no host synchronization.
    """
    top, _ = torch.sort(tail.top, dim=1, descending=True)
    size = top.shape[1]
    seen = tail.seen.to(top.dtype)
    k = torch.clamp(torch.ceil(fraction * seen), 3, size).to(torch.int64)
    k = torch.minimum(k, tail.seen.clamp(max=size).clamp_min(1))
    m = (k - 1).clamp_min(0)
    u = top.gather(1, (k - 1).clamp_min(0).unsqueeze(1)).squeeze(1)
    j = torch.arange(size, device=top.device, dtype=top.dtype)
    inside = j.unsqueeze(0) < m.unsqueeze(1)
    e = torch.where(inside, top - u.unsqueeze(1), 0.0)
    mf = m.to(top.dtype).clamp_min(2.0)
    a0 = e.sum(dim=1) / mf
    a1 = (e * j).sum(dim=1) / (mf * (mf - 1.0))
    d = (a0 - 2.0 * a1).clamp_min(torch.finfo(top.dtype).tiny)
    xi_hat = 2.0 - a0 / d
    xi = ((mf * xi_hat + prior_weight * prior_shape) / (mf + prior_weight)).clamp(XI_MIN, XI_MAX)
    sigma = 2.0 * a0 * a1 / d
    # Refit sigma to the shrunk or clamped shape through the mean excess, E[e] = sigma / (1 - xi).
    sigma = torch.where(xi_hat == xi, sigma, a0 * (1.0 - xi))
    ratio = (mf / (rate * seen.clamp_min(1.0))).clamp_min(torch.finfo(top.dtype).tiny)
    small = xi.abs() < 1e-6
    safe = torch.where(small, 1.0, xi)
    z = u + torch.where(small, sigma * torch.log(ratio), sigma / safe * torch.expm1(safe * torch.log(ratio)))
    return torch.where(m >= 2, z, math.inf)


def pooled_threshold(
    upper: TailState,
    lower: TailState,
    rate: float,
    *,
    fraction: float = TAIL_FRACTION,
    trim: float = TAIL_TRIM,
    prior_shape: float = XI_PRIOR,
    prior_weight: float = POOLED_PRIOR_WEIGHT,
    prior_weight_min: float = POOLED_PRIOR_MIN_WEIGHT,
    margin: float = RATE_MARGIN,
    lower_fence: float = LOWER_FENCE,
) -> torch.Tensor:
    """The calibrated detector's threshold: the larger of the upper and lower tails' peaks-over-threshold
    quantiles at ``rate``, with one generalized Pareto shape for both.

    Each tail is fitted as in ``tail_threshold`` (the k = clamp(ceil(fraction * n), 3, K) largest scores, u the
    smallest of them, probability-weighted moments of the m = k - 1 excesses; Hosking & Wallis 1987), after the
    upper tail's ceil(trim * n) largest scores are winsorized to the next one (unflagged spikes must not shape the
    fit), and the lower tail's scores at ``lower_fence`` times its (ceil(trim * n) + 1)-th (a gross outlier only). The shape is the excess-weighted mean of the two tails' estimates, shrunk towards ``prior_shape`` as if
    w more excesses had shown it, w = clamp(M, ``prior_weight_min``, ``prior_weight``) with M the excesses of both
    tails (early, the prior weighs as much as the data, not far more), and clamped to [XI_MIN, XI_MAX]; each
    tail's scale is refitted to it through its mean excess (E[e] = sigma / (1 - xi)), and

        z_rate = u + sigma / xi * ((rate * n / m) ^ -xi - 1)     (u + sigma * log(m / (rate * n)) at xi = 0)

    per tail at rate / ``margin`` (see RATE_MARGIN), the threshold their maximum. Pooling halves the variance of the shape, which sets the spread of
    the extrapolated quantile; the lower tail, which upward spikes never reach and no flag censors, floors the
    upper one. A symmetric-shape assumption: a stream whose upper tail is heavier than its lower one keeps its own
    u and sigma but not its own shape. One sort of (2, S, K), no host synchronization.
    """
    top = torch.stack([upper.top, lower.top])
    seen_int = torch.stack([upper.seen, lower.seen])
    top, _ = torch.sort(top, dim=2, descending=True)
    size = top.shape[2]
    seen = seen_int.to(top.dtype)
    # Winsorize the upper tail's top k0 to the next score, and the lower tail's at LOWER_FENCE times that score
    # (nothing but noise reaches the lower tail; the fence stops only a gross outlier).
    k0 = torch.clamp(torch.ceil(trim * seen), max=size // 8).to(torch.int64)
    cap = top.gather(2, k0.unsqueeze(2))
    cap[1] = torch.where(cap[1] > 0, lower_fence * cap[1], math.inf)
    top = torch.minimum(top, cap)
    k = torch.clamp(torch.ceil(fraction * seen), 3, size).to(torch.int64)
    k = torch.minimum(k, seen_int.clamp(max=size).clamp_min(1))
    m = (k - 1).clamp_min(0)
    u = top.gather(2, m.unsqueeze(2)).squeeze(2)
    j = torch.arange(size, device=top.device, dtype=top.dtype)
    e = torch.where(j < m.unsqueeze(2), top - u.unsqueeze(2), 0.0)
    mf = m.to(top.dtype).clamp_min(2.0)
    a0 = e.sum(dim=2) / mf
    a1 = (e * j).sum(dim=2) / (mf * (mf - 1.0))
    d = (a0 - 2.0 * a1).clamp_min(torch.finfo(top.dtype).tiny)
    xi_hat = torch.where(m >= 2, 2.0 - a0 / d, 0.0)
    used = torch.where(m >= 2, mf, 0.0)
    # The prior weighs as much as the excesses seen, between prior_weight_min and prior_weight.
    total = used.sum(0)
    weight = total.clamp(prior_weight_min, prior_weight)
    xi = ((used * xi_hat).sum(0) + weight * prior_shape) / (total + weight)
    xi = xi.clamp(XI_MIN, XI_MAX)
    sigma = a0 * (1.0 - xi)
    ratio = (mf * margin / (rate * seen.clamp_min(1.0))).clamp_min(torch.finfo(top.dtype).tiny)
    small = xi.abs() < 1e-6
    safe = torch.where(small, 1.0, xi)
    z = u + torch.where(small, sigma * torch.log(ratio), sigma / safe * torch.expm1(safe * torch.log(ratio)))
    z = torch.where(m >= 2, z, math.inf)
    return torch.maximum(z[0], z[1])


class DetectorState(NamedTuple):
    """Per-stream state of the calibrated detector (``detect``), all tensors on the input's device.

    The first five fields are a ``SpikeState`` (``forecast``); ``upper_*`` is the ``TailState`` of the scores
    (flagged steps left out), ``lower_*`` that of the negated scores, ``drift`` the CUSUM of the scores, and
    ``drift_mean``/``drift_square`` the running first and second moments of its increments, ``drift_anchor`` the
    forecast the current run of raised scores started from, ``threshold`` the spike threshold of the last refit,
    ``drift_level`` the slow level (no trend, half-life ``DRIFT_HALFLIFE``) the CUSUM scores values against,
    ``drift_previous`` the previous accepted value (a drift flag needs it, too, over the gate).
    """

    count: torch.Tensor  # int64 (S,)
    level: torch.Tensor  # (S,)
    trend: torch.Tensor  # (S,)
    scale: torch.Tensor  # (S,)
    log_domain: torch.Tensor  # bool (S,)
    upper_seen: torch.Tensor  # int64 (S,)
    upper_top: torch.Tensor  # (S, K)
    lower_seen: torch.Tensor  # int64 (S,)
    lower_top: torch.Tensor  # (S, K)
    drift: torch.Tensor  # (S,): CUSUM statistic, >= 0
    drift_mean: torch.Tensor  # (S,): running mean of the CUSUM increment
    drift_square: torch.Tensor  # (S,): running mean of its square
    drift_anchor: torch.Tensor  # (S,): the forecast (input units) when the CUSUM last left 0
    threshold: torch.Tensor  # (S,): the calibrated threshold of the last refit (inf before the first)
    drift_level: torch.Tensor  # (S,): the CUSUM's reference, a slow EWMA of the values (forecast's domain)
    drift_previous: torch.Tensor  # (S,): the previous accepted value (input units; NaN before the first)

    @property
    def forecast(self) -> SpikeState:
        return SpikeState(*self[:5])

    @property
    def upper(self) -> TailState:
        return TailState(self.upper_seen, self.upper_top)

    @property
    def lower(self) -> TailState:
        return TailState(self.lower_seen, self.lower_top)


class Detection(NamedTuple):
    """What ``detect`` found at one step, per stream, all on the device."""

    flags: torch.Tensor  # bool (S,): spike or drift
    spike: torch.Tensor  # bool (S,): score over the calibrated threshold (and the rtol/atol gate)
    drift: torch.Tensor  # bool (S,): the CUSUM over its limit (a slow divergence)
    score: torch.Tensor  # (S,): the robust z-score, as ``update`` returns it
    threshold: torch.Tensor  # (S,): the calibrated threshold the score was compared with (inf: cannot flag)
    drift_limit: torch.Tensor  # (S,): the CUSUM limit of this step (inf: cannot flag)


def detector_init(
    num_streams: int,
    device: torch.device | str | None = None,
    config: SpikeConfig = SpikeConfig(warmup=CALIBRATED_WARMUP),
    *,
    tail_size: int = TAIL_SIZE,
    dtype: torch.dtype = torch.float32,
) -> DetectorState:
    """A fresh calibrated detector for ``num_streams`` streams; memory 2 * ``tail_size`` + 14 numbers per stream."""
    forecast = init(num_streams, device, config, dtype=dtype)
    upper = tail_init(num_streams, tail_size, device, dtype=dtype)
    lower = tail_init(num_streams, tail_size, device, dtype=dtype)
    zeros = torch.zeros(num_streams, device=device, dtype=dtype)
    return DetectorState(
        *forecast,
        upper.seen,
        upper.top,
        lower.seen,
        lower.top,
        zeros,
        zeros.clone(),
        zeros.clone(),
        zeros.clone(),
        torch.full_like(zeros, math.inf),
        zeros.clone(),
        torch.full_like(zeros, math.nan),
    )


def _threshold(state: DetectorState, config: SpikeConfig) -> torch.Tensor:
    # The score over which a step is a spike: the larger of the upper and lower tails' calibrated thresholds
    # (see ``detect``), or the fixed threshold when ``calibrated`` is off.
    if not config.calibrated:
        return torch.full_like(state.scale, config.threshold)
    return pooled_threshold(state.upper, state.lower, config.false_alarm_rate)


def _drift_limit(state: DetectorState, config: SpikeConfig) -> torch.Tensor:
    # P(CUSUM > h) <= exp(-theta h) per step for increments X with E[exp(theta X)] = 1 (Wald; Siegmund 1985);
    # theta = 2 |E X| / Var X for Gaussian-like increments, and the increments are bounded (clipped scores).
    # The limit is at least one largest increment (drift_clip - drift_allowance), so that a single value, however
    # large, never flags a drift from a quiet CUSUM: early in a run the moments are few and h can fall under it.
    var = (state.drift_square - state.drift_mean**2).clamp_min(1e-6)
    theta = 2.0 * (-state.drift_mean).clamp_min(0.05) / var
    h = math.log(1.0 / config.false_alarm_rate) / theta
    return h.clamp_min(config.drift_clip - config.drift_allowance)


def detect(
    state: DetectorState,
    x: torch.Tensor,
    config: SpikeConfig = SpikeConfig(warmup=CALIBRATED_WARMUP),
    *,
    refit: bool = True,
) -> tuple[DetectorState, Detection]:
    """Score one value per stream, flag spikes over a threshold calibrated to ``config.false_alarm_rate`` and
    slow divergences, and fold the value into the state. No host synchronization; about 150 tensor ops and two
    sorts of (S, K), fixed cost, batched over streams.

    Per stream, each step:

    1. the robust Holt forecast of ``update`` gives the score z (its forecast error over its noise scale);
    2. **spike**: z over the calibrated threshold

           threshold = pooled_threshold(upper, lower, rate)

       (the larger of the two tails' quantiles at ``rate``, one shape for both; the rtol/atol gate of ``update``), where ``upper`` holds the largest scores of the stream's own
       unflagged steps and ``lower`` the largest negated scores. The upper fit is SPOT (Siffer et al. 2017):
       a flagged step must not teach the tail that spikes are normal, so flagged steps stay out of it. That
       censors the tail whenever the threshold is low (healthy extremes get flagged and left out, the fit falls,
       more are left out); the lower tail, which upward spikes never reach and nothing censors, floors it.
       Under noise whose upper tail is the heavier one, the upper fit is the larger and rules; under symmetric
       noise both estimate the same quantile and the maximum is the more conservative of two estimates;
    3. **drift**: a one-sided CUSUM (Page 1954) of the clipped scores,

           D' = max(0, D + clip(z_slow, -c, c) - k),   flag when D' > h,   D' = 0 after a flag

       with z_slow = (y - L) / sigma the value's distance from a slow level L (an EWMA of y without trend,
       half-life ``DRIFT_HALFLIFE``; the forecast's sigma), k = ``drift_allowance`` and h = log(1 / rate) *
       Var X / (2 |E X|) from the running moments of X = clip(z, -c, c) - k, the increment the forecast's own
       scores z would add: the stream's stationary noise (the exponential bound P(D > h) <= exp(-theta h)),
       and h at least c - k. Clipping at c = ``drift_clip`` keeps a spike to one increment of c - k, which that
       floor keeps under the limit, so only a run of raised values fills it (and one value far below the level
       neither empties the CUSUM nor, through the moments, inflates the limit): a loss ramping up, whose distance
       from the slow level grows with the ramp (the forecast's own trend follows a ramp of tens of steps, and its
       scores stay small). A falling loss lies under its slow level, so healthy
       training keeps the CUSUM at 0. A drift flag also needs the value, and the previous accepted one, to have
       risen by the rtol/atol gate over the forecast at which the run began (``drift_anchor``), so that a nearly
       noise-free curve, whose scores sit on one side of its forecast for long stretches, does not flag a rise of
       a few parts per thousand, and a loss whose level wanders healthily by a few percent (which fills the
       CUSUM: the limit assumes independent noise) does not flag at the one large noise draw that takes a value
       over the gate;

    No stream flags before ``config.warmup`` accepted values. Scores enter the tails and the CUSUM from the
    ``TAIL_START``-th value; until a tail has 3 scores its threshold is ``inf``, and the CUSUM does not flag before
    it has seen ``DRIFT_START`` scores.

    ``refit=False`` compares the step with the threshold of the last refit (``state.threshold``) instead of
    fitting the tails again: the monitor refits every ``REFIT_EVERY`` steps, which cuts the detector's cost about
    fourfold; the tails still take every step's score.

    Returns ``(new_state, Detection)``; ``Detection.score`` and ``Detection.threshold`` are what the alert rules
    compare (``score / threshold`` over 1 is a spike).
    """
    forecast = state.forecast
    # ``refit`` is a host-side decision (the monitor refits every REFIT_EVERY steps): no branch on a device value.
    threshold = _threshold(state, config) if refit or not config.calibrated else state.threshold
    new_forecast, spike_flags, score = update(forecast, x, config, threshold=threshold)
    valid = new_forecast.count > forecast.count
    warmed = forecast.count >= config.warmup
    in_tail = valid & (forecast.count >= TAIL_START)

    upper = tail_update(state.upper, score, in_tail & ~spike_flags)
    lower = tail_update(state.lower, -score, in_tail)

    # CUSUM of the clipped score; its increment's moments are running means, then EWMAs of the scale's half-life.
    # The CUSUM scores each value against a slow level without trend (DRIFT_HALFLIFE), not the forecast: the Holt
    # forecast's trend follows a loss that ramps up over tens of steps, its scores stay near 1 and the CUSUM never
    # fills; against the slow level the ramp's scores grow with its length. A falling loss lies below its slow level
    # (negative scores), so healthy training only makes the CUSUM more conservative.
    forecast_now = forecast.level + forecast.trend
    sigma = _sigma(forecast.scale, forecast_now, forecast.log_domain)
    y_now = forecast_now + score * sigma  # the value in the forecast's domain (score = (y - f) / sigma)
    has_level = forecast.count > TAIL_START
    drift_score = torch.where(has_level, (y_now - state.drift_level) / sigma, score)
    step = torch.clamp(drift_score, min=-config.drift_clip, max=config.drift_clip) - config.drift_allowance
    # The limit comes from the moments of the forecast's clipped scores, the stream's stationary noise: those of
    # the slow level's would be far below zero while the loss falls (its values lie under the level), and a limit
    # set by them collapses (h ~ Var X / |E X|) and flags the first bump once the loss flattens.
    noise_step = torch.clamp(score, min=-config.drift_clip, max=config.drift_clip) - config.drift_allowance
    # A running mean from the second value (a = 1 there: the first has no score, so no y_now), then an EWMA.
    a = torch.clamp(1.0 / forecast.count.clamp_min(1).to(score.dtype), min=_rate(DRIFT_HALFLIFE))
    drift_level = torch.where(valid, state.drift_level + a * (y_now - state.drift_level), state.drift_level)
    limit = torch.where(warmed, _drift_limit(state, config), math.inf)
    cusum = torch.where(in_tail, (state.drift + step).clamp_min(0.0), state.drift)
    baseline = torch.where(forecast.log_domain, torch.exp(forecast_now), forecast_now)
    anchor = torch.where(state.drift > 0, state.drift_anchor, baseline)
    x_now = x.detach().reshape(baseline.shape).to(baseline.dtype)
    # This value and the previous accepted one must both have risen by the gate: a loss ramping up stays over it,
    # while a healthy wander plus one large noise draw does not. NaN before the first value: no flag.
    risen = torch.minimum(x_now, state.drift_previous) - anchor > _gate(anchor, config)
    drift_previous = torch.where(valid, x_now, state.drift_previous)
    drift_flags = valid & warmed & (state.lower_seen >= DRIFT_START) & (cusum > limit) & risen
    if config.drift_streams is not None:
        drift_flags[config.drift_streams :] = False  # a slice of host metadata: no synchronization
    cusum = torch.where(drift_flags, 0.0, cusum)
    started = (forecast.count - TAIL_START + 1).clamp_min(1).to(step.dtype)
    g = torch.clamp(1.0 / started, min=_rate(config.scale_halflife))
    moments = in_tail
    drift_mean = torch.where(moments, state.drift_mean + g * (noise_step - state.drift_mean), state.drift_mean)
    drift_square = torch.where(
        moments, state.drift_square + g * (noise_step * noise_step - state.drift_square), state.drift_square
    )

    new_state = DetectorState(
        *new_forecast,
        upper.seen,
        upper.top,
        lower.seen,
        lower.top,
        cusum,
        drift_mean,
        drift_square,
        anchor,
        threshold,
        drift_level,
        drift_previous,
    )
    detection = Detection(
        flags=spike_flags | drift_flags,
        spike=spike_flags,
        drift=drift_flags,
        score=score,
        threshold=torch.where(warmed, threshold, math.inf),
        drift_limit=limit,
    )
    return new_state, detection


def detector_compute(state: DetectorState, config: SpikeConfig = SpikeConfig(warmup=CALIBRATED_WARMUP)) -> SpikeSummary:
    """``compute`` of the forecast with the calibrated threshold the next step will be compared with: its
    expected value (``baseline``) and the value over which it is a spike (``upper``)."""
    return compute(state.forecast, config, threshold=_threshold(state, config))


def skip_factor(spike_flags: torch.Tensor, count: torch.Tensor, warmup: int, streams: int = 2) -> torch.Tensor:
    """1.0, or 0.0 when the step's update should be skipped: a spike flag on one of the first ``streams``
    streams (the loss and the global gradient norm), from a stream past its warm-up.

    ``spike_flags``: ``Detection.spike`` (drift flags do not skip: skipping every step of a divergence would stop
    training, not save it); ``count``: the accepted values of each stream before this step (``count`` of the state
    the step was scored against). A 0-d tensor on the flags' device (no synchronization), to multiply into the
    step or hand to ``heavytail.hooks.skip.SkipStep.decide``. The rule of OLMo-core's skip-step optimizers, with the
    calibrated detector in place of a rolling 6-sigma test.
    """
    fire = spike_flags[:streams] & (count[:streams] >= warmup)
    return 1.0 - fire.any().to(torch.float32)


class Cooldown:
    """Host-side de-duplication so that one event is one alert: a flag alerts only after a quiet period.

    A stream's flag becomes an alert when that stream raised no flag in the previous ``steps`` steps; every
    flag (alerted or not) restarts the quiet period, so a spike lasting several steps, or a shifted level
    flagged for a while, gives one alert. Pure Python on flags already copied to the host (the alerting layer
    copies the flag vector asynchronously and reads it one step later).

    >>> cd = Cooldown(num_streams=1, steps=3)
    >>> [cd([flag], step=s)[0] for s, flag in enumerate([1, 1, 0, 1, 0, 0, 0, 1])]
    [True, False, False, False, False, False, False, True]
    """

    def __init__(self, num_streams: int, steps: int = 50) -> None:
        if not (isinstance(steps, int) and steps >= 0):
            raise ValueError(f"steps must be an int >= 0, got {steps!r}")
        self.steps = steps
        self._last_flag: list[int | None] = [None] * num_streams
        self._last_any: int | None = None
        self._step = -1

    @property
    def num_streams(self) -> int:
        return len(self._last_flag)

    @property
    def last_flag(self) -> int | None:
        """The last step at which any stream flagged (None before the first flag)."""
        return self._last_any

    def __call__(self, flags: Sequence[bool], step: int | None = None) -> list[bool]:
        """Alerts for one step's host-side flags; ``step`` defaults to one past the previous call's."""
        step = self._step + 1 if step is None else int(step)
        self._step = step
        alerts = []
        for i, flag in enumerate(flags):
            if not flag:
                alerts.append(False)
                continue
            last = self._last_flag[i]
            alerts.append(last is None or step - last > self.steps)
            self._last_flag[i] = step
            self._last_any = step
        return alerts

    def quiet(self, step: int | None = None) -> None:
        """A step without any flag: the same as calling with all flags false, without the per-stream loop."""
        self._step = self._step + 1 if step is None else int(step)

    def state_dict(self) -> dict:
        return {"steps": self.steps, "last_flag": list(self._last_flag), "step": self._step}

    def load_state_dict(self, state: dict) -> None:
        self.steps = int(state["steps"])
        self._last_flag = list(state["last_flag"])
        self._step = int(state["step"])
        self._last_any = max((s for s in self._last_flag if s is not None), default=None)
