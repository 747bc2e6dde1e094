"""Tests for the W&B backend, offline: what it wrote is read back from the run's ``.wandb`` file."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest

wandb = pytest.importorskip("wandb")

from wandb.proto import wandb_internal_pb2  # noqa: E402

from heavytail.backends import backend_factory  # noqa: E402
from heavytail.backends.wandb import WandbBackend, config_dict  # noqa: E402

STEP = "heavytail/step"


@dataclasses.dataclass(kw_only=True)
class Config:
    run_name: str = "exp1"
    every: int = 10
    backends: tuple = ("jsonl", "wandb")
    log_dir: Path = Path("runs/x")
    hook: object = print


@pytest.fixture(autouse=True)
def offline_wandb(tmp_path, monkeypatch):
    """W&B offline and silent, every file it writes under tmp_path; its service is shut down after the test."""
    for var, value in {
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_CONSOLE": "off",  # no wrapping of stdout/stderr under pytest's capture
        "WANDB_DISABLE_GIT": "true",
        "WANDB_DIR": str(tmp_path / "wandb_dir"),
        "WANDB_CONFIG_DIR": str(tmp_path / "wandb_config"),
        "WANDB_CACHE_DIR": str(tmp_path / "wandb_cache"),
        "WANDB_DATA_DIR": str(tmp_path / "wandb_data"),
    }.items():
        monkeypatch.setenv(var, value)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert wandb.run is None
    yield
    if wandb.run is not None:
        wandb.run.finish()
    wandb.teardown()


def read_records(root: Path) -> dict[str, list]:
    """Every record of the single offline run under ``root``, by kind (the LevelDB-log format of ``.wandb`` files).

    The file is a 7-byte header (``:W&B``, magic, version) then 32 KiB blocks of chunks, each with a 7-byte header
    (CRC32, little-endian length, type: 1 full, 2 first, 3 middle, 4 last); a block's tail under 7 bytes is padding.
    """
    (path,) = root.glob("wandb/offline-run-*/run-*.wandb")
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, pending = 32768, 7, b""
    out: dict[str, list] = {}
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:  # zero padding to the end of the block
            pos += left
            continue
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (2, 3):
            continue
        record = wandb_internal_pb2.Record()
        record.ParseFromString(pending)
        name = record.WhichOneof("record_type")
        out.setdefault(name, []).append(getattr(record, name))
    return out


def history(records) -> list[dict]:
    rows = []
    for h in records.get("history", []):
        row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in h.item}
        rows.append({k: v for k, v in row.items() if not k.startswith("_")})
    return rows


def metric_defs(records) -> dict[str, str]:
    return {m.glob_name or m.name: m.step_metric for m in records.get("metric", [])}


def record(step: int) -> dict[str, float]:
    return {
        "loss": 3.0 - step / 100,
        "grad/norm": 1.25,
        "grad/hill_alpha/blocks.0.attn.qkv.weight": 1.75,
        "grad/hill_alpha/embed.weight": math.nan,
        "adam/ratio_max/blocks.0.attn.qkv.weight": math.inf,
    }


ALERT = {
    "step": 20,
    "wall_time": 0.0,
    "rule": "loss_spike",
    "severity": "critical",
    "metric": "loss",
    "layer": None,
    "value": 7.9,
    "threshold": 4.1,
    "message": "loss 7.9 at step 20 is 6.3 robust sd above its recent level",
    "flight_record": "flight/000020_loss_spike.json",
}


def wandb_children() -> list[str]:
    """Command lines of this process's child processes that belong to W&B (Linux /proc)."""
    found = []
    for task in Path(f"/proc/{os.getpid()}/task").glob("*/children"):
        for pid in task.read_text().split():
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if "wandb" in cmd:
                found.append(cmd)
    return found


def test_starts_finishes_and_tears_down_its_own_run(tmp_path, monkeypatch, caplog):
    backend = backend_factory("wandb")(log_dir=tmp_path, config=Config(), alert_wait_s=60)
    assert backend.run is None  # chosen at the first record, not at construction
    backend.log(record(10), 10)
    assert backend.owns_run and wandb.run is backend.run
    backend.log(record(20), 20)
    backend.alert(ALERT)

    def broken_alert(**kwargs):
        raise RuntimeError("no network")

    with monkeypatch.context() as patch, caplog.at_level(logging.WARNING, logger="heavytail.backends.wandb"):
        patch.setattr(backend.run, "alert", broken_alert)
        backend.alert({**ALERT, "step": 21, "severity": "warning"})
        backend.alert({**ALERT, "step": 22, "severity": "warning"})
    backend.alert({**ALERT, "step": 23, "severity": "info"})
    assert [r.message for r in caplog.records if r.name == "heavytail.backends.wandb"] == [
        "wandb backend: could not send a W&B alert (no network); alerts are still logged"
    ]

    backend.close()
    backend.close()  # idempotent
    backend.log(record(30), 30)  # dropped after close
    assert wandb.run is None
    assert not [t.name for t in threading.enumerate() if t.name.startswith("wandb")]
    if sys.platform == "linux":
        assert wandb_children() == []

    records = read_records(tmp_path)
    (run,) = records["run"]
    assert run.display_name == "exp1"
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["run_name"] == "exp1"
    assert config["backends"] == ["jsonl", "wandb"]
    assert config["log_dir"] == "runs/x"
    assert config["hook"].startswith("<built-in function print")

    rows = history(records)
    assert set(rows[0]) == {STEP, *record(10)}
    assert rows[0][STEP] == 10 and rows[0]["loss"] == pytest.approx(2.9) and rows[0]["grad/norm"] == 1.25
    assert rows[0]["grad/hill_alpha/blocks.0.attn.qkv.weight"] == 1.75
    assert math.isnan(rows[0]["grad/hill_alpha/embed.weight"])
    assert rows[0]["adam/ratio_max/blocks.0.attn.qkv.weight"] == math.inf
    assert rows[1][STEP] == 20 and rows[1]["loss"] == pytest.approx(2.8)
    assert rows[2:] == [
        {STEP: 20, "alerts/loss_spike": 1},
        {STEP: 21, "alerts/loss_spike": 2},
        {STEP: 22, "alerts/loss_spike": 3},
        {STEP: 23, "alerts/loss_spike": 4},
    ]
    assert metric_defs(records) == {STEP: "", "loss": STEP, "grad/*": STEP, "adam/*": STEP, "alerts/*": STEP}

    # alerts went out as W&B alerts, except the two whose sending failed
    alerts = records["alert"]
    assert [(a.title, a.level) for a in alerts] == [("heavytail loss_spike", "ERROR"), ("heavytail loss_spike", "INFO")]
    assert alerts[0].wait_duration == 60_000
    assert "6.3 robust sd" in alerts[0].text and "flight/000020_loss_spike.json" in alerts[0].text
    summary = {}
    for s in records["summary"]:
        summary.update({u.key or "/".join(u.nested_key): json.loads(u.value_json) for u in s.update})
    assert summary["alerts/last"].startswith("step 23 loss_spike: loss 7.9")
    assert records.get("exit")


def test_logs_into_the_users_run_and_leaves_it_open(tmp_path, caplog):
    user_run = wandb.init(project="user-project", dir=str(tmp_path), config={"lr": 1e-3})
    user_run.define_metric("*", step_metric="user/step")
    backend = WandbBackend(tmp_path / "heavytail_run", Config(run_name="ignored"), prefix="ht/")
    user_run.log({"user/step": 1, "user/acc": 0.25})
    backend.log(record(10), 10)
    backend.alert(ALERT)
    backend.close()
    assert wandb.run is user_run and not user_run._is_finished
    assert not backend.owns_run

    # a second backend whose run is finished under it drops records with one warning
    late = WandbBackend(tmp_path / "heavytail_run", None)
    late.log(record(30), 30)
    user_run.log({"user/step": 2, "user/acc": 0.5})
    user_run.finish()
    with caplog.at_level(logging.WARNING, logger="heavytail.backends.wandb"):
        late.log(record(40), 40)
        late.alert(ALERT)
    assert [r.message for r in caplog.records if r.name == "heavytail.backends.wandb"] == [
        "wandb backend: the W&B run it logged into has finished; dropping records"
    ]
    late.close()
    assert not (tmp_path / "heavytail_run").exists()  # no run of its own was started

    wandb.teardown()  # finish() can return before wandb-core has written the whole file; teardown waits for it
    records = read_records(tmp_path)
    (run,) = records["run"]
    assert run.project == "user-project"
    rows = history(records)
    assert rows[0] == {"user/step": 1, "user/acc": 0.25}
    # W&B's step_sync may copy the user's step into heavytail's rows (the user's "*" matches them too)
    for row in rows[1:4]:
        assert row.pop("user/step", 1) == 1
    assert rows[1]["ht/loss"] == pytest.approx(2.9) and rows[1][STEP] == 10
    assert rows[2] == {"ht/alerts/loss_spike": 1, STEP: 20}
    assert rows[3]["loss"] == pytest.approx(2.7) and rows[3][STEP] == 30  # the second backend, no prefix
    assert rows[4:] == [{"user/step": 2, "user/acc": 0.5}]
    # the user's "*" still points at the user's step, heavytail's groups at heavytail's; "loss" without a prefix
    # is left alone (it may be the user's series too)
    assert metric_defs(records) == {
        "*": "user/step",
        STEP: "",
        "ht/loss": STEP,
        "ht/grad/*": STEP,
        "ht/adam/*": STEP,
        "ht/alerts/*": STEP,
        "grad/*": STEP,
        "adam/*": STEP,
    }
    updates = [{i.key: json.loads(i.value_json) for i in c.update} for c in records.get("config", [])]
    assert any(u.get("heavytail", {}).get("run_name") == "ignored" for u in updates)


def test_missing_wandb_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ImportError, match=r"pip install heavytail\[wandb\]"):
        WandbBackend(tmp_path)


def test_module_import_does_not_import_wandb():
    code = "import sys, heavytail.backends.wandb\nassert 'wandb' not in sys.modules\n"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_config_dict():
    assert config_dict(None) == {}
    assert config_dict({"a": (1, 2), "b": {"c": Path("p")}}) == {"a": [1, 2], "b": {"c": "p"}}
    flat = config_dict(Config(hook=len))
    assert flat["backends"] == ["jsonl", "wandb"] and flat["hook"].startswith("<built-in function len")
    # fields that cannot be deep-copied (a backend object in MonitorConfig.backends) and nested dataclasses
    lock = threading.Lock()
    flat = config_dict(Config(backends=("jsonl", lock), hook=Config(run_name="inner")))
    assert flat["backends"] == ["jsonl", repr(lock)]
    assert flat["hook"]["run_name"] == "inner"
