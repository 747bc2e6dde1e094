"""The Hill plot the tails family writes at each checkpoint (hill_plot.jsonl), against a direct ``hill``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import heavytail as ht
from heavytail.estimators import hill
from tests.conftest import read_records

N = 20_000


def _run(tmp_path, steps=6, every=3, **kwargs):
    """loss = (A * x).sum() + (B * y).sum(): the gradients are x (Gaussian) and y (Student-t(2), the heavier
    tail), known exactly; returns the gradients of every step and the Hill plot lines."""
    rng = np.random.default_rng(0)
    A = torch.nn.Parameter(torch.zeros(N))
    B = torch.nn.Parameter(torch.zeros(N))
    model = torch.nn.ParameterDict({"A": A, "B": B})
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    grads = []
    with ht.Monitor(model, opt, every=every, log_dir=tmp_path, **kwargs):
        for _ in range(steps):
            x = torch.from_numpy(rng.standard_normal(N)).float()
            y = torch.from_numpy(rng.standard_t(2, N)).float()
            grads.append({"A": x, "B": y})
            loss = (A * x).sum() + (B * y).sum()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    lines = [json.loads(line) for line in (tmp_path / "hill_plot.jsonl").read_text().splitlines()]
    return grads, lines


def test_hill_plot_of_the_lowest_alpha_equals_hill_on_its_gradient(tmp_path):
    grads, lines = _run(tmp_path)
    records = read_records(tmp_path)
    assert [line["step"] for line in lines] == [r["step"] for r in records] == [3, 6]
    for line, record in zip(lines, records):
        g = grads[line["step"] - 1]  # the tail is read from the gradient of the step before the checkpoint
        m = record["metrics"]
        lowest = min(("A", "B"), key=lambda u: m[f"grad/hill_alpha/{u}"])
        assert line["unit"] == lowest == "B" and line["selected"] == "lowest alpha"
        direct = hill(g["B"])
        assert line["n"] == N
        assert line["alpha"] == pytest.approx(float(direct.alpha), rel=1e-5) == m["grad/hill_alpha/B"]
        assert line["se"] == pytest.approx(float(direct.se), rel=1e-5)
        assert line["k"] == int(direct.k) == m["grad/hill_k/B"]
        curve = line["curve"]
        assert curve["k"][0] == 10 and curve["k"][-1] == N // 10 and line["k"] in curve["k"]
        for k, alpha in list(zip(curve["k"], curve["hill_alpha"]))[::5]:
            assert alpha == pytest.approx(float(hill(g["B"], k=k).alpha), rel=1e-5), k
        # The default's alpha at its chosen k is the record's.
        assert curve["default_alpha"][curve["k"].index(line["k"])] == pytest.approx(line["alpha"], rel=1e-6)


def test_a_configured_unit_is_plotted_at_every_checkpoint(tmp_path):
    grads, lines = _run(tmp_path, hill_plot_unit="A")
    assert [(line["unit"], line["selected"]) for line in lines] == [("A", "configured")] * 2
    for line in lines:
        direct = hill(grads[line["step"] - 1]["A"])
        assert line["alpha"] == pytest.approx(float(direct.alpha), rel=1e-5)
        assert line["k"] == int(direct.k)


def test_an_unknown_unit_is_an_error_at_attach(tmp_path):
    model = torch.nn.Linear(4, 4)
    with pytest.raises(ValueError, match=r"MonitorConfig\.hill_plot_unit 'fc9\.weight' is not a watched unit"):
        ht.Monitor(model, log_dir=tmp_path, hill_plot_unit="fc9.weight")


def test_no_line_when_no_unit_has_a_tail_index(tmp_path):
    model = torch.nn.Linear(4, 4)  # 16 + 4 entries: under min_tail_samples, no tail index anywhere
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with ht.Monitor(model, opt, every=2, log_dir=tmp_path):
        for _ in range(4):
            model(torch.randn(3, 4)).sum().backward()
            opt.step()
            opt.zero_grad()
    assert len(read_records(tmp_path)) == 2
    assert not (tmp_path / "hill_plot.jsonl").exists()


def test_a_light_tail_is_plotted_with_light_true(tmp_path):
    # A's gradient is constant (every order statistic tied: no power-law tail, alpha = inf); B, watched first,
    # has 2,000 entries but 5 non-zero ones (too few: not computed, NaN). The plot shows A, not the unit without a
    # reading, although both records are null.
    A = torch.nn.Parameter(torch.zeros(N))
    B = torch.nn.Parameter(torch.zeros(2000))
    mask = torch.zeros(2000)
    mask[:5] = 1.0
    model = torch.nn.Module()
    model.register_parameter("B", B)  # first: a NaN ranked like inf would be chosen
    model.register_parameter("A", A)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with ht.Monitor(model, opt, every=2, log_dir=tmp_path) as mon:
        assert mon.names == ["B", "A"]
        for _ in range(2):
            (A.sum() + (B * mask).sum()).backward()
            opt.step()
            opt.zero_grad()
    (line,) = [json.loads(s) for s in (tmp_path / "hill_plot.jsonl").read_text().splitlines()]
    metrics = read_records(tmp_path)[0]["metrics"]
    assert metrics["grad/hill_alpha/A"] is None and metrics["grad/hill_alpha/B"] is None  # inf and NaN: both null
    assert line["unit"] == "A" and line["light"] is True and line["alpha"] is None
    assert float(hill(torch.ones(N)).alpha) == float("inf")
    assert np.isnan(float(hill(mask).alpha))
