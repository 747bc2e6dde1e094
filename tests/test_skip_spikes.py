"""Monitor(..., skip_spikes=True): a loss or global-norm spike undoes the step's update, on the device, counted."""

from __future__ import annotations

import pytest
import torch

import heavytail as ht
from tests.conftest import TinyNet, read_alerts, read_records, tiny_batch
from tests.test_no_sync import TransferCounter


def _snapshot(model, opt):
    """Every parameter and every tensor of the optimizer state, cloned (the step counters included)."""
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    state = {
        (i, k): v.detach().clone() for i, s in enumerate(opt.state.values()) for k, v in s.items() if torch.is_tensor(v)
    }
    return params, state


def _run(tmp_path, name, steps, spike_at=(), skip=True, **kwargs):
    """AdamW on TinyNet; at the steps in ``spike_at`` the batch's targets are scaled by 30 (a bad batch).
    Returns the model, optimizer, monitor (closed) and a snapshot before and after each spiking step."""
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    around = {}
    with ht.Monitor(model, opt, every=50, log_dir=tmp_path / name, skip_spikes=skip, **kwargs) as mon:
        for step in range(steps):
            idx, y = tiny_batch(step)
            if step in spike_at:
                y = y * 30.0
            loss = torch.nn.functional.mse_loss(model(idx), y)
            loss.backward()
            mon.observe_loss(loss)
            if step in spike_at:
                before = _snapshot(model, opt)
            opt.step()
            if step in spike_at:
                around[step] = (before, _snapshot(model, opt))
            opt.zero_grad(set_to_none=True)
    return model, opt, mon, around


def test_a_spike_after_warm_up_is_skipped_exactly_and_counted(tmp_path):
    model, opt, _, around = _run(tmp_path, "skip", 100, spike_at=(70,))
    (before_params, before_state), (after_params, after_state) = around[70]
    for name, value in before_params.items():
        assert torch.equal(after_params[name], value), name  # the update was undone exactly
    for key, value in before_state.items():
        if value.dim() > 0:  # the moments are restored; the step counter (a 0-d CPU tensor) still advances
            assert torch.equal(after_state[key], value), key
    assert any(after_state[k].item() == before_state[k].item() + 1 for k in before_state if before_state[k].dim() == 0)
    records = read_records(tmp_path / "skip")
    assert [r["metrics"]["spikes/skipped_steps"] for r in records] == [0.0, 1.0]
    spikes = [a for a in read_alerts(tmp_path / "skip") if a["rule"] in ("loss_spike", "grad_spike")]
    assert spikes and all(a["step"] == 71 and a["skipped_step"] == 1.0 for a in spikes)
    assert "the step's update was skipped" in spikes[0]["message"]

    # The same run without skip_spikes: the bad batch moves the parameters, and no record has the key.
    _, _, _, around = _run(tmp_path, "noskip", 100, spike_at=(70,), skip=False)
    (before_params, _), (after_params, _) = around[70]
    assert any(not torch.equal(after_params[n], v) for n, v in before_params.items())
    assert all("spikes/skipped_steps" not in r["metrics"] for r in read_records(tmp_path / "noskip"))
    alerts = [a for a in read_alerts(tmp_path / "noskip") if a["rule"] == "loss_spike"]
    assert alerts and alerts[0]["skipped_step"] == 0.0


def test_steps_that_are_not_skipped_are_bit_for_bit_those_of_a_run_without_the_option(tmp_path):
    with_option, _, _, _ = _run(tmp_path, "on", 60)
    without, _, _, _ = _run(tmp_path, "off", 60, skip=False)
    for (name, a), (_, b) in zip(with_option.named_parameters(), without.named_parameters()):
        assert torch.equal(a, b), name
    assert [r["metrics"]["spikes/skipped_steps"] for r in read_records(tmp_path / "on")] == [0.0, 0.0]


def test_never_skips_during_warm_up(tmp_path):
    # A bad batch at step 10, inside the detectors' 50-step warm-up: not flagged, not skipped.
    _, _, _, around = _run(tmp_path, "early", 50, spike_at=(10,))
    (before_params, _), (after_params, _) = around[10]
    assert any(not torch.equal(after_params[n], v) for n, v in before_params.items())
    assert read_records(tmp_path / "early")[0]["metrics"]["spikes/skipped_steps"] == 0.0


def test_skipping_makes_no_host_transfer(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    mon = ht.Monitor(model, opt, every=1000, log_dir=tmp_path, skip_spikes=True)
    for step in range(70):
        idx, y = tiny_batch(step)
        if step == 60:
            counter = TransferCounter(monkeypatch)
        loss = torch.nn.functional.mse_loss(model(idx), y * (30.0 if step == 65 else 1.0))
        loss.backward()
        mon.observe_loss(loss)
        opt.step()
        opt.zero_grad(set_to_none=True)
    calls = list(counter.calls)
    monkeypatch.undo()
    skipped = mon._skip.count.clone()
    mon.close()
    assert skipped.item() == 1.0  # step 65 was skipped ...
    assert not [c for c in calls if not c.startswith("numpy from")], calls  # ... with no host read


def test_skip_spikes_needs_an_optimizer_and_one_process(tmp_path):
    with pytest.raises(ValueError, match="skip_spikes=True needs the optimizer"):
        ht.Monitor(TinyNet(), log_dir=tmp_path, skip_spikes=True)
    with pytest.raises(ValueError, match="skip_spikes must be True or False"):
        ht.Monitor(TinyNet(), log_dir=tmp_path, skip_spikes="yes")
