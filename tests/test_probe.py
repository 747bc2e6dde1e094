"""The noise probe: training state restored bit for bit, right tail verdicts on known noise, the moment fit."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from heavytail.estimators.noise import LIGHT
from heavytail.probe import (
    ProbeResult,
    gaussian_hill_reference,
    moment_fit,
    noise_probe,
    noise_statistics,
    split_batch,
)


class BNNet(nn.Module):
    """Linear, BatchNorm (running statistics), Dropout (draws from the RNG): everything the probe must restore."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 16)
        self.bn = nn.BatchNorm1d(16)
        self.drop = nn.Dropout(0.3)
        self.fc2 = nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(torch.relu(self.bn(self.fc1(x)))))


def mse(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return nn.functional.mse_loss(model(x), y)


def _index(params, s: int = 8) -> torch.Tensor:
    return torch.stack([torch.arange(s) % p.numel() for p in params])


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_training_state_is_restored_bit_for_bit(mode: str, device: str) -> None:
    torch.manual_seed(0)
    model = BNNet().to(device)
    model.train(mode == "train")
    model.drop.train(True)  # a module whose mode differs from its parent's must keep it
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(20, 6, generator=g).to(device), torch.randn(20, 1, generator=g).to(device)
    mse(model, (x, y)).backward()  # training gradients, left in place as the monitor finds them
    model.fc2.bias.grad = None  # a parameter with no gradient must stay without one
    params = [p for p in model.parameters()]
    grads = {n: (p.grad, None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    modes = {n: m.training for n, m in model.named_modules()}
    rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if device == "cuda" else None

    held = (torch.randn(32, 6, generator=g).to(device), torch.randn(32, 1, generator=g).to(device))
    result = noise_probe(model, params, mse, held, micro_batches=8, sample_index=_index(params).to(device))
    if cuda_rng is not None:
        assert all(torch.equal(a, b) for a, b in zip(torch.cuda.get_rng_state_all(), cuda_rng))
    assert result.hill_alpha.device.type == device  # results stay on the gradients' device

    assert isinstance(result, ProbeResult)
    for n, p in model.named_parameters():
        obj, value = grads[n]
        assert p.grad is obj, n  # the very tensor object, or None
        if value is not None:
            assert torch.equal(p.grad, value), n
    for n, b in model.named_buffers():
        assert torch.equal(b, buffers[n]), n
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert torch.equal(torch.get_rng_state(), rng)
    assert result.grad_norm.shape == (len(params), 8)
    # Each mini-batch gradient's norm, recomputed on a copy of the model from the same RNG state (dropout).
    twin = copy.deepcopy(model)
    torch.set_rng_state(rng)
    if cuda_rng is not None:
        torch.cuda.set_rng_state_all(cuda_rng)
    for m, piece in enumerate(zip(*(torch.tensor_split(t, 8) for t in held))):
        twin.zero_grad(set_to_none=True)
        mse(twin, piece).backward()
        norms = torch.stack([p.grad.double().norm() for p in twin.parameters()])
        torch.testing.assert_close(result.grad_norm[:, m].double(), norms, rtol=1e-5, atol=0)


def test_state_is_restored_when_the_loss_raises() -> None:
    model = BNNet()
    x = torch.randn(8, 6)
    mse(model, (x, torch.randn(8, 1))).backward()
    saved = [p.grad for p in model.parameters()]
    buffers = [b.clone() for b in model.buffers()]
    calls = []

    def failing(m, batch):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return mse(m, batch)

    with pytest.raises(RuntimeError, match="boom"):
        noise_probe(
            model,
            list(model.parameters()),
            failing,
            (torch.randn(16, 6), torch.randn(16, 1)),
            micro_batches=4,
            sample_index=_index(list(model.parameters())),
        )
    assert all(p.grad is g for p, g in zip(model.parameters(), saved))
    assert all(torch.equal(a, b) for a, b in zip(model.buffers(), buffers))


def test_the_probe_does_not_change_what_training_does_next() -> None:
    """Two runs, one probed at step 3: identical weights after 6 steps (dropout on, so the RNG matters)."""

    def run(probe: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = BNNet()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        held = (torch.randn(16, 6), torch.randn(16, 1))
        for step in range(6):
            g = torch.Generator().manual_seed(step)
            loss = mse(model, (torch.randn(8, 6, generator=g), torch.randn(8, 1, generator=g)))
            loss.backward()
            if probe and step == 3:
                noise_probe(
                    model,
                    list(model.parameters()),
                    mse,
                    held,
                    micro_batches=4,
                    sample_index=_index(list(model.parameters())),
                )
            opt.step()
            opt.zero_grad()
        return [p.detach().clone() for p in model.parameters()]

    for a, b in zip(run(False), run(True)):
        assert torch.equal(a, b)


def _linear_probe(noise: str, seed: int, micro_batches: int = 32, per_batch: int = 16) -> ProbeResult:
    """A linear model at its optimum: per-sample gradients are -eps_i x_i, so the noise has eps's tail."""
    g = torch.Generator().manual_seed(seed)
    n, d, out = micro_batches * per_batch, 64, 8
    x = torch.randn(n, d, generator=g)
    w = torch.randn(out, d, generator=g) * 0.1
    if noise == "student":  # Student-t with 1.5 degrees of freedom: tail index 1.5, infinite variance
        chi2 = torch.distributions.Chi2(torch.tensor(1.5))
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            eps = torch.randn(n, out, generator=g) / (chi2.sample((n, out)) / 1.5).sqrt()
    else:
        eps = torch.randn(n, out, generator=g)
    model = nn.Linear(d, out, bias=False)
    with torch.no_grad():
        model.weight.copy_(w)
    y = x @ w.T + eps

    def loss_fn(m, batch):
        return 0.5 * ((m(batch[0]) - batch[1]) ** 2).sum(1).mean()

    index = torch.randperm(out * d, generator=g)[:256][None]
    return noise_probe(model, [model.weight], loss_fn, (x, y), micro_batches=micro_batches, sample_index=index)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_heavy_tailed_noise_reads_heavy(seed: int) -> None:
    # Each sample's error scales a whole row of the gradient: coordinates move together, which only the
    # per-coordinate estimator is blind to (the pooled reading is biased light here; see noise_statistics).
    r = _linear_probe("student", seed)
    assert float(r.hill_alpha_coord[0]) < 2.2
    assert float(r.stable_alpha[0]) < 1.7
    assert float(r.kurtosis[0]) > 3.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gaussian_noise_reads_light(seed: int) -> None:
    r = _linear_probe("gaussian", seed)
    assert float(r.tail_class[0]) == LIGHT
    assert float(r.hill_alpha_coord[0]) > 3.0  # the per-coordinate estimator's Gaussian reading at M = 32 is about 4
    assert float(r.stable_alpha[0]) > 1.9
    assert abs(float(r.kurtosis[0])) < 1.0


def test_gaussian_reference_is_what_gaussian_noise_reads() -> None:
    ref = gaussian_hill_reference(32)
    assert 3.5 < ref < 4.5
    z = torch.randn(1, 32, 4096, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    assert float(noise_statistics(z).hill_alpha_coord[0]) == pytest.approx(ref, rel=0.05)
    assert float(noise_statistics(z).hill_alpha_gauss[0]) == ref


def _abs_normal_moment(p: float) -> float:
    return 2 ** (p / 2) * math.gamma((p + 1) / 2) / math.sqrt(math.pi)


def test_moment_fit_recovers_a_known_relationship() -> None:
    """Layer 0: constant noise (slope 0, e^a = sigma0^p E|Z|^p); layer 1: noise proportional to |g| (slope 1)."""
    g = torch.Generator().manual_seed(0)
    m, s = 64, 512
    grad = 10 ** (torch.rand(s, generator=g, dtype=torch.float64) * 2 - 1)  # |g| over two decades
    grad = grad * torch.where(torch.rand(s, generator=g) < 0.5, -1.0, 1.0).double()
    z = torch.randn(2, m, s, generator=g, dtype=torch.float64)
    sigma0, sigma1 = 0.05, 0.1
    samples = torch.stack([grad + sigma0 * z[0], grad + sigma1 * grad.abs() * z[1]])
    r = noise_statistics(samples, moments=(1.0, 1.5))
    assert r.noise_moment.shape == (2, 2, s) and r.grad_moment.shape == (2, 2, s)
    assert float(r.resolved_frac.min()) > 0.95
    for j, p in enumerate((1.0, 1.5)):
        assert float(r.moment_slope[0, j]) == pytest.approx(0.0, abs=0.05)
        assert float(r.moment_slope[1, j]) == pytest.approx(1.0, abs=0.05)
        # Centring on the half-sample mean shrinks the moment by a factor close to 1 (32 draws): 0.1 in log.
        assert float(r.moment_intercept[0, j]) == pytest.approx(math.log(sigma0**p * _abs_normal_moment(p)), abs=0.1)
        assert float(r.moment_intercept[1, j]) == pytest.approx(math.log(sigma1**p * _abs_normal_moment(p)), abs=0.1)
        assert float(r.moment_r2[1, j]) > 0.9


def test_moment_fit_needs_points() -> None:
    slope, intercept, r2 = moment_fit(torch.ones(1, 2), torch.tensor([[1.0, 2.0]]))
    assert math.isnan(float(slope[0])) and math.isnan(float(intercept[0]))
    slope, intercept, _ = moment_fit(torch.tensor([[2.0, 4.0, 8.0]]), torch.tensor([[1.0, 2.0, 4.0]]))
    assert float(slope[0]) == pytest.approx(1.0) and float(intercept[0]) == pytest.approx(math.log(2.0))


def test_packed_names_and_shapes() -> None:
    r = noise_statistics(torch.randn(3, 16, 32, generator=torch.Generator().manual_seed(0)))
    names, values = r.packed()
    assert values.shape == (3, len(names))
    assert names[:5] == ["hill_alpha", "hill_alpha_se", "hill_alpha_gauss", "stable_alpha", "kurtosis"]
    assert "moment_slope_p1" in names and "moment_intercept_p1.5" in names and "resolved_frac" in names


def test_split_batch_forms_and_errors() -> None:
    x, y = torch.arange(10), torch.arange(10) * 2
    pieces = split_batch({"x": x, "y": y, "flag": True}, 3)
    assert [len(p["x"]) for p in pieces] == [4, 3, 3] and pieces[0]["flag"] is True
    assert torch.equal(torch.cat([p["y"] for p in pieces]), y)
    assert len(split_batch([x, y], 10)) == 10
    with pytest.raises(ValueError, match="fewer than micro_batches"):
        split_batch(x, 11)
    with pytest.raises(ValueError, match="disagree"):
        split_batch((x, torch.arange(4)), 2)
    with pytest.raises(ValueError, match="micro_batches must be"):
        noise_probe(nn.Linear(2, 1), [], mse, x, micro_batches=1, sample_index=torch.zeros(0, 4, dtype=torch.long))


def test_unused_parameters_give_nan_not_errors() -> None:
    model = nn.ModuleDict({"used": nn.Linear(4, 1), "unused": nn.Linear(4, 1)})

    def loss_fn(m, batch):
        return m["used"](batch).pow(2).mean()

    params = list(model.parameters())
    r = noise_probe(model, params, loss_fn, torch.randn(64, 4), micro_batches=8, sample_index=_index(params, 4))
    assert math.isnan(float(r.hill_alpha[2])) and math.isnan(float(r.stable_alpha[2]))
    assert float(r.grad_norm[2].abs().sum()) == 0.0


def test_groups_pool_their_members() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 1))
    params = list(model.parameters())
    held = (torch.randn(64, 6), torch.randn(64, 1))
    index = torch.stack(
        [torch.randperm(p.numel())[:4] if p.numel() >= 4 else torch.arange(4) % p.numel() for p in params]
    )
    whole = noise_probe(model, params, mse, held, micro_batches=8, sample_index=index)
    grouped = noise_probe(model, params, mse, held, micro_batches=8, sample_index=index, groups=[[0, 1], [2, 3]])
    assert grouped.hill_alpha.shape == (2,) and grouped.grad_norm.shape == (2, 8)
    torch.testing.assert_close(grouped.grad_norm[0], whole.grad_norm[:2].pow(2).sum(0).sqrt())
    assert grouped.noise_moment.shape[-1] == 8  # two members' 4 coordinates side by side


# ---------------------------------------------------------------------------------------------- monitor wiring

from heavytail import Monitor  # noqa: E402
from tests.conftest import TinyNet, read_records, tiny_batch  # noqa: E402


def _train_tiny(tmp_path, probe: bool, steps: int = 8) -> tuple[list[dict], list[torch.Tensor]]:
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    held = tiny_batch(999, batch=16)

    def loss_fn(m, batch):
        return nn.functional.mse_loss(m(batch[0]), batch[1])

    with Monitor(
        model, opt, every=2, probe_every=2 if probe else 0, log_dir=tmp_path, sample_size=16, min_tail_samples=10
    ) as mon:
        if probe:
            mon.set_probe(loss_fn, held, micro_batches=4)
        for step in range(steps):
            idx, y = tiny_batch(step)
            loss = loss_fn(model, (idx, y))
            loss.backward()
            mon.observe_loss(loss)
            opt.step()
            opt.zero_grad(set_to_none=True)
    return read_records(tmp_path), [p.detach().clone() for p in model.parameters()]


def test_monitor_probes_every_probe_every_checkpoints_without_changing_training(tmp_path) -> None:
    plain, weights_plain = _train_tiny(tmp_path / "plain", probe=False)
    probed, weights_probed = _train_tiny(tmp_path / "probed", probe=True)
    for a, b in zip(weights_plain, weights_probed):
        assert torch.equal(a, b)
    with_probe = [r["step"] for r in probed if any(k.startswith("probe/") for k in r["metrics"])]
    assert with_probe == [4, 8]  # checkpoints 2 and 4 of every=2
    keys = [k for k in probed[1]["metrics"] if k.startswith("probe/")]
    for figure in ("hill_alpha", "stable_alpha", "kurtosis", "moment_slope_p1", "moment_intercept_p1.5"):
        assert f"probe/{figure}/fc1.weight" in keys
    # The step statistics are the probe-free run's: the probe's backward passes were not counted.
    for r_plain, r_probed in zip(plain, probed):
        for key, value in r_plain["metrics"].items():
            assert r_probed["metrics"][key] == value, key


def test_set_probe_checks_its_arguments(tmp_path) -> None:
    model = TinyNet()
    with Monitor(model, torch.optim.SGD(model.parameters(), lr=0.1), log_dir=tmp_path, probe_every=1) as mon:
        with pytest.raises(ValueError, match="micro_batches"):
            mon.set_probe(lambda m, b: m(b).sum(), torch.zeros(8, 3, dtype=torch.long), micro_batches=1)
        with pytest.raises(ValueError, match="fewer than micro_batches"):
            mon.set_probe(lambda m, b: m(b).sum(), torch.zeros(8, 3, dtype=torch.long), micro_batches=16)
        with pytest.raises(ValueError, match="not both"):
            mon.set_probe(lambda m, b: m(b).sum(), torch.zeros(8, 3, dtype=torch.long), micro_batches=4, batch_size=2)
        with pytest.raises(ValueError, match="fewer than two mini-batches of batch_size = 5"):
            mon.set_probe(lambda m, b: m(b).sum(), torch.zeros(8, 3, dtype=torch.long), batch_size=5)
        with pytest.raises(ValueError, match="batch_size must be a positive integer"):
            mon.set_probe(lambda m, b: m(b).sum(), torch.zeros(8, 3, dtype=torch.long), batch_size=0)
