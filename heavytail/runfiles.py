"""The files a heavytail run directory holds, and what attaching to a directory that already holds a run does."""

from __future__ import annotations

import json
import os
import shutil
import time
import warnings
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

RUN_FILES = ("metrics.jsonl", "alerts.jsonl", "hill_plot.jsonl", "meta.json", "report.html")
"""Files a monitored run writes into its run directory (the report is written by ``heavytail report``)."""

RUN_DIRS = ("flight", "tensorboard", "wandb")
"""Folders a monitored run writes into its run directory (flight records, the TensorBoard and W&B backends)."""


def existing_run(path: Path) -> list[str]:
    """What shows that ``path`` already holds a run: a ``meta.json`` (every attached monitor writes one) or a
    ``metrics.jsonl`` with records. Empty when it holds none (a fresh directory, or other files only)."""
    found = []
    if (path / "meta.json").is_file():
        found.append("meta.json")
    metrics = path / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size > 0:
        found.append("metrics.jsonl")
    return found


def clear_run_dir(path: Path) -> None:
    """Remove a previous run's files from ``path`` (only the files a heavytail run writes; anything else a
    trainer keeps there stays), so the new run's records are not appended to the old one's."""
    for name in RUN_FILES:
        (path / name).unlink(missing_ok=True)
    for name in RUN_DIRS:
        if (path / name).is_dir():
            shutil.rmtree(path / name)


def last_record_step(path: Path) -> int:
    """The step of the last whole record in ``path/metrics.jsonl`` (0 when there is none).

    Reads the file's tail only: a long run's record is megabytes, and a cut last line (a killed run) is skipped.
    """
    metrics = path / "metrics.jsonl"
    try:
        size = metrics.stat().st_size
    except OSError:
        return 0
    window = 1 << 16
    with open(metrics, "rb") as f:
        while True:
            start = max(0, size - window)
            f.seek(start)
            lines = f.read().split(b"\n")
            if start > 0:
                lines = lines[1:]  # the first line of the window may be a partial one
            for line in reversed(lines):
                try:
                    return int(json.loads(line)["step"])
                except (ValueError, KeyError, TypeError):
                    continue
            if start == 0:
                return 0
            window *= 4


def describe_existing(path: Path) -> str:
    """A short description of the run in ``path`` for error messages: its records and last step."""
    metrics = path / "metrics.jsonl"
    if not metrics.is_file():
        return "a previous run's files (" + ", ".join(existing_run(path)) + ")"
    with open(metrics, "rb") as f:
        records = sum(1 for line in f if line.strip())
    return f"a previous run ({records} record{'s' if records != 1 else ''} up to step {last_record_step(path)})"


def update_meta(path: Path, **fields: object) -> None:
    """Merge ``fields`` into ``path/meta.json`` (written whole through a temporary file, as the monitor does)."""
    meta_path = path / "meta.json"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return
    if not isinstance(meta, dict):
        return
    meta.update(fields)
    tmp = meta_path.with_name("meta.json.tmp")
    tmp.write_text(json.dumps(meta, indent=2, default=str))
    os.replace(tmp, meta_path)


def default_log_dir() -> Path:
    """``heavytail_runs/<timestamp>`` in the working directory (``-2``, ``-3``... when it exists)."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path("heavytail_runs") / stamp
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{stamp}-{n}")
    return path


def prepare(path: Path, *, resume: bool, overwrite: bool) -> int:
    """Refuse, continue or replace a run already in ``path``; returns the step a continued run goes on from (0
    for a new run). Raises ``FileExistsError`` when a run is there and neither ``resume`` nor ``overwrite``."""
    if not existing_run(path):
        return 0
    if resume:
        return last_record_step(path)
    if overwrite:
        clear_run_dir(path)
        return 0
    raise FileExistsError(
        f"Monitor: log_dir {path} already holds {describe_existing(path)}; pass resume=True to continue it, "
        "overwrite=True to replace it, or choose another log_dir"
    )


def write_meta(path: Path, meta: dict, *, resumed_at: int, resume: bool) -> None:
    """Write ``meta.json`` for a new run, or mark a continued run's ``meta.json`` running again (its start and
    parameters stay; a ``resumed`` entry records when and from which step)."""
    if resumed_at or (resume and (path / "meta.json").is_file()):
        try:
            previous = json.loads((path / "meta.json").read_text())
        except (OSError, ValueError):
            previous = None
        if isinstance(previous, dict):
            resumes = [*previous.get("resumed", []), {"time": time.time(), "step": resumed_at}]
            previous.pop("finished", None)
            previous.pop("final_step", None)
            meta = {**previous, "resumed": resumes}
    try:
        path.mkdir(parents=True, exist_ok=True)
        tmp = path / "meta.json.tmp"
        tmp.write_text(json.dumps(meta, indent=2, default=str))
        os.replace(tmp, path / "meta.json")
    except OSError as exc:
        warnings.warn(f"heavytail: could not write meta.json: {exc}", RuntimeWarning, stacklevel=3)


def run_meta(monitor: Any) -> dict[str, Any]:
    """The ``meta.json`` of a new run: versions, device, ranks, the watched tensors and their groups, the
    configuration and the optimizer's hyper-parameters."""
    from heavytail import __version__

    layout = monitor.layout
    meta = {
        "heavytail_version": __version__,
        "run_name": monitor.run_name,
        "started": time.time(),
        "torch_version": torch.__version__,
        "device": str(monitor.device),
        "world_size": monitor.dist.world,
        "sharded": monitor.dist.sharded,
        "model": type(monitor.model).__name__,
        "optimizer": type(monitor.optimizer).__name__ if monitor.optimizer is not None else None,
        "every": monitor.config.every,
        "sample_size": monitor.sample_size,
        "params": [
            {"name": n, "shape": list(p.shape), "numel": p.numel(), "dtype": str(p.dtype).replace("torch.", "")}
            for n, p in zip(monitor.names, monitor.params)
        ],
        "groups": {u: [monitor.names[i] for i in m] for u, m in zip(layout.units, layout.unit_members)}
        if layout.grouped
        else None,
        "config": monitor.config.to_dict(),
        "extra": monitor.config.extra,
    }
    if monitor.optimizer is not None:
        meta["optimizer_hparams"] = [
            {k: v for k, v in g.items() if k != "params" and isinstance(v, (int, float, str, bool, tuple, list))}
            for g in monitor.optimizer.param_groups
        ]
    return meta
