"""Plain-text accounts of run directories for the terminal: one run's summary, or several runs side by side."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np

from heavytail.report.rundir import Run
from heavytail.report.stats import RunSummary, consistency_checks, summarize, verdict_by_layer, verdict_key

MIN_RANKED_NUMEL = 1000
"""Tensors with fewer entries are left out of the heaviest-tail ranking (Hill keeps at most n/10)."""


ALERT_MESSAGE_CHARS = 100
"""An alert's message is cut to this many characters in the summary (whole in alerts.jsonl and the report)."""


def median_by_layer(run: Run, family: str) -> dict[str, float]:
    """Per layer, the median over the run of a per-layer family (nulls skipped; NaN for a layer with none)."""
    layers, _, values = run.matrix(family)
    out = {}
    for name, row in zip(layers, values):
        finite = row[np.isfinite(row)]
        out[name] = float(np.median(finite)) if finite.size else math.nan
    return out


def _numels(meta: Mapping[str, Any]) -> dict[str, int]:
    """Entries per parameter, and per group under ``group_by``, from meta.json."""
    params = meta.get("params") if isinstance(meta.get("params"), list) else []
    out = {p["name"]: int(p.get("numel") or 0) for p in params if isinstance(p, Mapping) and "name" in p}
    groups = meta.get("groups")
    if isinstance(groups, Mapping):
        for group, members in groups.items():
            out[group] = sum(out.get(m, 0) for m in members) if isinstance(members, list) else 0
    return out


class Ranking(NamedTuple):
    """Layers by median gradient tail index over the run, heaviest (lowest alpha) first."""

    layers: list[tuple[str, float]]
    """``(layer, median grad/hill_alpha)``, lowest first."""
    left_out: int
    """Layers with a tail index that were not ranked: too few entries for it to mean much."""


def heaviest_layers(run: Run) -> Ranking:
    """The layers ranked by median ``grad/hill_alpha``, lowest first.

    A tensor of a few hundred entries (a norm's gain, a bias) leaves Hill about ten order statistics: its
    estimate is as uncertain as it is large, and would head the list on noise alone. Ranked are the tensors (or
    groups) of at least :data:`MIN_RANKED_NUMEL` entries when meta.json lists them, else those whose median
    standard error is at most half their alpha.
    """
    alpha = median_by_layer(run, "grad/hill_alpha")
    se = median_by_layer(run, "grad/hill_alpha_se")
    numel = _numels(run.meta)
    certain = {
        n: a
        for n, a in alpha.items()
        if math.isfinite(a) and (numel.get(n, 0) >= MIN_RANKED_NUMEL if numel else se.get(n, math.inf) <= a / 2)
    }
    ranked = sorted(certain.items(), key=lambda t: (t[1], t[0]))
    left_out = sum(1 for n, a in alpha.items() if math.isfinite(a) and n not in certain)
    return Ranking(ranked, left_out)


def _with_verdict(alpha: float, verdict: str | None) -> str:
    """A noise tail index as the console shows it: the number for a power law (or without a verdict), the
    verdict's word for a light or sparse tail."""
    return num(alpha) if verdict in (None, "power") else verdict


def num(v: float | None, digits: int = 3) -> str:
    """A figure for the terminal: ``digits`` significant digits, whole numbers up to 99,999 written out."""
    if v is None or not math.isfinite(v):
        return "-" if v is None or math.isnan(v) else ("inf" if v > 0 else "-inf")
    if abs(v) >= 10**digits and abs(v) < 1e5:
        return f"{v:,.0f}"
    return f"{v:.{digits}g}"


def duration(seconds: float) -> str:
    """``1h02m``, ``3m05s`` or ``42s``; ``-`` when unknown."""
    if not math.isfinite(seconds) or seconds < 0:
        return "-"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def alert_counts(run: Run) -> str:
    """``3 (tail_index_drop x2, hidden_spike x1)``, most frequent rule first, or ``none``."""
    s = summarize(run)
    return _alert_counts(s)


def _alert_counts(s: RunSummary) -> str:
    if not s.alerts:
        return "none"
    return f"{s.alerts} (" + ", ".join(f"{k} x{v}" for k, v in s.alerts_by_rule.most_common()) + ")"


def ratio_text(s: RunSummary) -> str | None:
    """The largest denominator ratio with its key and step; None when the run has no ratio family."""
    if s.ratio_family is None:
        return None
    if s.ratio_peak is None:
        return (
            f"none yet ({s.ratio_family} is null at every checkpoint so far: the optimizer's denominator is "
            "still warming up)"
        )
    return (
        f"{num(s.ratio_peak.value)} ({s.ratio_peak.key} at step {s.ratio_peak.step:,}; median over layers and "
        f"checkpoints {num(s.ratio_median)})"
    )


def noise_scale_text(run: Run) -> str | None:
    """The whole model's gradient noise scale at the last checkpoint that has one (``gns/``), or None."""

    def last(keys: tuple[str, ...], anchor: str) -> list[float] | None:
        # The last record with a noise scale; a null figure there is an infinite one (noise dominates even B).
        recorded = np.flatnonzero(np.isfinite(run.series(anchor)[1]))
        if not len(recorded):
            return None
        values = [float(run.series(k)[1][recorded[-1]]) for k in keys]
        return [math.inf if math.isnan(v) else v for v in values]

    streaming = last(("gns/b_simple", "gns/b_robust", "gns/big_batch"), "gns/big_batch")
    probe = last(("gns/probe_b_simple", "gns/probe_b_robust", "gns/probe_big_batch"), "gns/probe_big_batch")
    if streaming is not None:
        unit = "examples" if (run.meta.get("config") or {}).get("batch_size") else "micro-batches"
        b_simple, robust, batch = streaming
        text = (
            f"Gradient noise scale (last checkpoint, in {unit}): B_simple {num(b_simple)} (gns/b_simple), robust "
            f"{num(robust)} (gns/b_robust); training batch {num(batch)}."
        )
    elif probe is not None:  # no streaming source (one process, no accumulation): the probe's held batch
        b_simple, robust, batch = probe
        text = (
            f"Gradient noise scale of the probe's held batch (last probing checkpoint, in rows): B_simple "
            f"{num(b_simple)} (gns/probe_b_simple), robust {num(robust)} (gns/probe_b_robust); held batch "
            f"{num(batch)} rows."
        )
    else:
        return None
    if run.final("gns/variance_flag") == 1.0:
        text += " A noise tail index under 2 makes B_simple meaningless here: read the robust figure."
    return text


def headline(run: Run, s: RunSummary | None = None) -> str:
    """``<name>: N steps of <model> with <optimizer>, K checkpoints (every E), <wall time>.``"""
    s = s or summarize(run)
    meta = run.meta
    optimizer = meta.get("optimizer") or "no optimizer"
    every = f" (every {meta['every']})" if isinstance(meta.get("every"), int) else ""
    took = f", {duration(s.duration_s)} of wall time" if math.isfinite(s.duration_s) else ""
    return (
        f"{run.name}: {s.steps:,} steps of {meta.get('model') or 'a model'} with {optimizer}, "
        f"{s.checkpoints:,} checkpoint{'s' if s.checkpoints != 1 else ''}{every}{took}."
    )


def summary_text(
    run: Run,
    *,
    title: str | None = None,
    status: bool = True,
    notes: Sequence[str] = (),
    report: Path | None = None,
    top: int = 5,
    first_alerts: int = 3,
) -> str:
    """A short plain-text account of any run directory: what ran, whether it finished, loss, heaviest-tailed
    layers, noise tails, the largest denominator ratio, alerts by rule, where the files are.

    ``title`` replaces the first line (:func:`headline`); ``status=False`` leaves out the finished/incomplete line
    (the demo prints its summary right after closing the run); ``notes`` are lines printed after the tail
    indices; ``report`` adds the report's path.
    """
    s = summarize(run)
    lines = [title or headline(run, s)]
    if status or not s.status.complete:
        text = s.status.text()
        lines.append(text[0].upper() + text[1:] + ".")
    if s.final_loss_at is not None and s.min_loss_at is not None:
        _, loss = run.series("loss")
        first = loss[np.isfinite(loss)][0]
        lines.append(
            f"Loss (checkpoint means): {first:.3f} at the first checkpoint, {s.final_loss_at.value:.3f} at the "
            f"last (step {s.final_loss_at.step:,}); lowest {s.min_loss_at.value:.3f} at step {s.min_loss_at.step:,}."
        )

    ranking = heaviest_layers(run)
    se = median_by_layer(run, "grad/hill_alpha_se")
    noise = median_by_layer(run, "noise/hill_alpha")
    probe = median_by_layer(run, "probe/hill_alpha")
    stable = median_by_layer(run, "probe/stable_alpha")
    if ranking.layers:
        shown = ranking.layers[:top]
        lines.append("")
        lines.append(f"Heaviest-tailed layers (median over {s.checkpoints} checkpoints; alpha < 2: infinite variance):")
        width = max(len("layer"), *(len(n) for n, _ in shown))
        cols = "coordinate alpha (grad/hill_alpha)"
        if noise:
            cols += " | noise alpha, temporal"
        if probe:
            cols += " | probe (Hill, stable)"
        lines.append(f"  {'layer'.ljust(width)}  {cols}")
        noise_verdict = verdict_by_layer(run, "noise/tail_class")
        probe_verdict = verdict_by_layer(run, "probe/tail_class")
        for n, a in shown:
            text = f"  {n.ljust(width)}  {num(a)} +/- {num(se.get(n, math.nan), 2)}"
            if noise:
                text += f" | {_with_verdict(noise.get(n, math.nan), noise_verdict.get(n))}"
            if probe:
                text += (
                    f" | {_with_verdict(probe.get(n, math.nan), probe_verdict.get(n))}, {num(stable.get(n, math.nan))}"
                )
            lines.append(text)
        if ranking.left_out:
            lines.append(
                f"  ({ranking.left_out} small tensor{'s' if ranking.left_out > 1 else ''} (norm gains, biases) left "
                "out: too few entries for a tail index to rank; all are in the report)"
            )
    if s.layers and run.layers("grad/hill_alpha"):
        under = f"Layers with alpha < 2 at some checkpoint: {s.layers_under2} of {s.layers}"
        if s.first_under2 is not None:
            f2 = s.first_under2
            under += f" (first {f2.layer}, {num(f2.value)} at step {f2.step:,})"
        lines.append(under + ".")
    if noise or probe:
        lines.append("")
        lines.append("Noise tail indices (median over layers and checkpoints; verdicts: layers by the verdict most")
        lines.append("checkpoints gave, light = no power-law tail, sparse = mostly zero draws):")
        for label, key, values in (("temporal", "noise/hill_alpha", noise), ("probe", "probe/hill_alpha", probe)):
            verdicts = verdict_by_layer(run, verdict_key(key))
            heavy = {n: v for n, v in values.items() if math.isfinite(v) and verdicts.get(n, "power") == "power"}
            if not values or not (heavy or verdicts):
                continue
            text = f"  {label} ({key}): "
            if verdicts:
                counts = {v: list(verdicts.values()).count(v) for v in ("power", "sparse", "light")}
                text += ", ".join(f"{c} {v}" for v, c in counts.items() if c) + "; "
            if heavy:
                heaviest = min(heavy.items(), key=lambda t: (t[1], t[0]))
                text += f"power-law alpha median {num(float(np.median(list(heavy.values()))))}, "
                text += f"heaviest {heaviest[0]} {num(heaviest[1])}"
            else:
                text += "no power-law tail"
            lines.append(text.rstrip("; "))
    gns = noise_scale_text(run)
    if gns is not None:
        lines.append("")
        lines.append(gns)
    if notes:
        lines.append("")
        lines += list(notes)
    ratio = ratio_text(s)
    if ratio is not None:
        lines.append("")
        lines.append(f"Largest denominator ratio: {ratio}.")

    lines.append("")
    if run.alerts:
        lines.append(f"Alerts: {_alert_counts(s)}")
        for a in run.alerts[:first_alerts]:
            lines.append(
                f"  step {a.get('step')} [{a.get('severity', '?')}] {a.get('rule', '?')}: "
                f"{_cut(str(a.get('message', '')), ALERT_MESSAGE_CHARS)}"
            )
        if len(run.alerts) > first_alerts:
            lines.append(f"  ... {len(run.alerts) - first_alerts} more in {run.path / 'alerts.jsonl'}")
    else:
        lines.append("Alerts: none.")
    lines.append("")
    lines.append(f"Run directory: {run.path}")
    if report is not None:
        lines.append(f"Report:        {report}")
    return "\n".join(lines)


def report_lines(run: Run, top: int = 3) -> list[str]:
    """What ``heavytail report`` prints besides the path: the status, alerts by rule and the heaviest layers."""
    s = summarize(run)
    lines = [f"Run:     {run.name}, {s.steps:,} steps, {s.status.text()}"]
    lines.append(f"Alerts:  {_alert_counts(s)}")
    ranking = heaviest_layers(run)
    if ranking.layers:
        heaviest = ", ".join(f"{n} {num(a)}" for n, a in ranking.layers[:top])
        lines.append(f"Heaviest-tailed layers (median grad/hill_alpha): {heaviest}")
    return lines


_CELL = 40  # a terminal column wider than this is cut (the HTML page has every figure in full)


def compare_text(runs: Mapping[str, Run]) -> str:
    """Runs side by side for the terminal: one column per run, one row per figure, then what makes the
    comparison fair (same model, steps, interval, seed) or not."""
    names = list(runs)
    summaries = {n: summarize(r) for n, r in runs.items()}
    rows: list[tuple[str, list[str]]] = [
        ("optimizer", [str(runs[n].meta.get("optimizer") or "-") for n in names]),
        ("model", [str(runs[n].meta.get("model") or "-") for n in names]),
        ("status", ["finished" if summaries[n].status.complete else "incomplete" for n in names]),
        ("last step (checkpoints)", [f"{summaries[n].steps:,} ({summaries[n].checkpoints:,})" for n in names]),
        ("final loss", [num(summaries[n].final_loss, 4) for n in names]),
        (
            "lowest loss (step)",
            [f"{num(m.value, 4)} ({m.step:,})" if (m := summaries[n].min_loss_at) is not None else "-" for n in names],
        ),
        ("median grad/hill_alpha", [num(summaries[n].alpha_median) for n in names]),
        (
            "layers with alpha < 2",
            [f"{summaries[n].layers_under2} / {summaries[n].layers}" if summaries[n].layers else "-" for n in names],
        ),
        ("ratio family", [summaries[n].ratio_family or "-" for n in names]),
        ("largest ratio (step)", [_ratio_cell(summaries[n]) for n in names]),
        ("median ratio", [num(summaries[n].ratio_median) for n in names]),
        ("alerts", [_alert_counts(summaries[n]) for n in names]),
        ("wall time", [duration(summaries[n].duration_s) for n in names]),
    ]
    label_w = max(len(label) for label, _ in rows)
    cells = [[_cut(v) for v in values] for _, values in rows]
    widths = [max(len(_cut(n)), *(len(c[i]) for c in cells)) for i, n in enumerate(names)]
    out = ["  ".join([" " * label_w, *(_cut(n).ljust(w) for n, w in zip(names, widths))]).rstrip()]
    for (label, _), values in zip(rows, cells):
        out.append("  ".join([label.ljust(label_w), *(v.ljust(w) for v, w in zip(values, widths))]).rstrip())
    checks = consistency_checks(runs)
    if checks:
        out.append("")
        out += [f"{'same' if ok else 'DIFFERS'}: {text}" for ok, text in checks]
    return "\n".join(out)


def _ratio_cell(s: RunSummary) -> str:
    if s.ratio_family is None:
        return "not recorded"
    if s.ratio_peak is None:
        return "none yet"
    return f"{num(s.ratio_peak.value)} ({s.ratio_peak.step:,})"


def _cut(text: str, width: int = _CELL) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"
