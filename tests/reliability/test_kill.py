"""A run killed with SIGKILL mid-training leaves its run directory valid line by line, and can be resumed."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import heavytail as ht
from tests.conftest import TinyNet, train
from tests.reliability import one_intra_op_thread, read_lines  # noqa: F401 (autouse fixture)

REPO = Path(__file__).resolve().parents[2]


_TRAIN_SCRIPT = textwrap.dedent(
    """
    import os, sys
    import torch
    import heavytail as ht
    from tests.conftest import TinyNet, tiny_batch

    run, ckpt = sys.argv[1], sys.argv[2]
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    mon = ht.Monitor(model, opt, every=5, log_dir=run, alert_cooldown=0)
    for step in range(1_000_000):  # until killed
        idx, y = tiny_batch(step)
        loss = torch.nn.functional.mse_loss(model(idx), y)
        loss.backward()
        if step % 4 == 3:
            model.fc2.weight.grad[0, 0] = float("nan")  # alerts flow too
        mon.observe_loss(loss)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if mon.step_count % 10 == 0:  # the training checkpoint, written atomically, with the monitor's state
            state = {"model": model.state_dict(), "opt": opt.state_dict(), "monitor": mon.state_dict(),
                     "step": step + 1}
            torch.save(state, ckpt + ".tmp")
            os.replace(ckpt + ".tmp", ckpt)
    """
)


def _line_count(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def test_sigkill_mid_training_leaves_valid_files_and_resumes(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(_TRAIN_SCRIPT)
    run, ckpt = tmp_path / "run", tmp_path / "ckpt.pt"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, str(script), str(run), str(ckpt)],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 240
        while _line_count(run / "metrics.jsonl") < 3 or not ckpt.exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the training script made no progress"
            time.sleep(0.02)
        time.sleep(random.uniform(0.0, 0.05))  # land anywhere in a step, a checkpoint or a write
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()

    # Every line of both files is whole JSON; records are the checkpoints, in order.
    records = read_lines(run / "metrics.jsonl")
    alerts = read_lines(run / "alerts.jsonl")
    steps = [r["step"] for r in records]
    assert len(steps) >= 3 and steps == list(range(5, 5 * len(steps) + 1, 5))
    assert alerts and all(a["rule"] == "nonfinite_grad" for a in alerts)
    assert all(a["step"] <= steps[-1] + 5 for a in alerts)
    assert json.loads((run / "meta.json").read_text())["every"] == 5
    # Flight records that exist are whole (written to a temporary name, then renamed).
    for path in (run / "flight").glob("*.json"):
        json.loads(path.read_text())

    # Resume from the last training checkpoint into the same run directory.
    state = torch.load(ckpt, weights_only=True)
    model = TinyNet()
    model.load_state_dict(state["model"])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt.load_state_dict(state["opt"])
    saved = state["monitor"]["step_count"]
    with ht.Monitor(model, opt, every=5, log_dir=run, resume=True) as mon:
        mon.load_state_dict(state["monitor"])
        train(model, opt, mon, steps=10, start=state["step"])
    after = read_lines(run / "metrics.jsonl")  # still every line whole
    resumed = [r["step"] for r in after[len(records) :]]
    assert resumed == [saved + 5, saved + 10]  # the step counter went on from the checkpoint


def test_a_line_cut_by_a_kill_is_dropped_when_the_run_resumes(tmp_path):
    """What a kill during a write leaves (a record without its end) never gets the next record glued to it."""
    run = tmp_path / "run"
    run.mkdir()
    whole = json.dumps({"step": 5, "wall_time": 1.0, "metrics": {"loss": 1.0}})
    (run / "metrics.jsonl").write_text(whole + "\n" + whole.replace("5", "10")[:25])
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with pytest.warns(RuntimeWarning, match="dropped a cut last line"):
        with ht.Monitor(model, opt, every=5, log_dir=run, resume=True) as mon:
            train(model, opt, mon, steps=5)
    # The count goes on from the last whole record (step 5), not from the cut one.
    assert [r["step"] for r in read_lines(run / "metrics.jsonl")] == [5, 10]
