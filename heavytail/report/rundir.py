"""Reading a run directory (``meta.json``, ``metrics.jsonl``, ``alerts.jsonl``) into arrays the report can draw."""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, NamedTuple, Sequence, overload

import numpy as np

# Per-layer metric families the report knows by name. A key ``<family>/<param name>`` is split on these when the
# run's meta.json does not list its parameters (with the list, any family splits unambiguously).
KNOWN_FAMILIES: tuple[str, ...] = (
    "grad/hill_alpha",
    "grad/hill_alpha_se",
    "grad/hill_k",
    "grad/kurtosis",
    "grad/kurtosis_gauss",
    "grad/norm",
    "grad/norm_preclip",
    "grad/max",
    "grad/nonfinite_frac",
    "noise/hill_alpha",
    "noise/hill_alpha_se",
    "noise/kurtosis",
    "noise/kurtosis_gauss",
    "noise/microbatch_hill_alpha",
    "noise/microbatch_hill_alpha_se",
    "noise/microbatch_kurtosis",
    "noise/rank_hill_alpha",
    "noise/rank_hill_alpha_se",
    "noise/rank_kurtosis",
    "probe/hill_alpha",
    "probe/hill_alpha_se",
    "probe/hill_alpha_gauss",
    "probe/stable_alpha",
    "probe/kurtosis",
    "probe/moment_slope_p1",
    "probe/moment_intercept_p1",
    "probe/moment_slope_p1.5",
    "probe/moment_intercept_p1.5",
    "probe/resolved_frac",
    "probe/grad_norm",
    "adam/ratio_max",
    "adam/ratio_p99",
    "adam/spike_frac",
    "adam/memory_steps",
    "shadow/ratio_max",
    "shadow/ratio_p99",
    "shadow/spike_frac",
    "shadow/memory_steps",
    # The monitor's shadow denominators are tagged by their beta2 (0.999 -> shadow999, 0.95 -> shadow95).
    "shadow999/ratio_max",
    "shadow999/spike_frac",
    "shadow999/memory_steps",
    "shadow95/ratio_max",
    "shadow95/spike_frac",
    "shadow95/memory_steps",
)
# Longest first, so that "grad/hill_alpha_se/x" is never read as family "grad/hill_alpha", layer "_se/x".
_FAMILIES_LONGEST_FIRST = tuple(sorted(KNOWN_FAMILIES, key=len, reverse=True))


class RunDirError(ValueError):
    """A run directory that cannot be read: missing, not a heavytail run, empty or corrupt.

    The message is one line naming the path and what is wrong with it.
    """


class NoRunYet(RunDirError):
    """A place that holds no records yet: missing, without ``metrics.jsonl``, or with an empty one.

    A run being started may still be there in a moment (``heavytail report --watch`` waits for it); a corrupt
    file is a plain :class:`RunDirError`.
    """


class Record(NamedTuple):
    """One checkpoint line of ``metrics.jsonl``: metric values are floats, or None where the run wrote null."""

    step: int
    wall_time: float
    metrics: dict[str, float | None]


def split_key(key: str, param_names: frozenset[str] | set[str] = frozenset()) -> tuple[str, str | None]:
    """Split a metric key into ``(family, layer)``; global keys (``loss``, ``grad/norm``) give ``(key, None)``.

    A family has at least two slash-separated parts (``grad/hill_alpha``), so a two-part key is always global.
    Parameter names come first when known (they may contain slashes), then the known families, then the
    convention that the first two parts are the family.
    """
    parts = key.split("/")
    if len(parts) < 3:
        return key, None
    if param_names:
        for i in range(2, len(parts)):
            layer = "/".join(parts[i:])
            if layer in param_names:
                return "/".join(parts[:i]), layer
    for family in _FAMILIES_LONGEST_FIRST:
        if key.startswith(family + "/"):
            return family, key[len(family) + 1 :]
    return "/".join(parts[:2]), "/".join(parts[2:])


class RecordTable(Sequence[Record]):
    """The checkpoint records of a run, stored by column.

    A run with hundreds of layers and thousands of checkpoints holds millions of values; one float64 matrix
    (records x keys) with a presence mask costs 9 bytes a value, where a dict per record costs ten times that.
    Indexing or iterating gives :class:`Record` tuples built on demand.
    """

    def __init__(
        self,
        steps: np.ndarray,
        wall_times: np.ndarray,
        keys: list[str],
        values: np.ndarray,
        present: np.ndarray,
    ) -> None:
        self.steps = np.asarray(steps, dtype=np.int64)
        self.wall_times = np.asarray(wall_times, dtype=np.float64)
        self.keys = list(keys)
        self.key_index = {k: i for i, k in enumerate(self.keys)}
        self.values = values
        self.present = present

    @classmethod
    def from_records(cls, records: Iterable[Record | tuple[int, float, Mapping[str, float | None]]]) -> RecordTable:
        """Build the table from ``(step, wall_time, metrics)`` tuples (None or NaN for a missing value)."""
        builder = _TableBuilder()
        for step, wall_time, metrics in records:
            builder.add(int(step), float(wall_time), metrics)
        return builder.build()

    def __len__(self) -> int:
        return len(self.steps)

    @overload
    def __getitem__(self, i: int) -> Record: ...

    @overload
    def __getitem__(self, i: slice) -> list[Record]: ...

    def __getitem__(self, i: int | slice) -> Record | list[Record]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        row, mask = self.values[i], self.present[i]
        metrics: dict[str, float | None] = {}
        for j in np.flatnonzero(mask):
            v = float(row[j])
            metrics[self.keys[j]] = None if math.isnan(v) else v
        return Record(int(self.steps[i]), float(self.wall_times[i]), metrics)

    def __iter__(self) -> Iterator[Record]:
        for i in range(len(self)):
            yield self[i]

    def column(self, key: str) -> np.ndarray:
        """Values of ``key`` at every record, NaN where it is missing or null."""
        j = self.key_index.get(key)
        if j is None:
            return np.full(len(self), np.nan)
        return self.values[:, j].copy()


class _TableBuilder:
    """Collects records line by line as sparse rows, then packs them into one matrix."""

    def __init__(self) -> None:
        self.key_index: dict[str, int] = {}
        self.steps: list[int] = []
        self.wall_times: list[float] = []
        self.rows: list[tuple[np.ndarray, np.ndarray]] = []

    def add(self, step: int, wall_time: float, metrics: Mapping[str, Any]) -> None:
        index = self.key_index
        cols = np.empty(len(metrics), dtype=np.int64)
        vals = np.empty(len(metrics), dtype=np.float64)
        for n, (k, v) in enumerate(metrics.items()):
            j = index.get(k)
            if j is None:
                j = index[k] = len(index)
            cols[n] = j
            vals[n] = np.nan if v is None else v
        self.steps.append(step)
        self.wall_times.append(wall_time)
        self.rows.append((cols, vals))

    def build(self) -> RecordTable:
        steps = np.asarray(self.steps, dtype=np.int64)
        order = _latest_per_step(steps)
        n_keys = len(self.key_index)
        values = np.full((len(order), n_keys), np.nan)
        present = np.zeros((len(order), n_keys), dtype=bool)
        for i, src in enumerate(order):
            cols, vals = self.rows[src]
            values[i, cols] = vals
            present[i, cols] = True
        keys = sorted(self.key_index, key=self.key_index.__getitem__)
        wall = np.asarray(self.wall_times, dtype=np.float64)
        return RecordTable(steps[order], wall[order] if len(order) else wall, keys, values, present)


def _latest_per_step(steps: np.ndarray) -> np.ndarray:
    """Indices that put records in step order, keeping the last record written for each step.

    A run resumed from a checkpoint appends to the same metrics.jsonl and writes again the steps between the
    checkpoint and the kill; the later lines are the ones that the training run that went on actually took.
    """
    if len(steps) == 0 or bool(np.all(np.diff(steps) > 0)):
        return np.arange(len(steps))
    last: dict[int, int] = {}
    for i, s in enumerate(steps.tolist()):
        last[s] = i
    return np.asarray([last[s] for s in sorted(last)], dtype=np.int64)


@dataclass(eq=False)
class Run:
    """A loaded run directory.

    ``records`` are the checkpoint lines in step order (``(step, wall_time, metrics)``, None for null),
    ``alerts`` the alert records as written, ``meta`` the contents of meta.json (empty if it was missing).
    A list of ``(step, wall_time, metrics)`` tuples may be passed as ``records`` to build a run in memory.
    """

    path: Path
    meta: dict[str, Any]
    records: Sequence[Record]
    alerts: list[dict[str, Any]] = field(default_factory=list)

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
    builder = _TableBuilder()
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
    return Run(path=path, meta=meta, records=builder.build(), alerts=alerts)


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
