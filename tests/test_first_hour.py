"""What a newcomer trips over: no silent loss of records, run directories never mixed, headline ratios warm."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import heavytail as ht
from tests.conftest import TinyNet, read_records, tiny_batch, train

ROOT = Path(__file__).resolve().parents[1]


def _step(model, opt=None, step=0):
    idx, y = tiny_batch(step)
    loss = torch.nn.functional.mse_loss(model(idx), y)
    loss.backward()
    if opt is not None:
        opt.step()
        opt.zero_grad(set_to_none=True)
    return loss


# ---------------------------------------------------------------------------------------------- no optimizer step


def test_backward_passes_without_a_counted_step_warn_at_close(tmp_path, tiny_model):
    # The optimizer was built after the monitor and not passed: nothing can be recorded, and the user is told.
    mon = ht.Monitor(tiny_model, every=10, log_dir=tmp_path)
    opt = torch.optim.AdamW(tiny_model.parameters(), lr=1e-3)
    for step in range(30):
        _step(tiny_model, opt, step)
    with pytest.warns(
        RuntimeWarning,
        match=r"30 backward passes and no optimizer step counted in this run; the "
        r"monitor was built without an optimizer: pass it",
    ):
        mon.close()
    assert mon.step_count == 0
    assert read_records(tmp_path) == []


def test_an_optimizer_that_never_steps_warns_during_the_run(tmp_path, tiny_model, monkeypatch):
    monkeypatch.setattr("heavytail.monitor._NO_STEP_BACKWARDS", 5)
    watched = torch.optim.AdamW(tiny_model.parameters(), lr=1e-3)
    stepped = torch.optim.AdamW(tiny_model.parameters(), lr=1e-3)  # the one the loop really steps
    with ht.Monitor(tiny_model, watched, every=2, log_dir=tmp_path) as mon:
        with pytest.warns(
            RuntimeWarning,
            match=r"5 backward passes and no optimizer step counted since the last "
            r"one; the optimizer given to the monitor never stepped",
        ):
            for step in range(5):
                _step(tiny_model, stepped, step)
        assert mon.step_count == 0


def test_a_counted_step_resets_the_count_and_nothing_is_warned(tmp_path, tiny_model, recwarn):
    opt = torch.optim.AdamW(tiny_model.parameters(), lr=1e-3)
    with ht.Monitor(tiny_model, opt, every=5, log_dir=tmp_path) as mon:
        train(tiny_model, opt, mon, steps=10)
    assert not [w for w in recwarn if "no optimizer step" in str(w.message)]
    assert [r["step"] for r in read_records(tmp_path)] == [5, 10]


# ---------------------------------------------------------------------------------------------- observe_loss


def test_observe_loss_refuses_a_per_sample_loss_vector(tmp_path, tiny_model):
    with ht.Monitor(tiny_model, log_dir=tmp_path) as mon:
        with pytest.raises(
            ValueError,
            match=r"expected the scalar loss .* got a tensor of shape \(16,\); pass the "
            r"loss you back-propagate, e\.g\. loss\.mean\(\)",
        ):
            mon.observe_loss(torch.rand(16))
        mon.observe_loss(torch.tensor([0.5]))  # one element, any shape: accepted


def test_observe_loss_takes_a_one_element_tensor_whole(tmp_path, tiny_model):
    opt = torch.optim.SGD(tiny_model.parameters(), lr=0.0)
    with ht.Monitor(tiny_model, opt, every=2, log_dir=tmp_path) as mon:
        for step, value in enumerate((1.5, 2.5)):
            _step(tiny_model, None, step)
            mon.observe_loss(torch.tensor([[value]]))
            opt.step()
            opt.zero_grad()
    assert read_records(tmp_path)[0]["metrics"]["loss"] == pytest.approx(2.0)


# ---------------------------------------------------------------------------------------------- close() forgotten


def test_the_last_partial_interval_is_written_at_exit_without_close(tmp_path):
    script = textwrap.dedent(f"""
        import torch, heavytail as ht
        from tests.conftest import TinyNet, train
        torch.manual_seed(0)
        model = TinyNet()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        mon = ht.Monitor(model, opt, log_dir={str(tmp_path / "run")!r})  # every=100, never closed
        train(model, opt, mon, steps=7)
    """)
    subprocess.run([sys.executable, "-c", script], check=True, cwd=ROOT)
    records = read_records(tmp_path / "run")
    assert [r["step"] for r in records] == [7]
    assert records[0]["metrics"]["steps"] == 7
    meta = json.loads((tmp_path / "run" / "meta.json").read_text())
    assert meta["final_step"] == 7 and meta["finished"] >= meta["started"]


def test_a_closed_run_is_marked_finished_and_a_running_one_is_not(tmp_path, tiny_model):
    opt = torch.optim.AdamW(tiny_model.parameters(), lr=1e-3)
    mon = ht.Monitor(tiny_model, opt, every=2, log_dir=tmp_path)
    train(tiny_model, opt, mon, steps=3)
    assert "finished" not in json.loads((tmp_path / "meta.json").read_text())
    mon.close()
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["final_step"] == 3


# ---------------------------------------------------------------------------------------------- reused log_dir


def _run(log_dir, steps, start=0, **kwargs):
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with ht.Monitor(model, opt, every=10, log_dir=log_dir, **kwargs) as mon:
        train(model, opt, mon, steps=steps, start=start)
    return mon


def test_a_log_dir_holding_a_run_is_refused_and_left_untouched(tmp_path):
    _run(tmp_path, 30)
    before = (tmp_path / "metrics.jsonl").read_bytes(), (tmp_path / "meta.json").read_bytes()
    with pytest.raises(
        FileExistsError,
        match=r"already holds a previous run \(3 records up to step 30\); pass "
        r"resume=True to continue it, overwrite=True to replace it",
    ):
        _run(tmp_path, 20)
    assert ((tmp_path / "metrics.jsonl").read_bytes(), (tmp_path / "meta.json").read_bytes()) == before


def test_resume_continues_the_step_count_and_keeps_the_records(tmp_path):
    _run(tmp_path, 30)
    mon = _run(tmp_path, 20, start=30, resume=True)
    assert mon.step_count == 50
    assert [r["step"] for r in read_records(tmp_path)] == [10, 20, 30, 40, 50]
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert [r["step"] for r in meta["resumed"]] == [30]
    assert meta["final_step"] == 50


def test_overwrite_replaces_the_run_and_keeps_other_files(tmp_path):
    _run(tmp_path, 30)
    (tmp_path / "flight").mkdir(exist_ok=True)
    (tmp_path / "flight" / "old.json").write_text("{}")
    (tmp_path / "trainer_state.json").write_text("{}")  # a trainer's own file in the same directory
    _run(tmp_path, 20, overwrite=True)
    assert [r["step"] for r in read_records(tmp_path)] == [10, 20]
    assert not (tmp_path / "flight" / "old.json").exists()
    assert (tmp_path / "trainer_state.json").read_text() == "{}"


def test_an_empty_or_foreign_directory_is_a_new_run(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    _run(tmp_path, 10)
    assert [r["step"] for r in read_records(tmp_path)] == [10]


def test_resume_and_overwrite_together_are_refused():
    with pytest.raises(ValueError, match=r"MonitorConfig\.resume and MonitorConfig\.overwrite: choose one"):
        ht.MonitorConfig(resume=True, overwrite=True)


# ---------------------------------------------------------------------------------------------- ratio warm-up


def test_denominator_ratios_count_only_after_the_warmup(tmp_path, tiny_model):
    opt = torch.optim.AdamW(tiny_model.parameters(), lr=1e-3, betas=(0.9, 0.99))
    p = tiny_model.fc1.weight
    expected = []

    def hook(o, args, kwargs):
        state = o.state.get(p)
        if not state:
            expected.append(None)
            return
        t = float(state["step"])
        v = state["exp_avg_sq"].double() / (1 - 0.99**t)
        r = p.grad.double().abs() / (v.sqrt() + 1e-8)
        expected.append((t, float(torch.where(state["exp_avg_sq"] > 0, r, 0.0).max())))

    opt.register_step_pre_hook(hook)
    with ht.Monitor(tiny_model, opt, every=1, log_dir=tmp_path, ratio_warmup=4) as mon:
        train(tiny_model, opt, mon, steps=7)
    got = [r["metrics"]["adam/ratio_max/fc1.weight"] for r in read_records(tmp_path)]
    # Step t sees a denominator of t - 1 gradients: steps 1-4 are warm-up (null), 5-7 the AdamW state's ratio.
    assert got[:4] == [None] * 4
    assert [e[0] for e in expected[4:]] == [4.0, 5.0, 6.0]
    assert got[4:] == pytest.approx([e[1] for e in expected[4:]], rel=1e-9)


def test_the_default_warmup_hides_the_first_steps_ratios(tmp_path, tiny_model):
    # Without the warm-up the first interval's largest ratio is set at steps 2-4 and reads hundreds or more.
    runs = {}
    for warmup in (0, 10):
        torch.manual_seed(0)
        model = TinyNet()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        with ht.Monitor(model, opt, every=20, log_dir=tmp_path / str(warmup), ratio_warmup=warmup) as mon:
            train(model, opt, mon, steps=20)
        runs[warmup] = read_records(tmp_path / str(warmup))[0]["metrics"]
    assert runs[0]["adam/ratio_max/fc1.weight"] > 100
    assert runs[10]["adam/ratio_max/fc1.weight"] < runs[0]["adam/ratio_max/fc1.weight"] / 10
