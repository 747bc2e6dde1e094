"""Gradient accumulation, AMP (bf16 autocast, fp16 GradScaler), clipping and torch.compile."""

from __future__ import annotations

import math

import pytest
import scipy.stats
import torch
from torch import nn

import heavytail as ht
from heavytail.estimators import cpu_pass
from tests.conftest import TinyNet, read_records, tiny_batch


def _loop(model, opt, mon, steps, micro=1, clip=None, scaler=None, autocast=None, poison_step=None):
    totals = []
    for step in range(steps):
        for i in range(micro):
            idx, y = tiny_batch(step * micro + i)
            with torch.autocast("cpu", dtype=autocast) if autocast else torch.autocast("cpu", enabled=False):
                loss = nn.functional.mse_loss(model(idx), y) / micro
            (scaler.scale(loss) if scaler else loss).backward()
            mon.observe_loss(loss * micro)
        if poison_step == step:
            model.fc1.weight.grad[0, 0] = float("inf")
        if clip is not None:
            if scaler:
                scaler.unscale_(opt)
            totals.append(float(nn.utils.clip_grad_norm_(model.parameters(), clip)))
        if scaler:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
    return totals


@pytest.mark.parametrize("micro", [1, 4])
def test_gradient_accumulation_counts_optimizer_steps_and_measures_microbatch_noise(tmp_path, micro):
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    seen = []
    opt.register_step_pre_hook(lambda o, a, k: seen.append(model.fc1.weight.grad.detach().clone()))
    with ht.Monitor(model, opt, every=3, log_dir=tmp_path) as mon:
        _loop(model, opt, mon, steps=6, micro=micro)
        assert mon.step_count == 6
    records = read_records(tmp_path)
    assert [r["step"] for r in records] == [3, 6]
    last = records[-1]["metrics"]
    # grad/ metrics see the accumulated gradient the optimizer consumes.
    rms = math.sqrt(sum(float((g.double() ** 2).sum()) for g in seen[3:]) / 3)
    assert last["grad/norm/fc1.weight"] == pytest.approx(rms, rel=1e-9)
    if micro == 1:
        assert "noise/microbatch_hill_alpha/fc1.weight" not in last
    else:
        # Micro-batch gradients around their step's median: a noise source from the second step on (its figures
        # against a NumPy recomputation: tests/test_noise_records.py).
        for figure in ("hill_alpha", "hill_alpha_se", "kurtosis", "tail_class", "active_frac"):
            assert f"noise/microbatch_{figure}/fc1.weight" in last


def test_bf16_autocast(tmp_path):
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    seen, losses = [], []
    opt.register_step_pre_hook(lambda o, a, k: seen.append(model.fc1.weight.grad.detach().clone()))
    with ht.Monitor(model, opt, every=4, log_dir=tmp_path) as mon:
        observe = mon.observe_loss

        def observe_and_keep(loss):
            losses.append(float(loss.detach()))
            observe(loss)

        mon.observe_loss = observe_and_keep
        _loop(model, opt, mon, steps=4, autocast=torch.bfloat16)
    m = read_records(tmp_path)[-1]["metrics"]
    # Under bf16 autocast the parameters and their gradients stay float32: the figures are those gradients'.
    assert all(g.dtype == torch.float32 for g in seen)
    pooled = torch.cat([g.double().reshape(-1) for g in seen]).numpy()
    assert m["grad/norm/fc1.weight"] == pytest.approx(math.sqrt(float((pooled**2).sum()) / 4), rel=1e-9)
    assert m["grad/kurtosis/fc1.weight"] == pytest.approx(float(scipy.stats.kurtosis(pooled)), rel=1e-6)
    assert m["loss"] == pytest.approx(sum(losses) / 4, rel=1e-6)


def test_clipping_reports_the_preclip_norm(tmp_path):
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    with ht.Monitor(model, opt, every=1, log_dir=tmp_path) as mon:
        totals = _loop(model, opt, mon, steps=3, clip=1e-3)
    for record, total in zip(read_records(tmp_path), totals):
        m = record["metrics"]
        assert m["grad/norm_preclip"] == pytest.approx(total, rel=1e-5)  # what clip_grad_norm_ returned
        assert m["grad/norm"] == pytest.approx(1e-3, rel=1e-3)  # what the optimizer consumed


def test_fp16_grad_scaler_unscales_and_skipped_steps_are_not_counted(tmp_path):
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    with ht.Monitor(model, opt, every=1, log_dir=tmp_path, scaler=scaler) as mon:
        _loop(model, opt, mon, steps=6, scaler=scaler, poison_step=2)
        assert mon.step_count == 5  # the scaler skipped the poisoned step: no optimizer update, not counted
        # GradScaler.unscale_ divides the gradients in place without bumping their version counters (its fused
        # kernel), so the gradients look untouched and the pre-clip norm is reused from the step pass: the
        # unscaled norm, the same number the end-of-backward measurement gives by dividing the scale out.
        assert mon.families["preclip"].mode.value == "reuse"
    records = read_records(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    for record in records:
        m = record["metrics"]
        # Measured at the end of backward on scaled gradients, divided by the scale on the device (steps 1-2),
        # then the step pass's own (steps 3-5).
        assert m["grad/norm_preclip"] == pytest.approx(m["grad/norm"], rel=1e-4)


def test_compiled_model_gives_the_same_records_as_eager(tmp_path):
    runs = {}
    for mode in ("eager", "compiled"):
        torch.manual_seed(0)
        model = TinyNet()
        opt = torch.optim.SGD(model.parameters(), lr=1e-2)
        net = torch.compile(model) if mode == "compiled" else model
        with ht.Monitor(net, opt, every=1, log_dir=tmp_path / mode) as mon:
            _loop(net, opt, mon, steps=3)
        runs[mode] = read_records(tmp_path / mode)
    for eager, compiled in zip(runs["eager"], runs["compiled"]):
        for key, value in eager["metrics"].items():
            if key.startswith(("grad/norm/", "grad/kurtosis/", "grad/max/")) and value is not None:
                assert compiled["metrics"][key] == pytest.approx(value, rel=1e-4), key
        assert set(compiled["metrics"]) == set(eager["metrics"])


def test_preclip_norm_stops_costing_a_read_when_nothing_changes_the_gradients(tmp_path, monkeypatch):
    """Without clipping the step sees the backward's own gradients, so the pre-clip norm is the step's norm and
    the end-of-backward read is skipped; clipping that starts later is detected and measured again."""
    reads = []
    foreach_norm = torch._foreach_norm
    monkeypatch.setattr(
        torch, "_foreach_norm", lambda tensors, *a, **k: reads.append(1) or foreach_norm(tensors, *a, **k)
    )
    sums_of_squares = cpu_pass.sums_of_squares  # the CPU kernel's form of the same read
    monkeypatch.setattr(cpu_pass, "sums_of_squares", lambda tensors: reads.append(1) or sums_of_squares(tensors))
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    totals = []
    with ht.Monitor(model, opt, every=1, log_dir=tmp_path):
        for step in range(10):
            idx, y = tiny_batch(step)
            nn.functional.mse_loss(model(idx), y).backward()
            if step == 6:
                assert reads, "the first backward passes measure the norm"
                assert not reads[3:], "the backward hook still reads every gradient"
                reads.clear()
            if step >= 6:
                totals.append(float(nn.utils.clip_grad_norm_(model.parameters(), 1e-3)))
            opt.step()
            opt.zero_grad(set_to_none=True)
    metrics = [r["metrics"] for r in read_records(tmp_path)]
    for m in metrics[:6]:
        assert m["grad/norm_preclip"] == pytest.approx(m["grad/norm"], rel=1e-6)
    # Step 7 is the first clipped one: its gradients changed after the backward pass that skipped the read, so its
    # pre-clip norm is unknown (null, not a wrong number); from then on it is measured at every backward.
    assert metrics[6]["grad/norm_preclip"] is None
    for m, total in zip(metrics[7:], totals[1:], strict=True):
        assert m["grad/norm_preclip"] == pytest.approx(total, rel=1e-5)
        assert m["grad/norm"] == pytest.approx(1e-3, rel=1e-3)
