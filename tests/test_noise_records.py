"""Every ``noise/*`` and ``probe/*`` record key against an independent float64 NumPy recomputation.

The workload is heavytail.workload.noise_laws' model: loss (P * xi).sum(), so the gradient is a draw we keep;
SGD with lr = 0. With ``sample_size`` equal to P's size every coordinate is sampled, so the references need no
sample index (each reading is a function of the set of coordinates, not of their order).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import heavytail as ht
from heavytail.workload.noise_laws import LAWS, NoiseModel
from tests import noise_reference as ref
from tests.conftest import read_records

DIM, WINDOW = 48, 32


def _draws(law: str, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    scale = np.exp(rng.standard_normal(DIM))  # lognormal coordinate scales
    return (LAWS[law].draw(rng, (n, DIM)) * scale).astype(np.float32)


def _check(metrics: dict, prefix: str, expected: dict, name: str = "P") -> None:
    for field, value in expected.items():
        got = metrics[f"{prefix}{field}/{name}"]
        if not math.isfinite(value):  # NaN: not computed; inf (a tied top): JSON has no Inf, both are null
            assert got is None, field
        else:
            assert got == pytest.approx(value, rel=1e-3, abs=1e-6), field


def _monitor(model, tmp_path, **kwargs):
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    mon = ht.Monitor(model, opt, log_dir=tmp_path, sample_size=DIM, noise_window=WINDOW, min_tail_samples=50, **kwargs)
    assert mon.sample_size == DIM
    return mon, opt


def _train(model, mon, opt, g) -> None:
    with mon:
        for xi in g:
            model(torch.from_numpy(xi)).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)


def _ones(window: np.ndarray) -> np.ndarray:
    return np.ones_like(window, dtype=bool)


@pytest.mark.parametrize(
    "law, kernel", [("t(3)", "auto"), ("t(3)", "torch"), ("gauss", "auto"), ("bernoulli(0.05)", "auto")]
)
def test_temporal_noise_keys(tmp_path, law, kernel):
    """A checkpoint reads every full window since the previous one, pooled: two windows here (the first push has
    no EMA to deviate from and is not a draw), and not the five steps of the third."""
    steps = 2 * WINDOW + 5
    g = _draws(law, steps, seed=1)
    model = NoiseModel(DIM)
    mon, opt = _monitor(model, tmp_path, every=steps, kernel=kernel)
    _train(model, mon, opt, g)
    metrics = read_records(tmp_path)[-1]["metrics"]
    windows = [g[1:WINDOW].T.astype(np.float64), g[WINDOW : 2 * WINDOW].T.astype(np.float64)]
    expected = ref.tail_windows([(w, _ones(w), None) for w in windows], min_count=50)
    _check(metrics, "noise/", expected)
    if law.startswith("bernoulli"):
        assert expected["tail_class"] == ref.CODES["sparse"]  # the sparse path is the one checked


@pytest.mark.parametrize("kernel", ["auto", "torch"])
def test_a_checkpoint_without_a_full_window_reads_the_ring(tmp_path, kernel):
    """Checkpoints every W / 2 steps: the first and third see no window fill and read the ring as it stands (steps
    2 to W / 2; the last W steps); the second and fourth read the window folded since (steps 1-W, W+1 to 2W)."""
    every = WINDOW // 2
    g = _draws("t(3)", 4 * every, seed=3)
    model = NoiseModel(DIM)
    mon, opt = _monitor(model, tmp_path, every=every, kernel=kernel)
    _train(model, mon, opt, g)
    records = read_records(tmp_path)
    assert [r["step"] for r in records] == [every, 2 * every, 3 * every, 4 * every]
    windows = [g[1:every], g[1:WINDOW], g[every : every + WINDOW], g[WINDOW : 2 * WINDOW]]
    for record, window in zip(records, windows):
        w = window.T.astype(np.float64)
        _check(record["metrics"], "noise/", ref.tail(w, _ones(w), min_count=50))


def _microbatch_deviations(g: np.ndarray, micro: int) -> tuple[np.ndarray, np.ndarray]:
    """Per step, each micro-batch's gradient minus the step's median (one push per step for two micro-batches)."""
    draws, devs = [], []
    for step in g.reshape(-1, micro, DIM).astype(np.float64):
        centre = np.median(step, axis=0)
        for sample in step[:1] if micro == 2 else step:
            draws.append(sample)
            devs.append(sample - centre)
    # The first step is not seen as accumulating (the monitor learns it from that step): its micro-batches are no
    # draws. The window is the one folded when the ring filled.
    skip = 1 if micro == 2 else micro
    return np.array(draws)[skip : skip + WINDOW].T, np.array(devs)[skip : skip + WINDOW].T


@pytest.mark.parametrize("micro", [2, 3])
def test_microbatch_noise_keys(tmp_path, micro):
    steps = 40 if micro == 2 else 12  # more pushes than the ring holds
    g = _draws("t(2.5)", steps * micro, seed=2)
    model = NoiseModel(DIM)
    mon, opt = _monitor(model, tmp_path, every=steps)
    with mon:
        for step in g.reshape(steps, micro, DIM):
            for xi in step:
                model(torch.from_numpy(xi)).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    metrics = read_records(tmp_path)[-1]["metrics"]
    draws, devs = _microbatch_deviations(g, micro)
    expected = ref.tail(draws, np.ones_like(draws, dtype=bool), devs, min_count=50)
    _check(metrics, "noise/microbatch_", expected)
    # The temporal source saw the accumulated gradients, one per step: with 40 steps, the window folded at
    # step W (its first push is no draw); with 12, the ring as it stands.
    accumulated = g.reshape(steps, micro, DIM).astype(np.float64).sum(axis=1)
    window = (accumulated[1:WINDOW] if steps >= WINDOW else accumulated[1:]).T
    _check(metrics, "noise/", ref.tail(window, np.ones_like(window, dtype=bool), min_count=50))


def test_probe_keys(tmp_path):
    micro, batch_size = 32, 2
    rows = _draws("t(2.5)", micro * batch_size + 1, seed=3)  # the odd row left over: mini-batches of batch_size
    rows += np.linspace(-4, 4, DIM, dtype=np.float32)  # mean gradients the probe resolves: the moment fit has points
    model = NoiseModel(DIM)
    mon, opt = _monitor(model, tmp_path, every=1, probe_every=1)
    with mon:
        mon.set_probe(lambda m, batch: m(batch.mean(dim=0)), torch.from_numpy(rows), batch_size=batch_size)
        model(torch.from_numpy(rows[0])).backward()
        opt.step()
    metrics = read_records(tmp_path)[-1]["metrics"]
    x = rows[: micro * batch_size].astype(np.float32).reshape(micro, batch_size, DIM).mean(axis=1)
    x = x.astype(np.float64).T  # (S, M): each coordinate's mini-batch gradients
    ok = np.ones_like(x, dtype=bool)
    xi = x - x.mean(axis=1, keepdims=True)
    pairs = (x[:, 0::2] + x[:, 1::2]) / 2
    reading, doubled = ref.tail(x, ok, min_count=50), ref.tail(pairs, ok[:, : micro // 2], min_count=50)
    gauss = np.random.default_rng(0).standard_normal((8192, micro))
    expected = {
        **reading,
        "hill_alpha_2x": doubled["hill_alpha"],
        "tail_class_2x": doubled["tail_class"],
        "hill_alpha_coord": ref.per_coordinate_hill(xi, max(2, micro // 8)),
        "stable_alpha": ref.stable_alpha(xi),
        "kurtosis": np.mean([ref.coordinate_kurtosis(r[None], np.ones((1, micro), dtype=bool)) for r in xi]),
        "resolved_frac": None,
        "grad_norm": np.linalg.norm(x, axis=0).mean(),
        "micro_batches": float(micro),
        "batch_size": float(batch_size),
    }
    for p in (1.0, 1.5):
        expected[f"moment_slope_p{p:g}"], expected[f"moment_intercept_p{p:g}"] = ref.moment_fit(x, p)
    even = x[:, 0::2]
    expected["resolved_frac"] = float(
        np.mean(np.abs(even.mean(axis=1)) > 2.0 * even.std(axis=1, ddof=1) / math.sqrt(even.shape[1]))
    )
    _check(metrics, "probe/", expected)
    assert math.isfinite(expected["moment_slope_p1"])  # the fit's figures were checked, not only its NaN
    # The Gaussian reference of the per-coordinate estimator, from an independent simulation.
    ref_gauss = ref.per_coordinate_hill(gauss - gauss.mean(axis=1, keepdims=True), max(2, micro // 8))
    assert metrics["probe/hill_alpha_gauss/P"] == pytest.approx(ref_gauss, rel=0.02)
    probe_keys = {k.split("/")[1] for k in metrics if k.startswith("probe/")}
    assert probe_keys == set(expected) | {"hill_alpha_gauss"}


class TwoVectors(torch.nn.Module):
    """Two parameter vectors, each with the noise model's loss: one group under ``group_by="P"``."""

    def __init__(self) -> None:
        super().__init__()
        self.P1 = torch.nn.Parameter(torch.zeros(DIM))
        self.P2 = torch.nn.Parameter(torch.zeros(DIM))

    def forward(self, xi: torch.Tensor) -> torch.Tensor:
        return (self.P1 * xi[0]).sum() + (self.P2 * xi[1]).sum()


def test_a_group_pools_its_members_coordinates(tmp_path):
    steps = WINDOW + 3
    g = np.stack([_draws("t(2.5)", steps, seed=4), _draws("gauss", steps, seed=5)], axis=1)  # (step, 2, DIM)
    model = TwoVectors()
    mon, opt = _monitor(model, tmp_path, every=steps, group_by="P")
    with mon:
        for xi in g:
            model(torch.from_numpy(xi)).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    metrics = read_records(tmp_path)[-1]["metrics"]
    # The window folded when the ring filled (steps 1-W, the first no draw), both members' coordinates.
    window = g[1:WINDOW].transpose(1, 2, 0).reshape(2 * DIM, WINDOW - 1).astype(np.float64)
    _check(metrics, "noise/", ref.tail(window, np.ones_like(window, dtype=bool), min_count=50), name="P")


@pytest.mark.parametrize("m", [2, 3, 4, 5, 8])
def test_the_micro_batch_median_is_quantile_one_half(m):
    from heavytail.families.noise import median

    x = torch.randn(m, 6, 32, generator=torch.Generator().manual_seed(m), dtype=torch.float64)
    x[:, 0, :3] = x[0, 0, :3]  # ties
    torch.testing.assert_close(median(x), x.quantile(0.5, dim=0), rtol=0, atol=1e-15)
