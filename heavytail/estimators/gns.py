"""Gradient noise scale: B_simple from gradient norms at two batch sizes, and a counterpart that heavy tails leave finite.

McCandlish, Kaplan, Amodei et al. (2018, "An Empirical Model of Large-Batch Training", appendix A): with G the
true gradient, Sigma the per-example gradient covariance and G_b a gradient averaged over b examples,
E|G_b|^2 = |G|^2 + tr(Sigma) / b. Two batch sizes b < B seen at the same step give unbiased estimates of both terms

    |G|^2      ~ (B |G_B|^2 - b |G_b|^2) / (B - b)
    tr(Sigma)  ~ (|G_b|^2 - |G_B|^2) / (1/b - 1/B)

and the simple noise scale B_simple = tr(Sigma) / |G|^2: the batch size at which the noise's share of a batch
gradient's squared norm equals the signal's, about the critical batch size beyond which a larger batch buys little
(the paper's B_crit ~ B_noise). Each estimate is smoothed by its own exponential moving average, and B_simple is
their ratio (an EMA of per-step ratios would be biased by the noise in the denominator).

A ratio of second moments means nothing when the noise has infinite variance (a noise tail index under 2): the
per-step trace estimate then has an infinite mean, its running mean grows without bound, and so does B_simple
(see ``robust`` below for the figure that stays finite). The monitor's noise tail index says when that is so
(``variance_flag``).

The monitor feeds, per step, each tensor's squared norm of a small-batch gradient (the first micro-batch under
gradient accumulation, or this rank's gradient before the all-reduce under DDP) and of the big-batch gradient the
optimizer steps with, with b and B as host numbers. ``b`` and ``B`` may be in examples or in any common unit
(micro-batches): B_simple comes out in the same unit, and the squared-norm estimates depend only on their ratio
up to one factor (see ``update``). Everything here runs on the device with no host read.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch

__all__ = [
    "GnsState",
    "GnsResult",
    "MERGE",
    "init",
    "update",
    "update_many",
    "compute",
    "merge",
    "variance_flag",
]


class GnsState(NamedTuple):
    """Per row ``(L + 1,)`` float64 on the gradients' device: rows ``0..L-1`` the tensors, row ``L`` the whole
    model (squared norms summed over the step's valid tensors).

    ``grad_sq``, ``trace_sigma`` and ``log_ratio`` are EMAs of per-step estimates (see ``update``); ``count`` the
    steps each row has taken in; ``small_batch`` and ``big_batch`` the b and B of the row's last step.
    """

    count: torch.Tensor
    small_batch: torch.Tensor
    big_batch: torch.Tensor
    grad_sq: torch.Tensor
    trace_sigma: torch.Tensor
    log_ratio: torch.Tensor


MERGE = GnsState(
    count="max",
    small_batch="max",
    big_batch="max",
    grad_sq="mean",
    trace_sigma="mean",
    log_ratio="mean",
)
"""How each field merges across data-parallel ranks that saw the same big-batch gradient and each its own small one
(DDP): the EMAs are linear in the per-step inputs, so the mean of the ranks' EMAs is the EMA of the ranks' mean
estimate, which uses every rank's small batch. ``"mean"`` is a sum all-reduce divided by the world size. Merge
before ``compute``, never its ratios."""


class GnsResult(NamedTuple):
    """What ``compute`` returns, per row ``(L + 1,)``; NaN where a row has taken no step."""

    b_simple: torch.Tensor  # tr(Sigma) / |G|^2 in the unit of b and B, clamped to [0, inf]
    trace_sigma: torch.Tensor  # EMA estimate of tr(Sigma), per example (per unit of b)
    grad_sq: torch.Tensor  # EMA estimate of |G|^2
    robust: torch.Tensor  # the batch size at which typical noise equals the signal (geometric mean)
    norm_ratio: torch.Tensor  # exp(EMA of log(|G_b|^2 / |G_B|^2)): the typical small- to big-batch ratio
    small_batch: torch.Tensor  # b of the last step
    big_batch: torch.Tensor  # B of the last step
    count: torch.Tensor  # steps taken in


def init(num_tensors: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float64) -> GnsState:
    """An empty state of ``num_tensors + 1`` rows (the last is the whole model)."""
    if num_tensors < 0:
        raise ValueError(f"num_tensors must be >= 0, got {num_tensors!r}")
    zeros = torch.zeros(num_tensors + 1, device=device, dtype=dtype)
    return GnsState(*(zeros.clone() for _ in GnsState._fields))


def update(
    state: GnsState,
    small_sq: torch.Tensor,
    big_sq: torch.Tensor,
    b: float,
    B: float,
    valid: torch.Tensor | None = None,
    beta: float = 0.99,
) -> GnsState:
    """Fold one step's squared norms into the EMAs.

    Args:
        small_sq: ``(L,)`` |G_b|^2 per tensor, the small-batch gradient (mean over b examples).
        big_sq: ``(L,)`` |G_B|^2 per tensor, the big-batch gradient of the same step (mean over B examples, the
            small batch's among them or not).
        b, B: the batch sizes, host numbers with 0 < b < B.
        valid: ``(L,)`` bool, the tensors measured at this step (others keep their state and stay out of the
            whole-model row); non-finite inputs are left out as well.
        beta: the EMA's decay. A row's n-th step enters with weight max(1 - beta, 1/n), so the first steps form a
            running mean (no bias towards 0), and ``beta=1`` keeps the running mean of every step.

    Per row, with s = small_sq, S = big_sq and k = B / b:

        grad_sq      <- EMA of (B S - b s) / (B - b)
        trace_sigma  <- EMA of (s - S) / (1/b - 1/B)
        log_ratio    <- EMA of log(clamp(s / S, 1/k^2, k^2))

    The last is the robust counterpart's per-step input, a self-normalised statistic (de la Peña, Lai & Shao
    2009, "Self-Normalized Processes"): one huge example enters both norms, so s / S lies near k^2 when it falls
    in the small batch and near 0 when it falls outside, whatever the noise's tail. The clamp makes that a hard
    bound (a near-cancellation in G_B, or a tensor the small batch did not reach, would otherwise break it), so
    every moment is finite and the EMA settles under any tail index. A logarithm because it is scale-equivariant:
    if |G_b|^2 and |G_B|^2 are pure noise with the same law up to scale, E log(s / S) is exactly that scale
    ratio, in any dimension and with any dependence between the two (see ``compute``).

    Scaling both inputs by one factor (a loss scale, a loss divided by the number of micro-batches) scales
    ``grad_sq`` and ``trace_sigma`` by it and leaves ``b_simple``, ``log_ratio`` and ``robust`` unchanged. ``b``
    and ``B`` in micro-batches rather than examples give the same ``grad_sq`` and ``log_ratio``, and
    ``trace_sigma``, ``b_simple`` and ``robust`` per micro-batch (multiply ``b_simple`` and ``robust`` by the
    examples per micro-batch, divide ``trace_sigma`` by them). ``log_ratio`` assumes the same b and B at every step
    (they normally are); the other two EMAs take each step's own. About 40 elementwise ops on ``(L + 1,)``; no host
    read.
    """
    b, B = _checked(b, B, beta, "update")
    okf, grad_sq, trace, log_ratio = (
        t[0] for t in _estimates(state.grad_sq.dtype, small_sq.reshape(1, -1), big_sq.reshape(1, -1), b, B, valid)
    )

    count = state.count + okf
    # max(1 - beta, 1/n) on the rows that take the step, 0 on the others: count is at least 1 where okf is 1.
    weight = okf * torch.clamp(1.0 / count.clamp_min(1.0), min=1.0 - beta)
    return GnsState(
        count=count,
        small_batch=torch.lerp(state.small_batch, torch.full_like(okf, b), okf),
        big_batch=torch.lerp(state.big_batch, torch.full_like(okf, B), okf),
        grad_sq=state.grad_sq + weight * (grad_sq - state.grad_sq),
        trace_sigma=state.trace_sigma + weight * (trace - state.trace_sigma),
        log_ratio=state.log_ratio + weight * (log_ratio - state.log_ratio),
    )


def _checked(b: float, B: float, beta: float, name: str) -> tuple[float, float]:
    b, B = float(b), float(B)
    if not (0 < b < B and math.isfinite(B)):
        raise ValueError(f"gns.{name} needs 0 < b < B, got b={b!r}, B={B!r}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"gns.{name} needs 0 <= beta <= 1, got {beta!r}")
    return b, B


def _estimates(dt: torch.dtype, small_sq: torch.Tensor, big_sq: torch.Tensor, b: float, B: float, valid):
    """Per step ``(T, L + 1)``: whether each row takes the step (0/1), and its |G|^2, tr(Sigma) and clamped log
    norm ratio (see ``update``); the last column is the whole model."""
    T = small_sq.shape[0]
    s = small_sq.detach().reshape(T, -1).to(dt)
    S = big_sq.detach().reshape(T, -1).to(dt)
    ok = torch.isfinite(s) & torch.isfinite(S) & (s >= 0) & (S >= 0)
    if valid is not None:
        ok = ok & valid.reshape(T, -1).to(device=ok.device, dtype=torch.bool)
    okf = ok.to(dt)
    s = torch.where(ok, s, 0.0)
    S = torch.where(ok, S, 0.0)
    # The whole model's row: its squared norms are the sums over the tensors measured this step.
    s = torch.cat([s, s.sum(dim=1, keepdim=True)], dim=1)
    S = torch.cat([S, S.sum(dim=1, keepdim=True)], dim=1)
    whole = okf.amax(dim=1, keepdim=True) if okf.shape[1] else okf.new_zeros(T, 1)
    # No gradient at all (s = S = 0): nothing to measure.
    okf = torch.cat([okf, whole], dim=1) * ((s + S) > 0).to(dt)

    k = B / b
    grad_sq = (B * S - b * s) / (B - b)
    trace = (s - S) / (1.0 / b - 1.0 / B)
    # s / S is inf for S = 0 < s and NaN for s = S = 0 (a row left out above); the clamp bounds both ends.
    log_ratio = torch.log(torch.nan_to_num(s / S, nan=1.0).clamp(1.0 / (k * k), k * k))
    return okf, grad_sq, trace, log_ratio


def update_many(
    state: GnsState,
    small_sq: torch.Tensor,
    big_sq: torch.Tensor,
    b: float,
    B: float,
    valid: torch.Tensor | None = None,
    beta: float = 0.99,
) -> GnsState:
    """``update`` for T steps at once: ``small_sq``, ``big_sq`` (and ``valid``) ``(T, L)``, one row a step, all
    with the same b and B. The same EMAs as T calls of ``update`` (to rounding), in about 50 ops on ``(T, L + 1)``
    instead of 40 a step, so a caller can keep a step's two squared norms and fold them in every few steps.

    The recursion m_t = m_{t-1} + w_t (x_t - m_{t-1}) unrolls to m_T = P_1 m_0 + sum_t w_t x_t P_{t+1}, with
    P_t = prod_{j >= t} (1 - w_j): a reversed cumulative product. Every factor lies in [0, 1] and a row's first
    step has w = 1, so the products only shrink towards 0 and nothing is divided."""
    b, B = _checked(b, B, beta, "update_many")
    T = small_sq.shape[0]
    if T == 0:
        return state
    okf, grad_sq, trace, log_ratio = _estimates(state.grad_sq.dtype, small_sq, big_sq, b, B, valid)

    count = state.count + okf.cumsum(dim=0)
    weight = okf * torch.clamp(1.0 / count.clamp_min(1.0), min=1.0 - beta)
    kept = (1.0 - weight).flip(0).cumprod(dim=0).flip(0)  # P_t: what survives of step t - 1's EMA
    later = torch.cat([kept[1:], torch.ones_like(kept[:1])])  # P_{t + 1}: what survives of step t's input
    contribution = weight * later

    def ema(previous: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        return kept[0] * previous + (contribution * inputs).sum(dim=0)

    took = okf.amax(dim=0)
    return GnsState(
        count=count[-1],
        small_batch=torch.lerp(state.small_batch, torch.full_like(took, b), took),
        big_batch=torch.lerp(state.big_batch, torch.full_like(took, B), took),
        grad_sq=ema(state.grad_sq, grad_sq),
        trace_sigma=ema(state.trace_sigma, trace),
        log_ratio=ema(state.log_ratio, log_ratio),
    )


def compute(state: GnsState) -> GnsResult:
    """B_simple and its robust counterpart per row from the (merged) state.

        b_simple = trace_sigma / grad_sq          (McCandlish et al. 2018, eq. 2.8 and appendix A)

    is 0 where the trace estimate is <= 0 (no noise resolved: the signal dominates even the small batch) and inf
    where the trace is positive but the |G|^2 estimate is <= 0 (the noise dominates even the big batch).

    ``robust`` reads the same question from the typical norm ratio r = exp(log_ratio) of the small to the big
    batch instead of from mean squares. With E|G_n|^2 = |G|^2 + N / n, r = (|G|^2 + N / b) / (|G|^2 + N / B)
    solves to

        robust = N / |G|^2 = b B (r - 1) / (B - r b)

    which is B_simple itself for norms that concentrate (many coordinates; the log's bias is O(1 / effective
    dimension)), 0 for r <= 1 and inf for r >= B / b (pure noise, as B_simple would be). Its input is bounded
    (see ``update``), so unlike B_simple it settles when the noise variance is infinite (tail index under 2),
    where it answers McCandlish's question (from which batch size on does a bigger batch barely reduce the noise
    relative to the signal) with "typical" read as a geometric mean instead of a mean square. Under such tails it
    is a relative figure: no calibration case fixes its absolute value there.
    """
    count = state.count
    empty = count <= 0
    trace, grad_sq = state.trace_sigma, state.grad_sq
    inf = torch.full_like(trace, math.inf)
    b_simple = torch.where(trace <= 0, 0.0, torch.where(grad_sq <= 0, inf, trace / grad_sq))

    b, B = state.small_batch, state.big_batch
    r = torch.exp(state.log_ratio)
    denom = B - r * b
    robust = torch.where(r <= 1.0, 0.0, torch.where(denom <= 0, inf, b * B * (r - 1.0) / denom))

    nan = torch.full_like(trace, math.nan)
    return GnsResult(
        b_simple=torch.where(empty, nan, b_simple),
        trace_sigma=torch.where(empty, nan, trace),
        grad_sq=torch.where(empty, nan, grad_sq),
        robust=torch.where(empty, nan, robust),
        norm_ratio=torch.where(empty, nan, r),
        small_batch=torch.where(empty, nan, state.small_batch),
        big_batch=torch.where(empty, nan, state.big_batch),
        count=count,
    )


def merge(states: Sequence[GnsState]) -> GnsState:
    """The ranks' states merged as ``MERGE`` declares (what the checkpoint's all-reduce does), for one process."""
    fields = []
    for name, how in zip(GnsState._fields, MERGE):
        stacked = torch.stack([getattr(st, name) for st in states])
        fields.append(stacked.amax(dim=0) if how == "max" else stacked.mean(dim=0))
    return GnsState(*fields)


def variance_flag(noise_alpha: torch.Tensor, threshold: float = 2.0) -> torch.Tensor:
    """``(L + 1,)`` 1.0 where the noise tail index says B_simple means nothing, 0.0 where it does, NaN if unknown.

    ``noise_alpha`` ``(L,)`` is each tensor's noise tail index (``noise/`` keys; NaN where not estimated). A tail
    index alpha < 2 means infinite variance (P(|noise| > x) ~ x^-alpha), so tr(Sigma) and B_simple do not exist
    and the estimate grows with the number of steps averaged: read ``robust`` instead. The whole model's row is 1
    if any tensor's is (a sum has infinite variance if a term has), else NaN if any is unknown, else 0.
    """
    alpha = noise_alpha.reshape(-1).to(torch.float64)
    known = ~torch.isnan(alpha)  # inf (no power-law tail) is known: finite variance
    flag = torch.where(known, (alpha < threshold).to(alpha.dtype), math.nan)
    if flag.numel():
        whole = torch.where((flag == 1).any(), 1.0, torch.where(torch.isnan(flag).any(), math.nan, 0.0)).reshape(1)
    else:
        whole = flag.new_full((1,), math.nan)
    return torch.cat([flag, whole.to(flag.dtype)])
