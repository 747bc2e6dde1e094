"""Reliability tests: the monitor never breaks the training run, never loses a record, never lies.

Shared helpers: a model whose gradients the test sets by hand, recording and failing backends, and readers that
check a run directory line by line. Each guarantee and the test that proves it is listed in docs/reliability.md.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import pytest
import torch
from torch import nn


@pytest.fixture(autouse=True)
def one_intra_op_thread():
    """Run each test with one intra-op thread (imported by every module here, so it applies to all of them).

    These tests drive tiny tensors, where OpenMP only adds cost, and on a busy 2-core CI machine an op that opens a
    parallel region for any size (``torch.repeat_interleave`` does: grain size 1) waits milliseconds for a core.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class HandModel(nn.Module):
    """A model of bare parameters (one per shape/dtype), for tests that set ``.grad`` by hand."""

    def __init__(self, shapes: Mapping[str, Sequence[int]], dtypes: Mapping[str, torch.dtype] | None = None):
        super().__init__()
        dtypes = dtypes or {}
        for name, shape in shapes.items():
            dtype = dtypes.get(name, torch.float32)
            self.register_parameter(name, nn.Parameter(torch.zeros(tuple(shape), dtype=dtype)))

    def set_grads(self, grads: Mapping[str, torch.Tensor | None]) -> None:
        for name, g in grads.items():
            getattr(self, name).grad = g


class RecordingBackend:
    """A user backend that keeps everything it is sent."""

    def __init__(self) -> None:
        self.records: list[tuple[int, dict]] = []
        self.alerts: list[dict] = []
        self.closed = 0

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        self.records.append((step, dict(metrics)))

    def alert(self, alert: Mapping[str, Any]) -> None:
        self.alerts.append(dict(alert))

    def close(self) -> None:
        self.closed += 1


class FailingBackend(RecordingBackend):
    """A user backend whose chosen methods raise ``error`` every time they are called (after counting the call)."""

    def __init__(self, methods: Sequence[str] = ("log", "alert", "close"), error: Exception | None = None) -> None:
        super().__init__()
        self.methods = set(methods)
        self.error = error if error is not None else RuntimeError("backend is down")
        self.calls = {"log": 0, "alert": 0, "close": 0}

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        self.calls["log"] += 1
        if "log" in self.methods:
            raise self.error
        super().log(metrics, step)

    def alert(self, alert: Mapping[str, Any]) -> None:
        self.calls["alert"] += 1
        if "alert" in self.methods:
            raise self.error
        super().alert(alert)

    def close(self) -> None:
        self.calls["close"] += 1
        if "close" in self.methods:
            raise self.error
        super().close()


def read_lines(path: Path | str) -> list[dict]:
    """Every line of a JSONL file, each of which must parse (the file must end with a newline)."""
    text = Path(path).read_text(encoding="utf-8") if Path(path).exists() else ""
    assert text == "" or text.endswith("\n"), f"{path} ends with a cut line: {text[-80:]!r}"
    return [json.loads(line) for line in text.splitlines()]


def heavytail_warnings(caught: Sequence[warnings.WarningMessage], contains: str = "") -> list[str]:
    """The messages of the RuntimeWarnings heavytail gave that contain ``contains``."""
    return [
        str(w.message)
        for w in caught
        if issubclass(w.category, RuntimeWarning)
        and str(w.message).startswith("heavytail")
        and contains in str(w.message)
    ]


def same_metrics(a: Mapping[str, Any], b: Mapping[str, Any], *, rel: float = 0.0, skip: Sequence[str] = ()) -> None:
    """Assert two metric dicts agree key for key (``None``/NaN equal to each other); ``rel`` 0 means bit for bit."""
    keys_a = {k for k in a if not any(k.startswith(s) for s in skip)}
    keys_b = {k for k in b if not any(k.startswith(s) for s in skip)}
    assert keys_a == keys_b, f"keys differ: {sorted(keys_a ^ keys_b)[:10]}"
    for key in sorted(keys_a):
        x, y = a[key], b[key]
        x = math.nan if x is None else x
        y = math.nan if y is None else y
        if math.isnan(x) or math.isnan(y):
            assert math.isnan(x) and math.isnan(y), f"{key}: {x} != {y}"
        elif rel == 0.0:
            assert x == y, f"{key}: {x!r} != {y!r}"
        else:
            assert math.isclose(x, y, rel_tol=rel, abs_tol=1e-300), f"{key}: {x!r} != {y!r}"
