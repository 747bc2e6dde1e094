"""Per-layer and per-run figures for the report's tables: medians of tail index, kurtosis and ratios."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np

from heavytail.report.rundir import Run


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
        ratio_max=_nanstat(np.max, ratios),
        spike_frac_median=_nanstat(np.median, all_values(run, spike_family)) if spike_family else math.nan,
        duration_s=duration,
    )
