"""The default backend: ``metrics.jsonl`` and ``alerts.jsonl`` in the run directory, one whole line per record."""

from __future__ import annotations

import json
import math
import os
import time
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

    Each record is one ``write`` of one complete line, then flushed and fsynced, so a run killed at any moment
    leaves every earlier line whole (a line cut by the kill itself is the last one, which readers skip).
    """

    def __init__(self, log_dir: Path, config: Any = None, **_: Any) -> None:
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._metrics = open(self.log_dir / "metrics.jsonl", "a", encoding="utf-8")
        self._alerts = None

    def _append(self, handle: Any, line: str) -> None:
        handle.write(line + "\n")
        handle.flush()
        os.fsync(handle.fileno())

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        record = {"step": int(step), "wall_time": time.time(), "metrics": dict(metrics)}
        self._append(self._metrics, dumps_record(record))

    def alert(self, alert: Mapping[str, Any]) -> None:
        if self._alerts is None:
            self._alerts = open(self.log_dir / "alerts.jsonl", "a", encoding="utf-8")
        self._append(self._alerts, dumps_record(dict(alert)))

    def close(self) -> None:
        for handle in (self._metrics, self._alerts):
            if handle is not None and not handle.closed:
                handle.close()
