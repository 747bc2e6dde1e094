"""Tests for the moment (Dekkers-Einmahl-de Haan) tail index (heavytail/estimators/dedh.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from heavytail.estimators import dedh

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


def ref_dedh(x: np.ndarray, k: int) -> float:
    """Textbook moment estimator (Dekkers, Einmahl & de Haan 1989) on the finite non-zero |x|."""
    a = np.abs(np.asarray(x, dtype=np.float64))
    a = -np.sort(-a[np.isfinite(a) & (a > 0)])
    if len(a) < k + 1:
        return math.nan
    e = np.log(a[:k]) - np.log(a[k])
    m1, m2 = np.mean(e), np.mean(e**2)
    if m2 == 0 or m1 <= 1e-6:  # no spread, or rounding between tied values (noise.ROUNDING_ALPHA)
        return math.inf
    xi = m1 + 1 - 0.5 / (1 - m1**2 / m2)
    return 1 / xi if xi > 0 else math.inf


def _rows(seed: int = 0, n: int = 4000) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([rng.pareto(1.5, n) + 1, rng.standard_t(3, n), rng.standard_cauchy(n), rng.standard_normal(n)])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k", [2, 40, 400, 3999])
def test_matches_textbook_float64(device, k):
    x = _rows()
    got = dedh(torch.from_numpy(x).to(device), k)
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.cpu().numpy(), [ref_dedh(r, k) for r in x], rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_input_is_upcast(device, dtype):
    x = torch.from_numpy(_rows(seed=1)).to(dtype)
    got = dedh(x.to(device), 100)
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.cpu().numpy(), [ref_dedh(r, 100) for r in x.double().numpy()], rtol=1e-3)


@pytest.mark.parametrize("device", DEVICES)
def test_batched_equals_row_by_row(device):
    x = torch.from_numpy(np.random.default_rng(2).standard_t(2, (3, 4, 800))).to(device)
    batched = dedh(x, 30)
    assert batched.shape == (3, 4)
    for a in range(3):
        for b in range(4):
            torch.testing.assert_close(batched[a, b], dedh(x[a, b], 30), rtol=1e-12, atol=0)


def test_default_k_is_n_over_100():
    x = torch.from_numpy(_rows(seed=3, n=10_000))
    torch.testing.assert_close(dedh(x), dedh(x, 100))


def test_known_distributions():
    rng = np.random.default_rng(4)
    n = 100_000
    pareto = dedh(torch.from_numpy(rng.pareto(1.5, (8, n)) + 1), 1000).numpy()
    cauchy = dedh(torch.from_numpy(rng.standard_cauchy((8, n))), 1000).numpy()
    t3 = dedh(torch.from_numpy(np.abs(rng.standard_t(3, (8, n)))), 1000).numpy()
    gauss = dedh(torch.from_numpy(rng.standard_normal((8, n))), 1000).numpy()
    assert np.median(np.abs(pareto / 1.5 - 1)) < 0.05, pareto
    assert np.median(np.abs(cauchy - 1)) < 0.05, cauchy
    assert np.median(np.abs(t3 / 3 - 1)) < 0.1, t3
    assert (gauss > 4).all(), gauss  # xi <= 0 for the Gaussian (Gumbel domain): inf, or a large alpha


def test_edge_cases_give_nan_or_inf():
    assert torch.isnan(dedh(torch.randn(5), 5))
    assert dedh(torch.randn(3, 0), 1).shape == (3,)
    x = torch.randn(3, 100, dtype=torch.float64)
    x[0, 10:] = 0  # 10 valid values: too few for k = 10
    x[1, :] = -2.0  # tied tops: no tail
    x[2, 50] = math.nan
    got = dedh(x, 10)
    assert torch.isnan(got[0]) and torch.isinf(got[1])
    assert got[2] == pytest.approx(ref_dedh(x[2].numpy(), 10))
    with pytest.raises(ValueError, match="positive int"):
        dedh(torch.randn(10), -1)


def test_no_host_sync(monkeypatch):
    x = torch.from_numpy(_rows()).float()

    def forbidden(*args, **kwargs):
        raise AssertionError("host-device synchronisation in an estimator")

    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    dedh(x, 10)
    dedh(x)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31), scale_exp=st.integers(-30, 30), k=st.integers(1, 200))
def test_scale_invariant(seed, scale_exp, k):
    x = torch.from_numpy(np.random.default_rng(seed).standard_t(2.5, 500))
    torch.testing.assert_close(dedh(x * 2.0**scale_exp, k), dedh(x, k), rtol=1e-9, atol=0, equal_nan=True)
