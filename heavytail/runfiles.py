"""The files a heavytail run directory holds, and what attaching to a directory that already holds a run does."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

RUN_FILES = ("metrics.jsonl", "alerts.jsonl", "meta.json", "report.html")
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
