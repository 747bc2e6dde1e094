"""Resuming from a checkpoint restores the monitor: same detector state, no re-warm, the step counter goes on."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import heavytail as ht
from tests.conftest import read_alerts, read_records
from tests.reliability import one_intra_op_thread, same_metrics  # noqa: F401 (autouse fixture)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1))


def _train(model, opt, mon, start: int, steps: int, spike_at: int | None = None) -> None:
    for step in range(start, start + steps):
        gen = torch.Generator().manual_seed(step)
        x, y = torch.randn(16, 6, generator=gen), torch.randn(16, 1, generator=gen)
        if step == spike_at:
            y = y * 300  # a bad batch: the loss and the gradients jump
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        if mon is not None:
            mon.observe_loss(loss)
        opt.step()
        opt.zero_grad(set_to_none=True)


def _checkpoint(tmp_path, steps: int, **kwargs):
    """Train ``steps`` steps under a monitor; save model, optimizer and monitor state as a training script would."""
    model = _net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    mon = ht.Monitor(model, opt, log_dir=tmp_path / "before", **kwargs)
    _train(model, opt, mon, 0, steps)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "monitor": mon.state_dict()}, path)
    mon.close()
    return path, mon


def _resume(tmp_path, path, name: str, restore: bool = True, **kwargs):
    state = torch.load(path, weights_only=True)  # plain data only: no pickled objects in the checkpoint
    model = _net()
    model.load_state_dict(state["model"])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt.load_state_dict(state["opt"])
    mon = ht.Monitor(model, opt, log_dir=tmp_path / name, **kwargs)
    if restore:
        mon.load_state_dict(state["monitor"])
    return model, opt, mon


def _walk(obj, path="state"):
    """Yield (path, leaf) for every leaf of a nested state."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            assert isinstance(key, str), f"{path}: key {key!r} is not a string"
            yield from _walk(value, f"{path}[{key!r}]")
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            yield from _walk(value, f"{path}[{i}]")
    else:
        yield path, obj


def test_state_dict_holds_only_tensors_numbers_strings_lists_and_dicts(tmp_path):
    _, mon = _checkpoint(tmp_path, steps=12, every=5)
    leaves = list(_walk(mon.state_dict()))
    assert leaves
    for path, leaf in leaves:
        # None appears for "never": a detector stream that has not flagged yet.
        assert leaf is None or isinstance(leaf, (torch.Tensor, bool, int, float, str)), (path, type(leaf))
        if isinstance(leaf, torch.Tensor):
            assert leaf.device.type == "cpu" and not leaf.requires_grad, path


def test_round_trip_through_torch_save_gives_the_same_state(tmp_path):
    path, _ = _checkpoint(tmp_path, steps=23, every=5)  # mid-interval: accumulators hold steps 21 to 23
    saved = torch.load(path, weights_only=True)["monitor"]
    _, _, resumed = _resume(tmp_path, path, "after", every=5)
    restored = resumed.state_dict()
    assert resumed.step_count == 23
    flat_saved, flat_restored = dict(_walk(saved)), dict(_walk(restored))
    assert flat_saved.keys() == flat_restored.keys()
    for key, value in flat_saved.items():
        other = flat_restored[key]
        if isinstance(value, torch.Tensor):
            assert value.dtype == other.dtype and torch.equal(value.nan_to_num(7.0), other.nan_to_num(7.0)), key
            assert torch.equal(value.isnan(), other.isnan()), key
        else:
            assert value == other, key
    resumed.close()


def test_resuming_mid_interval_is_indistinguishable_from_not_stopping(tmp_path):
    """Stop at step 17 (between checkpoints at 14 and 21), resume: records and alerts equal an unbroken run's."""
    model = _net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with ht.Monitor(model, opt, every=7, log_dir=tmp_path / "unbroken", spike_warmup=5) as mon:
        _train(model, opt, mon, 0, 35, spike_at=24)
    unbroken = read_records(tmp_path / "unbroken")

    path, _ = _checkpoint(tmp_path, steps=17, every=7, spike_warmup=5)
    model, opt, mon = _resume(tmp_path, path, "after", every=7, spike_warmup=5)
    _train(model, opt, mon, 17, 18, spike_at=24)
    mon.close()
    pieces = read_records(tmp_path / "before") + read_records(tmp_path / "after")
    # The first run's close() flushed a partial record at 17; the resumed run then completes that interval.
    pieces = [r for r in pieces if r["step"] != 17]
    assert [r["step"] for r in pieces] == [r["step"] for r in unbroken] == [7, 14, 21, 28, 35]
    for got, want in zip(pieces, unbroken):
        same_metrics(got["metrics"], want["metrics"], rel=1e-12)
    alerts = read_alerts(tmp_path / "after")
    want_alerts = [a for a in read_alerts(tmp_path / "unbroken") if a["step"] > 17]
    assert [(a["step"], a["rule"], a["layer"]) for a in alerts] == [
        (a["step"], a["rule"], a["layer"]) for a in want_alerts
    ]
    assert any(a["rule"] == "loss_spike" and a["step"] == 25 for a in alerts)


def test_resumed_run_raises_no_false_alert_and_stays_warm(tmp_path):
    """200 healthy steps after a resume: no alert. A real spike 20 steps in: the restored monitor sees it; one that
    was not restored is still re-warming (its detectors need 100 values) and misses it, and it counts steps
    from 0 again, so its records would claim the wrong steps."""
    path, _ = _checkpoint(tmp_path, steps=120, every=50)

    model, opt, mon = _resume(tmp_path, path, "healthy", every=50)
    _train(model, opt, mon, 120, 200)
    mon.close()
    assert read_alerts(tmp_path / "healthy") == []
    assert [r["step"] for r in read_records(tmp_path / "healthy")] == [150, 200, 250, 300, 320]

    found = {}
    for restore in (True, False):
        model, opt, mon = _resume(tmp_path, path, f"spike_{restore}", restore=restore, every=50)
        _train(model, opt, mon, 120, 25, spike_at=140)
        mon.close()
        found[restore] = {(a["step"], a["rule"]) for a in read_alerts(tmp_path / f"spike_{restore}")}
        steps = [r["step"] for r in read_records(tmp_path / f"spike_{restore}")]
        assert steps == ([145] if restore else [25])
    assert (141, "loss_spike") in found[True]
    assert not any(rule in ("loss_spike", "grad_spike") for _, rule in found[False])


def test_loading_a_state_from_another_model_is_refused(tmp_path):
    path, _ = _checkpoint(tmp_path, steps=3, every=5)
    state = torch.load(path, weights_only=True)["monitor"]
    other = nn.Sequential(nn.Linear(6, 3))
    with ht.Monitor(other, log_dir=tmp_path / "other") as mon:
        with pytest.raises(ValueError, match="watches different parameters"):
            mon.load_state_dict(state)
        with pytest.raises(ValueError, match="unsupported state version"):
            mon.load_state_dict({**state, "version": -1})
        assert mon.step_count == 0  # nothing was half loaded


def test_a_spike_state_of_the_previous_version_resumes_and_older_ones_are_refused(tmp_path):
    # Version 4 of the spikes state had no previous value for the drift rule: it loads, with NaN there (the next
    # step cannot flag a drift), and the detector goes on warm: the bad batch at step 140 alerts as from a v5 state.
    path, _ = _checkpoint(tmp_path, steps=120, every=50)
    state = torch.load(path, weights_only=True)["monitor"]
    old = {**state, "families": dict(state["families"])}
    spikes = state["families"]["spikes"]
    tensors = {k: v for k, v in spikes["tensors"].items() if k != "drift_previous"}
    old["families"]["spikes"] = {**spikes, "version": 4, "tensors": tensors}
    found = {}
    for name, saved in (("v5", state), ("v4", old)):
        model, opt, mon = _resume(tmp_path, path, name, restore=False, every=50)
        mon.load_state_dict(saved)
        if name == "v4":
            assert torch.isnan(mon.families["spikes"].state.drift_previous).all()
        _train(model, opt, mon, 120, 25, spike_at=140)
        mon.close()
        found[name] = {(a["step"], a["rule"]) for a in read_alerts(tmp_path / name)}
    assert (141, "loss_spike") in found["v4"] and found["v4"] == found["v5"]
    model, opt, mon = _resume(tmp_path, path, "v3", restore=False, every=50)
    with mon:
        old["families"]["spikes"] = {**spikes, "version": 3, "tensors": tensors}
        with pytest.raises(ValueError, match="no spikes state of version 5"):
            mon.load_state_dict(old)
