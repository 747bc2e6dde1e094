"""Denominator memory episodes against a hand-computed EMA of g^2."""

import math

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
