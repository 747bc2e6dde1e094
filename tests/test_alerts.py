"""Alerts end to end: each rule fires on its event, once, within a step, everywhere, with a flight record."""

from __future__ import annotations

import json
import logging

import torch
from torch import nn

import heavytail as ht
from tests.conftest import TinyNet, read_alerts, tiny_batch


class Collect:
    """A user backend that keeps what it is given."""

    def __init__(self):
        self.records, self.alerts, self.closed = [], [], False

    def log(self, metrics, step):
        self.records.append((step, dict(metrics)))

    def alert(self, alert):
        self.alerts.append(dict(alert))

    def close(self):
        self.closed = True


def _train(model, opt, mon, steps, loss_scale=None, grad_hook=None, seen=None):
    # One fixed batch: a smooth, slowly decreasing loss, like a real run's (whose per-step noise is a few percent).
    for step in range(steps):
        idx, y = tiny_batch(0, batch=64)
        loss = nn.functional.mse_loss(model(idx), y)
        if loss_scale and step in loss_scale:
            loss = loss * loss_scale[step]
        loss.backward()
        if grad_hook:
            grad_hook(step, model)
        mon.observe_loss(loss)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if seen is not None:
            seen.append((step + 1, len(seen_alerts(mon))))


def seen_alerts(mon):
    return [a for b in mon._backends if isinstance(b.backend, Collect) for a in b.backend.alerts]


def test_loss_spike_fires_once_within_one_step_everywhere(tmp_path, caplog):
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    collect = Collect()
    called = []
    timeline = []
    with ht.Monitor(model, opt, every=50, log_dir=tmp_path, backends=("jsonl", collect), spike_warmup=20) as mon:
        mon.on_alert(called.append)
        with caplog.at_level(logging.WARNING, logger="heavytail"):
            # Scaling the loss (and so every gradient) by 5 at step 60 is a loss spike and a gradient spike.
            _train(model, opt, mon, steps=120, loss_scale={59: 5.0}, seen=timeline)
    alerts = read_alerts(tmp_path)
    loss_alerts = [a for a in alerts if a["rule"] == "loss_spike"]
    assert len(loss_alerts) == 1 and loss_alerts[0]["step"] == 60
    grad_alerts = [a for a in alerts if a["rule"] == "grad_spike"]
    assert len(grad_alerts) == 1 and grad_alerts[0]["step"] == 60 and grad_alerts[0]["layer"] is None
    # Fired at most one optimizer step after the spike: visible once step 61 completed.
    first_seen = next(step for step, count in timeline if count > 0)
    assert first_seen <= 61
    assert {a["rule"] for a in called} >= {"loss_spike", "grad_spike"}
    assert {a["rule"] for a in collect.alerts} == {a["rule"] for a in alerts}
    assert any("loss_spike" in r.getMessage() for r in caplog.records)
    record = loss_alerts[0]
    assert set(record) >= {
        "step",
        "wall_time",
        "rule",
        "severity",
        "metric",
        "layer",
        "value",
        "threshold",
        "message",
        "flight_record",
    }
    flight = json.loads((tmp_path / record["flight_record"]).read_text())
    assert 60 in flight["steps"] and flight["steps"][-1] <= 61 and flight["layers"] == mon.names
    assert len(flight["series"]["grad/norm"]) == len(flight["steps"]) and flight["series"]["loss"][-1] > 0


def test_nonfinite_gradients_alert_and_are_excluded(tmp_path):
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    def poison(step, m):
        if step == 4:
            m.fc2.weight.grad[0, :3] = float("nan")

    with ht.Monitor(model, opt, every=10, log_dir=tmp_path) as mon:
        # After the monitor has looked, clean the gradient so the weights stay finite (as a GradScaler would skip).
        def clean(o, args, kwargs):
            for p in model.parameters():
                p.grad.nan_to_num_(0.0)

        opt.register_step_pre_hook(clean)
        _train(model, opt, mon, steps=10, grad_hook=poison)
    alerts = [a for a in read_alerts(tmp_path) if a["rule"] == "nonfinite_grad"]
    assert len(alerts) == 1 and alerts[0]["layer"] == "fc2.weight" and alerts[0]["severity"] == "critical"
    assert alerts[0]["value"] == 3


def test_hidden_spike_alert_after_warmup(tmp_path):
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def jolt(step, m):
        if step == 40:
            m.fc1.weight.grad[5, 5] *= 1e4  # one coordinate 10^4 times its running RMS

    with ht.Monitor(model, opt, every=100, log_dir=tmp_path, spike_warmup=20, alerts=("hidden_spike",)) as mon:
        _train(model, opt, mon, steps=45, grad_hook=jolt)
    alerts = read_alerts(tmp_path)
    assert [(a["rule"], a["layer"], a["step"]) for a in alerts] == [("hidden_spike", "fc1.weight", 41)]


def test_tail_index_drop_needs_a_confident_estimate(tmp_path):
    torch.manual_seed(0)
    model = nn.Linear(200, 100, bias=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    gen = torch.Generator().manual_seed(1)
    with ht.Monitor(model, opt, every=1, log_dir=tmp_path, alerts=("tail_index_drop",)):
        for _step in range(3):
            # Student-t(1.2) gradient entries: alpha about 1.2, well under 2.
            model.weight.grad = torch.distributions.StudentT(1.2).sample((100, 200))
            opt.step()
        for _step in range(3):
            model.weight.grad = torch.randn(100, 200, generator=gen)
            opt.step()
    alerts = read_alerts(tmp_path)
    assert [a["step"] for a in alerts] == [1]  # once (cooldown), and never for the Gaussian steps
    assert alerts[0]["value"] < 2 and alerts[0]["layer"] == "weight"


def test_disabled_rules_do_not_fire(tmp_path):
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    with ht.Monitor(model, opt, every=50, log_dir=tmp_path, spike_warmup=20, alerts=()) as mon:
        _train(model, opt, mon, steps=70, loss_scale={59: 20.0})
    assert read_alerts(tmp_path) == []


def test_healthy_training_raises_no_alert(tmp_path):
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with ht.Monitor(model, opt, every=100, log_dir=tmp_path) as mon:
        _train(model, opt, mon, steps=300)
    rules = [a["rule"] for a in read_alerts(tmp_path)]
    assert "loss_spike" not in rules and "grad_spike" not in rules and "nonfinite_grad" not in rules
