"""Reading a run directory (``meta.json``, ``metrics.jsonl``, ``alerts.jsonl``) into arrays the report can draw."""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from heavytail.report.families import KNOWN_FAMILIES, split_key
from heavytail.report.records import Record, RecordTable, TableBuilder

__all__ = [
    "FIND_DEPTH",
    "INTEGRATION_DIR",
    "KNOWN_FAMILIES",
    "NoRunYet",
    "Record",
    "RecordTable",
    "Run",
    "RunDirError",
    "find_run_dir",
    "find_runs",
    "load_run",
    "split_key",
]


class RunDirError(ValueError):
    """A run directory that cannot be read: missing, not a heavytail run, empty or corrupt.

    The message is one line naming the path and what is wrong with it.
    """


class NoRunYet(RunDirError):
    """A place that holds no records yet: missing, without ``metrics.jsonl``, or with an empty one.

    A run being started may still be there in a moment (``heavytail report --watch`` waits for it); a corrupt
    file is a plain :class:`RunDirError`.
    """


@dataclass(eq=False)
class Run:
    """A loaded run directory.

    ``records`` are the checkpoint lines in step order (``(step, wall_time, metrics)``, None for null),
    ``alerts`` the alert records as written, ``meta`` the contents of meta.json (empty if it was missing),
    ``hill_plots`` the Hill plots of ``hill_plot.jsonl`` in step order (one per checkpoint; the last line of a
    step when a resumed run wrote it twice; empty when the run wrote none).
    A list of ``(step, wall_time, metrics)`` tuples may be passed as ``records`` to build a run in memory.
    """

    path: Path
    meta: dict[str, Any]
    records: Sequence[Record]
    alerts: list[dict[str, Any]] = field(default_factory=list)
    hill_plots: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        if not isinstance(self.records, RecordTable):
            self.records = RecordTable.from_records(self.records)
        self._table: RecordTable = self.records  # type: ignore[assignment]
        if not isinstance(self.meta, dict):
            raise TypeError(f"Run.meta must be a dict, got {type(self.meta).__name__}")
        params = self.meta.get("params")
        params = params if isinstance(params, list) else []
        names = [p["name"] for p in params if isinstance(p, Mapping) and isinstance(p.get("name"), str)]
        # A monitor with ``group_by`` reports groups of tensors under the group's name (meta.json "groups").
        groups = self.meta.get("groups")
        if isinstance(groups, Mapping):
            names += [g for g in groups if isinstance(g, str) and g not in names]
        self._param_order = {name: i for i, name in enumerate(names)}
        self._index = self._build_index(frozenset(names))

    def _build_index(self, param_names: frozenset[str]) -> dict[str, dict[str, str]]:
        index: dict[str, dict[str, str]] = {}
        for key in self._table.keys:
            family, layer = split_key(key, param_names)
            if layer is not None:
                index.setdefault(family, {})[layer] = key
        # Model order (meta.json lists parameters as named_parameters() yields them), then first appearance.
        big = len(self._param_order)
        for family, layers in index.items():
            order = sorted(enumerate(layers), key=lambda t: (self._param_order.get(t[1], big), t[0]))
            index[family] = {name: layers[name] for _, name in order}
        return index

    @property
    def name(self) -> str:
        """The run's name from meta.json, else the directory name.

        A run the Hugging Face or Lightning integration wrote lives in ``<output_dir>/heavytail``, and a monitor
        not given a ``run_name`` names the run after that folder: "heavytail" says nothing, so the trainer's
        output directory names it instead.
        """
        name = str(self.meta.get("run_name") or self.path.name)
        if name == self.path.name == INTEGRATION_DIR:
            return self.path.resolve().parent.name or name
        return name

    @property
    def finished(self) -> float | None:
        """When the monitor closed (meta.json ``finished``, unix time), or None for a run that is still going,
        was killed, or was written by a monitor older than that key."""
        value = self.meta.get("finished")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return None
        return float(value)

    @property
    def final_step(self) -> int | None:
        """The monitor's step count when it closed (meta.json ``final_step``), or None."""
        value = self.meta.get("final_step")
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    @property
    def steps(self) -> np.ndarray:
        """The step of every record, increasing."""
        return self._table.steps.copy()

    @property
    def wall_times(self) -> np.ndarray:
        """The wall time of every record (unix seconds)."""
        return self._table.wall_times.copy()

    def keys(self) -> list[str]:
        """Every metric key that appears in the run, in order of first appearance."""
        return list(self._table.keys)

    def families(self) -> list[str]:
        """The per-layer metric families present in the run."""
        return list(self._index)

    def global_keys(self) -> list[str]:
        """Keys that belong to no layer (``loss``, ``grad/norm``, ...)."""
        per_layer = {k for layers in self._index.values() for k in layers.values()}
        return [k for k in self._table.keys if k not in per_layer]

    def layers(self, family: str) -> list[str]:
        """Parameter names with a key ``<family>/<name>``, in model order; empty if the family is absent."""
        return list(self._index.get(family, ()))

    def key(self, family: str, layer: str) -> str | None:
        """The metric key of ``layer`` in ``family``, or None."""
        return self._index.get(family, {}).get(layer)

    def series(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """``(steps, values)`` over every record, values NaN where ``key`` is missing or null."""
        return self.steps, self._table.column(key)

    def matrix(self, family: str) -> tuple[list[str], np.ndarray, np.ndarray]:
        """``(layers, steps, values)`` for a per-layer family; ``values[i, j]`` is layer i at ``steps[j]``.

        The columns are the records in which the family appears at all (a family written every k-th checkpoint,
        like a noise probe, gets only its own columns); NaN marks a missing or null value.
        """
        layers = self._index.get(family)
        if not layers:
            return [], np.zeros(0, dtype=np.int64), np.zeros((0, 0))
        cols = [self._table.key_index[k] for k in layers.values()]
        present = self._table.present[:, cols]
        rows = np.flatnonzero(present.any(axis=1))
        values = self._table.values[np.ix_(rows, cols)].T.copy()
        return list(layers), self._table.steps[rows], values

    def final(self, key: str) -> float:
        """The last finite value of ``key`` (NaN if it never had one)."""
        values = self._table.column(key)
        finite = np.flatnonzero(np.isfinite(values))
        return float(values[finite[-1]]) if len(finite) else math.nan

    def flight_record(self, alert: Mapping[str, Any]) -> dict[str, Any] | None:
        """The flight record an alert points to, or None if it has none or the file cannot be read."""
        rel = alert.get("flight_record")
        if not isinstance(rel, str) or not rel:
            return None
        try:
            with open(self.path / rel, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None


def load_run(path: str | Path) -> Run:
    """Read a run directory written by heavytail (format: ``docs/run-directory.md``).

    Raises :class:`RunDirError` for a missing directory, a directory without ``metrics.jsonl``, a
    ``metrics.jsonl`` without records, or a corrupt file. A cut last line (a run killed mid-write) is skipped
    with a warning; a missing ``meta.json`` gives an empty ``meta`` with a warning.
    """
    path = Path(path)
    if not path.exists():
        raise NoRunYet(f"{path}: no such run directory")
    if not path.is_dir():
        raise RunDirError(f"{path}: not a directory (expected a heavytail run directory)")
    metrics_path = path / "metrics.jsonl"
    if not metrics_path.is_file():
        raise NoRunYet(f"{path}: no metrics.jsonl, so this is not a heavytail run directory")
    builder = TableBuilder()
    for lineno, obj in _read_jsonl(metrics_path):
        step, wall_time, metrics = _check_record(metrics_path, lineno, obj)
        builder.add(step, wall_time, metrics)
    if not builder.steps:
        raise NoRunYet(f"{metrics_path}: empty, the run wrote no checkpoint record")
    # After the records: a directory that is no run at all gets its error, not a warning about meta.json first.
    meta = _read_meta(path / "meta.json")

    alerts: list[dict[str, Any]] = []
    alerts_path = path / "alerts.jsonl"
    if alerts_path.exists():  # written on the first alert only
        for lineno, obj in _read_jsonl(alerts_path):
            if not isinstance(obj, dict):
                raise RunDirError(f"{alerts_path}:{lineno}: an alert must be a JSON object, got {_kind(obj)}")
            alerts.append(obj)
    alerts.sort(key=lambda a: a.get("step") if isinstance(a.get("step"), (int, float)) else math.inf)
    return Run(path=path, meta=meta, records=builder.build(), alerts=alerts, hill_plots=_read_hill_plots(path))


def _read_hill_plots(path: Path) -> list[dict[str, Any]]:
    """The Hill plots of ``hill_plot.jsonl`` by step (the last line of each), skipping malformed lines with one
    warning: they only feed one figure, which must not cost the rest of the report."""
    plot_path = path / "hill_plot.jsonl"
    if not plot_path.is_file():
        return []
    by_step: dict[int, dict[str, Any]] = {}
    bad = 0
    try:
        lines = list(_read_jsonl(plot_path))
    except RunDirError as exc:
        warnings.warn(f"{exc}; the report leaves out the Hill plots", stacklevel=3)
        return []
    for _, obj in lines:
        curve = obj.get("curve") if isinstance(obj, dict) else None
        lists = [curve.get(name) for name in ("k", "hill_alpha", "default_alpha")] if isinstance(curve, dict) else []
        if (
            not isinstance(obj, dict)
            or not isinstance(obj.get("step"), int)
            or not isinstance(obj.get("unit"), str)
            or len(lists) != 3
            or not all(isinstance(v, list) and len(v) == len(lists[0]) for v in lists)
        ):
            bad += 1
            continue
        by_step[obj["step"]] = obj
    if bad:
        warnings.warn(f"{plot_path}: skipped {bad} malformed line{'s' if bad > 1 else ''}", stacklevel=3)
    return [by_step[step] for step in sorted(by_step)]


INTEGRATION_DIR = "heavytail"
"""The folder the Hugging Face, Lightning and Accelerate integrations write their run into, under the trainer's
output directory."""

FIND_DEPTH = 3
"""How deep under a given directory :func:`find_run_dir` looks for a run (``out/runs/<name>/heavytail``)."""

_FIND_MAX_DIRS = 20_000  # a search that would read a home directory stops here rather than take minutes


def find_runs(path: str | Path, depth: int = FIND_DEPTH) -> list[Path]:
    """Every run directory (a folder holding ``metrics.jsonl``) at ``path`` or under it, at most ``depth`` levels
    down, sorted. A run's own folders are not searched; hidden folders and symbolic links to folders are skipped."""
    root = Path(path)
    if (root / "metrics.jsonl").is_file():
        return [root]
    found: list[Path] = []
    level, seen = [root], 0
    for _ in range(depth):
        below: list[Path] = []
        for folder in level:
            try:
                entries = sorted(os.scandir(folder), key=lambda e: e.name)
            except OSError:
                continue
            for entry in entries:
                if entry.name.startswith(".") or entry.is_symlink() or not entry.is_dir():
                    continue
                seen += 1
                child = Path(entry.path)
                if (child / "metrics.jsonl").is_file():
                    found.append(child)
                else:
                    below.append(child)
            if seen > _FIND_MAX_DIRS:
                return sorted(found)
        level = below
    return sorted(found)


def find_run_dir(path: str | Path) -> Path:
    """The run directory that ``path`` names: ``path`` itself when it holds ``metrics.jsonl`` (or is that file),
    else the run a trainer's output directory holds: ``path/heavytail`` (where the integrations write), else the
    one folder at most :data:`FIND_DEPTH` levels under ``path`` that holds ``metrics.jsonl``.

    Raises :class:`NoRunYet` when there is none and :class:`RunDirError` listing them when there are several.
    """
    path = Path(path)
    if path.is_file() and path.name == "metrics.jsonl":
        return path.parent
    if not path.is_dir() or (path / "metrics.jsonl").is_file():
        return path  # load_run says what is wrong with it, or reads it
    if (path / INTEGRATION_DIR / "metrics.jsonl").is_file():
        return path / INTEGRATION_DIR
    runs = find_runs(path)
    if len(runs) == 1:
        return runs[0]
    if not runs:
        raise NoRunYet(
            f"{path}: no metrics.jsonl here or in the folders under it ({FIND_DEPTH} levels), so this is not a "
            "heavytail run directory"
        )
    shown = ", ".join(str(r) for r in runs[:10]) + (f" and {len(runs) - 10} more" if len(runs) > 10 else "")
    raise RunDirError(f"{path}: holds {len(runs)} runs, name one of them: {shown}")


def _read_meta(meta_path: Path) -> dict[str, Any]:
    if not meta_path.exists():
        warnings.warn(f"{meta_path}: missing, the report will show no run metadata", stacklevel=3)
        return {}
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise RunDirError(f"{meta_path}: corrupt ({_one_line(exc)})") from None
    if not isinstance(meta, dict):
        raise RunDirError(f"{meta_path}: corrupt (expected a JSON object, got {_kind(meta)})")
    return meta


def _read_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    """Yield ``(line number, object)``; a bad last line is skipped with a warning, a bad middle one raises.

    A bad line is held back until the next non-blank line shows it was not the last.
    """
    pending: tuple[int, str] | None = None
    try:
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue
                if pending is not None:
                    raise RunDirError(f"{path}:{pending[0]}: corrupt line ({pending[1]})")
                try:
                    obj = json.loads(raw.decode("utf-8"))
                except (UnicodeDecodeError, ValueError) as exc:
                    pending = (lineno, _one_line(exc))
                    continue
                yield lineno, obj
    except OSError as exc:
        raise RunDirError(f"{path}: cannot be read ({_one_line(exc)})") from None
    if pending is not None:
        warnings.warn(
            f"{path}:{pending[0]}: skipped a cut last line (the run was probably killed while writing it)",
            stacklevel=4,
        )


def _check_record(path: Path, lineno: int, obj: Any) -> tuple[int, float, Mapping[str, Any]]:
    where = f"{path}:{lineno}"
    if not isinstance(obj, dict):
        raise RunDirError(f"{where}: a record must be a JSON object, got {_kind(obj)}")
    for name in ("step", "metrics"):
        if name not in obj:
            raise RunDirError(f"{where}: a record needs a {name!r} field")
    step = obj.get("step")
    if isinstance(step, bool) or not isinstance(step, int):
        raise RunDirError(f"{where}: 'step' must be an integer, got {_kind(step)}")
    wall_time = obj.get("wall_time")
    if wall_time is None:
        wall_time = math.nan
    elif isinstance(wall_time, bool) or not isinstance(wall_time, (int, float)):
        raise RunDirError(f"{where}: 'wall_time' must be a number, got {_kind(wall_time)}")
    metrics = obj.get("metrics")
    if not isinstance(metrics, dict):
        raise RunDirError(f"{where}: 'metrics' must be a JSON object, got {_kind(metrics)}")
    for k, v in metrics.items():
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise RunDirError(f"{where}: metric {k!r} must be a number or null, got {_kind(v)}")
    return step, float(wall_time), metrics


def _kind(obj: Any) -> str:
    if obj is None:
        return "null"
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}.get(type(obj), type(obj).__name__)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())
