"""Slow, obvious float64 NumPy references of the denominator and update figures (``adam/``, ``shadow*/``,
``update/``, ``lion/``, ``muon/``), following docs/metrics.md, from what an optimizer step saw and did.

:func:`record_steps` hooks an optimizer and keeps, per step, each parameter's gradient, its values before and
after the step and the optimizer's state before it; the references read only those arrays (never heavytail).
Every reference returns one dict per interval (a range of 0-based step indices) of key prefix -> figure, NaN
where the record holds null.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from torch import nn


@dataclass
class Trace:
    """What the optimizer saw and did at each step (index t - 1 for step t), per parameter name, flat float64."""

    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    grads: list[dict[str, np.ndarray]] = field(default_factory=list)
    before: list[dict[str, np.ndarray]] = field(default_factory=list)
    after: list[dict[str, np.ndarray]] = field(default_factory=list)
    state: list[dict[str, dict[str, np.ndarray]]] = field(default_factory=list)

    def sampled(self, index: dict[str, np.ndarray]) -> "Trace":
        """The same steps at the sampled coordinates ``index[name]`` (flat indices) only."""

        def pick(rows):
            return [{n: a[index[n]] for n, a in row.items() if n in index} for row in rows]

        def pick_state(name, values):  # per-coordinate state tensors, and scalars (the step counter) as they are
            size = math.prod(self.shapes[name])
            return {k: v[index[name]] if v.size == size else v for k, v in values.items()}

        state = [{n: pick_state(n, values) for n, values in row.items() if n in index} for row in self.state]
        return Trace(dict(self.shapes), pick(self.grads), pick(self.before), pick(self.after), state)


def _flat(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float64).cpu().numpy().reshape(-1).copy()


def record_steps(model: nn.Module, optimizer: torch.optim.Optimizer) -> Trace:
    """Hook ``optimizer`` (step pre- and post-hooks) and return the :class:`Trace` it fills as training runs."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    trace = Trace(shapes={n: tuple(p.shape) for n, p in named})

    def pre(o, args, kwargs):
        trace.grads.append({n: _flat(p.grad) for n, p in named})
        trace.before.append({n: _flat(p) for n, p in named})
        trace.state.append(
            {n: {k: _flat(v) for k, v in optimizer.state.get(p, {}).items() if torch.is_tensor(v)} for n, p in named}
        )

    def post(o, args, kwargs):
        trace.after.append({n: _flat(p) for n, p in named})

    optimizer.register_step_pre_hook(pre)
    optimizer.register_step_post_hook(post)
    return trace


def intervals(steps: int, every: int) -> list[range]:
    """The records' intervals of ``steps`` optimizer steps, ``every`` steps each (the last one possibly shorter)."""
    return [range(k, min(k + every, steps)) for k in range(0, steps, every)]


def nan_mean(values) -> float:
    values = list(values)
    return float(np.mean(values)) if values else math.nan


def episodes(r: np.ndarray, v_hat: np.ndarray, ok: np.ndarray, threshold: float, inflation: float):
    """Denominator-memory episodes over steps: ``r``, ``v_hat`` ``(T, S)`` (v_hat the denominator before the step's
    gradient, bias-corrected), ``ok`` ``(T,)`` the steps that count (warm).

    An event: r^2 over ``threshold`` on a coordinate with no open episode (and v_hat > 0); it opens an episode at
    level L = v_hat. An open episode ends at the first later counted step whose v_hat <= inflation^2 L; its length
    is the counted steps since the event. Returns the event mask ``(T, S)`` and, per step, the lengths of the
    episodes that ended there.
    """
    steps, size = r.shape
    level, age, active = np.zeros(size), np.zeros(size), np.zeros(size, dtype=bool)
    events, ended = np.zeros((steps, size), dtype=bool), [[] for _ in range(steps)]
    for t in range(steps):
        if not ok[t]:
            continue
        for j in range(size):
            if active[j]:
                age[j] += 1
                if v_hat[t, j] <= inflation**2 * level[j]:
                    ended[t].append(age[j])
                    active[j] = False
            if not active[j] and r[t, j] ** 2 > threshold and v_hat[t, j] > 0:
                events[t, j], active[j], level[j], age[j] = True, True, v_hat[t, j], 0
    return events, ended


def damping(dp: np.ndarray, g: np.ndarray, events: np.ndarray, s: int) -> list[list[float]]:
    """``memory_damping``: per step, the ratios D of the windows that closed there.

    D = [sum |dp| / sum |g| over the coordinate's next s usable steps after the event step] / [the same over the s
    steps before it]; a window opens only where each of the s steps before the event was usable (|g| > 0, a finite
    update) and the parameter moved over them, and where none is open on that coordinate.
    """
    steps, size = g.shape
    usable = (np.abs(g) > 0) & np.isfinite(dp)
    closed: list[list[float]] = [[] for _ in range(steps)]
    for j in range(size):
        is_open, before, after_dp, after_g, age = False, 0.0, 0.0, 0.0, 0
        for t in range(steps):
            if is_open and usable[t, j]:
                after_dp, after_g, age = after_dp + abs(dp[t, j]), after_g + abs(g[t, j]), age + 1
                if age >= s:
                    closed[t].append(after_dp / after_g / before)
                    is_open = False
            past = range(t - s, t)
            ready = t >= s and all(usable[u, j] for u in past) and sum(abs(dp[u, j]) for u in past) > 0
            if events[t, j] and ready and usable[t, j] and not is_open:
                before = sum(abs(dp[u, j]) for u in past) / sum(abs(g[u, j]) for u in past)
                is_open, after_dp, after_g, age = True, 0.0, 0.0, 0
    return closed


def _memory_figures(prefix, events, ended, r, dp, g, closed, spans) -> list[dict[str, float]]:
    """The memory and event-update figures of one denominator, per interval."""
    out = []
    for steps in spans:
        sizes = np.concatenate([r[t][events[t]] for t in steps])
        lengths = [x for t in steps for x in ended[t]]
        hit = [(np.abs(g[t]) > 0) & np.isfinite(dp[t]) & events[t] for t in steps]
        update_ratio = np.concatenate([np.abs(dp[t])[u] / np.abs(g[t])[u] for t, u in zip(steps, hit)])
        row = {
            f"{prefix}/memory_events": float(events[list(steps)].sum()),
            f"{prefix}/memory_steps": nan_mean(lengths),
            f"{prefix}/memory_event_r": nan_mean(sizes),
            f"{prefix}/memory_event_r_max": float(sizes.max()) if len(sizes) else math.nan,
            f"{prefix}/event_update_ratio": nan_mean(update_ratio),
        }
        if closed is not None:
            row[f"{prefix}/memory_damping"] = nan_mean(x for t in steps for x in closed[t])
        out.append(row)
    return out


def _arrays(trace: Trace, name: str) -> tuple[np.ndarray, np.ndarray]:
    g = np.stack([row[name] for row in trace.grads])
    dp = np.stack([a[name] - b[name] for a, b in zip(trace.after, trace.before)])
    return g, dp


def adam_figures(trace, name, spans, *, beta2, eps, warmup, threshold=5000.0, inflation=1.5, window=0, index=None):
    """``adam/`` figures of one tensor, from the Adam state each step saw: r = |g_t| / (sqrt(v_{t-1} / (1 -
    beta2^k)) + eps), k the optimizer's step counter (0 where v is 0); a step counts once k >= ``warmup``.

    From every coordinate: ``ratio_max``, max r over the counted steps, and ``spike_frac``, the fraction of
    (coordinate, step) pairs with r^2 over ``threshold``. From the sampled coordinates (flat ``index``; None:
    all): ``ratio_p99``, the mean over the counted steps of the 0.99 quantile (linear) of r, and the memory figures
    of :func:`episodes` and :func:`damping` (``window`` steps; 0: no damping key)."""
    g, dp = _arrays(trace, name)
    T = len(g)
    r, v_hat, ok = np.zeros_like(g), np.zeros_like(g), np.zeros(T, dtype=bool)
    for t in range(T):
        state = trace.state[t][name]
        if "exp_avg_sq" not in state:
            continue
        k = float(state["step"][0])
        v_hat[t] = state["exp_avg_sq"] / (1 - beta2**k)
        r[t] = np.where(state["exp_avg_sq"] > 0, np.abs(g[t]) / (np.sqrt(v_hat[t]) + eps), 0.0)
        ok[t] = k >= warmup
    pick = slice(None) if index is None else index
    rs, gs, dps = r[:, pick], g[:, pick], dp[:, pick]
    events, ended = episodes(rs, v_hat[:, pick], ok, threshold, inflation)
    closed = damping(dps, gs, events, window) if window else None
    out = _memory_figures("adam", events, ended, rs, dps, gs, closed, spans)
    for row, steps in zip(out, spans):
        counted = [t for t in steps if ok[t]]
        row["adam/ratio_max"] = max((r[t].max() for t in counted), default=math.nan)
        row["adam/ratio_p99"] = nan_mean(np.quantile(rs[t], 0.99) for t in counted)
        spikes = sum(int((r[t] ** 2 > threshold).sum()) for t in counted)
        row["adam/spike_frac"] = spikes / (len(counted) * g.shape[1]) if counted else math.nan
    return out


def shadow_tag(beta: float) -> str:
    """``shadow999`` for 0.999 (docs/metrics.md)."""
    return "shadow" + f"{beta:.6g}".split(".")[-1]


def shadow_figures(trace, name, spans, *, betas, warmup, threshold=5000.0, inflation=1.5, window=0):
    """``shadow<beta>/`` figures of one tensor: per beta an EMA v of g^2 (float32, as stored), r = |g_t| / (sqrt(v /
    (1 - beta^k)) + 1e-8) before v takes g_t (0 where v is 0), a step counted once k >= max(1, ``warmup``)
    gradients are in v; ``ratio_max`` the max r and ``spike_frac`` the mean over steps of the fraction with r^2 over
    ``threshold``; the memory and event-update figures for the first beta only."""
    g, dp = _arrays(trace, name)
    T = len(g)
    out: list[dict[str, float]] = [{} for _ in spans]
    for b, beta in enumerate(betas):
        tag = shadow_tag(beta)
        v, r, v_hat = np.zeros(g.shape[1]), np.zeros_like(g), np.zeros_like(g)
        ok = np.arange(T) >= max(1, warmup)  # t gradients are in v at step index t
        for t in range(T):
            if t > 0:
                v_hat[t] = v / (1 - beta**t)
                r[t] = np.where(v > 0, np.abs(g[t]) / (np.sqrt(v_hat[t]) + 1e-8), 0.0)
            v = (beta * v + (1 - beta) * g[t] ** 2).astype(np.float32).astype(np.float64)
        for row, steps in zip(out, spans):
            counted = [t for t in steps if ok[t]]
            row[f"{tag}/ratio_max"] = max((r[t].max() for t in counted), default=math.nan)
            row[f"{tag}/spike_frac"] = nan_mean(np.mean(r[t] ** 2 > threshold) for t in counted)
        if b == 0:
            events, ended = episodes(r, v_hat, ok, threshold, inflation)
            closed = damping(dp, g, events, window) if window else None
            for row, extra in zip(out, _memory_figures(tag, events, ended, r, dp, g, closed, spans)):
                row.update(extra)
    return out


def update_figures(trace, name, spans):
    """``update/rms_ratio``: mean over steps of RMS(delta p) / RMS(g)."""
    g, dp = _arrays(trace, name)
    ratios = np.sqrt((dp**2).mean(axis=1)) / np.sqrt((g**2).mean(axis=1))
    return [{"update/rms_ratio": nan_mean(ratios[t] for t in steps)} for steps in spans]


def lion_figures(trace, name, spans, *, beta1):
    """``lion/sign_flip_frac``: mean over steps of the fraction of coordinates (with a nonzero momentum m_{t-1})
    where sign(beta1 m_{t-1} + (1 - beta1) g_t) differs from sign(m_{t-1})."""
    fracs = []
    for t in range(len(trace.grads)):
        m = trace.state[t][name].get("exp_avg")
        live = np.zeros(0, dtype=bool) if m is None else m != 0
        if not live.any():
            fracs.append(None)
            continue
        c = beta1 * m + (1 - beta1) * trace.grads[t][name]
        fracs.append(float(np.mean(np.sign(c[live]) != np.sign(m[live]))))
    return [{"lion/sign_flip_frac": nan_mean(fracs[t] for t in steps if fracs[t] is not None)} for steps in spans]


def muon_figures(trace, name, spans, *, momentum, nesterov=True):
    """``muon/sv_cond`` and ``muon/sv_max_median`` at each interval's last step: sigma_max / sigma_min and sigma_max
    / median sigma of the matrix Muon orthogonalises there, from the gradients alone: buf_t = mu buf_{t-1} + (1 -
    mu) g_t (buf_0 = 0), and its Nesterov form g_t + mu (buf_t - g_t)."""
    shape = trace.shapes[name]
    buf, mats = np.zeros(shape), []
    for row in trace.grads:
        g = row[name].reshape(shape)
        buf = momentum * buf + (1 - momentum) * g
        mats.append(g + momentum * (buf - g) if nesterov else buf)
    out = []
    for steps in spans:
        sv = np.linalg.svd(mats[steps[-1]], compute_uv=False)
        # numpy.linalg.matrix_rank's cut for float32: a sigma at or under it is rounding, and its ratio inf (null)
        cut = sv[0] * max(shape) * np.finfo(np.float32).eps
        spread = [sv[0] / s if s > cut else math.inf for s in (sv[-1], np.median(sv))]
        out.append({"muon/sv_cond": spread[0], "muon/sv_max_median": spread[1]})
    return out


def check_records(metrics: list[dict], expected: list[dict], name: str, rel: float = 1e-5) -> set[str]:
    """Each record's figures for tensor ``name`` against the references (NaN and inf: null in the record); returns the keys
    that were a nonzero number in some record, so a test can require that a figure was compared, not its null."""
    assert len(metrics) == len(expected)
    numbers = set()
    for k, (got_row, want_row) in enumerate(zip(metrics, expected)):
        for key, want in want_row.items():
            got = got_row[f"{key}/{name}"]
            where = f"{key}/{name}, record {k}"
            if math.isnan(want) or math.isinf(want):  # null in JSON
                assert got is None, where
            else:
                assert got == pytest.approx(want, rel=rel, abs=1e-12), where
                if want != 0:
                    numbers.add(key)
    return numbers
