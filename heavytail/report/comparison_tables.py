"""The comparison report's tables: figures per run, settings, per-layer medians side by side, and their sections."""

from __future__ import annotations

import json
import math
from typing import Any, Mapping

import numpy as np

from heavytail.report.families import families
from heavytail.report.linechart import RUN_COLOURS
from heavytail.report.rundir import Run
from heavytail.report.scales import ALPHA_SCALE
from heavytail.report.sections import Context, Section
from heavytail.report.stats import RunSummary, consistency_checks, layer_stats, ratio_family
from heavytail.report.svg import esc, fmt
from heavytail.report.tables import cell, duration_text, missing, severity_order


def _alert_count_text(s: RunSummary) -> str:
    if not s.alerts:
        return "0"
    parts = [f"{n} {k}" for k, n in sorted(s.alerts_by_severity.items(), key=severity_order)]
    return f"{s.alerts} ({', '.join(parts)})"


def _summary_table(
    runs: Mapping[str, Run], summaries: Mapping[str, RunSummary], summary: Mapping[str, Any] | None
) -> str:
    names = list(runs)
    rows: list[tuple[str, list[str]]] = []

    def row(label: str, values: list[str]) -> None:
        rows.append((label, values))

    row("optimizer", [esc(runs[n].meta.get("optimizer") or "—") for n in names])
    row("model", [esc(runs[n].meta.get("model") or "—") for n in names])
    row("last step / checkpoints", [f"{summaries[n].steps:,} / {summaries[n].checkpoints:,}" for n in names])
    row(
        "status",
        [
            "finished"
            if summaries[n].status.complete
            else f"<span class='ht-low'>incomplete</span> ({esc(summaries[n].status.last_record())})"
            for n in names
        ],
    )
    losses = [summaries[n].final_loss for n in names]
    best = np.nanargmin(losses) if np.isfinite(losses).any() else -1
    row(
        "final loss",
        [(f"<b>{esc(fmt(v))}</b>" if i == best and len(names) > 1 else esc(fmt(v))) for i, v in enumerate(losses)],
    )
    row("lowest loss", [esc(fmt(summaries[n].min_loss)) for n in names])
    row("alerts", [esc(_alert_count_text(summaries[n])) for n in names])
    row(
        "alerts by rule",
        [esc(", ".join(f"{k} ×{v}" for k, v in summaries[n].alerts_by_rule.most_common()) or "none") for n in names],
    )
    row("median tail index α (all layers, all checkpoints)", [esc(fmt(summaries[n].alpha_median, 3)) for n in names])
    row(
        "layers that went under α = 2",
        [
            (f"<span class='ht-low'>{summaries[n].layers_under2}</span>" if summaries[n].layers_under2 else "0")
            + f" / {summaries[n].layers}"
            for n in names
        ],
    )
    row("median excess kurtosis", [esc(fmt(summaries[n].kurtosis_median, 3)) for n in names])
    row("denominator ratio source", [esc(summaries[n].ratio_family or "not recorded") for n in names])
    row("median ratio max", [esc(fmt(summaries[n].ratio_median, 3)) for n in names])
    row("largest ratio max", [esc(_peak_text(summaries[n])) for n in names])
    row("median spike fraction (r² > threshold)", [esc(fmt(summaries[n].spike_frac_median, 3)) for n in names])
    row("wall time", [esc(duration_text(summaries[n].duration_s)) for n in names])
    if summary:
        per_run = {k: v for k, v in summary.items() if k in runs and isinstance(v, Mapping)}
        figures: list[str] = []
        for v in per_run.values():
            figures += [str(f) for f in v if str(f) not in figures]
        for f in figures:
            row(f, [esc(_value_text(per_run.get(n, {}).get(f))) for n in names])
    head = (
        "<tr><th>figure</th>"
        + "".join(
            f"<th class='num'><span class='ht-swatch' style='background:{RUN_COLOURS[i % len(RUN_COLOURS)]}'></span>{esc(n)}</th>"
            for i, n in enumerate(names)
        )
        + "</tr>"
    )
    body = "".join(
        f"<tr><td>{esc(label)}</td>" + "".join(f"<td class='num'>{v}</td>" for v in values) + "</tr>"
        for label, values in rows
    )
    return f"<div class='ht-scroll-x'><table class='ht-table' id='summary-table'>{head}{body}</table></div>"


def _peak_text(s: RunSummary) -> str:
    if s.ratio_family is None:
        return "—"
    if s.ratio_peak is None:
        return "none yet"
    return f"{fmt(s.ratio_peak.value, 3)} ({s.ratio_peak.layer}, step {s.ratio_peak.step:,})"


def _value_text(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, (int, float, np.number)) and not isinstance(v, bool):
        return fmt(v)
    return v if isinstance(v, str) else json.dumps(v, default=str)


def _settings_table(summary: Mapping[str, Any] | None, runs: Mapping[str, Run]) -> str:
    if not summary:
        return ""
    flat = {k: v for k, v in summary.items() if not (k in runs and isinstance(v, Mapping))}
    if not flat:
        return ""
    rows = "".join(f"<tr><td>{esc(k)}</td><td class='mono'>{esc(_value_text(v))}</td></tr>" for k, v in flat.items())
    return f"<h3>Comparison settings</h3><table class='ht-table' id='settings-table'>{rows}</table>"


def _per_layer_table(runs: Mapping[str, Run]) -> str:
    stats = {name: layer_stats(r) for name, r in runs.items()}
    layers: list[str] = []
    seen: set[str] = set()
    for r in runs.values():
        for layer in r.layers("grad/hill_alpha") or r.layers(ratio_family(r) or "adam/ratio_max"):
            if layer not in seen:
                seen.add(layer)
                layers.append(layer)
    if not layers:
        return missing("grad/hill_alpha")
    names = list(runs)
    head1 = (
        "<tr><th rowspan='2'>layer</th>"
        + "".join(f"<th colspan='2' class='num'>{esc(n)}</th>" for n in names)
        + "</tr>"
    )
    head2 = "<tr>" + "".join("<th class='num'>median α</th><th class='num'>median ratio</th>" for _ in names) + "</tr>"
    rows = []
    for layer in layers:
        cells = [f"<td class='ht-layer'>{esc(layer)}</td>"]
        for n in names:
            s = stats[n].get(layer, {})
            a = s.get("alpha_median", math.nan)
            cells.append(cell(a, ALPHA_SCALE, 3, low=a < 2))
            cells.append(cell(s.get("ratio_median", math.nan), None, 3))
        rows.append(f"<tr>{''.join(cells)}</tr>")
    return (
        "<div class='ht-scroll'><table class='ht-table' id='layer-table'>"
        f"<thead>{head1}{head2}</thead><tbody>{''.join(rows)}</tbody></table></div>"
    )


# Figures of the side-by-side per-layer tables, in order; each is shown when some run recorded it.
def _family_tables(runs: Mapping[str, Run]) -> str:
    names = list(runs)
    blocks = []
    present = [(f.key, f.table) for f in families() if f.table and any(r.layers(f.key) for r in runs.values())]
    for n_shown, (family, title) in enumerate(present):
        layers: list[str] = []
        medians: dict[str, dict[str, float]] = {}
        for n, r in runs.items():
            fam_layers, _, values = r.matrix(family)
            for name, row in zip(fam_layers, values):
                if name not in medians:
                    layers.append(name)
                    medians[name] = {}
                finite = row[np.isfinite(row)]
                medians[name][n] = float(np.median(finite)) if finite.size else math.nan
        is_alpha = family.endswith("hill_alpha")
        head = "<tr><th>layer</th>" + "".join(f"<th class='num'>{esc(n)}</th>" for n in names) + "</tr>"
        rows = []
        for layer in layers:
            cells = [f"<td class='ht-layer'>{esc(layer)}</td>"]
            for n in names:
                v = medians[layer].get(n, math.nan)
                cells.append(cell(v, ALPHA_SCALE if is_alpha else None, 3, low=is_alpha and v < 2))
            rows.append(f"<tr>{''.join(cells)}</tr>")
        table = (
            f"<div class='ht-scroll'><table class='ht-table' data-family='{esc(family)}'>{head}{''.join(rows)}"
            "</table></div>"
        )
        opened = " open" if n_shown < 2 else ""
        blocks.append(
            f"<details class='ht-family'{opened}><summary>{esc(title)} · <code>{esc(family)}</code></summary>"
            f"{table}</details>"
        )
    return "\n".join(blocks) if blocks else missing("grad/hill_alpha")


def _comparison(ctx: Context) -> str:
    parts = []
    if ctx.note:
        parts.append(f'<div class="ht-note" id="fair-note">{esc(ctx.note)}</div>')
    checks = consistency_checks(ctx.runs)
    if checks:
        items = "".join(
            f"<li><span class='{'ht-ok' if ok else 'ht-diff'}'>{'same' if ok else 'differs'}</span> {esc(text)}</li>"
            for ok, text in checks
        )
        parts.append(f"<ul class='ht-checks' id='consistency-checks'>{items}</ul>")
    parts.append(_settings_table(ctx.summary, ctx.runs))
    parts.append("<h3>Figures per run</h3>")
    parts.append(_summary_table(ctx.runs, ctx.summaries, ctx.summary))
    return "\n".join(parts)


COMPARISON_SECTION = Section(
    id="sec-comparison",
    title="Comparison",
    keys=(),
    compare=_comparison,
    description="A comparison is fair when the runs share the model, data order, seed and step budget and differ "
    "only in the optimizer. What the run directories record of that is checked below.",
)
LAYERS_SECTION = Section(
    id="sec-layers",
    title="Per-layer tail index and denominator ratio",
    keys=("grad/hill_alpha", "adam/ratio_max"),
    compare=lambda ctx: _per_layer_table(ctx.runs),
    description="Median over the run of each layer's gradient tail index (red swatch: α &lt; 2) and of its "
    "denominator ratio (AdamW's own, or the shadow denominator for optimizers without one).",
    nav="Per layer",
)
FAMILY_TABLES_SECTION = Section(
    id="sec-family-tables",
    title="Per-layer medians, side by side",
    keys=tuple(f.key for f in families() if f.table),
    compare=lambda ctx: _family_tables(ctx.runs),
    description="For each figure, the median over the run of every layer, one column per run. Tail indices: red "
    "swatch under 2. Denominators: <code>adam/</code> is the optimizer's own (AdamW, and the AdamW half of "
    "Muon+AdamW), <code>shadowNNN/</code> the shadow EMA of g² with β₂ = 0.NNN that every run keeps; spike "
    "fraction: the share of coordinates with r² over the threshold; memory: how many steps the denominator stays "
    "inflated after a spike.",
    nav="Per-layer medians",
)
