"""Denominator memory: how long a large-gradient event keeps an adaptive denominator inflated.

An event on a coordinate is a step whose ratio r = |g_t| / sqrt(v_hat_{t-1}) has r^2 over a threshold (SPAM's
5000 by default): a gradient the denominator had not prepared for. Its square enters v with weight (1 - beta2)
and then decays as beta2^s, so for many steps afterwards sqrt(v_hat) stays above its pre-event level and damps
every later update of that coordinate: the "corridor" by which AdamW's second moment hides large gradient events
(Yu et al., arXiv 2606.23676). ``update`` follows the sampled coordinates through such episodes and counts,
per episode, the steps until sqrt(v_hat) falls back under ``inflation`` times its pre-event value (a function of
the event's r and beta2: docs/metrics.md); ``damping_update`` compares the update per unit of gradient in the s
steps after each event with the s steps before it.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from heavytail.estimators.masks import float_mask


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
    events: torch.Tensor  # (L, S) 0/1 mask: coordinates where an episode started this step


def init(num_layers: int, num_samples: int, device=None, dtype: torch.dtype = torch.float64) -> MemoryState:
    """No open episode anywhere; ``active`` is a 0/1 mask in ``dtype``."""
    zeros = torch.zeros(num_layers, num_samples, device=device, dtype=dtype)
    return MemoryState(zeros, zeros.clone(), zeros.clone())


def update(
    state: MemoryState,
    ratio: torch.Tensor,
    v_hat: torch.Tensor,
    valid: torch.Tensor,
    *,
    threshold: float = 5000.0,
    inflation: float = 1.5,
) -> tuple[MemoryState, MemoryStep]:
    """Advance every open episode with this step's ``v_hat`` (v_{t-1}, bias-corrected), then open new ones.

    An open episode ends when sqrt(v_hat) <= ``inflation`` * sqrt(level), i.e. v_hat <= inflation^2 * level;
    its length is the number of steps since its event. A coordinate with an open episode does not start another.
    ``valid`` ``(L,)`` masks tensors without a gradient or a denominator this step. The state is kept in the
    dtype of ``level`` (``active`` as a 0/1 mask; a boolean one is accepted), and ``events`` is returned as a 0/1
    mask of that dtype. No host synchronization.
    """
    level, age, active = state
    dt = level.dtype
    active = active.to(dt)
    # Finite ratio and v_hat: x * 0 is exactly 0 for finite x and NaN otherwise.
    ok = float_mask(torch.eq, ratio * 0 + v_hat * 0, 0.0, dt) * valid.to(dt)[:, None]
    ongoing = active * ok
    age = age + ongoing
    ending = ongoing * float_mask(torch.le, v_hat, inflation * inflation * level, dt)
    ended_steps = (ending * age).sum(dim=1)
    active = active - ending
    large = float_mask(torch.gt, ratio * ratio, threshold, dt) * float_mask(torch.gt, v_hat, 0.0, dt)
    events = ok * (1 - active) * large
    # lerp with a 0/1 weight returns either end exactly; v_hat is finite wherever the weight is 1.
    level = torch.lerp(level, torch.nan_to_num(v_hat, nan=0.0, posinf=0.0, neginf=0.0).to(dt), events)
    age = age * (1 - torch.maximum(events, ending))
    active = active + events
    step = MemoryStep(events.sum(dim=1), ending.sum(dim=1), ended_steps, events)
    return MemoryState(level, age, active), step


class DampingState(NamedTuple):
    """Update damping around denominator events, on the sampled coordinates, for D denominators.

    ``ring``: ``(s, 2, L, S)`` |delta p| and |g| of the last s steps (0 where a step was not usable), step-major so
    that a step's write is one contiguous copy; ``window``: ``(3, L, S)`` their running sums over the ring and the
    count of usable steps in it (float64: adding and later subtracting the same values leaves no residue at any
    gradient scale a run meets); ``before``: ``(D, L, S)`` the ratio sum|delta p| / sum|g| over the s steps before
    each open window's event; ``after``: ``(2, D, L, S)`` sum|delta p| and sum|g| since the event; ``age``:
    ``(D, L, S)`` usable steps since the event; ``active``: ``(D, L, S)`` 0/1, a window is open.
    """

    ring: torch.Tensor
    window: torch.Tensor
    before: torch.Tensor
    after: torch.Tensor
    age: torch.Tensor
    active: torch.Tensor


class DampingStep(NamedTuple):
    """Per denominator and tensor ``(D, L)`` for one step: windows closed, and the sum of their damping ratios."""

    closed: torch.Tensor
    ratio_sum: torch.Tensor


def damping_init(
    num_denominators: int, num_layers: int, num_samples: int, steps: int, device=None, dtype=torch.float32
) -> DampingState:
    """Empty rings and no open window; ``steps`` is s, the length of the windows before and after an event."""
    per = torch.zeros(num_denominators, num_layers, num_samples, device=device, dtype=dtype)
    return DampingState(
        torch.zeros(steps, 2, num_layers, num_samples, device=device, dtype=dtype),
        torch.zeros(3, num_layers, num_samples, device=device, dtype=torch.float64),
        per,
        torch.zeros(2, *per.shape, device=device, dtype=dtype),
        per.clone(),
        per.clone(),
    )


def damping_update(
    state: DampingState,
    update: torch.Tensor,
    grad: torch.Tensor,
    usable: torch.Tensor,
    events: list[torch.Tensor | None],
    slot: int,
) -> tuple[DampingState, DampingStep]:
    """One optimizer step of the update-damping windows: ``update`` = |delta p|, ``grad`` = |g| ``(L, S)`` at the
    sampled coordinates, ``usable`` a 0/1 ``(L, S)`` mask of the coordinates with a gradient (|g| > 0) and a finite
    update, ``events`` per denominator the 0/1 ``(L, S)`` event mask of this step (None: no such denominator).

    The damping ratio of an event at step t on a coordinate is

        D = [sum_{u=t+1..t+s} |delta p_u| / sum_{u=t+1..t+s} |g_u|] / [sum_{u=t-s..t-1} |delta p_u| / sum |g_u|]

    "after" being the coordinate's next s usable steps and "before" the s steps before the event step (the event
    step itself is ``event_update_ratio``'s). D < 1: the updates after the event moved the parameter less per unit
    of gradient than before it, the inflated denominator damping them; for Adam with beta1 = 0 and a steady
    gradient scale, D ~ sqrt(v_hat before / v_hat after). With momentum the event's own gradient keeps moving the
    coordinate for about 1 / (1 - beta1) steps, which raises D over windows that short. A window opens at an
    event only where each of the s steps before it was usable and the parameter moved (so D is defined) and no
    window is open on that denominator and coordinate; it closes after s usable steps. The ring is written at
    ``slot`` (the caller's step counter modulo s, a host int) after the windows read it. All work is elementwise
    on ``(L, S)`` (about 40 small operations a step; the window sums are kept running, not summed over the ring).
    Returns the new state (updated in place) and the windows closed this step. No host read.
    """
    ring, window, before, after, age, active = state
    dt = ring.dtype
    steps = ring.shape[0]
    ok = usable if usable.dtype == dt else usable.to(dt)
    # Unusable entries may hold NaN or inf (no gradient): zero them before they are multiplied by a 0 mask.
    du = torch.nan_to_num(update, nan=0.0, posinf=0.0, neginf=0.0).to(dt) * ok
    dg = torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0).to(dt) * ok

    # Advance the open windows with this step, then close those that have s usable steps.
    grow = active * ok
    after[0].addcmul_(grow, du)
    after[1].addcmul_(grow, dg)
    age.add_(grow)
    closing = active * float_mask(torch.ge, age, float(steps), dt)
    # A closing window has s usable steps (|g| > 0 each) and was opened with before > 0: the divisions are safe.
    ratio = after[0] / (after[1] * before).clamp_min(1e-30)
    step = DampingStep(closing.sum(dim=-1), (closing * ratio).sum(dim=-1))
    active.sub_(closing)

    # Open windows at this step's events, with the s steps before it (the running window) as the reference.
    ready = float_mask(torch.eq, window[2], float(steps), dt) * float_mask(torch.gt, window[0], 0.0, dt) * ok
    reference = (window[0] / window[1].clamp_min(1e-300)).to(dt)
    for d, e in enumerate(events):
        if e is None:
            continue
        start = e.to(dt) * ready * (1 - active[d])
        before[d].copy_(torch.lerp(before[d], reference, start))
        fresh = 1 - torch.maximum(start, closing[d])
        after[:, d].mul_(fresh)
        age[d].mul_(fresh)
        active[d].add_(start)

    # Slide the window: drop the step leaving the ring, add this one.
    old = ring[slot]
    window[0].add_(du.to(torch.float64) - old[0].to(torch.float64))
    window[1].add_(dg.to(torch.float64) - old[1].to(torch.float64))
    window[2].add_(float_mask(torch.gt, dg, 0.0, torch.float64) - float_mask(torch.gt, old[1], 0.0, torch.float64))
    old[0].copy_(du)
    old[1].copy_(dg)
    return DampingState(ring, window, before, after, age, active), step
