"""Tests for the block-sum alpha-stable index (heavytail/estimators/stable.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import levy_stable

from heavytail.estimators import stable_alpha

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


def ref_stable(x: np.ndarray) -> float:
    """Mohammadi et al. (2015) Corollary 2.4 written out: K2 = floor(sqrt(n)) consecutive values per block."""
    x = np.asarray(x, dtype=np.float64)
    k2 = math.isqrt(len(x))
    k1 = len(x) // k2
    x = x[: k1 * k2]
    y = x.reshape(k1, k2).sum(axis=1)
    inv = (np.mean(np.log(np.abs(y))) - np.mean(np.log(np.abs(x)))) / math.log(k2)
    return 1 / max(inv, 0.5)


def _rows(seed: int = 0, n: int = 5000) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack(
        [
            levy_stable.rvs(1.5, 0, size=n, random_state=seed),
            rng.standard_cauchy(n),
            rng.standard_t(3, n),
            rng.standard_normal(n),
        ]
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", [4, 17, 5000, 4999])
def test_matches_reference_float64(device, n):
    x = _rows()[:, :n]
    got = stable_alpha(torch.from_numpy(x).to(device))
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.cpu().numpy(), [ref_stable(r) for r in x], rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_input_is_upcast(device, dtype):
    x = torch.from_numpy(_rows(seed=1)).to(dtype)
    got = stable_alpha(x.to(device))
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.cpu().numpy(), [ref_stable(r) for r in x.double().numpy()], rtol=1e-3)


@pytest.mark.parametrize("device", DEVICES)
def test_batched_equals_row_by_row(device):
    x = torch.from_numpy(np.random.default_rng(2).standard_t(1.5, (3, 4, 900))).to(device)
    batched = stable_alpha(x)
    assert batched.shape == (3, 4)
    for a in range(3):
        for b in range(4):
            torch.testing.assert_close(batched[a, b], stable_alpha(x[a, b]), rtol=1e-12, atol=0)


def test_known_distributions():
    n = 100_000
    rng = np.random.default_rng(3)
    stable = np.stack([levy_stable.rvs(1.7, 0, size=n, random_state=s) for s in range(6)])
    got = stable_alpha(torch.from_numpy(stable)).numpy()
    assert np.median(np.abs(got / 1.7 - 1)) < 0.05, got
    cauchy = stable_alpha(torch.from_numpy(rng.standard_cauchy((6, n)))).numpy()
    assert np.median(np.abs(cauchy - 1)) < 0.05, cauchy
    gauss = stable_alpha(torch.from_numpy(rng.standard_normal((6, n)))).numpy()
    assert (gauss <= 2).all() and np.median(gauss) > 1.9, gauss


def test_clamped_to_the_stable_range():
    # Alternating signs cancel inside every block: sums smaller than the parts, 1/alpha < 0 -> 2, not negative.
    x = torch.tensor([1.0, -1.0] * 50, dtype=torch.float64) * torch.linspace(1, 2, 100, dtype=torch.float64)
    assert stable_alpha(x) == 2.0


def test_edge_cases():
    assert torch.isnan(stable_alpha(torch.randn(3))) and stable_alpha(torch.randn(2, 0)).shape == (2,)
    assert torch.isnan(stable_alpha(torch.zeros(100)))
    rng = np.random.default_rng(4)
    x = rng.standard_cauchy(400)
    dirty = x.copy()
    dirty[[5, 77]] = [math.nan, math.inf]
    dirty[200] = 0.0
    clean = x.copy()
    clean[[5, 77, 200]] = 0.0  # non-finite entries count as 0 in the sums; zeros leave the log-means
    got = stable_alpha(torch.from_numpy(dirty))
    blocks = clean.reshape(20, 20).sum(1)
    nz = clean[clean != 0]
    expected = 1 / max((np.mean(np.log(np.abs(blocks))) - np.mean(np.log(np.abs(nz)))) / math.log(20), 0.5)
    assert got == pytest.approx(expected, rel=1e-12)


def test_no_host_sync(monkeypatch):
    x = torch.from_numpy(_rows()).float()

    def forbidden(*args, **kwargs):
        raise AssertionError("host-device synchronisation in an estimator")

    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    stable_alpha(x)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31), scale_exp=st.integers(-30, 30), negate=st.booleans())
def test_scale_and_sign_invariant(seed, scale_exp, negate):
    x = torch.from_numpy(np.random.default_rng(seed).standard_t(1.5, 900))
    y = x * (-(2.0**scale_exp) if negate else 2.0**scale_exp)
    torch.testing.assert_close(stable_alpha(y), stable_alpha(x), rtol=1e-9, atol=0)
