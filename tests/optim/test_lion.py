"""Lion against a float64 transcription of Chen et al. 2023, Algorithm 2."""

from __future__ import annotations

import copy
import io

import numpy as np
import pytest
import torch
from torch import nn

from heavytail.optim import Lion

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
SHAPES = [(7, 5), (13,), (3, 4, 2)]


def lion_reference(theta, grad_fn, steps, lr, beta1, beta2, wd):
    """Algorithm 2 of the paper, line by line, in NumPy float64."""
    theta = [t.copy() for t in theta]
    m = [np.zeros_like(t) for t in theta]
    for _ in range(steps):
        g = grad_fn(theta)
        for i in range(len(theta)):
            c = beta1 * m[i] + (1 - beta1) * g[i]
            theta[i] = theta[i] - lr * (np.sign(c) + wd * theta[i])
            m[i] = beta2 * m[i] + (1 - beta2) * g[i]
    return theta


def _problem(seed=0):
    """Parameters and a parameter-dependent gradient g = a * theta + b (a quadratic's gradient)."""
    rng = np.random.default_rng(seed)
    theta = [rng.standard_normal(s) for s in SHAPES]
    a = [rng.uniform(0.5, 2.0, s) for s in SHAPES]
    b = [rng.standard_normal(s) for s in SHAPES]

    def grad_fn(th):
        return [ai * t + bi for ai, t, bi in zip(a, th, b)]

    return theta, grad_fn


def _run_torch(opt, params, grad_fn, steps):
    for _ in range(steps):
        grads = grad_fn([p.detach().cpu().numpy() for p in params])
        for p, g in zip(params, grads):
            p.grad = torch.from_numpy(g).to(p.device)
        opt.step()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_matches_paper_reference(device, foreach, wd):
    theta, grad_fn = _problem()
    params = [nn.Parameter(torch.from_numpy(t.copy()).to(device)) for t in theta]
    opt = Lion(params, lr=3e-2, betas=(0.9, 0.99), weight_decay=wd, foreach=foreach)
    _run_torch(opt, params, grad_fn, steps=12)
    expected = lion_reference(theta, grad_fn, 12, 3e-2, 0.9, 0.99, wd)
    for p, e in zip(params, expected):
        np.testing.assert_allclose(p.detach().cpu().numpy(), e, rtol=0, atol=1e-12)


def test_first_step_moves_every_coordinate_by_lr():
    p = nn.Parameter(torch.randn(1000, dtype=torch.float64))
    before = p.detach().clone()
    p.grad = torch.randn(1000, dtype=torch.float64) * torch.logspace(-6, 6, 1000, dtype=torch.float64)
    Lion([p], lr=1e-3).step()
    # No denominator: a 1e6 gradient entry and a 1e-6 one take the same step.
    torch.testing.assert_close((p - before).abs(), torch.full_like(before, 1e-3), rtol=0, atol=1e-15)


@pytest.mark.parametrize("foreach", [False, True])
def test_param_groups_use_their_own_hyperparameters(foreach):
    theta, grad_fn = _problem(seed=1)
    params = [nn.Parameter(torch.from_numpy(t.copy())) for t in theta]
    opt = Lion(
        [
            {"params": params[:1], "lr": 1e-2, "weight_decay": 0.5},
            {"params": params[1:], "betas": (0.5, 0.9)},
        ],
        lr=2e-2,
        foreach=foreach,
    )
    _run_torch(opt, params, grad_fn, steps=6)
    # The groups are independent, so each matches a reference run on its own parameters.
    first = lion_reference(theta, grad_fn, 6, 1e-2, 0.9, 0.99, 0.5)[0]
    rest = lion_reference(theta, grad_fn, 6, 2e-2, 0.5, 0.9, 0.0)[1:]
    for p, e in zip(params, [first, *rest]):
        np.testing.assert_allclose(p.detach().numpy(), e, rtol=0, atol=1e-12)


def test_mixed_dtypes_and_state_key():
    p32 = nn.Parameter(torch.randn(4, 3))
    p64 = nn.Parameter(torch.randn(5, dtype=torch.float64))
    opt = Lion([p32, p64], lr=0.1, foreach=True)
    p32.grad, p64.grad = torch.randn_like(p32), torch.randn_like(p64)
    opt.step()
    assert set(opt.state[p32]) == {"exp_avg"}
    assert opt.state[p64]["exp_avg"].dtype == torch.float64
    torch.testing.assert_close(opt.state[p32]["exp_avg"], 0.01 * p32.grad)


def test_state_dict_round_trip():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 1))
    x, y = torch.randn(32, 6), torch.randn(32, 1)

    def train(model, opt, steps):
        for _ in range(steps):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()

    opt = Lion(model.parameters(), lr=1e-2, weight_decay=0.1)
    train(model, opt, 3)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    clone = copy.deepcopy(model)
    opt2 = Lion(clone.parameters(), lr=1.0)  # hyperparameters come from the state dict
    buf.seek(0)
    opt2.load_state_dict(torch.load(buf))
    assert opt2.param_groups[0]["lr"] == 1e-2
    train(model, opt, 4)
    train(clone, opt2, 4)
    for a, b in zip(model.parameters(), clone.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_closure_is_evaluated_with_grad_enabled():
    p = nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = Lion([p], lr=0.5)
    calls = []

    def closure():
        calls.append(torch.is_grad_enabled())
        opt.zero_grad()
        loss = (p**2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert calls == [True]
    assert loss.item() == 5.0
    torch.testing.assert_close(p.detach(), torch.tensor([0.5, -1.5]))


def test_sparse_gradients_are_rejected():
    emb = nn.Embedding(10, 4, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        Lion(emb.parameters()).step()


def test_parameters_without_grad_are_skipped():
    a, b = nn.Parameter(torch.randn(3)), nn.Parameter(torch.randn(3))
    b_before = b.detach().clone()
    opt = Lion([a, b], lr=0.1)
    a.grad = torch.ones(3)
    opt.step()
    assert b not in opt.state
    torch.testing.assert_close(b.detach(), b_before, rtol=0, atol=0)


def test_empty_group_steps_without_error():
    a = nn.Parameter(torch.randn(3))
    opt = Lion([a])
    opt.step()  # no gradients at all
    assert len(opt.state) == 0


@pytest.mark.parametrize(
    "kwargs, match",
    [({"lr": -1.0}, "lr"), ({"betas": (0.9, 1.5)}, "betas"), ({"weight_decay": -0.1}, "weight_decay")],
)
def test_invalid_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Lion([nn.Parameter(torch.zeros(1))], **kwargs)
