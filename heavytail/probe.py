"""The noise probe: many mini-batch gradients of a held batch at a checkpoint, and the tails of their noise.

Protocol of Simsekli, Sagun & Gurbuzbalaban (2019) and of the code of arXiv 2602.07425: split a fixed batch into
``M`` disjoint mini-batches, compute each one's gradient, and take noise = a mini-batch gradient minus the mean of
the ``M`` gradients. Unlike the monitor's streaming noise sources (temporal, micro-batch, rank), the probe holds
the weights fixed, so its noise is the sampling noise of the stochastic gradient and nothing else. It is read on
the monitor's fixed sample of coordinates per tensor (``sample_index``), so memory is ``M x L x S`` floats.

Cost: ``M`` forward and backward passes over ``1/M`` of the held batch each, i.e. about one forward+backward of
the whole held batch plus ``M`` times the per-call overhead, and one running sum of the watched gradients while
it runs (for the whole batch's gradient norm, the big batch of the gradient noise scale); no optimizer step. Run
it at checkpoints, not at every step (``MonitorConfig.probe_every``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Callable, NamedTuple

import torch
from torch import nn

from heavytail.estimators import gns
from heavytail.estimators.hill import hill
from heavytail.estimators.kurtosis import kurtosis
from heavytail.estimators.noise import centred, noise_tail

__all__ = [
    "DEFAULT_MOMENTS",
    "ProbeResult",
    "batch_rows",
    "head_rows",
    "moment_fit",
    "noise_probe",
    "noise_scale",
    "noise_statistics",
    "split_batch",
]

DEFAULT_MOMENTS: tuple[float, ...] = (1.0, 1.5)
"""Powers p of the generalized heavy-tailed noise condition that the probe fits (p in (1, 2]; 2 is the variance)."""

RESOLVED_SE = 2.0
"""A coordinate's mean gradient counts as resolved when it is this many standard errors away from zero."""


class ProbeResult(NamedTuple):
    """What one probe measured, per watched tensor (``L`` rows), as tensors on the gradients' device.

    Tail of the noise; each coordinate's M mini-batch values are its draws (:func:`noise_statistics`):

    - ``hill_alpha``, ``hill_alpha_se`` ``(L,)``: the calibrated tail reading of the noise
      (:func:`heavytail.estimators.noise.noise_tail`: each coordinate's M draws standardised by their own scale,
      pooled, Hill with its standard error); under 2 the noise has infinite variance. ``tail_class`` ``(L,)``:
      its verdict (0 light, 1 power, 2 sparse, NaN not computed) and ``active_frac`` the share of draws that are
      not the atom at zero.
    - ``hill_alpha_coord`` ``(L,)``: Hill with a fixed k per coordinate (``max(2, M // 8)`` of its M draws),
      pooled over coordinates as a mean of 1/alpha: blind to how coordinates move together, but biased up for
      light tails at small M; ``hill_alpha_gauss`` ``(L,)``: what it reads on Gaussian noise of the same M (about
      4.0 at M = 32).
    - ``hill_alpha_2x``, ``tail_class_2x`` ``(L,)``: the same reading at twice the batch size (the means of
      pairs of mini-batch gradients, M/2 draws): the generalized-CLT check of Simsekli et al. (2019): an
      alpha-stable noise (alpha < 2) keeps its alpha as the batch grows, a finite-variance one drifts to light.
    - ``stable_alpha`` ``(L,)``: the alpha-stable index (Mohammadi et al. 2015, as Simsekli et al. 2019 use it),
      in (0, 2]; 2 reads as Gaussian.
    - ``kurtosis`` ``(L,)``: mean over coordinates of the excess kurtosis of the noise (Gaussian: -6/(M+1)).

    Moment data of the generalized heavy-tailed noise condition ``E|xi|^p <= sigma0^p + sigma1^p |grad|^p``:

    - ``moments``: the powers p.
    - ``noise_moment`` ``(L, P, S)``: per sampled coordinate, ``mean_m |xi_m|^p``.
    - ``grad_moment`` ``(L, P, S)``: per sampled coordinate, ``|mean_m g_m|^p``.
    - ``moment_slope``, ``moment_intercept``, ``moment_r2`` ``(L, P)``: least squares of
      ``log E|xi|^p = intercept + slope * log |grad|^p`` over the resolved coordinates (see :func:`moment_fit`).
    - ``resolved_frac`` ``(L,)``: the fraction of sampled coordinates whose mean gradient is resolved (more than
      ``RESOLVED_SE`` standard errors from zero); only those enter the fit.

    And ``grad_norm`` ``(L, M)``: each mini-batch gradient's norm per tensor; ``mean_grad_norm`` ``(L,)``: the
    norm of the mean of the M mini-batch gradients (the whole held batch's gradient, over every entry, not only
    the sampled coordinates), the big batch of the gradient noise scale (:func:`noise_scale`); ``micro_batches``:
    M; ``batch_size``: the mean number of rows of the held batch per mini-batch (NaN when not known).
    """

    hill_alpha: torch.Tensor
    hill_alpha_se: torch.Tensor
    hill_alpha_gauss: torch.Tensor
    stable_alpha: torch.Tensor
    kurtosis: torch.Tensor
    moments: tuple[float, ...]
    noise_moment: torch.Tensor
    grad_moment: torch.Tensor
    moment_slope: torch.Tensor
    moment_intercept: torch.Tensor
    moment_r2: torch.Tensor
    resolved_frac: torch.Tensor
    grad_norm: torch.Tensor
    micro_batches: int
    tail_class: torch.Tensor
    active_frac: torch.Tensor
    hill_alpha_2x: torch.Tensor
    tail_class_2x: torch.Tensor
    hill_alpha_coord: torch.Tensor
    batch_size: float = math.nan
    mean_grad_norm: torch.Tensor | None = None

    def packed(self) -> tuple[list[str], torch.Tensor]:
        """The per-tensor figures as ``(names, values (L, K))``, for one checkpoint copy.

        Names: ``hill_alpha``, ``hill_alpha_se``, ``hill_alpha_gauss``, ``stable_alpha``, ``kurtosis``,
        ``moment_slope_p<p>`` and
        ``moment_intercept_p<p>`` for each p (``p1``, ``p1.5``), ``resolved_frac``, ``grad_norm`` (the mean
        mini-batch gradient norm), ``tail_class``, ``active_frac``, ``hill_alpha_2x``, ``tail_class_2x``,
        ``hill_alpha_coord``, ``micro_batches`` and ``batch_size``. The monitor writes them as ``probe/<name>/<parameter>``.
        """
        names = ["hill_alpha", "hill_alpha_se", "hill_alpha_gauss", "stable_alpha", "kurtosis"]
        cols = [self.hill_alpha, self.hill_alpha_se, self.hill_alpha_gauss, self.stable_alpha, self.kurtosis]
        for j, p in enumerate(self.moments):
            names += [f"moment_slope_p{p:g}", f"moment_intercept_p{p:g}"]
            cols += [self.moment_slope[:, j], self.moment_intercept[:, j]]
        names += ["resolved_frac", "grad_norm", "tail_class", "active_frac", "hill_alpha_2x", "tail_class_2x"]
        cols += [self.resolved_frac, self.grad_norm.mean(dim=1), self.tail_class, self.active_frac]
        cols += [self.hill_alpha_2x, self.tail_class_2x]
        names += ["hill_alpha_coord", "micro_batches", "batch_size"]
        cols += [self.hill_alpha_coord]
        cols += [
            torch.full_like(self.hill_alpha, float(self.micro_batches)),
            torch.full_like(self.hill_alpha, self.batch_size),
        ]
        return names, torch.stack([c.to(torch.float64) for c in cols], dim=1)


# ----------------------------------------------------------------------------------------------------------------
# The probe


def noise_probe(
    model: nn.Module,
    params: Sequence[torch.Tensor],
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    batch: Any,
    *,
    micro_batches: int = 32,
    sample_index: torch.Tensor,
    moments: Sequence[float] = DEFAULT_MOMENTS,
    groups: Sequence[Sequence[int]] | None = None,
    min_count: int = 1000,
) -> ProbeResult:
    """Mini-batch gradient noise of a held batch, on sampled coordinates, without disturbing training.

    ``batch`` (a tensor, a tuple/list or a dict of tensors, split along dim 0; other values are passed to every
    mini-batch as they are) is cut into ``micro_batches`` disjoint mini-batches (:func:`split_batch`). For each:
    gradients are set to None, ``loss_fn(model, mini_batch)`` is evaluated and back-propagated under the model's
    current train/eval mode, and each of ``params`` (``L`` tensors) is read at ``sample_index[i]`` (``(L, S)``
    flat indices, the monitor's coordinate sample) along with its norm. Noise = a mini-batch gradient minus the
    mean of the ``M`` mini-batch gradients (Simsekli et al. 2019); :func:`noise_statistics` turns the samples
    into tail indices and the moment fit.

    Training is left exactly as it was: every parameter's ``.grad`` (the tensor object itself, or None), the
    torch CPU and CUDA RNG states, every module's ``training`` flag and every buffer (BatchNorm running
    statistics and counters) are saved before and restored after, bit for bit, also when ``loss_fn`` raises.
    Dropout in train mode draws from the RNG, whose state is restored, so training's random stream goes on
    unchanged.

    ``groups`` (lists of indices into ``params``) makes the result's rows groups of tensors instead of single
    tensors: a group pools its members' sampled coordinates (the monitor's ``group_by``), and its norm is the
    norm of the members' concatenated gradient.

    Cost: ``micro_batches`` forward and backward passes over ``1/micro_batches`` of ``batch`` each (about one
    forward+backward of the whole batch plus per-call overhead), and ``L x micro_batches x S`` floats. Parameters
    that get no gradient count as zero gradient. Hooks registered on the parameters (a monitor's backward taps)
    fire during the probe's backward passes: a monitor must ignore them while it probes.
    """
    if isinstance(micro_batches, bool) or not isinstance(micro_batches, int) or micro_batches < 2:
        raise ValueError(f"noise_probe: micro_batches must be an integer >= 2, got {micro_batches!r}")
    params = list(params)
    if sample_index.ndim != 2 or sample_index.shape[0] != len(params):
        raise ValueError(
            f"noise_probe: sample_index must have shape (L, S) with L = {len(params)} parameters, "
            f"got {tuple(sample_index.shape)}"
        )
    pieces = split_batch(batch, micro_batches)
    device = params[0].device if params else torch.device("cpu")
    index = sample_index.to(device)

    # Every parameter the backward passes can touch: the model's, and any watched tensor outside it.
    everything: list[torch.Tensor] = []
    seen: set[int] = set()
    for p in [*model.parameters(), *params]:
        if id(p) not in seen:
            seen.add(id(p))
            everything.append(p)
    saved_grads = [p.grad for p in everything]
    modes = [(m, m.training) for m in model.modules()]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None

    samples = torch.zeros(micro_batches, len(params), index.shape[1], device=device, dtype=torch.float64)
    norms = torch.zeros(micro_batches, len(params), device=device, dtype=torch.float64)
    # The sum of the M mini-batch gradients, per watched tensor (float32 at least: half sums lose the noise).
    totals = [torch.zeros(p.shape, device=p.device, dtype=_sum_dtype(p.dtype)) for p in params]
    try:
        for m, piece in enumerate(pieces):
            for p in everything:
                p.grad = None
            with torch.enable_grad():
                loss = loss_fn(model, piece)
                loss.backward()
            with torch.no_grad():
                grads = [p.grad for p in params]
                present = [i for i, g in enumerate(grads) if g is not None]
                if present:
                    rows = torch.tensor(present, device=device)
                    dense = [grads[i].to_dense() if grads[i].layout != torch.strided else grads[i] for i in present]
                    taken = torch.stack([g.reshape(-1)[index[i]].to(torch.float64) for i, g in zip(present, dense)])
                    samples[m, rows] = taken
                    norms[m, rows] = torch.stack(torch._foreach_norm(dense)).to(torch.float64)
                    for i, g in zip(present, dense):
                        totals[i].add_(g)
    finally:
        for p, g in zip(everything, saved_grads):
            p.grad = g
        with torch.no_grad():
            for b, value in buffers:
                b.copy_(value)
        for module, training in modes:
            module.training = training
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
    samples, norms = samples.transpose(0, 1), norms.T  # (L, M, S), (L, M)
    mean_norm = (
        torch.stack(torch._foreach_norm(totals)).to(torch.float64) / micro_batches
        if totals
        else torch.zeros(0, device=device, dtype=torch.float64)
    )
    valid = None
    if groups is not None:
        samples, norms, valid = _pool_groups(samples, norms, groups)
        mean_norm = torch.stack(
            [mean_norm[list(g)].pow(2).sum().sqrt() if len(g) else mean_norm.new_zeros(()) for g in groups]
        )
    stats = noise_statistics(samples, moments=moments, valid=valid, min_count=min_count)
    return stats._replace(
        grad_norm=norms.contiguous(), batch_size=batch_rows(batch) / micro_batches, mean_grad_norm=mean_norm
    )


def _sum_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def noise_scale(result: ProbeResult) -> gns.GnsResult:
    """The gradient noise scale of the held batch (McCandlish et al. 2018), per row and for all rows together.

    The probe's M mini-batch gradients are M small batches of b rows (``batch_size``; 1, i.e. B_simple in
    mini-batches, when the row count is not known) and their mean is one big batch of B = M b: each mini-batch's
    squared norm per row (``grad_norm``) and the mean's (``mean_grad_norm``) enter
    :func:`heavytail.estimators.gns.update` as M steps of a running mean, so ``grad_sq`` and ``trace_sigma`` are
    the unbiased two-batch estimates with the small batch's squared norm averaged over the M mini-batches, and the
    robust counterpart's log ratio is averaged likewise. The weights are the same for every mini-batch: the
    probe's figure is the noise scale at the checkpoint's weights, with no smoothing across checkpoints. A row with
    no gradient on any mini-batch is NaN. Returns :class:`heavytail.estimators.gns.GnsResult` with ``L + 1`` rows,
    the last the whole model (squared norms summed over rows).
    """
    if result.mean_grad_norm is None:
        raise ValueError("noise_scale: the result has no mean_grad_norm (noise_probe fills it)")
    small = result.grad_norm.to(torch.float64).pow(2)  # (L, M)
    big = result.mean_grad_norm.to(torch.float64).pow(2)  # (L,)
    b = result.batch_size if math.isfinite(result.batch_size) and result.batch_size > 0 else 1.0
    state = gns.init(small.shape[0], small.device, torch.float64)
    for m in range(small.shape[1]):
        state = gns.update(state, small[:, m], big, b, b * small.shape[1], beta=1.0)
    return gns.compute(state)


def _pool_groups(
    samples: torch.Tensor, norms: torch.Tensor, groups: Sequence[Sequence[int]]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows of groups: members' coordinates side by side, zero-padded, and which coordinates are real ``(U, W)``
    (the padding is missing to every estimate)."""
    num_layers, m, s = samples.shape
    width = max((len(g) for g in groups), default=1) * s
    pooled = torch.zeros(len(groups), m, width, device=samples.device, dtype=samples.dtype)
    pooled_norms = torch.zeros(len(groups), m, device=norms.device, dtype=norms.dtype)
    real = torch.zeros(len(groups), width, device=samples.device, dtype=torch.bool)
    for u, members in enumerate(groups):
        members = list(members)
        if not members:
            continue
        pooled[u, :, : len(members) * s] = samples[members].transpose(0, 1).reshape(m, -1)
        pooled_norms[u] = norms[members].pow(2).sum(dim=0).sqrt()
        real[u, : len(members) * s] = True
    return pooled, pooled_norms, real


def head_rows(batch: Any, rows: int) -> Any:
    """The first ``rows`` rows of every tensor of ``batch`` (same forms as :func:`split_batch`)."""
    if isinstance(batch, torch.Tensor):
        return batch[:rows] if batch.ndim else batch
    if isinstance(batch, Mapping):
        items = {k: head_rows(v, rows) for k, v in batch.items()}
        return type(batch)(items) if isinstance(batch, dict) else items
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a NamedTuple
        return type(batch)(*(head_rows(v, rows) for v in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(head_rows(v, rows) for v in batch)
    return batch


def batch_rows(batch: Any) -> int:
    """The number of rows (dim 0) of the held batch's tensors (:func:`split_batch` checks that they agree)."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0])
    values = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (tuple, list)) else ()
    for v in values:
        rows = batch_rows(v)
        if rows:
            return rows
    return 0


def split_batch(batch: Any, parts: int) -> list[Any]:
    """``batch`` cut along dim 0 into ``parts`` disjoint, nearly equal pieces (``torch.tensor_split``).

    A tensor, or a tuple/list/dict whose tensor entries share their first dimension; other entries are repeated
    in every piece. Raises ``ValueError`` when the batch has fewer rows than ``parts`` or no tensor at all.
    """
    sizes: list[int] = []

    def scan(obj: Any) -> None:
        if isinstance(obj, torch.Tensor):
            sizes.append(obj.shape[0] if obj.ndim else -1)
        elif isinstance(obj, Mapping):
            for v in obj.values():
                scan(v)
        elif isinstance(obj, (tuple, list)):
            for v in obj:
                scan(v)

    scan(batch)
    if not sizes or -1 in sizes:
        raise ValueError("noise_probe: the batch must hold tensors with a batch dimension (dim 0) to split")
    if len(set(sizes)) != 1:
        raise ValueError(f"noise_probe: the batch's tensors disagree on their first dimension: {sorted(set(sizes))}")
    if sizes[0] < parts:
        raise ValueError(
            f"noise_probe: the held batch has {sizes[0]} rows, fewer than micro_batches = {parts}; "
            "give a larger batch or fewer micro-batches"
        )

    def cut(obj: Any, i: int) -> Any:
        if isinstance(obj, torch.Tensor):
            return torch.tensor_split(obj, parts, dim=0)[i]
        if isinstance(obj, Mapping):
            return (
                type(obj)({k: cut(v, i) for k, v in obj.items()})
                if isinstance(obj, dict)
                else {k: cut(v, i) for k, v in obj.items()}
            )
        if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # a NamedTuple
            return type(obj)(*(cut(v, i) for v in obj))
        if isinstance(obj, (tuple, list)):
            return type(obj)(cut(v, i) for v in obj)
        return obj

    return [cut(batch, i) for i in range(parts)]


# ----------------------------------------------------------------------------------------------------------------
# Statistics of the samples (pure)


def noise_statistics(
    samples: torch.Tensor,
    moments: Sequence[float] = DEFAULT_MOMENTS,
    *,
    valid: torch.Tensor | None = None,
    min_count: int = 1000,
) -> ProbeResult:
    """Tail indices, kurtosis and the moment fit from mini-batch gradient samples ``(L, M, S)``.

    ``samples[l, m, s]``: tensor l's gradient on mini-batch m at sampled coordinate s. With
    ``gbar = mean_m samples`` the noise is ``xi = samples - gbar`` (Simsekli et al. 2019). Every estimate treats
    the M mini-batches of one coordinate as its independent draws and pools coordinates only through
    scale-free quantities. Pooling the raw ``M x S`` values instead (one sample per layer) makes a scale mixture
    of coordinates of different scales, heavy-tailed even for Gaussian noise.

    - ``hill_alpha``, ``hill_alpha_se``, ``tail_class``, ``active_frac``: :func:`heavytail.estimators.noise.noise_tail`
      on the draws ``(L, S, M)``: each coordinate's draws centred on their median and divided by the mean
      absolute deviation of its other draws, so that coordinates' scales cancel, then pooled: the same reading as
      the streaming sources'. Rows with fewer than ``min_count`` draws are NaN. ``valid`` ``(L, S)`` marks the
      coordinates that exist (groups pad with missing ones). Measured through the Monitor on known laws with one
      draw per mini-batch (``benchmarks/calibration.py``): Gaussian and Laplace read light at M = 32, S = 256.
      Its limit: it treats coordinates as independent. When one rare sample scales a whole row of a weight
      matrix at once, the top standardised values come in clusters of one draw each, whose spread inside a
      cluster is light, and the reading is biased light (a linear model with Student-t(1.5) errors reads 1.1-3.3
      in six seeds of six); ``hill_alpha_coord`` does not have that bias.
    - ``hill_alpha_2x``, ``tail_class_2x``: the same on the means of pairs of mini-batches (twice the batch).
    - ``hill_alpha_coord``: Hill (1975) with a threshold per coordinate: ``1/alpha`` is the mean over
      coordinates of ``mean_{i<=k} log(|xi|_(i) / |xi|_(k+1))`` over that coordinate's M values sorted
      descending, with ``k = max(2, M // 8)``; each coordinate's scale cancels in its log-ratios. With so few
      draws per coordinate the estimate is biased up for light tails: Gaussian noise reads about 4.0 at M = 32,
      not infinity, hence ``hill_alpha_gauss``. Measured on mini-batch means of Student-t noise at M = 32: t(1.5)
      reads 1.5-1.8, t(1) 1.0-1.3, t(3) 2.7-3.1.
    - ``stable_alpha``: Mohammadi, Mohammadpour & Ogata (2015),
      ``1/alpha = (mean log|Y| - mean log|xi|) / log K2``, Y the sums of blocks of ``K2 = floor(sqrt(M))`` noise
      values of one coordinate (blocks across coordinates would cancel to Gaussian for the reason above); the
      two log-means are pooled over coordinates, so scales cancel. Clamped to ``(0, 2]``; 2 reads as Gaussian.
      Its variance is large for small M (32 mini-batches give blocks of 5): read it beside Hill.
    - ``kurtosis``: the mean over coordinates of the excess kurtosis of each coordinate's M noise values (scale
      free). A Gaussian gives ``-6 / (M + 1)`` on average; the sample value of one coordinate cannot exceed
      about M, so heavy tails show as values of several units, not hundreds.
    - :func:`moment_fit` for each p in ``moments``, cross-fitted: ``|grad|`` from the even mini-batches and the
      noise moment from the odd ones, over the coordinates whose even-half mean gradient is resolved (more
      than ``RESOLVED_SE`` standard errors from zero), so that a coordinate's gradient and noise estimates
      share no draw. The returned per-coordinate ``noise_moment`` and ``grad_moment`` use all M.

    Zeros are missing (an unused embedding row has all-zero noise). Returns a :class:`ProbeResult`
    (``grad_norm`` is empty: :func:`noise_probe` fills it); float64 tensors on ``samples``' device.
    """
    if samples.ndim != 3:
        raise ValueError(f"noise_statistics: samples must be (L, M, S), got shape {tuple(samples.shape)}")
    num_layers, m, s = samples.shape
    if m < 4:
        raise ValueError(f"noise_statistics: need at least 4 mini-batches, got {m}")
    ps = tuple(float(p) for p in moments)
    if any(not p > 0 for p in ps):
        raise ValueError(f"noise_statistics: moments must be positive powers, got {ps}")
    x = samples.to(torch.float64)
    gbar = x.mean(dim=1)  # (L, S)
    xi = x - gbar[:, None, :]  # (L, M, S)

    xt = x.transpose(1, 2)  # (L, S, M): each coordinate's M draws
    ok = torch.ones_like(xt, dtype=torch.bool) if valid is None else valid[:, :, None].expand_as(xt)
    tail = noise_tail(centred(xt, ok), ok, xt, min_count)
    half = m // 2  # twice the batch size: the mean of each pair of mini-batch gradients
    pairs, ok2 = (xt[..., 0 : 2 * half : 2] + xt[..., 1 : 2 * half : 2]) / 2, ok[..., :half]
    tail2 = noise_tail(centred(pairs, ok2), ok2, pairs, min_count)
    xi_ok = torch.where(ok.transpose(1, 2), xi, 0.0)  # padding coordinates are missing (zeros)
    alpha_coord = _hill_per_coordinate(xi_ok, hill_top_count(m))
    stable = _stable_alpha_over_batches(xi)
    kurt = _mean_finite(kurtosis(xi.transpose(1, 2)))  # per coordinate over M, then mean over coordinates

    abs_xi, abs_g = xi.abs(), gbar.abs()
    noise_moment = torch.stack([(abs_xi**p).mean(dim=1) for p in ps], dim=1)  # (L, P, S)
    grad_moment = torch.stack([abs_g**p for p in ps], dim=1)  # (L, P, S)
    even, odd = x[:, 0::2], x[:, 1::2]
    g_even = even.mean(dim=1)
    resolved = g_even.abs() > RESOLVED_SE * even.std(dim=1) / math.sqrt(even.shape[1])  # (L, S)
    xi_odd = (odd - odd.mean(dim=1, keepdim=True)).abs()
    fit_noise = torch.stack([(xi_odd**p).mean(dim=1) for p in ps], dim=1)
    fit_grad = torch.stack([g_even.abs() ** p for p in ps], dim=1)
    slope, intercept, r2 = moment_fit(fit_noise, fit_grad, resolved[:, None, :].expand_as(fit_noise))
    f64 = torch.float64
    alpha = tail.alpha.to(f64)
    return ProbeResult(
        hill_alpha=alpha,
        hill_alpha_se=tail.se.to(f64),
        hill_alpha_gauss=torch.full_like(alpha, gaussian_hill_reference(m)),
        stable_alpha=stable,
        kurtosis=kurt,
        moments=ps,
        noise_moment=noise_moment,
        grad_moment=grad_moment,
        moment_slope=slope,
        moment_intercept=intercept,
        moment_r2=r2,
        resolved_frac=resolved.to(torch.float64).mean(dim=1),
        grad_norm=torch.zeros(num_layers, 0, device=x.device, dtype=torch.float64),
        micro_batches=m,
        tail_class=tail.tail_class.to(f64),
        active_frac=tail.active_frac.to(f64),
        hill_alpha_2x=tail2.alpha.to(f64),
        tail_class_2x=tail2.tail_class.to(f64),
        hill_alpha_coord=alpha_coord,
    )


def hill_top_count(m: int) -> int:
    """The probe's Hill k for M mini-batches: ``max(2, M // 8)`` of each coordinate's M noise values."""
    return max(2, m // 8)


_GAUSS_REFERENCE: dict[int, float] = {}


def gaussian_hill_reference(m: int) -> float:
    """What the probe's per-coordinate Hill estimator reads on Gaussian noise of M mini-batches.

    Simulated once per M (65,536 coordinates from a fixed generator, about 0.3% relative error) and cached: the
    estimator's small-sample bias makes a light tail read a finite alpha (4.0 at M = 32), so a probe's alpha
    means "heavier than Gaussian" only well below this value.
    """
    if m not in _GAUSS_REFERENCE:
        g = torch.Generator().manual_seed(1234)
        z = torch.randn(1, m, 65536, generator=g, dtype=torch.float64)
        _GAUSS_REFERENCE[m] = float(_hill_per_coordinate(_centred(z), hill_top_count(m))[0])
    return _GAUSS_REFERENCE[m]


def _centred(x: torch.Tensor) -> torch.Tensor:
    return x - x.mean(dim=1, keepdim=True)


def _hill_per_coordinate(xi: torch.Tensor, k: int) -> torch.Tensor:
    """``(L,)``: 1 / the mean over coordinates of 1/alpha, Hill with fixed k over each coordinate's M values."""
    inv = 1.0 / hill(xi.transpose(1, 2), k=k).alpha.to(torch.float64)  # (L, S); NaN: fewer than k+1 non-zeros
    mean_inv = _mean_finite(inv)
    return torch.where(mean_inv > 0, 1.0 / mean_inv, math.inf).where(torch.isfinite(mean_inv), math.nan)


def _mean_finite(v: torch.Tensor) -> torch.Tensor:
    ok = torch.isfinite(v)
    return torch.where(ok, v, 0.0).sum(-1) / ok.sum(-1)


def moment_fit(
    noise_moment: torch.Tensor, grad_moment: torch.Tensor, mask: torch.Tensor | None = None, min_points: int = 3
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Least squares of ``log E|xi|^p`` on ``log |grad|^p`` over the last dimension (coordinates).

    The generalized heavy-tailed noise condition bounds the noise's p-th moment by an affine function of the
    gradient's: ``E|xi|^p <= sigma0^p + sigma1^p |grad|^p`` for some ``p in (1, 2]`` (``sigma1 = 0``: the
    bounded p-th moment of Zhang et al. 2020; ``p = 2``: the affine variance condition). Across coordinates,
    fit ``log E|xi|^p = a + b log |grad|^p`` (natural logs). Reading it:

    - ``b ~ 0``: the noise moment does not grow with the gradient: ``sigma0^p ~ e^a``, ``sigma1 ~ 0``;
    - ``b ~ 1``: the noise scales with the gradient (relative noise): ``sigma1^p ~ e^a``, ``sigma0`` small;
    - in between, both terms matter over the range of |grad| seen (a sum of the two is a bent line in log-log
      space; ``b`` is its average slope there); ``b > 1``: the noise grows faster than the gradient, which no
      affine bound with small constants covers.

    ``e^a`` is in the gradient's units to the power p, so compare intercepts between layers only at equal b.
    Returns ``(slope, intercept, r2)`` of shape ``noise_moment.shape[:-1]``; NaN where fewer than ``min_points``
    coordinates are usable (``mask``, finite and positive on both axes) or the x values do not vary.
    """
    usable = (noise_moment > 0) & (grad_moment > 0) & torch.isfinite(noise_moment) & torch.isfinite(grad_moment)
    if mask is not None:
        usable = usable & mask
    w = usable.to(torch.float64)
    n = w.sum(dim=-1)
    x = torch.where(usable, grad_moment.to(torch.float64), 1.0).log()
    y = torch.where(usable, noise_moment.to(torch.float64), 1.0).log()
    nn_ = n.clamp(min=1)
    mx, my = (w * x).sum(-1) / nn_, (w * y).sum(-1) / nn_
    dx, dy = (x - mx[..., None]) * w, (y - my[..., None]) * w
    sxx, sxy, syy = (dx * dx).sum(-1), (dx * dy).sum(-1), (dy * dy).sum(-1)
    ok = (n >= min_points) & (sxx > 0)
    slope = torch.where(ok, sxy / sxx.clamp(min=1e-300), math.nan)
    intercept = torch.where(ok, my - slope * mx, math.nan)
    r2 = torch.where(ok & (syy > 0), sxy * sxy / (sxx * syy).clamp(min=1e-300), math.nan)
    return slope, intercept, r2


def _stable_alpha_over_batches(xi: torch.Tensor) -> torch.Tensor:
    """Mohammadi et al. (2015) stable index with blocks over the mini-batch axis, log-means pooled, ``(L,)``."""
    num_layers, m, s = xi.shape
    k2 = math.isqrt(m)
    k1 = m // k2 if k2 else 0
    if k2 < 2 or k1 < 2:
        return torch.full((num_layers,), math.nan, dtype=torch.float64, device=xi.device)
    used = xi[:, : k1 * k2, :]
    blocks = used.reshape(num_layers, k1, k2, s).sum(dim=2)  # (L, K1, S)
    inv_alpha = (_mean_log_abs(blocks) - _mean_log_abs(used)) / math.log(k2)
    # 1/alpha >= 1/2 is the stable family's range; smaller (or negative, from cancelling sums) means Gaussian.
    return torch.where(torch.isfinite(inv_alpha), 1.0 / inv_alpha.clamp(min=0.5), math.nan)


def _mean_log_abs(v: torch.Tensor) -> torch.Tensor:
    a = v.abs().reshape(v.shape[0], -1)
    nonzero = (a > 0) & torch.isfinite(a)
    logs = torch.where(nonzero, a, 1.0).log()
    return logs.sum(-1) / nonzero.sum(-1)  # 0/0 = NaN for a tensor with no usable value
