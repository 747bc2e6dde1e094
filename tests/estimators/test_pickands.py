"""Tests for the Pickands tail index (heavytail/estimators/pickands.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from heavytail.estimators import pickands

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


def ref_pickands(x: np.ndarray, k: int) -> float:
    """Textbook Pickands (1975) on the finite non-zero |x|, 1-based order statistics."""
    a = np.abs(np.asarray(x, dtype=np.float64))
    a = -np.sort(-a[np.isfinite(a) & (a > 0)])
    if len(a) < 4 * k or a[2 * k - 1] == a[4 * k - 1]:
        return math.nan
    xi = math.log((a[k - 1] - a[2 * k - 1]) / (a[2 * k - 1] - a[4 * k - 1])) / math.log(2)
    return 1 / xi if xi > 0 else math.inf


def _rows(seed: int = 0, n: int = 4000) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([rng.pareto(1.5, n) + 1, rng.standard_t(3, n), rng.standard_cauchy(n), rng.standard_normal(n)])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k", [1, 40, 250, 1000])
def test_matches_textbook_float64(device, k):
    x = _rows()
    got = pickands(torch.from_numpy(x).to(device), k)
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.cpu().numpy(), [ref_pickands(r, k) for r in x], rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_input_is_upcast(device, dtype):
    x = torch.from_numpy(_rows(seed=1)).to(dtype)
    got = pickands(x.to(device), 100)
    assert got.dtype == torch.float32
    expected = [ref_pickands(r, 100) for r in x.double().numpy()]
    np.testing.assert_allclose(got.cpu().numpy(), expected, rtol=1e-3)


@pytest.mark.parametrize("device", DEVICES)
def test_batched_equals_row_by_row(device):
    x = torch.from_numpy(np.random.default_rng(2).standard_t(2, (3, 4, 800))).to(device)
    batched = pickands(x, 20)
    assert batched.shape == (3, 4)
    for a in range(3):
        for b in range(4):
            torch.testing.assert_close(batched[a, b], pickands(x[a, b], 20), rtol=1e-12, atol=0)


def test_default_k_is_n_over_100():
    x = torch.from_numpy(_rows(seed=3, n=10_000))
    torch.testing.assert_close(pickands(x), pickands(x, 100))


def test_known_distributions():
    rng = np.random.default_rng(4)
    n = 100_000
    pareto = pickands(torch.from_numpy(rng.pareto(1.5, (8, n)) + 1), 1000).numpy()
    cauchy = pickands(torch.from_numpy(rng.standard_cauchy((8, n))), 1000).numpy()
    gauss = pickands(torch.from_numpy(rng.standard_normal((8, n))), 1000).numpy()
    # Pickands' variance is several times Hill's: a 10% median error at k = 1000 is its normal accuracy.
    assert np.median(np.abs(pareto / 1.5 - 1)) < 0.1, pareto
    assert np.median(np.abs(cauchy - 1)) < 0.1, cauchy
    assert (gauss > 4).all(), gauss


def test_edge_cases_give_nan_or_inf():
    assert torch.isnan(pickands(torch.randn(7), 2))  # needs 4k values
    assert pickands(torch.randn(3, 0), 1).shape == (3,)
    x = torch.randn(2, 100, dtype=torch.float64)
    x[0, 10:] = 0  # 10 valid values left: too few for k = 5
    x[1, :] = 2.0  # ties: X(2k) = X(4k)
    assert torch.isnan(pickands(x, 5)).all()
    dirty = torch.from_numpy(_rows(seed=5, n=1000))
    clean = dirty.clone()
    dirty = torch.cat([dirty, torch.tensor([[math.nan, math.inf, 0.0]] * 4, dtype=torch.float64)], -1)
    torch.testing.assert_close(pickands(dirty, 30), pickands(clean, 30))
    # k = 1: xi = log2((X(1) - X(2)) / (X(2) - X(4))); spread-out tops give xi > 0, bunched ones xi < 0 -> inf.
    spread = torch.tensor([10.0, 9.0, 8.99, 8.98], dtype=torch.float64)
    bunched = torch.tensor([10.0, 9.99, 9.0, 8.0], dtype=torch.float64)
    assert pickands(spread, 1) == pytest.approx(1 / math.log2(1 / 0.02))
    assert torch.isinf(pickands(bunched, 1))
    with pytest.raises(ValueError, match="positive int"):
        pickands(torch.randn(10), 0)


def test_no_host_sync(monkeypatch):
    x = torch.from_numpy(_rows()).float()

    def forbidden(*args, **kwargs):
        raise AssertionError("host-device synchronisation in an estimator")

    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    pickands(x, 10)
    pickands(x)
