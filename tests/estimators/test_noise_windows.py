"""The noise family's window arithmetic: the median by sorting network, the float32 reconstruction of the
temporal source's window, and the tally's merge (heavytail.estimators.noise)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from heavytail.estimators import noise


@pytest.mark.parametrize("window", [1, 2, 3, 5, 8, 16, 17, 32])
def test_window_centred_is_the_median_of_the_valid_draws(window):
    gen = torch.Generator().manual_seed(window)
    x = torch.randn(4, 9, window, generator=gen, dtype=torch.float64)
    valid = torch.rand(4, window, generator=gen) > 0.4
    valid[0] = True
    valid[1] = False  # a tensor with no valid slot: all zeros
    got = noise.window_centred(x, valid)
    for layer in range(4):
        keep = valid[layer].numpy()
        for coord in range(9):
            row = x[layer, coord].numpy()
            want = np.where(keep, row - np.median(row[keep]), 0.0) if keep.any() else np.zeros(window)
            np.testing.assert_allclose(got[layer, coord].numpy(), want, rtol=0, atol=1e-12)


def test_sort_network_sorts():
    x = torch.randn(16, 3, 5, generator=torch.Generator().manual_seed(0))
    x[3, 1, 2] = float("inf")  # invalid slots sort last
    assert torch.equal(noise._sort_network(x), x.sort(dim=0).values)


def test_temporal_window_keeps_a_small_noise_on_a_large_mean():
    """Gradients 1e4 + 1e-3 xi: the float32 ring of deviations from the EMA, read back. Adding the mean before
    centring would leave float32 rounding of 1e4 (about 1e-3): the noise itself."""
    rng = np.random.default_rng(0)
    layers, coords, window, beta = 2, 64, 16, 0.9
    g = 1e4 + 1e-3 * rng.standard_normal((3 * window, layers, coords))  # float64 truth
    ring = noise.init(layers, coords, window)
    mean = torch.full((layers, coords), 1e4, dtype=torch.float32)  # the EMA, started at the mean
    m64 = np.full((layers, coords), 1e4)
    for t, gt in enumerate(g):
        noise.push(ring, t, torch.from_numpy(gt - m64).float(), torch.ones(layers, dtype=torch.bool))
        m64 = beta * m64 + (1 - beta) * gt
        mean = (beta * mean.double() + (1 - beta) * torch.from_numpy(gt)).float()
    values, draws = noise.temporal_window(ring, mean, 3 * window, beta)
    last = g[-window:].transpose(1, 2, 0)  # (L, S, W)
    want = last - np.median(last, axis=2, keepdims=True)
    err = np.abs(values.double().numpy() - want).max()
    assert err < 1e-5 * np.abs(want).max(), err  # the deviations are 1e-3: kept to 1e-8
    np.testing.assert_allclose(draws.double().numpy(), last, rtol=1e-6)


def test_a_tally_merged_into_is_the_merge_of_two():
    gen = torch.Generator().manual_seed(3)
    windows = [torch.randn(3, 32, 16, generator=gen).pow(3) for _ in range(3)]
    ok = torch.ones(3, 32, 16, dtype=torch.bool)
    acc = noise.tally_init(3, 128)
    step = noise.tally_init(3, 128)
    for w in windows:
        acc = noise.merge(acc, noise.tally(w, ok, size=128))
        step = noise.tally(w, ok, size=128, into=step)
    torch.testing.assert_close(acc.top.sort(dim=1).values, step.top.sort(dim=1).values)
    torch.testing.assert_close(acc.counts, step.counts)
    z = torch.cat([noise.standardise(w, ok).reshape(3, -1) for w in windows], dim=1)
    assert torch.equal(step.counts[:, 0], (z > 0).sum(1).double())  # every window's positives, not the top's
    assert torch.allclose(step.top.sort(dim=1, descending=True).values, z.topk(128, dim=1).values.float())
