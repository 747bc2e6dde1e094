"""Per-layer and per-run figures for the report's tables: medians of tail index, kurtosis and ratios."""

from __future__ import annotations

import datetime as _dt
import json
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, NamedTuple

import numpy as np

from heavytail.report.rundir import Run
from heavytail.report.svg import truncate as _truncate


def _nanstat(fn: Callable[[np.ndarray], Any], values: np.ndarray) -> float:
    """``fn`` over the finite values, NaN when there are none (no all-NaN warnings)."""
    finite = np.asarray(values, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    return float(fn(finite)) if finite.size else math.nan


def shadow_beta(family: str) -> float:
    """The beta2 a shadow family's tag stands for (``shadow999/...`` -> 0.999, ``shadow95`` -> 0.95); NaN if none."""
    tag = family.split("/", 1)[0][len("shadow") :]
    return float("0." + tag) if tag.isdigit() else math.nan


def shadow_ratio_families(run: Run) -> list[str]:
    """The shadow-denominator ratio families of a run (``shadow999/ratio_max``, ...), largest beta2 first."""
    found = [f for f in run.families() if f.startswith("shadow") and f.endswith("/ratio_max") and run.layers(f)]
    return sorted(found, key=lambda f: (-shadow_beta(f) if math.isfinite(shadow_beta(f)) else 0.0, f))


def ratio_family(run: Run) -> str | None:
    """The denominator-ratio family a run has: AdamW's own, else a shadow denominator's (the largest beta2,
    closest to AdamW's default 0.999), else None."""
    if run.layers("adam/ratio_max"):
        return "adam/ratio_max"
    shadows = shadow_ratio_families(run)
    return shadows[0] if shadows else None


def layer_stats(run: Run) -> dict[str, dict[str, float]]:
    """Per layer: median and min tail index, checkpoints under 2, median kurtosis (and Gaussian ref), ratios."""
    stats: dict[str, dict[str, float]] = {}

    def add(family: str, fields: Mapping[str, Callable[[np.ndarray], float]]) -> None:
        layers, _, values = run.matrix(family)
        for name, row in zip(layers, values):
            entry = stats.setdefault(name, {})
            for field_name, fn in fields.items():
                entry[field_name] = fn(row)

    add(
        "grad/hill_alpha",
        {
            "alpha_median": lambda r: _nanstat(np.median, r),
            "alpha_min": lambda r: _nanstat(np.min, r),
            "alpha_under2": lambda r: float(np.sum(r < 2.0)),
            "alpha_count": lambda r: float(np.sum(np.isfinite(r))),
        },
    )
    add("grad/hill_alpha_se", {"alpha_se_median": lambda r: _nanstat(np.median, r)})
    add("noise/hill_alpha", {"noise_alpha_median": lambda r: _nanstat(np.median, r)})
    add("probe/hill_alpha", {"probe_alpha_median": lambda r: _nanstat(np.median, r)})
    add("grad/kurtosis", {"kurtosis_median": lambda r: _nanstat(np.median, r)})
    add("grad/kurtosis_gauss", {"kurtosis_gauss_median": lambda r: _nanstat(np.median, r)})
    rf = ratio_family(run)
    if rf:
        add(rf, {"ratio_median": lambda r: _nanstat(np.median, r), "ratio_max": lambda r: _nanstat(np.max, r)})
    return stats


def all_values(run: Run, family: str) -> np.ndarray:
    _, _, values = run.matrix(family)
    return values[np.isfinite(values)]


VERDICTS = {0: "light", 1: "power", 2: "sparse"}
"""The noise-tail verdict codes (``noise/tail_class``, ``probe/tail_class``; heavytail.estimators.noise)."""


def verdict_key(alpha_key: str) -> str:
    """The verdict family of a noise tail-index family: ``noise/microbatch_hill_alpha`` ->
    ``noise/microbatch_tail_class``."""
    return alpha_key[: -len("hill_alpha")] + "tail_class"


def verdict_by_layer(run: Run, family: str) -> dict[str, str]:
    """Per layer, the verdict most of the run's checkpoints gave (a tie goes to the heavier: power, sparse,
    light), from a ``.../tail_class`` family; layers with no verdict are left out."""
    layers, _, values = run.matrix(family)
    out = {}
    for name, row in zip(layers, values):
        codes = [int(v) for v in row[np.isfinite(row)] if int(v) in VERDICTS]
        if codes:
            counts = {c: codes.count(c) for c in set(codes)}
            out[name] = VERDICTS[max(counts, key=lambda c: (counts[c], {1: 2, 2: 1, 0: 0}[c]))]
    return out


class Reading(NamedTuple):
    """One value of a run and where it was read: its metric key, the step, and the layer (None for a global key)."""

    value: float
    key: str
    step: int
    layer: str | None = None


def peak(run: Run, family: str, *, lowest: bool = False) -> Reading | None:
    """The largest (``lowest``: smallest) value of a per-layer family over every layer and checkpoint.

    Nulls are skipped (a ratio is null while the optimizer's denominator warms up); None when every value is null
    or the family is absent. Ties go to the earliest step, then to the first layer in model order.
    """
    layers, steps, values = run.matrix(family)
    ok = np.isfinite(values)
    if not ok.any():
        return None
    target = float(values[ok].min() if lowest else values[ok].max())
    hits = np.argwhere(ok & (values == target))
    i, j = min(hits.tolist(), key=lambda ij: (ij[1], ij[0]))
    return Reading(target, run.key(family, layers[i]) or family, int(steps[j]), layers[i])


def series_reading(run: Run, key: str, how: str = "last") -> Reading | None:
    """The ``last``, ``min`` or ``max`` non-null value of a global key (``loss``) with its step; None if none.

    ``min`` and ``max`` go to the earliest step on ties.
    """
    steps, values = run.series(key)
    finite = np.flatnonzero(np.isfinite(values))
    if not len(finite):
        return None
    if how == "last":
        i = int(finite[-1])
    elif how in ("min", "max"):
        picked = values[finite]
        i = int(finite[np.argmin(picked) if how == "min" else np.argmax(picked)])
    else:
        raise ValueError(f"series_reading: how must be 'last', 'min' or 'max', got {how!r}")
    return Reading(float(values[i]), key, int(steps[i]))


def first_under(run: Run, family: str, threshold: float) -> Reading | None:
    """The first checkpoint at which a layer of ``family`` read under ``threshold`` (the lowest such layer
    there), or None."""
    layers, steps, values = run.matrix(family)
    under = np.isfinite(values) & (values < threshold)
    cols = np.flatnonzero(under.any(axis=0))
    if not len(cols):
        return None
    j = int(cols[0])
    rows = np.flatnonzero(under[:, j])
    i = int(rows[np.argmin(values[rows, j])])
    return Reading(float(values[i, j]), run.key(family, layers[i]) or family, int(steps[j]), layers[i])


def timestamp(value: Any) -> str:
    """A unix time as ``2026-11-25 19:00:00 UTC``; other values as text, None as '—'."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        try:
            return _dt.datetime.fromtimestamp(float(value), tz=_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        except (OverflowError, OSError, ValueError):
            pass
    return str(value) if value is not None else "—"


INCOMPLETE = "the run is still going or was stopped without closing (killed)"
"""What a run directory whose meta.json has no ``finished`` time is: the monitor writes it when it closes
(``close()``, the end of a ``with`` block, or interpreter exit); monitors before that key never wrote it."""


@dataclass(frozen=True)
class RunStatus:
    """Whether the monitor closed the run, and the last record it wrote."""

    finished: float | None
    """meta.json's ``finished`` (unix time), None when the run did not close."""
    final_step: int | None
    """meta.json's ``final_step``: the monitor's step count at close."""
    last_step: int
    """The step of the last record in metrics.jsonl."""
    last_wall_time: float
    """Its wall time (unix time; NaN if not written)."""

    @property
    def complete(self) -> bool:
        return self.finished is not None

    def last_record(self) -> str:
        """``last record at step N, <wall time>``."""
        when = timestamp(self.last_wall_time) if math.isfinite(self.last_wall_time) else "time not recorded"
        return f"last record at step {self.last_step:,}, {when}"

    def text(self) -> str:
        """One sentence: ``finished at <time>, final step N`` or ``incomplete: ...; last record at step N, <time>``."""
        if self.complete:
            final = self.final_step if self.final_step is not None else self.last_step
            text = f"finished at {timestamp(self.finished)}, final step {final:,}"
            if final != self.last_step:
                text += f" (last record at step {self.last_step:,})"
            return text
        return f"incomplete: {INCOMPLETE}; {self.last_record()}"


def run_status(run: Run) -> RunStatus:
    """The :class:`RunStatus` of a loaded run."""
    steps, wall = run.steps, run.wall_times
    return RunStatus(
        finished=run.finished,
        final_step=run.final_step,
        last_step=int(steps[-1]) if len(steps) else 0,
        last_wall_time=float(wall[-1]) if len(wall) else math.nan,
    )


@dataclass
class RunSummary:
    """The headline figures of one run."""

    steps: int
    checkpoints: int
    final_loss: float
    min_loss: float
    alerts: int
    alerts_by_severity: Counter
    alerts_by_rule: Counter
    layers: int
    layers_under2: int
    alpha_median: float
    kurtosis_median: float
    ratio_family: str | None
    ratio_median: float
    ratio_max: float
    spike_frac_median: float
    duration_s: float
    first_step: int = 0
    final_loss_at: Reading | None = None
    """The last non-null ``loss`` and its step."""
    min_loss_at: Reading | None = None
    ratio_peak: Reading | None = None
    """The largest non-null value of ``ratio_family``: its layer's key and step."""
    first_under2: Reading | None = None
    """The first checkpoint at which a layer's ``grad/hill_alpha`` read under 2."""
    status: RunStatus = field(default_factory=lambda: RunStatus(None, None, 0, math.nan))


def summarize(run: Run) -> RunSummary:
    """Headline figures for the cards and the comparison table."""
    alphas_layers, _, alphas = run.matrix("grad/hill_alpha")
    under = int(np.sum(np.any(alphas < 2.0, axis=1))) if alphas.size else 0
    rf = ratio_family(run)
    ratios = all_values(run, rf) if rf else np.zeros(0)
    spike_family = f"{rf.split('/')[0]}/spike_frac" if rf else None
    wall = run.wall_times
    started = run.meta.get("started")
    t0 = float(started) if isinstance(started, (int, float)) and not isinstance(started, bool) else np.nan
    finite_wall = wall[np.isfinite(wall)]
    if not math.isfinite(t0) and finite_wall.size:
        t0 = float(finite_wall[0])
    duration = float(finite_wall[-1] - t0) if finite_wall.size and math.isfinite(t0) else math.nan
    _, loss = run.series("loss")
    steps = run.steps
    ratio_peak = peak(run, rf) if rf else None
    return RunSummary(
        steps=int(steps[-1]) if len(steps) else 0,
        checkpoints=len(steps),
        final_loss=run.final("loss"),
        min_loss=_nanstat(np.min, loss),
        alerts=len(run.alerts),
        alerts_by_severity=Counter(str(a.get("severity", "?")) for a in run.alerts),
        alerts_by_rule=Counter(str(a.get("rule", "?")) for a in run.alerts),
        layers=len(alphas_layers) or len(run.meta.get("params") or ()),
        layers_under2=under,
        alpha_median=_nanstat(np.median, alphas),
        kurtosis_median=_nanstat(np.median, all_values(run, "grad/kurtosis")),
        ratio_family=rf,
        ratio_median=_nanstat(np.median, ratios),
        ratio_max=ratio_peak.value if ratio_peak else math.nan,
        spike_frac_median=_nanstat(np.median, all_values(run, spike_family)) if spike_family else math.nan,
        duration_s=duration,
        first_step=int(steps[0]) if len(steps) else 0,
        final_loss_at=series_reading(run, "loss", "last"),
        min_loss_at=series_reading(run, "loss", "min"),
        ratio_peak=ratio_peak,
        first_under2=first_under(run, "grad/hill_alpha", 2.0),
        status=run_status(run),
    )


def consistency_checks(runs: Mapping[str, Run]) -> list[tuple[bool, str]]:
    """Whether the runs are comparable: same model, parameters, steps, interval and seed where recorded."""

    def same(label: str, get: Callable[[Run], Any]) -> tuple[bool, str] | None:
        values = {name: get(r) for name, r in runs.items()}
        known = {k: v for k, v in values.items() if v not in (None, "", [], {})}
        if len(known) < 2:
            return None
        distinct = {json.dumps(v, sort_keys=True, default=str) for v in known.values()}
        if len(distinct) == 1:
            shown = next(iter(known.values()))
            text = shown if isinstance(shown, str) else json.dumps(shown, default=str)
            return True, f"{label}: the same in every run ({_truncate(str(text), 80)})"
        listing = "; ".join(f"{k}: {_truncate(json.dumps(v, default=str), 40)}" for k, v in known.items())
        return False, f"{label} differs: {listing}"

    def param_signature(r: Run) -> Any:
        params = r.meta.get("params")
        if not isinstance(params, list):
            return None
        numel = sum(int(p.get("numel", 0) or 0) for p in params if isinstance(p, Mapping))
        return f"{len(params)} tensors, {numel:,} values"

    def seed(r: Run) -> Any:
        for where in ("extra", "config"):
            d = r.meta.get(where)
            if isinstance(d, Mapping) and "seed" in d:
                return d["seed"]
        return None

    checks = [
        same("model", lambda r: r.meta.get("model")),
        same("parameters", param_signature),
        same("last step", lambda r: int(r.steps[-1]) if len(r.steps) else None),
        same("monitor interval (every)", lambda r: r.meta.get("every")),
        same("seed", seed),
    ]
    return [c for c in checks if c is not None]
