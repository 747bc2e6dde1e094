"""Noise tails: ring buffers of sampled gradient-noise deviations, and their tail index and kurtosis.

The noise of a stochastic gradient is its deviation from the mean gradient (DESIGN: the noise tail, which the
convergence theory is about, as opposed to the coordinate tail of one step's gradient). Each source provides
deviations on the same fixed sample of coordinates per tensor, ``(L, S)`` per push:

- temporal: g_t - EMA(g) per coordinate (every run, every step);
- micro-batch: g_micro,i - mean_i g_micro,i under gradient accumulation;
- rank: g_rank - mean over ranks (the all-reduced gradient) under data parallelism.

Deviations from all coordinates of a tensor are pooled, as Simsekli et al. (2019) pool them; since coordinates
differ in scale the pool is a scale mixture, which has the tail index of its components (Breiman 1965).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from heavytail.estimators.hill import default_top_count, hill_from_top


class NoiseRing(NamedTuple):
    """The last ``W`` pushes of ``(L, S)`` deviations, and which (tensor, push) slots hold data."""

    values: torch.Tensor  # (L, S, W) float32
    valid: torch.Tensor  # (L, W) bool


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


def noise_tail(values: torch.Tensor, mask: torch.Tensor, min_count: int = 100) -> torch.Tensor:
    """Per row: Hill alpha, its standard error and the excess kurtosis of the valid deviations, ``(L, 3)``.

    Hill as in :func:`heavytail.estimators.hill.hill` (zeros and masked entries are missing); kurtosis is the
    biased m4/m2^2 - 3 over the valid entries (masked central moments, float64). Rows with fewer than
    ``min_count`` valid deviations give NaN: too few to say anything honest about a tail.
    """
    data = values.to(torch.float64) * mask
    counts = mask.sum(dim=1)
    n = counts.to(torch.float64).clamp_min(1)
    mean = data.sum(1) / n
    centred = (data - mean[:, None]) * mask
    m2 = (centred**2).sum(1) / n
    m4 = (centred**4).sum(1) / n
    kurtosis = m4 / (m2 * m2) - 3.0
    width = values.shape[1]
    m = int(min(default_top_count(width), width))
    top = torch.topk(data.abs(), m, dim=1).values
    result = hill_from_top(top, counts.clamp_min(1))
    enough = counts >= min_count
    nan = torch.full_like(kurtosis, math.nan)
    return torch.stack(
        [
            torch.where(enough, result.alpha.to(torch.float64), nan),
            torch.where(enough, result.se.to(torch.float64), nan),
            torch.where(enough, kurtosis, nan),
        ],
        dim=1,
    ).to(torch.float32)
