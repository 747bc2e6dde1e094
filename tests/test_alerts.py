"""Alerts end to end: each rule fires on its event, once, within a step, everywhere, with a flight record."""

from __future__ import annotations

import json
import logging
import math
import re
import types

import numpy as np
import pytest
import torch
from torch import nn

import heavytail as ht
from heavytail.alerts import AlertEngine, StepFlags, flag_vector_size, pack_step_flags, unpack_step_flags
from heavytail.estimators import spike
from tests.conftest import TinyNet, read_alerts, read_records, tiny_batch, train
from tests.estimators.test_spike import pooled_reference, reference


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


def test_the_flight_record_series_equal_a_float64_recomputation_of_every_step(tmp_path):
    """grad/norm, grad/max and grad/kurtosis of every tensor at every step of a flight record, against NumPy
    (scipy's biased Fisher kurtosis) on the gradients captured at those steps; a tensor without a gradient at a
    step (fc2.bias, frozen for one step) reads null norm and kurtosis, and 0 max."""
    from scipy.stats import kurtosis

    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    grads = {}

    def keep(step, model):
        if step == 55:
            model.fc2.bias.grad = None
        grads[step + 1] = {
            n: None if p.grad is None else p.grad.double().numpy().ravel() for n, p in model.named_parameters()
        }

    with ht.Monitor(model, opt, every=50, log_dir=tmp_path, spike_warmup=20, flight_steps=8) as mon:
        _train(model, opt, mon, steps=70, loss_scale={59: 5.0}, grad_hook=keep)
    record = next(a for a in read_alerts(tmp_path) if a["rule"] == "loss_spike")
    flight = json.loads((tmp_path / record["flight_record"]).read_text())
    assert len(flight["steps"]) == 8 and 56 in flight["steps"]
    series = flight["series"]
    for k, step in enumerate(flight["steps"]):
        for i, name in enumerate(flight["layers"]):
            g = grads[step][name]
            norm, top, kurt = (series[key][k][i] for key in ("grad/norm", "grad/max", "grad/kurtosis"))
            if g is None:
                assert (norm, top, kurt) == (None, 0.0, None)
                continue
            assert norm == pytest.approx(np.sqrt((g * g).sum()), rel=1e-6)
            assert top == pytest.approx(np.abs(g).max(), rel=1e-6)
            want = kurtosis(g, fisher=True, bias=True)  # NaN for one entry: JSON null
            assert kurt is None if np.isnan(want) else kurt == pytest.approx(want, rel=1e-5, abs=1e-6)


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
    assert len(flight["series"]["grad/norm"]) == len(flight["steps"]) == len(flight["series"]["loss"])
    # The flight record holds the loss the alert reports, at the alert's step.
    assert flight["series"]["loss"][flight["steps"].index(60)] == pytest.approx(record["value"], rel=1e-6)
    for alert in (record, grad_alerts[0]):
        assert_states_observed_expected_threshold(alert)
        # A 5x jump over a smooth curve: far over the threshold, which sits over the forecast.
        assert alert["value"] > 4 * alert["expected"] and alert["expected"] < alert["value_threshold"] < alert["value"]
        # The threshold is calibrated to the false-alarm rate (a z-score of a few on this nearly noise-free curve).
        assert alert["z"] > alert["z_threshold"] == alert["threshold"] and 0 < alert["threshold"] < alert["z"] / 100


def assert_states_observed_expected_threshold(alert):
    """The message states the record's observed value, expected value and threshold, as the record has them."""
    for word, key in (("observed", "value"), ("expected", "expected"), ("threshold", "value_threshold")):
        number = re.escape(f"{alert[key]:.4g}")
        assert re.search(rf"\b{word} (at least |at most )?{number}\b", alert["message"]), (word, alert["message"])


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
    assert alerts[0]["value"] == 3 and alerts[0]["expected"] == 0 and alerts[0]["value_threshold"] == 0
    assert alerts[0]["step"] == 5
    assert_states_observed_expected_threshold(alerts[0])


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
    # One coordinate of fc1.weight's 4096 is over the ratio; healthy is none (hidden_spike_frac = 0).
    assert alerts[0]["value"] == pytest.approx(1 / 4096) and alerts[0]["expected"] == alerts[0]["threshold"] == 0
    assert alerts[0]["ratio_max"] > 1000
    assert_states_observed_expected_threshold(alerts[0])


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
    alert = alerts[0]
    assert alert["value"] < 2 and alert["layer"] == "weight"
    record = next(r for r in read_records(tmp_path) if r["step"] == 1)["metrics"]
    assert alert["value"] == record["grad/hill_alpha/weight"] and alert["se"] == record["grad/hill_alpha_se/weight"]
    assert alert["expected"] == alert["threshold"] == 2.0
    assert alert["value_threshold"] == pytest.approx(2.0 - 2.0 * alert["se"])  # fires under 2 by two errors
    assert alert["value"] < alert["value_threshold"] < 2.0
    assert_states_observed_expected_threshold(alert)


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


# ----------------------------------------------------------------------------- expected values


def test_expected_value_is_the_detectors_forecast(tmp_path):
    # A loss series the test controls, recomputed by the float64 reference loop of the detector.
    rng = np.random.default_rng(3)
    t = np.arange(80)
    losses = ((2.0 + 3.0 * (1 + t / 30) ** -0.7) * np.exp(0.01 * rng.standard_normal(80))).astype(np.float32)
    losses[60] *= 2.5
    model = nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with ht.Monitor(model, opt, every=100, log_dir=tmp_path, spike_warmup=30, alerts=("loss_spike",)) as mon:
        for value in losses:
            for p in model.parameters():
                p.grad = torch.ones_like(p)
            mon.observe_loss(torch.tensor(value))
            opt.step()
    (alert,) = read_alerts(tmp_path)
    assert alert["step"] == 61 and alert["value"] == losses[60]
    config = spike.SpikeConfig(warmup=30)
    bands = []
    ref_flags, ref_scores = reference(losses.astype(np.float64), config, bands=bands)
    assert np.flatnonzero(ref_flags).tolist() == [60]
    baseline, _, _ = bands[60]
    assert alert["expected"] == pytest.approx(baseline, rel=1e-5)
    assert alert["z"] == pytest.approx(ref_scores[60], rel=1e-4)
    # The threshold is calibrated from the scores before the last refit (every REFIT_EVERY steps: step 56, so
    # steps 10..55; both tails, one pooled shape), recomputed in float64 by the textbook peaks-over-threshold fit;
    # the value over which the step flags follows from it.
    refit = 60 // spike.REFIT_EVERY * spike.REFIT_EVERY
    tail = ref_scores[spike.TAIL_START : refit]
    fit = [pooled_reference(tail, -tail, 1e-4)]
    assert alert["z_threshold"] == alert["threshold"] == pytest.approx(max(fit), rel=1e-4)
    sigma = math.log(losses[60] / baseline) / ref_scores[60]
    upper = max(baseline * math.exp(alert["z_threshold"] * sigma), 1.1 * baseline)
    assert alert["value_threshold"] == pytest.approx(upper, rel=1e-4)


# ----------------------------------------------------------------------------- the flag vector


def test_flag_vector_round_trip():
    gen = torch.Generator().manual_seed(0)
    layers = 3
    detector = spike.SpikeState(
        count=torch.tensor([0, 5, 100, 7, 20_000]),
        level=torch.randn(5, generator=gen),
        trend=torch.randn(5, generator=gen) * 0.01,
        scale=torch.rand(5, generator=gen),
        log_domain=torch.tensor([True, False, True, True, False]),
    )
    step = StepFlags(
        flags=torch.tensor([True, False, True, False, False]),
        scores=torch.randn(5, generator=gen),
        values=torch.rand(5, generator=gen),
        thresholds=torch.tensor([math.inf, 3.5, 17.0, 9.25, 12.0]),
        drift=torch.tensor([True, False, False, False, False]),
        detector=detector,
        nonfinite=torch.tensor([0, 3, 0]),
        spike_frac=torch.rand(3, generator=gen),
        ratio_max=torch.tensor([1.5, math.nan, 2.0]),
    )
    packed = pack_step_flags(step)
    assert packed.dtype == torch.float32 and packed.shape == (flag_vector_size(layers),) == (10 * 5 + 3 * 3,)
    back = unpack_step_flags(packed.numpy(), layers)
    for name in ("flags", "scores", "values", "thresholds", "drift", "nonfinite", "spike_frac", "ratio_max"):
        np.testing.assert_array_equal(getattr(back, name), getattr(step, name).to(torch.float32).numpy())
    for name, value in detector._asdict().items():
        assert torch.equal(getattr(back.detector, name), value), name
    # The forecast read on the host is the forecast of the state the device packed.
    assert torch.equal(spike.compute(back.detector).upper, spike.compute(detector).upper)
    with pytest.raises(ValueError, match="do not fit 4 layers"):
        pack_step_flags(step._replace(nonfinite=torch.zeros(4)))
    with pytest.raises(ValueError, match="59 values for 3 layers"):
        unpack_step_flags(packed.numpy()[:-1], layers)


# ----------------------------------------------------------------------------- one event, one alert


def _engine(cooldown=50):
    alerts = []
    config = types.SimpleNamespace(
        alerts=("loss_spike", "grad_spike"),
        alert_cooldown=cooldown,
        tail_alpha_threshold=2.0,
        hidden_spike_frac=0.0,
        spike_threshold=5000.0,
    )
    return AlertEngine(config, log_dir=".", emit=alerts.append), alerts


def _step_flags(scores, threshold=18.0):
    """A step's flag vector for streams (loss, global, a, b, c) with these z-scores; every norm forecast at 1."""
    scores = torch.tensor(scores, dtype=torch.float32)
    state = spike.init(5)._replace(count=torch.full((5,), 500), scale=torch.full((5,), 0.01))
    return pack_step_flags(
        StepFlags(
            flags=scores > threshold,
            scores=scores,
            values=torch.exp(scores * 0.01 * math.sqrt(math.pi / 2)),
            thresholds=torch.full((5,), threshold),
            drift=torch.zeros(5, dtype=torch.bool),
            detector=state,
            nonfinite=torch.zeros(3),
            spike_frac=torch.zeros(3),
            ratio_max=torch.zeros(3),
        )
    ).numpy()


def test_streams_that_rise_into_an_open_event_join_it_and_jumps_alert():
    engine, alerts = _engine()
    names, config = ["a", "b", "c"], spike.SpikeConfig()
    history = {
        9: [0, 14, 16, 0, 0],  # a drift: layer a and the global norm rise towards the threshold
        10: [0, 16, 19, 0, 0],  # a flags: an alert
        11: [0, 19, 20, 0, 0],  # the global norm follows (over 9 at steps 9 and 10): the same event
        12: [0, 10, 19, 25, 0],  # b jumps from 0 to 25 while the event is open: a new spike, an alert
        13: [0, 0, 19, 0, 0],
        14: [0, 0, 0, 0, 15],  # c's spike scores just under the threshold on its first step...
        15: [0, 0, 0, 0, 19],  # ... and flags on its second: one step over half the threshold is no rise
        # Quiet from 16 to 65: the event closes 50 steps after its last flag.
        66: [0, 20, 0, 0, 0],  # the global norm jumps: an alert
    }
    for step in range(9, 70):
        engine.process_step_flags(step, _step_flags(history.get(step, [0] * 5)), names, config)
    assert [(a["step"], a["metric"], a["layers"]) for a in alerts] == [
        (10, "grad/norm/a", ["a"]),
        (12, "grad/norm/b", ["b"]),
        (15, "grad/norm/c", ["c"]),
        (66, "grad/norm", ["global"]),
    ]
    assert alerts[0]["expected"] == pytest.approx(1.0) and alerts[0]["value_threshold"] == pytest.approx(
        math.exp(18 * 0.01 * math.sqrt(math.pi / 2)), rel=1e-5
    )

    # A restart between 10 and 11 keeps the previous steps' scores: the global norm still joins the event.
    engine, alerts = _engine()
    for step in (9, 10):
        engine.process_step_flags(step, _step_flags(history[step]), names, config)
    resumed, alerts_after = _engine()
    resumed.load_state_dict(json.loads(json.dumps(engine.state_dict())))
    resumed.process_step_flags(11, _step_flags(history[11]), names, config)
    assert len(alerts) == 1 and alerts_after == []


def test_a_smooth_drift_is_one_alert_and_a_later_spike_still_alerts(tmp_path):
    # One layer's gradient norm rises smoothly by 18% over 30 steps (0.0094 -> 0.0111, the reported case),
    # its bias with it, so the layer and the global norm cross the threshold a few steps apart; the loss is flat.
    # Fifteen steps after the drift, another layer's norm jumps 3x for one step: a spike of its own.
    rng = np.random.default_rng(0)
    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 32))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    params = list(model.parameters())
    base = [0.0094, 0.003, 0.001, 0.001, 0.001, 0.001]
    directions = [torch.randn(p.shape, generator=gen) for p in params]
    start, length, jump = 155, 30, 200
    # The fixed z = 18 rule (spike_z): this drift crosses it, while the calibrated rule leaves a layer's slow rise
    # to the loss's slow-divergence rule; what is tested here is how the engine groups the flags into events.
    with ht.Monitor(model, opt, every=100, log_dir=tmp_path, spike_z=18.0) as mon:
        for step in range(260):
            drift = (0.0111 / 0.0094) ** (min(max(step - start, 0), length) / length)
            for i, (p, d) in enumerate(zip(params, directions)):
                norm = base[i] * (drift if i < 2 else 1.0) * math.exp(0.002 * rng.standard_normal())
                norm *= 3.0 if (i == 4 and step == jump) else 1.0
                g = d + 0.05 * torch.randn(p.shape, generator=gen)
                p.grad = g * (norm / g.norm())
            mon.observe_loss(torch.tensor(2.0 * math.exp(0.01 * rng.standard_normal())))
            opt.step()
    alerts = read_alerts(tmp_path)
    drift_alerts = [a for a in alerts if a["step"] <= jump]
    assert len(drift_alerts) == 1, [(a["step"], a["metric"]) for a in alerts]
    assert drift_alerts[0]["rule"] == "grad_spike" and start < drift_alerts[0]["step"] <= start + length
    assert set(drift_alerts[0]["layers"]) <= {"global", "0.weight", "0.bias"}
    assert_states_observed_expected_threshold(drift_alerts[0])
    assert [(a["rule"], a["step"], a["layer"]) for a in alerts[1:]] == [("grad_spike", jump + 1, "2.weight")]
    assert alerts[1]["value"] == pytest.approx(3 * alerts[1]["expected"], rel=0.02)


def test_the_per_step_flag_vector_is_what_the_readme_says(tmp_path, tiny_model):
    # README, Cost: "one small flag vector per step (13 floats per tensor plus 20)", queued by the step path.
    opt = torch.optim.AdamW(tiny_model.parameters(), lr=1e-3)
    with ht.Monitor(tiny_model, opt, every=100, log_dir=tmp_path) as mon:
        train(tiny_model, opt, mon, steps=1)
        (packed, _, _) = mon.families["spikes"].pending[0]
        assert packed.shape == (13 * len(mon.names) + 20,) == (flag_vector_size(len(mon.names)),)
        assert packed.dtype == torch.float32


# ----------------------------------------------------------------------------- calibrated to a false-alarm rate


def _replay(tmp_path, name, losses, **kwargs):
    """Replay a loss trace through ``Monitor.observe_loss`` (no optimizer: ``step()``); the loss alerts' steps."""
    with ht.Monitor(nn.Linear(1, 1), log_dir=tmp_path / name, every=10_000, alerts=("loss_spike",), **kwargs) as mon:
        for value in losses:
            mon.observe_loss(float(value))
            mon.step()
    return [a["step"] for a in read_alerts(tmp_path / name)]


@pytest.mark.parametrize("df, level", [(3.0, 0.02), (None, 0.05)])
def test_calibrated_loss_alerts_match_the_detector_that_knows_the_curve(tmp_path, df, level):
    # Issue 14's traces: a decaying loss, multiplicative log-noise of standard deviation `level` (Student-t(3)
    # scaled to it, or Gaussian), 12 one-step spikes x1.5 to x5 after step 300. The fixed z = 18 rule caught 80%
    # of them under 2% t(3) noise and 70% under 5% Gaussian noise. The detector that knows the true curve flags
    # log(loss / curve) over the threshold that lets one healthy step through: it catches them all, and so must
    # the calibrated rule, with at most one false alert.
    rng = np.random.default_rng(40)
    steps = 2500
    t = np.arange(steps)
    curve = 2.0 + 6.0 * (1.0 + t / 300.0) ** -0.6
    eps = rng.standard_normal(steps) if df is None else rng.standard_t(df, steps) / math.sqrt(df / (df - 2))
    losses = curve * np.exp(level * eps)
    at = 300 + 180 * np.arange(12) + rng.integers(0, 60, 12)
    losses[at] *= np.exp(rng.uniform(math.log(1.5), math.log(5.0), 12))
    alerts = _replay(tmp_path, "calibrated", losses)
    caught = [s + 1 in alerts or s + 2 in alerts for s in at]  # alert steps count completed steps
    false = [a for a in alerts if a - 1 not in at and a - 2 not in at]
    healthy = np.log(losses / curve)
    healthy[at] = -np.inf
    oracle_threshold = np.sort(healthy[50:])[-2]
    oracle = [np.log(losses[s] / curve[s]) > oracle_threshold for s in at]
    assert np.mean(oracle) == 1.0
    # The shape prior (0.5, worth the excesses seen and at least 128) keeps the thresholds of the first ~500 steps
    # high: under 5% Gaussian noise the spikes at steps 311 and 503 (x1.5-x2) are missed there; every later one is
    # caught. Under 2% t(3) noise one healthy step alerts (step 776).
    late = at > 600
    assert all(np.array(caught)[late]) and np.mean(caught) >= 10 / 12 and len(false) <= 1, (at.tolist(), alerts)


def test_a_slow_divergence_of_the_loss_is_one_alert_that_says_why(tmp_path):
    # A decaying loss under 1% Student-t(3) noise ramps to x1.5 over 50 steps from step 800: no step is a spike, the
    # drift rule flags it before it is half done, and the alert says what fired: the CUSUM, and the last two values
    # over the 10% gate.
    rng = np.random.default_rng(41)
    t = np.arange(1000)
    losses = (2.0 + 6.0 * (1.0 + t / 300.0) ** -0.6) * np.exp(0.01 * rng.standard_t(3.0, 1000) / math.sqrt(3.0))
    losses *= np.exp(np.clip((t - 800 + 1) / 50, 0.0, 1.0) * math.log(1.5))
    _replay(tmp_path, "ramp", losses)
    (alert,) = read_alerts(tmp_path / "ramp")
    assert 800 < alert["step"] <= 800 + 25 and alert["drift"] == 1.0 and alert["rule"] == "loss_spike"
    assert "slow divergence" in alert["message"]
    assert "this value and the previous one are both 10% over the forecast where the rise began" in alert["message"]
