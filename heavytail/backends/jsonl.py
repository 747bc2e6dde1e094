"""The default backend: ``metrics.jsonl`` and ``alerts.jsonl`` in the run directory, one whole line per record."""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
import warnings
from pathlib import Path
from typing import Any, Mapping


def _clean(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def dumps_record(obj: Any) -> str:
    """One JSON line; NaN and Inf become ``null`` (JSON has neither), at any depth."""
    return json.dumps(_clean(obj), allow_nan=False, separators=(",", ":"))


class JsonlBackend:
    """Appends records to ``<log_dir>/metrics.jsonl`` and alerts to ``<log_dir>/alerts.jsonl``.

    Each record is written whole or not at all, then fsynced, so a run killed at any moment leaves every earlier
    line whole. A write that fails (a full disk) is raised (the monitor warns once) after the file is cut back to
    its last whole line; the lines not yet written are kept, oldest dropped past ``max_pending`` bytes, and written
    first at the next record, so a passing outage loses nothing. A cut last line left by a killed run is dropped
    when the file is reopened, so a resumed run never appends to half a line.
    """

    def __init__(self, log_dir: Path, config: Any = None, *, max_pending: int = 64 << 20, **_: Any) -> None:
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.max_pending = int(max_pending)
        self._files: dict[str, list] = {}  # name -> [fd, bytes of whole lines, lines not yet written]
        self._closed = False
        self._open("metrics.jsonl")  # now, so an unwritable run directory is an error at attach time

    def _open(self, name: str) -> list:
        if self._closed:
            raise ValueError("JsonlBackend: closed")
        if name not in self._files:
            path = self.log_dir / name
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
            size, whole = os.fstat(fd).st_size, _whole_lines_size(path)
            if whole < size:
                os.ftruncate(fd, whole)
                warnings.warn(
                    f"heavytail: {path}: dropped a cut last line ({size - whole} bytes) left by an interrupted run",
                    RuntimeWarning,
                    stacklevel=3,
                )
            self._files[name] = [fd, whole, []]
        return self._files[name]

    def _write(self, entry: list) -> None:
        fd, whole, pending = entry
        try:
            if os.fstat(fd).st_size != whole:
                os.ftruncate(fd, whole)  # an earlier failed write left part of a line
            data = memoryview(b"".join(pending))
            while data:
                data = data[os.write(fd, data) :]
            os.fsync(fd)
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, whole)
            while len(pending) > 1 and sum(map(len, pending)) > self.max_pending:
                pending.pop(0)
            raise
        entry[1] = whole + sum(map(len, pending))
        pending.clear()

    def _append(self, name: str, line: str) -> None:
        entry = self._open(name)
        entry[2].append((line + "\n").encode("utf-8"))
        self._write(entry)

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        record = {"step": int(step), "wall_time": time.time(), "metrics": dict(metrics)}
        self._append("metrics.jsonl", dumps_record(record))

    def alert(self, alert: Mapping[str, Any]) -> None:
        self._append("alerts.jsonl", dumps_record(dict(alert)))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            for entry in self._files.values():
                if entry[2]:
                    self._write(entry)  # a last try for lines an outage held back
        finally:
            for fd, _, _ in self._files.values():
                os.close(fd)
            self._files.clear()


def _whole_lines_size(path: Path) -> int:
    """Bytes of ``path`` up to and including its last newline: what is left once a cut last line is dropped."""
    with open(path, "rb") as f:
        end = f.seek(0, os.SEEK_END)
        while end > 0:
            start = max(0, end - (1 << 16))
            f.seek(start)
            i = f.read(end - start).rfind(b"\n")
            if i >= 0:
                return start + i + 1
            end = start
    return 0
