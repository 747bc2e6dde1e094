"""The fused gradient pass against per-tensor float64 NumPy references."""

import numpy as np
import pytest
import torch

from heavytail.estimators.gradient_pass import (
    ABSMAX,
    COUNT,
    NONFINITE,
    RATIO_MAX,
    RATIO_SPIKES,
    S1,
    S2,
    S3,
    S4,
    Denominators,
    GradientPass,
    gradient_pass,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _reference(g: np.ndarray):
    finite = np.isfinite(g)
    x = np.where(finite, g, 0.0).astype(np.float64)
    return [finite.sum(), x.sum(), (x**2).sum(), (x**3).sum(), (x**4).sum(), np.abs(x).max(), (~finite).sum()]


def _grads(device, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(7, 5), (300,), (1,), (64, 33), (2, 3, 4)]
    return [torch.randn(*s, generator=gen).to(device, dtype) for s in shapes]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("chunk", [1 << 23, 50, 7])
def test_power_sums_match_numpy(device, chunk):
    grads = _grads(device)
    grads[1][3] = float("nan")
    grads[3][0, 0] = float("inf")
    result = gradient_pass(grads, chunk_numel=chunk)
    stats = result.stats.cpu().numpy()
    for i, g in enumerate(grads):
        ref = _reference(g.cpu().double().numpy().reshape(-1))
        got = stats[i, [COUNT, S1, S2, S3, S4, ABSMAX, NONFINITE]]
        np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("chunk", [1 << 23, 13])
def test_missing_gradients_give_empty_rows(chunk):
    grads = _grads("cpu")
    grads[2] = None
    stats = gradient_pass(grads, chunk_numel=chunk).stats
    assert stats[2, COUNT] == 0 and stats[2, S2] == 0
    assert stats[0, COUNT] == 35


@pytest.mark.parametrize("chunk", [1 << 23, 11])
def test_denominator_ratio_matches_adamw_division(chunk):
    grads = _grads("cpu", seed=1)
    gen = torch.Generator().manual_seed(2)
    vs = [torch.rand(g.shape, generator=gen) * 1e-2 for g in grads]
    vs[1] = None
    bc = torch.tensor([0.5, 1.0, 0.25, 0.9, 0.1], dtype=torch.float64)
    eps = torch.full((5,), 1e-8, dtype=torch.float64)
    grads[0].view(-1)[0] = 50.0  # a hidden spike
    stats = gradient_pass(
        grads, denominators=Denominators(vs, bc, eps), spike_threshold=5000.0, chunk_numel=chunk
    ).stats.numpy()
    for i, (g, v) in enumerate(zip(grads, vs)):
        if v is None:
            assert np.isnan(stats[i, RATIO_MAX]) and np.isnan(stats[i, RATIO_SPIKES])
            continue
        r = np.abs(g.double().numpy()) / (np.sqrt(v.double().numpy() / bc[i].item()) + 1e-8)
        np.testing.assert_allclose(stats[i, RATIO_MAX], r.max(), rtol=1e-9)
        assert stats[i, RATIO_SPIKES] == (r**2 > 5000).sum()
    assert stats[0, RATIO_SPIKES] >= 1


@pytest.mark.parametrize("chunk", [1 << 23, 9])
def test_samples_are_the_indexed_coordinates(chunk):
    grads = _grads("cpu", seed=3)
    gen = torch.Generator().manual_seed(0)
    index = torch.stack([torch.randint(0, g.numel(), (16,), generator=gen) for g in grads])
    result = gradient_pass(grads, sample_index=index, chunk_numel=chunk)
    for i, g in enumerate(grads):
        expected = g.reshape(-1)[index[i]].double()
        torch.testing.assert_close(result.grad_samples[i], expected)


def test_plan_is_cached_per_set_of_present_gradients():
    grads = _grads("cpu")
    plan = GradientPass([g.numel() for g in grads], torch.zeros(5, 4, dtype=torch.long))
    plan(grads)
    plan(grads)
    plan([None, *grads[1:]])
    assert len(plan._plans) == 2


def test_bf16_gradients_are_upcast():
    grads = _grads("cpu", dtype=torch.bfloat16)
    stats = gradient_pass(grads).stats.numpy()
    for i, g in enumerate(grads):
        ref = _reference(g.double().numpy().reshape(-1))
        np.testing.assert_allclose(stats[i, [COUNT, S1, S2, S3, S4]], ref[:5], rtol=1e-6, atol=1e-9)
