"""Faults in what the monitor writes to: failing backends and callbacks, unwritable and full disks.

In every case the training loop goes on, each failing destination is reported by one warning (then counted
silently), the other destinations keep receiving everything, and metrics.jsonl keeps every record while its disk
can be written. Tests run as root in CI, where permission bits do not stop writes: full and read-only disks are
simulated with /dev/full (every write fails with ENOSPC), RLIMIT_FSIZE (the kernel cuts a write short, then fails
it with EFBIG) and backends whose writes raise OSError(ENOSPC); the chmod variant runs only as a non-root user.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

import heavytail as ht
from tests.conftest import read_alerts, read_records
from tests.reliability import (  # noqa: F401 (one_intra_op_thread: an autouse fixture)
    FailingBackend,
    HandModel,
    RecordingBackend,
    heavytail_warnings,
    one_intra_op_thread,
    read_lines,
)

REPO = Path(__file__).resolve().parents[2]
SHAPES = {"w": (8, 8), "b": (8,)}
ENOSPC = OSError(errno.ENOSPC, "No space left on device")


def _drive(model: HandModel, mon: ht.Monitor, steps: int, nan_every: int = 3) -> None:
    """Hand-set gradients; every ``nan_every``-th step has a NaN entry, so alerts flow as well as records."""
    for step in range(steps):
        gen = torch.Generator().manual_seed(step)
        grads = {name: torch.randn(*shape, generator=gen) for name, shape in SHAPES.items()}
        if nan_every and step % nan_every == nan_every - 1:
            grads["b"][0] = float("nan")
        model.set_grads(grads)
        mon.step()


def _monitored_run(tmp_path, backends, steps: int = 12, every: int = 4, callbacks=(), **kwargs):
    model = HandModel(SHAPES)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mon = ht.Monitor(
            model, every=every, log_dir=tmp_path, backends=["jsonl", *backends], alert_cooldown=0, **kwargs
        )
        for fn in callbacks:
            mon.on_alert(fn)
        _drive(model, mon, steps)
        mon.close()
    return mon, caught


# ---------------------------------------------------------------------------------------------- user backends


@pytest.mark.parametrize("method", ["log", "alert", "close"])
def test_a_backend_failing_in_one_method_is_reported_once_and_isolated(tmp_path, method):
    bad, good = FailingBackend([method], error=ENOSPC), RecordingBackend()
    mon, caught = _monitored_run(tmp_path, [bad, good])
    assert mon.step_count == 12  # the loop went on
    messages = heavytail_warnings(caught, "FailingBackend")
    assert len(messages) == 1
    assert f"failed in {method}()" in messages[0] and "No space left on device" in messages[0]
    # It was still offered everything (a passing outage would heal), and the others received everything.
    assert bad.calls["log"] == 3 and bad.calls["alert"] == len(good.alerts) == 4 and bad.calls["close"] == 1
    assert [step for step, _ in good.records] == [4, 8, 12] and good.closed == 1
    assert [r["step"] for r in read_records(tmp_path)] == [4, 8, 12]
    assert [a["step"] for a in read_alerts(tmp_path)] == [a["step"] for a in good.alerts] == [3, 6, 9, 12]


def test_a_backend_failing_everywhere_gives_one_warning(tmp_path):
    bad, good = FailingBackend(), RecordingBackend()
    _, caught = _monitored_run(tmp_path, [bad, good])
    assert len(heavytail_warnings(caught, "FailingBackend")) == 1
    assert len(good.records) == 3 and len(good.alerts) == 4


def test_two_failing_backends_give_one_warning_each(tmp_path):
    first, second = FailingBackend(["log"]), FailingBackend(["alert"], error=ENOSPC)
    good = RecordingBackend()
    _, caught = _monitored_run(tmp_path, [first, good, second])
    messages = heavytail_warnings(caught, "failed in")
    assert len(messages) == 2
    assert any("log()" in m for m in messages) and any("alert()" in m for m in messages)
    assert len(good.records) == 3 and len(read_records(tmp_path)) == 3


def test_a_backend_whose_file_writes_fail_with_enospc(tmp_path):
    """A user backend writing its own file on a full disk: the documented stand-in for a read-only directory."""

    class FileBackend:
        def __init__(self, path: Path) -> None:
            self.path = path
            self.writes = 0

        def log(self, metrics, step):
            self.writes += 1
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": step}) + "\n")
                raise ENOSPC  # what f.flush() raises on a full disk

        def close(self):
            pass

    backend = FileBackend(tmp_path / "mine.jsonl")
    _, caught = _monitored_run(tmp_path / "run", [backend])
    assert backend.writes == 3 and len(heavytail_warnings(caught, "FileBackend")) == 1
    assert len(read_records(tmp_path / "run")) == 3


# ---------------------------------------------------------------------------------------------- tensorboard


def test_tensorboard_backend_whose_writer_raises(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    from torch.utils.tensorboard import SummaryWriter

    writers = []
    original_init, original_close = SummaryWriter.__init__, SummaryWriter.close

    def init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        writers.append(self)

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(SummaryWriter, "__init__", init)
    for name in ("flush", "add_text", "close"):
        monkeypatch.setattr(SummaryWriter, name, full)
    good = RecordingBackend()
    try:
        mon, caught = _monitored_run(tmp_path, ["tensorboard", good])
    finally:
        for writer in writers:  # the writer's thread is real: stop it
            original_close(writer)
    assert mon.step_count == 12
    messages = heavytail_warnings(caught, "'tensorboard'")
    assert len(messages) == 1 and "No space left on device" in messages[0]
    assert len(good.records) == 3 and len(good.alerts) == 4
    assert len(read_records(tmp_path)) == 3 and len(read_alerts(tmp_path)) == 4


# ---------------------------------------------------------------------------------------------- callbacks


def test_a_raising_alert_callback_is_reported_once_and_the_others_still_run(tmp_path):
    calls = {"bad": 0}
    received = []

    def bad(alert):
        calls["bad"] += 1
        raise KeyError("my dashboard is down")

    _, caught = _monitored_run(tmp_path, [], callbacks=[bad, received.append])
    messages = heavytail_warnings(caught, "on_alert callback")
    assert len(messages) == 1 and "KeyError" in messages[0]
    assert calls["bad"] == len(received) == 4  # still called; the next callback still ran every time
    assert len(read_alerts(tmp_path)) == 4


# ---------------------------------------------------------------------------------------------- full / read-only disk


needs_dev_full = pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")


@needs_dev_full
def test_jsonl_on_a_full_disk_does_not_stop_training(tmp_path):
    """metrics.jsonl and alerts.jsonl on a device where every write fails with ENOSPC."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").symlink_to("/dev/full")
    (run / "alerts.jsonl").symlink_to("/dev/full")
    good = RecordingBackend()
    received = []
    mon, caught = _monitored_run(run, [good], callbacks=[received.append])
    assert mon.step_count == 12
    messages = heavytail_warnings(caught, "'jsonl'")
    assert len(messages) == 1 and "No space left on device" in messages[0]
    assert [s for s, _ in good.records] == [4, 8, 12] and len(good.alerts) == len(received) == 4
    assert (run / "meta.json").exists()


@needs_dev_full
def test_unwritable_alert_and_flight_files_warn_once_and_records_go_on(tmp_path):
    """Only the files created during the run fail (a directory made read-only after attach, simulated)."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "alerts.jsonl").symlink_to("/dev/full")
    (run / "flight").write_text("not a directory")  # every flight record fails to be created
    good = RecordingBackend()
    _, caught = _monitored_run(run, [good])
    assert len(heavytail_warnings(caught, "'jsonl'")) == 1
    assert len(heavytail_warnings(caught, "flight record")) == 1
    assert [r["step"] for r in read_records(run)] == [4, 8, 12]  # the record is still written
    assert len(good.alerts) == 4


def test_read_only_directory_after_attach_chmod(tmp_path):
    """The real thing, where permission bits apply (not as root): records continue on the open file."""
    run = tmp_path / "run"
    model = HandModel(SHAPES)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mon = ht.Monitor(model, every=4, log_dir=run, alert_cooldown=0)
        run.chmod(0o500)
        try:
            probe = run / "probe"
            try:
                probe.write_text("x")
            except PermissionError:
                pass
            else:
                probe.unlink()
                mon.close()
                pytest.skip("permission bits do not stop this user (root); simulated by the /dev/full tests")
            _drive(model, mon, 12)
            mon.close()
        finally:
            run.chmod(0o700)
    assert [r["step"] for r in read_records(run)] == [4, 8, 12]
    assert len(heavytail_warnings(caught, "'jsonl'")) == 1  # alerts.jsonl could not be created
    assert len(heavytail_warnings(caught, "flight record")) == 1


def test_meta_json_that_cannot_be_written_is_a_warning(tmp_path):
    run = tmp_path / "run"
    (run / "meta.json").mkdir(parents=True)  # os.replace onto a directory fails
    _, caught = _monitored_run(run, [])
    assert len(heavytail_warnings(caught, "meta.json")) == 1
    assert len(read_records(run)) == 3


_FSIZE_SCRIPT = textwrap.dedent(
    """
    import json, os, resource, signal, sys, warnings
    import torch
    from torch import nn
    import heavytail as ht

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG instead
    run = sys.argv[1]
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(20)])  # 40 tensors: a record of tens of kB
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    steps = []

    class Recorder:
        def log(self, metrics, step):
            steps.append(step)
        def close(self):
            pass

    def train(n):
        for _ in range(n):
            model(torch.randn(8, 4)).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()

    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mon = ht.Monitor(model, opt, every=1, log_dir=run, backends=[Recorder()])
        train(2)
        size = os.path.getsize(os.path.join(run, "metrics.jsonl"))
        # The disk fills up 1000 bytes into the next record: the kernel writes those, then refuses.
        resource.setrlimit(resource.RLIMIT_FSIZE, (size + 1000, hard))
        try:
            train(2)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        train(2)  # space is back
        mon.close()
    print(json.dumps({"steps": steps, "warnings": [str(w.message) for w in caught]}))
    """
)


@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_FSIZE semantics are Linux's")
def test_jsonl_disk_full_mid_record_then_space_returns(tmp_path):
    script = tmp_path / "fsize.py"
    script.write_text(_FSIZE_SCRIPT)
    run = tmp_path / "run"
    out = subprocess.run(
        [sys.executable, str(script), str(run)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["steps"] == [1, 2, 3, 4, 5, 6]  # the other backends never noticed
    assert len([w for w in result["warnings"] if "'jsonl'" in w]) == 1
    steps = [r["step"] for r in read_lines(run / "metrics.jsonl")]  # every line whole: no half record
    # Records made while the disk could be written are all there, in order; those of the outage were held back
    # and written once space returned.
    assert steps == [1, 2, 3, 4, 5, 6]
