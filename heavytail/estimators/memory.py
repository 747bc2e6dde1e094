"""Denominator memory: how long a large-gradient event keeps an adaptive denominator inflated.

An event on a coordinate is a step whose ratio r = |g_t| / sqrt(v_hat_{t-1}) has r^2 over a threshold (SPAM's
5000 by default): a gradient the denominator had not prepared for. Its square enters v with weight (1 - beta2)
and then decays as beta2^s, so for many steps afterwards sqrt(v_hat) stays above its pre-event level and damps
every later update of that coordinate: the "corridor" by which AdamW's second moment hides large gradient events
(Yu et al., arXiv 2606.23676). This estimator follows the sampled coordinates through such episodes and counts,
per episode, the steps until sqrt(v_hat) falls back under ``inflation`` times its pre-event value.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class MemoryState(NamedTuple):
    """Per sampled coordinate ``(L, S)``: pre-event v_hat, steps since the event, whether an episode is open."""

    level: torch.Tensor
    age: torch.Tensor
    active: torch.Tensor


class MemoryStep(NamedTuple):
    """Per tensor ``(L,)`` for one step: episodes started, episodes ended and the sum of their lengths."""

    started: torch.Tensor
    ended: torch.Tensor
    ended_steps: torch.Tensor
    events: torch.Tensor  # (L, S) bool: coordinates where an episode started this step


def init(num_layers: int, num_samples: int, device=None, dtype: torch.dtype = torch.float64) -> MemoryState:
    zeros = torch.zeros(num_layers, num_samples, device=device, dtype=dtype)
    return MemoryState(zeros, zeros.clone(), torch.zeros(num_layers, num_samples, device=device, dtype=torch.bool))


def update(state: MemoryState, ratio: torch.Tensor, v_hat: torch.Tensor, valid: torch.Tensor, *,
           threshold: float = 5000.0, inflation: float = 1.5) -> tuple[MemoryState, MemoryStep]:
    """Advance every open episode with this step's ``v_hat`` (v_{t-1}, bias-corrected), then open new ones.

    An open episode ends when sqrt(v_hat) <= ``inflation`` * sqrt(level), i.e. v_hat <= inflation^2 * level;
    its length is the number of steps since its event. A coordinate with an open episode does not start another.
    ``valid`` ``(L,)`` masks tensors without a gradient or a denominator this step. No host synchronization.
    """
    ok = valid[:, None] & torch.isfinite(v_hat) & torch.isfinite(ratio)
    level, age, active = state
    ongoing = active & ok
    age = torch.where(ongoing, age + 1, age)
    ending = ongoing & (v_hat <= inflation * inflation * level)
    ended_steps = torch.where(ending, age, 0.0).sum(dim=1)
    active = active & ~ending
    events = ok & ~active & (ratio * ratio > threshold) & (v_hat > 0)
    level = torch.where(events, v_hat, level)
    age = torch.where(events | ending, 0.0, age)
    active = active | events
    step = MemoryStep(events.sum(dim=1).to(level.dtype), ending.sum(dim=1).to(level.dtype), ended_steps, events)
    return MemoryState(level, age, active), step
