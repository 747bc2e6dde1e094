"""Every ``adam/``, ``shadow*/``, ``update/``, ``lion/`` and ``muon/`` record key against an independent float64
NumPy recomputation, for AdamW, Lion, Muon (``torch.optim.Muon``, alone and as the Muon half of
``muon_with_adamw``) and SGD, with and without gradient accumulation.

The model's loss is ``(P * xi).sum() + (W * zeta).sum()``, so its gradients are draws the test makes (Gaussian
with lognormal coordinate scales, and large spikes at chosen steps and coordinates that open denominator
episodes). ``sample_size`` equals every tensor's size, so every coordinate is sampled once and the references need
no sample index. A step pre-hook and post-hook record what the optimizer saw (``p.grad``, its state) and did (the
parameters before and after); the references below follow the definitions of docs/metrics.md on those arrays,
without calling heavytail.

Inventory of the keys these prefixes can emit (``<p>``: a parameter name), and the test that checks each against
an independent recomputation:

=========================================================  ========================================================
key                                                        checked by
=========================================================  ========================================================
noise/{hill_alpha,hill_alpha_se,tail_class,active_frac,     test_noise_records.py::test_temporal_noise_keys,
kurtosis}/<p> (temporal)                                   ::test_microbatch_noise_keys, ::test_a_group_pools_...
noise/microbatch_{hill_alpha,hill_alpha_se,tail_class,      test_noise_records.py::test_microbatch_noise_keys
active_frac,kurtosis}/<p>
noise/rank_{...}/<p> (DDP only)                            test_distributed.py::test_rank_noise_of_four_ranks_...
probe/{hill_alpha,hill_alpha_se,tail_class,active_frac,     test_noise_records.py::test_probe_keys (every probe/ key;
hill_alpha_2x,tail_class_2x,hill_alpha_coord,stable_alpha,  ``hill_alpha_gauss`` against an independent Gaussian
kurtosis,moment_slope_p1,moment_intercept_p1,               simulation, rel 2%: it is a Monte Carlo figure)
moment_slope_p1.5,moment_intercept_p1.5,resolved_frac,
grad_norm,micro_batches,batch_size,hill_alpha_gauss}/<p>
adam/ratio_max/<p>                                         here (intervals of 15 steps); test_monitor.py,
                                                           test_first_hour.py (every=1); test_denominators.py
                                                           (Adafactor)
adam/ratio_p99/<p>                                         here
adam/spike_frac/<p>                                        here (with spikes; test_monitor.py's run has none)
adam/memory_events/<p>, adam/memory_event_r/<p>,            here (many events, overlapping windows);
adam/memory_event_r_max/<p>, adam/memory_damping/<p>       test_denominators.py::test_memory_event_size_and_...
adam/memory_steps/<p>, adam/event_update_ratio/<p>         here
shadow<b>/ratio_max/<p>, shadow<b>/spike_frac/<p>          here (every optimizer; the default shadow999 and
(every beta in shadow_betas)                               shadow95, and custom betas); test_denominators.py
shadow<b>/memory_{events,steps,event_r,event_r_max,         here (first shadow only, as documented)
damping}/<p>, shadow<b>/event_update_ratio/<p>
update/rms_ratio/<p>                                       here (every optimizer); test_denominators.py (SGD: lr)
lion/sign_flip_frac/<p>                                    here
muon/sv_cond/<p>, muon/sv_max_median/<p>                   here
=========================================================  ========================================================
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from torch import nn

import heavytail as ht
from heavytail.optim import Lion, muon_with_adamw
from tests.conftest import read_records

ROWS, COLS = 8, 12
N = ROWS * COLS  # coordinates of each tensor: every one is sampled


class TwoTensors(nn.Module):
    """``P`` (a vector: AdamW's half under Muon+AdamW) and ``W`` (a matrix: Muon's); loss (P xi).sum() + (W zeta).sum()."""

    def __init__(self, names: tuple[str, ...]) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(7)
        for name in names:
            shape = (N,) if name == "P" else (ROWS, COLS)
            self.register_parameter(name, nn.Parameter(0.1 * torch.randn(shape, generator=gen)))

    def forward(self, draws: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum((getattr(self, name) * x).sum() for name, x in draws.items())


@dataclass
class Trace:
    """What the optimizer saw and did at each step (index t - 1 for step t), per parameter name, in float64."""

    grads: list[dict[str, np.ndarray]] = field(default_factory=list)
    before: list[dict[str, np.ndarray]] = field(default_factory=list)
    after: list[dict[str, np.ndarray]] = field(default_factory=list)
    state: list[dict[str, dict[str, np.ndarray]]] = field(default_factory=list)


def _numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float64).cpu().numpy().reshape(-1).copy()


def _hooks(model: nn.Module, opt: torch.optim.Optimizer, trace: Trace) -> None:
    named = list(model.named_parameters())

    def pre(o, args, kwargs):
        trace.grads.append({n: _numpy(p.grad) for n, p in named})
        trace.before.append({n: _numpy(p) for n, p in named})
        trace.state.append(
            {n: {k: _numpy(v) for k, v in opt.state.get(p, {}).items() if torch.is_tensor(v)} for n, p in named}
        )

    def post(o, args, kwargs):
        trace.after.append({n: _numpy(p) for n, p in named})

    opt.register_step_pre_hook(pre)
    opt.register_step_post_hook(post)


def _draws(steps: int, micro: int, names: tuple[str, ...], spike: float, first_spike: int, seed: int) -> list:
    """Per step and micro-batch, the gradient of each tensor: Gaussian times lognormal coordinate scales, and
    ``spike`` times that at about 4% of the (step, coordinate) pairs from step ``first_spike`` on."""
    rng = np.random.default_rng(seed)
    out = []
    scales = {n: np.exp(rng.standard_normal(N)) for n in names}
    for t in range(1, steps + 1):
        step = []
        for _ in range(micro):
            draw = {}
            for n in names:
                x = rng.standard_normal(N) * scales[n]
                if t >= first_spike:
                    x = np.where(rng.random(N) < 0.04 / micro, spike * x, x)
                draw[n] = torch.from_numpy(x.reshape((N,) if n == "P" else (ROWS, COLS))).float()
            step.append(draw)
        out.append(step)
    return out


def _run(tmp_path, make_opt, names, *, steps, every, micro=1, spike=20.0, first_spike=1, seed=0, **config):
    model = TwoTensors(names)
    opt = make_opt(model)
    trace = Trace()
    data = _draws(steps, micro, names, spike, first_spike, seed)
    with ht.Monitor(model, opt, every=every, log_dir=tmp_path, sample_size=N, **config) as mon:
        assert mon.sample_size == N and all((row == torch.arange(N)).all() for row in mon._sample_index)
        _hooks(model, opt, trace)
        for step in data:
            for draw in step:
                loss = model(draw) / 1.0
                loss.backward()
                mon.observe_loss(loss)
            opt.step()
            opt.zero_grad(set_to_none=True)
    records = read_records(tmp_path)
    assert len(records) == steps // every and len(trace.after) == steps
    return trace, [r["metrics"] for r in records]


# ------------------------------------------------------------------------------------------ the references


def _episodes(r: np.ndarray, v_hat: np.ndarray, ok: np.ndarray, threshold: float, inflation: float):
    """Denominator-memory episodes (docs/metrics.md, ``*/memory_*``) over steps: ``r``, ``v_hat`` ``(T, S)`` (v_hat
    the denominator before the step's gradient, bias-corrected), ``ok`` ``(T,)`` the steps that count.

    An event: r^2 over ``threshold`` on a coordinate with no open episode (and v_hat > 0); it opens an episode at
    level L = v_hat. An open episode ends at the first later counted step whose v_hat <= inflation^2 L; its length
    is the counted steps since the event. Returns per step the event mask, and per step the ended episodes' lengths.
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


def _damping(dp: np.ndarray, g: np.ndarray, events: np.ndarray, s: int) -> list[list[float]]:
    """``memory_damping`` per step: the ratios D of the windows that closed at each step.

    D = [sum |dp| / sum |g| over the coordinate's next s usable steps after the event step] / [the same over the s
    steps before it]; a window opens only where each of the s steps before the event was usable and the parameter
    moved over them, and where none is open on that coordinate; it counts at the step it closes.
    """
    steps, size = g.shape
    usable = (np.abs(g) > 0) & np.isfinite(dp)
    closed: list[list[float]] = [[] for _ in range(steps)]
    for j in range(size):
        open_at, before, after_dp, after_g, age = None, 0.0, 0.0, 0.0, 0
        for t in range(steps):
            if open_at is not None and usable[t, j]:
                after_dp, after_g, age = after_dp + abs(dp[t, j]), after_g + abs(g[t, j]), age + 1
                if age >= s:
                    closed[t].append(after_dp / after_g / before)
                    open_at = None
            past = range(t - s, t)
            ready = t >= s and all(usable[u, j] for u in past) and sum(abs(dp[u, j]) for u in past) > 0
            if events[t, j] and ready and usable[t, j] and open_at is None:
                before = sum(abs(dp[u, j]) for u in past) / sum(abs(g[u, j]) for u in past)
                open_at, after_dp, after_g, age = t, 0.0, 0.0, 0
    return closed


def _nan_mean(values) -> float:
    values = list(values)
    return float(np.mean(values)) if values else math.nan


def _memory_keys(prefix, events, ended, r, dp, g, closed, intervals, damping_on) -> list[dict[str, float]]:
    """The memory and event-update keys of one denominator, per interval (a list of step ranges)."""
    out = []
    for steps in intervals:
        ev = [r[t][events[t]] for t in steps]
        sizes = np.concatenate(ev) if ev else np.zeros(0)
        lengths = [x for t in steps for x in ended[t]]
        usable = [(np.abs(g[t]) > 0) & events[t] for t in steps]
        update_ratio = np.concatenate([np.abs(dp[t])[u] / np.abs(g[t])[u] for t, u in zip(steps, usable)])
        row = {
            f"{prefix}/memory_events": float(events[list(steps)].sum()),
            f"{prefix}/memory_steps": _nan_mean(lengths),
            f"{prefix}/memory_event_r": _nan_mean(sizes),
            f"{prefix}/memory_event_r_max": float(sizes.max()) if len(sizes) else math.nan,
            f"{prefix}/event_update_ratio": _nan_mean(update_ratio),
        }
        if damping_on:
            row[f"{prefix}/memory_damping"] = _nan_mean(x for t in steps for x in closed[t])
        out.append(row)
    return out


def _adam_reference(trace, name, *, beta2, eps, warmup, threshold, inflation, window, intervals):
    """``adam/`` keys of one tensor per interval, from the AdamW state the optimizer step saw.

    r = |g_t| / (sqrt(v_{t-1} / (1 - beta2^(t-1))) + eps) (0 where v is 0), counted at the steps whose state has
    averaged at least ``warmup`` gradients.
    """
    T = len(trace.grads)
    g = np.stack([trace.grads[t][name] for t in range(T)])
    dp = np.stack([trace.after[t][name] - trace.before[t][name] for t in range(T)])
    r, v_hat, ok = np.zeros_like(g), np.zeros_like(g), np.zeros(T, dtype=bool)
    for t in range(T):
        state = trace.state[t][name]
        if "exp_avg_sq" not in state:
            continue
        k = float(state["step"][0])  # gradients averaged in v
        v_hat[t] = state["exp_avg_sq"] / (1 - beta2**k)
        r[t] = np.where(state["exp_avg_sq"] > 0, np.abs(g[t]) / (np.sqrt(v_hat[t]) + eps), 0.0)
        ok[t] = k >= warmup
    events, ended = _episodes(r, v_hat, ok, threshold, inflation)
    closed = _damping(dp, g, events, window) if window else None
    out = _memory_keys("adam", events, ended, r, dp, g, closed, intervals, window > 0)
    for row, steps in zip(out, intervals):
        counted = [t for t in steps if ok[t]]
        row["adam/ratio_max"] = max((r[t].max() for t in counted), default=math.nan)
        row["adam/ratio_p99"] = _nan_mean(np.quantile(r[t], 0.99) for t in counted)
        spikes = sum(int((r[t] ** 2 > threshold).sum()) for t in counted)
        row["adam/spike_frac"] = spikes / (len(counted) * g.shape[1]) if counted else math.nan
    return out


def _shadow_reference(trace, name, *, betas, warmup, threshold, inflation, window, intervals):
    """``shadow<beta>/`` keys of one tensor per interval: an EMA v of g^2 per beta (float32 as stored), r =
    |g_t| / (sqrt(v / (1 - beta^k)) + 1e-8) before v takes g_t (0 where v is 0), counted once k >= ``warmup``
    gradients are in v; the memory and event-update keys for the first beta only."""
    T = len(trace.grads)
    g = np.stack([trace.grads[t][name] for t in range(T)])
    dp = np.stack([trace.after[t][name] - trace.before[t][name] for t in range(T)])
    out = [{} for _ in intervals]
    for b, beta in enumerate(betas):
        tag = "shadow" + f"{beta:.6g}".split(".")[-1]
        v, r, v_hat, ok = np.zeros(g.shape[1]), np.zeros_like(g), np.zeros_like(g), np.zeros(T, dtype=bool)
        for t in range(T):
            ok[t] = t >= max(1, warmup)  # t gradients are in v
            bias = 1 - beta**t
            if t > 0:
                v_hat[t] = v / bias
                r[t] = np.where(v > 0, np.abs(g[t]) / (np.sqrt(v_hat[t]) + 1e-8), 0.0)
            v = (beta * v + (1 - beta) * g[t] ** 2).astype(np.float32).astype(np.float64)
        for row, steps in zip(out, intervals):
            counted = [t for t in steps if ok[t]]
            row[f"{tag}/ratio_max"] = max((r[t].max() for t in counted), default=math.nan)
            row[f"{tag}/spike_frac"] = _nan_mean(np.mean(r[t] ** 2 > threshold) for t in counted)
        if b == 0:
            events, ended = _episodes(r, v_hat, ok, threshold, inflation)
            closed = _damping(dp, g, events, window) if window else None
            memory = _memory_keys(tag, events, ended, r, dp, g, closed, intervals, window > 0)
            for row, extra in zip(out, memory):
                row.update(extra)
    return out


def _update_reference(trace, name, intervals):
    """``update/rms_ratio``: mean over steps of RMS(delta p) / RMS(g)."""
    ratios = [
        np.sqrt(np.mean((trace.after[t][name] - trace.before[t][name]) ** 2)) / np.sqrt(np.mean(trace.grads[t][name] ** 2))
        for t in range(len(trace.grads))
    ]
    return [{"update/rms_ratio": _nan_mean(ratios[t] for t in steps)} for steps in intervals]


def _lion_reference(trace, name, beta1, intervals):
    """``lion/sign_flip_frac``: mean over steps of the fraction of coordinates (with a nonzero momentum m_{t-1})
    where sign(beta1 m_{t-1} + (1 - beta1) g_t) differs from sign(m_{t-1})."""
    fracs = []
    for t in range(len(trace.grads)):
        m = trace.state[t][name].get("exp_avg")
        if m is None or not (m != 0).any():
            fracs.append(None)
            continue
        c = beta1 * m + (1 - beta1) * trace.grads[t][name]
        live = m != 0
        fracs.append(float(np.mean(np.sign(c[live]) != np.sign(m[live]))))
    return [{"lion/sign_flip_frac": _nan_mean(fracs[t] for t in steps if fracs[t] is not None)} for steps in intervals]


def _muon_reference(trace, name, mu, intervals):
    """``muon/sv_cond`` and ``muon/sv_max_median`` at each interval's last step: the singular values of the matrix
    Muon orthogonalises there, the Nesterov form g_t + mu (buf_t - g_t) of its momentum buf_t = mu buf_{t-1} +
    (1 - mu) g_t (buf_0 = 0), recomputed from the gradients alone."""
    buf, out = np.zeros((ROWS, COLS)), []
    mats = []
    for t in range(len(trace.grads)):
        g = trace.grads[t][name].reshape(ROWS, COLS)
        buf = mu * buf + (1 - mu) * g
        mats.append(g + mu * (buf - g))
    for steps in intervals:
        sv = np.linalg.svd(mats[steps[-1]], compute_uv=False)
        out.append({"muon/sv_cond": sv[0] / sv[-1], "muon/sv_max_median": sv[0] / np.median(sv)})
    return out


def _check(metrics: list[dict], expected: list[dict], name: str, rel: float = 1e-5) -> None:
    checked = 0
    for k, (got_row, want_row) in enumerate(zip(metrics, expected)):
        for key, want in want_row.items():
            got = got_row[f"{key}/{name}"]
            where = f"{key}/{name}, record {k}"
            if math.isnan(want):
                assert got is None, where
            else:
                assert got == pytest.approx(want, rel=rel, abs=1e-12), where
                checked += want != 0
    assert checked  # some figures were nonzero numbers, not only nulls and zeros


def _intervals(steps: int, every: int) -> list[range]:
    return [range(k, k + every) for k in range(0, steps, every)]


# ----------------------------------------------------------------------------------------------- the tests

STEPS, EVERY = 60, 15
CONFIG = dict(ratio_warmup=3, spike_threshold=30.0, shadow_betas=(0.8, 0.95), memory_window=4)
"""Short denominators (beta2 0.8, a cut at r^2 = 30) so that episodes open and close within the run."""

OPTIMIZERS = {
    "adamw": (("P", "W"), lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2, betas=(0.9, 0.8), weight_decay=0.1)),
    "sgd": (("P", "W"), lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, weight_decay=0.01)),
    "lion": (("P", "W"), lambda m: Lion(m.parameters(), lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1)),
    "muon": (("W",), lambda m: torch.optim.Muon([m.W], lr=0.02, momentum=0.95)),
    "muon+adamw": (("P", "W"), lambda m: muon_with_adamw(m, lr=0.02, adamw_lr=1e-2, adamw_betas=(0.9, 0.8))),
}


@pytest.mark.parametrize(
    "optimizer, micro, kernel",
    [
        ("adamw", 1, "auto"),
        ("adamw", 1, "torch"),
        ("adamw", 2, "auto"),
        ("sgd", 1, "auto"),
        ("lion", 1, "auto"),
        ("lion", 2, "torch"),
        ("muon", 1, "auto"),
        ("muon+adamw", 1, "auto"),
    ],
)
def test_denominator_and_update_keys_against_numpy(tmp_path, optimizer, micro, kernel):
    names, make_opt = OPTIMIZERS[optimizer]
    trace, metrics = _run(tmp_path, make_opt, names, steps=STEPS, every=EVERY, micro=micro, kernel=kernel, **CONFIG)
    intervals = _intervals(STEPS, EVERY)
    common = dict(threshold=CONFIG["spike_threshold"], window=CONFIG["memory_window"], intervals=intervals)
    for name in names:
        expected = _shadow_reference(
            trace, name, betas=CONFIG["shadow_betas"], warmup=CONFIG["ratio_warmup"], inflation=1.5, **common
        )
        for row, extra in zip(expected, _update_reference(trace, name, intervals)):
            row.update(extra)
        if optimizer in ("adamw", "muon+adamw"):  # the Muon half's W has no denominator: its adam/ keys are null
            adam = _adam_reference(trace, name, beta2=0.8, eps=1e-8, warmup=3, inflation=1.5, **common)
            for row, extra in zip(expected, adam):
                row.update(extra)
            # Episodes opened and closed: memory_steps and the damping are numbers somewhere, not only nulls.
            has_denominator = name == "P" or optimizer == "adamw"
            assert any(math.isfinite(row["adam/memory_steps"]) for row in expected) == has_denominator
            assert any(math.isfinite(row["adam/memory_damping"]) for row in expected) == has_denominator
        else:
            assert not any(k.startswith("adam/") for k in metrics[-1])
        if optimizer == "lion":
            for row, extra in zip(expected, _lion_reference(trace, name, 0.9, intervals)):
                row.update(extra)
        if optimizer.startswith("muon") and name == "W":
            for row, extra in zip(expected, _muon_reference(trace, name, 0.95, intervals)):
                row.update(extra)
        assert any(math.isfinite(row["shadow8/memory_steps"]) for row in expected)
        assert any(row["shadow8/spike_frac"] > 0 for row in expected if math.isfinite(row["shadow8/spike_frac"]))
        _check(metrics, expected, name, rel=1e-4 if optimizer.startswith("muon") else 1e-5)
        # Every key of these prefixes the record holds for this tensor was checked.
        recorded = {k.rsplit("/", 1)[0] for k in metrics[-1] if k.endswith(f"/{name}")}
        prefixes = ("adam/", "shadow", "update/", "lion/", "muon/")
        assert {k for k in recorded if k.startswith(prefixes)} == set(expected[-1])


def test_default_shadow_and_adam_keys_against_numpy(tmp_path):
    """The default configuration (AdamW's beta2 = 0.999, shadow999 and shadow95, the cut r^2 > 5000, ratio_warmup
    10): large spikes from step 12 on are events; at beta2 = 0.999 their episodes outlast the run (null lengths)."""
    steps, every = 40, 10
    trace, metrics = _run(
        tmp_path,
        lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1),
        ("P", "W"),
        steps=steps,
        every=every,
        spike=300.0,
        first_spike=12,
        memory_window=4,
    )
    intervals = _intervals(steps, every)
    common = dict(threshold=5000.0, inflation=1.5, window=4, intervals=intervals)
    for name in ("P", "W"):
        expected = _shadow_reference(trace, name, betas=(0.999, 0.95), warmup=10, **common)
        adam = _adam_reference(trace, name, beta2=0.999, eps=1e-8, warmup=10, **common)
        for row, a, u in zip(expected, adam, _update_reference(trace, name, intervals)):
            row.update(a)
            row.update(u)
        assert expected[0]["adam/ratio_max"] != expected[0]["adam/ratio_max"]  # steps 1-10: warm-up, null
        assert expected[-1]["adam/memory_events"] > 0 and expected[-1]["shadow999/memory_events"] > 0
        assert expected[-1]["adam/spike_frac"] > 0 and expected[-1]["shadow95/spike_frac"] > 0
        _check(metrics, expected, name)
        recorded = {k.rsplit("/", 1)[0] for k in metrics[-1] if k.endswith(f"/{name}")}
        assert {k for k in recorded if k.startswith(("adam/", "shadow", "update/"))} == set(expected[-1])
