"""Tests for excess kurtosis, its power-sum form and the Gaussian reference quantile (estimators/kurtosis.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from heavytail.estimators import gaussian_kurtosis_quantile, kurtosis, kurtosis_from_power_sums

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


def _rows(seed: int = 0, n: int = 3000) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack(
        [
            rng.standard_t(5, n),
            rng.laplace(size=n),
            rng.standard_normal(n) * 1e-3 + 5.0,  # offset 5000 standard deviations: the two passes must centre first
            rng.pareto(3, n),
            rng.uniform(size=n),  # platykurtic: -1.2
        ]
    )


@pytest.mark.parametrize("device", DEVICES)
def test_matches_scipy_float64(device):
    x = _rows()
    got = kurtosis(torch.from_numpy(x).to(device))
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.cpu().numpy(), scipy.stats.kurtosis(x, axis=-1), rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_input_is_upcast(device, dtype):
    x = torch.from_numpy(_rows(seed=1)[[0, 1, 3, 4]]).to(dtype)  # float16 cannot hold 5 +- 1e-3 apart
    got = kurtosis(x.to(device))
    assert got.dtype == torch.float32
    expected = scipy.stats.kurtosis(x.double().numpy(), axis=-1)
    np.testing.assert_allclose(got.cpu().numpy(), expected, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("scale", [1e-30, 1e-12, 1e12, 1e30])
def test_float32_survives_extreme_scales(scale):
    x = torch.from_numpy(_rows(seed=2)[[0, 1, 4]])
    got = kurtosis((x * scale).float())
    np.testing.assert_allclose(got.numpy(), scipy.stats.kurtosis(x.numpy(), axis=-1), rtol=1e-3)


@pytest.mark.parametrize("device", DEVICES)
def test_batched_equals_row_by_row(device):
    x = torch.from_numpy(np.random.default_rng(3).standard_t(6, (3, 4, 500))).to(device)
    batched = kurtosis(x)
    assert batched.shape == (3, 4)
    for a in range(3):
        for b in range(4):
            torch.testing.assert_close(batched[a, b], kurtosis(x[a, b]), rtol=1e-12, atol=1e-12)


def test_missing_and_degenerate_rows():
    rng = np.random.default_rng(4)
    clean = rng.standard_t(5, 1000)
    dirty = np.insert(clean, [0, 10, 500], [math.nan, math.inf, -math.inf])
    assert kurtosis(torch.from_numpy(dirty)) == pytest.approx(scipy.stats.kurtosis(clean), rel=1e-10)
    assert torch.isnan(kurtosis(torch.full((5, 10), 3.0))).all()  # constant: m2 = 0
    assert torch.isnan(kurtosis(torch.tensor([1.0])))
    assert kurtosis(torch.empty(2, 0)).shape == (2,) and torch.isnan(kurtosis(torch.empty(2, 0))).all()
    assert torch.isnan(kurtosis(torch.tensor([1.0, math.nan, math.inf])))


# ----------------------------------------------------------------------------- power sums


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_power_sums_match_scipy(device, dtype):
    x = np.concatenate([_rows(seed=5)[[0, 1, 3, 4]], np.random.default_rng(6).standard_normal((1, 3000)) + 0.5])
    t = torch.from_numpy(x).to(device)
    sums = [(t**p).sum(-1).to(dtype) for p in (1, 2, 3, 4)]
    n = torch.full((x.shape[0],), x.shape[1], dtype=dtype, device=device)
    got = kurtosis_from_power_sums(n, *sums)
    assert got.dtype == dtype
    rtol = 1e-8 if dtype == torch.float64 else 1e-3
    np.testing.assert_allclose(got.cpu().numpy(), scipy.stats.kurtosis(x, axis=-1), rtol=rtol, atol=rtol)


def test_power_sums_accept_python_n_and_broadcast():
    x = torch.from_numpy(np.random.default_rng(7).laplace(size=(2, 3, 400)))
    sums = [(x**p).sum(-1) for p in (1, 2, 3, 4)]
    torch.testing.assert_close(kurtosis_from_power_sums(400, *sums), kurtosis(x), rtol=1e-9, atol=1e-9)
    zero = torch.zeros(2)
    assert torch.isnan(kurtosis_from_power_sums(torch.tensor([1.0, 0.0]), zero, zero, zero, zero)).all()
    constant = kurtosis_from_power_sums(
        10, torch.tensor(20.0), torch.tensor(40.0), torch.tensor(80.0), torch.tensor(160.0)
    )
    assert torch.isnan(constant)


# ----------------------------------------------------------------------------- the Gaussian reference


def test_gaussian_quantile_formula():
    for n in (4, 100, 10_000, 10**7):
        mean = -6 / (n + 1)
        var = 24 * n * (n - 2) * (n - 3) / ((n + 1) ** 2 * (n + 3) * (n + 5))
        expected = mean + scipy.stats.norm.ppf(0.99) * math.sqrt(var)
        assert gaussian_kurtosis_quantile(n) == pytest.approx(expected, rel=1e-12)
        assert gaussian_kurtosis_quantile(n, q=0.5) == pytest.approx(mean, rel=1e-12)
    assert math.isnan(gaussian_kurtosis_quantile(3))
    n = torch.tensor([[3.0, 100.0], [10_000.0, 1e7]], dtype=torch.float64)
    got = gaussian_kurtosis_quantile(n, 0.95)
    assert got.shape == (2, 2) and got.dtype == torch.float64 and torch.isnan(got[0, 0])
    for idx in [(0, 1), (1, 0), (1, 1)]:
        assert got[idx] == pytest.approx(gaussian_kurtosis_quantile(int(n[idx]), 0.95), rel=1e-12)
    assert gaussian_kurtosis_quantile(torch.tensor([100, 200])).dtype == torch.float32
    with pytest.raises(ValueError, match="q must be in"):
        gaussian_kurtosis_quantile(100, q=1.0)


def test_gaussian_quantile_is_calibrated():
    # 2,000 Gaussian rows of 10,000: about 1% (measured 1.2% with 20,000 rows) should exceed the 0.99 quantile.
    x = torch.from_numpy(np.random.default_rng(8).standard_normal((2000, 10_000)).astype(np.float32))
    exceed = (kurtosis(x) > gaussian_kurtosis_quantile(10_000)).double().mean()
    assert 0.003 < exceed < 0.025


# ----------------------------------------------------------------------------- no sync, properties


def test_no_host_sync(monkeypatch):
    x = torch.from_numpy(_rows()).float()
    sums = [(x**p).sum(-1) for p in (1, 2, 3, 4)]
    n = torch.full((x.shape[0],), float(x.shape[1]))

    def forbidden(*args, **kwargs):
        raise AssertionError("host-device synchronisation in an estimator")

    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    kurtosis(x)
    kurtosis_from_power_sums(n, *sums)
    gaussian_kurtosis_quantile(n)


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    scale=st.floats(1e-6, 1e6),
    shift=st.floats(-10.0, 10.0),
    negate=st.booleans(),
)
def test_shift_and_scale_invariant(seed, scale, shift, negate):
    x = torch.from_numpy(np.random.default_rng(seed).standard_t(4.5, 300))
    # The shift is in units of the data's spread, so the check is about the estimator, not float64 itself.
    y = (-scale if negate else scale) * (x + shift * x.std())
    torch.testing.assert_close(kurtosis(y), kurtosis(x), rtol=1e-8, atol=1e-8)
