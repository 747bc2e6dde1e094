"""The checkpoint records of a run, stored by column: one float matrix and a presence mask."""

from __future__ import annotations

import math
from typing import Any, Iterable, Iterator, Mapping, NamedTuple, Sequence, overload

import numpy as np


class Record(NamedTuple):
    """One checkpoint line of ``metrics.jsonl``: metric values are floats, or None where the run wrote null."""

    step: int
    wall_time: float
    metrics: dict[str, float | None]


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
        builder = TableBuilder()
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


class TableBuilder:
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
