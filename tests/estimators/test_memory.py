"""Denominator memory episodes against a hand-computed EMA of g^2."""

import math

import numpy as np
import pytest
import torch

from heavytail.estimators import memory


def test_episode_length_matches_the_ema_decay():
    beta2, base, spike = 0.99, 1.0, 100.0
    # v_hat of one coordinate: constant 1, then a gradient of 100 (r^2 = 10^4 > 5000) enters with weight 1 - beta2.
    state = memory.init(1, 1)
    valid = torch.tensor([True])
    v = base
    lengths, started = [], 0
    for t in range(2000):
        g = spike if t == 10 else math.sqrt(base)
        r = torch.tensor([[g / math.sqrt(v)]], dtype=torch.float64)
        state, step = memory.update(state, r, torch.tensor([[v]], dtype=torch.float64), valid, inflation=1.5)
        started += int(step.started)
        if step.ended.item() > 0:
            lengths.append(step.ended_steps.item())
        v = beta2 * v + (1 - beta2) * g * g
    # After the event v = 0.99 + 0.01 * 10^4 = 100.99, decaying to 1 as 0.99^s: ends when v <= 2.25.
    s = 1
    v_after = beta2 * base + (1 - beta2) * spike**2
    while v_after > 2.25:
        v_after = beta2 * v_after + (1 - beta2) * base
        s += 1
    assert started == 1
    assert lengths == [s]


def test_no_event_without_a_large_ratio_and_invalid_rows_are_frozen():
    state = memory.init(2, 3)
    r = torch.full((2, 3), 10.0, dtype=torch.float64)  # r^2 = 100 < 5000
    v = torch.ones(2, 3, dtype=torch.float64)
    state, step = memory.update(state, r, v, torch.tensor([True, True]))
    assert step.started.sum() == 0
    r[1] = 1000.0
    state, step = memory.update(state, r, v, torch.tensor([True, False]))
    assert step.started.tolist() == [0.0, 0.0]
    state, step = memory.update(state, r, v, torch.tensor([True, True]))
    assert step.started.tolist() == [0.0, 3.0]


def episode_length(r: float, beta2: float, inflation: float) -> int:
    """docs/metrics.md: steps until sqrt(v_hat) is back under ``inflation`` times its level L, for an event of
    size r on a stationary v (later gradients g^2 = L): (1 - beta2)(r^2 - 1) beta2^(s-1) <= inflation^2 - 1."""
    excess = (1 - beta2) * (r * r - 1) / (inflation * inflation - 1)
    return 1 if excess <= 1 else 1 + math.ceil(math.log(excess) / math.log(1 / beta2))


@pytest.mark.parametrize("beta2, r", [(0.99, 100.0), (0.95, 100.0), (0.999, 100.0), (0.999, 1000.0), (0.95, 80.0)])
def test_episode_length_is_the_closed_form_in_r_and_beta2(beta2, r):
    state, v, lengths = memory.init(1, 1, dtype=torch.float64), 1.0, []
    valid = torch.tensor([True])
    t, event = 0, 5
    while not lengths and t < 20_000:
        g = r if t == event else 1.0
        ratio = torch.tensor([[g / math.sqrt(v)]], dtype=torch.float64)
        state, step = memory.update(state, ratio, torch.tensor([[v]], dtype=torch.float64), valid, inflation=1.5)
        if step.ended.item() > 0:
            lengths.append(step.ended_steps.item())
        v = beta2 * v + (1 - beta2) * g * g
        t += 1
    assert lengths == [episode_length(r, beta2, 1.5)]


def ref_damping(dp, g, usable, events, s):
    """The damping windows written per coordinate with Python loops: returns (closed, sum of D) per (D, L)."""
    T, L, S = dp.shape
    closed = np.zeros((len(events), L))
    total = np.zeros((len(events), L))
    for d, ev in enumerate(events):
        for layer in range(L):
            for i in range(S):
                is_open, age, a_dp, a_g, before = False, 0, 0.0, 0.0, None
                for t in range(T):
                    u = usable[t, layer, i]
                    if is_open and u:
                        a_dp, a_g, age = a_dp + dp[t, layer, i], a_g + g[t, layer, i], age + 1
                    if is_open and age >= s:
                        closed[d, layer] += 1
                        total[d, layer] += (a_dp / a_g) / before
                        is_open = False
                    window = slice(t - s, t)
                    if (
                        ev[t, layer, i]
                        and u
                        and not is_open
                        and t >= s
                        and usable[window, layer, i].all()
                        and dp[window, layer, i].sum() > 0
                    ):
                        before = dp[window, layer, i].sum() / g[window, layer, i].sum()
                        is_open, age, a_dp, a_g = True, 0, 0.0, 0.0
    return closed, total


def test_damping_windows_match_a_loop_reference():
    rng = np.random.default_rng(0)
    T, L, S, s = 120, 3, 7, 4
    g = np.abs(rng.standard_normal((T, L, S))) + 0.1
    dp = np.abs(rng.standard_normal((T, L, S))) * rng.choice([0.1, 1.0], (T, L, 1))  # damped and plain stretches
    dp[:, 2, 0] = 0.0  # a coordinate that never moves: its windows never open (D undefined)
    usable = rng.random((T, L, S)) < 0.85
    events = [rng.random((T, L, S)) < 0.08, rng.random((T, L, S)) < 0.04]
    g_seen = np.where(usable, g, np.nan)  # unusable coordinates carry NaN, as a tensor without a gradient does
    state = memory.damping_init(2, L, S, s, dtype=torch.float64)
    closed, total = torch.zeros(2, L, dtype=torch.float64), torch.zeros(2, L, dtype=torch.float64)
    for t in range(T):
        ev = [torch.from_numpy(e[t].astype(np.float64)) for e in events]
        state, step = memory.damping_update(
            state,
            torch.from_numpy(dp[t]),
            torch.from_numpy(g_seen[t]),
            torch.from_numpy(usable[t].astype(np.float64)),
            ev,
            t % s,
        )
        closed += step.closed
        total += step.ratio_sum
    want_closed, want_total = ref_damping(dp, g, usable, events, s)
    assert want_closed.sum() > 20  # the case exercises many windows
    np.testing.assert_array_equal(closed.numpy(), want_closed)
    np.testing.assert_allclose(total.numpy(), want_total, rtol=1e-12)


def test_damping_without_a_denominator_opens_nothing():
    state = memory.damping_init(2, 1, 3, 2, dtype=torch.float64)
    ones = torch.ones(1, 3, dtype=torch.float64)
    for t in range(6):
        state, step = memory.damping_update(state, ones, ones, ones, [None, ones], t % 2)
        assert step.closed[0].sum() == 0  # the missing denominator never opens a window
    assert state.active[0].sum() == 0 and state.active[1].sum() == 3
