"""The report's tables: cells and badges, run metadata, the alert list, the heaviest-tailed layers, noise sources."""

from __future__ import annotations

import json
import math
from collections import Counter
from typing import Any, Mapping

import numpy as np

from heavytail.report.families import families
from heavytail.report.linechart import SEVERITY_COLOURS, SEVERITY_RANK
from heavytail.report.rundir import Run
from heavytail.report.scales import ALPHA_SCALE, ColorScale
from heavytail.report.sections import Context, Part, Section
from heavytail.report.stats import (
    all_values,
    layer_stats,
    ratio_family,
    summarize,
    timestamp,
    verdict_by_layer,
    verdict_key,
)
from heavytail.report.summary import median_by_layer
from heavytail.report.svg import esc, fmt


def missing(family: str) -> str:
    """What a section shows for a family the run did not record."""
    return (
        f'<p class="ht-missing">Not recorded in this run: metrics.jsonl has no '
        f"<code>{esc(family)}/&lt;layer&gt;</code> keys.</p>"
    )


def _badge(severity: Any) -> str:
    sev = str(severity)
    cls = f"sev-{sev}" if sev in SEVERITY_COLOURS else "sev-other"
    return f'<span class="ht-badge {cls}">{esc(sev)}</span>'


def cell(value: Any, scale: ColorScale | None = None, digits: int = 4, low: bool = False) -> str:
    """A numeric table cell, with a colour swatch on ``scale`` and red when ``low``."""
    text = fmt(value, digits)
    swatch = ""
    if scale is not None and isinstance(value, (int, float)) and math.isfinite(float(value)):
        swatch = f'<span class="ht-swatch" style="background:{scale.css(float(value))}"></span>'
    cls = "num ht-low" if low else "num"
    return f'<td class="{cls}">{swatch}{esc(text)}</td>'


def duration_text(seconds: float) -> str:
    """A wall-clock span as ``1h 02m``, ``3m 05s`` or ``42s``; '—' when unknown."""
    if not math.isfinite(seconds) or seconds < 0:
        return "—"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h {m:02d}m" if h else (f"{m}m {s:02d}s" if m else f"{s}s")


def _meta_rows(run: Run) -> list[tuple[str, str]]:
    meta = run.meta
    summary = summarize(run)
    params = meta.get("params") if isinstance(meta.get("params"), list) else []
    numel = sum(int(p.get("numel", 0)) for p in params if isinstance(p, Mapping) and isinstance(p.get("numel"), int))
    steps = run.steps
    rows = [
        ("Run", run.name),
        ("Model", meta.get("model", "—")),
        ("Optimizer", meta.get("optimizer") if meta.get("optimizer") is not None else "—"),
        ("Steps", f"{int(steps[0]):,} – {int(steps[-1]):,}" if len(steps) else "—"),
        ("Checkpoints", f"{len(steps):,}" + (f" (every {meta['every']} steps)" if "every" in meta else "")),
        ("Parameters", f"{len(params):,} tensors, {numel:,} values" if params else "—"),
        ("Device", meta.get("device", "—")),
        ("Started", timestamp(meta.get("started"))),
        ("Duration", duration_text(summary.duration_s)),
        ("Status", summary.status.text()),
        ("torch / heavytail", f"{meta.get('torch_version', '—')} / {meta.get('heavytail_version', '—')}"),
        ("Run directory", str(run.path)),
    ]
    return [(k, v if isinstance(v, str) else json.dumps(v, default=str)) for k, v in rows]


def _pretty(value: Any) -> str:
    return esc(json.dumps(value, indent=2, sort_keys=True, default=str, ensure_ascii=False))


def render_meta(run: Run) -> str:
    """Run metadata: a definition list, then config, extra and the parameter list folded."""
    rows = "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in _meta_rows(run))
    parts = [f'<dl class="ht-meta">{rows}</dl>']
    if not run.meta:
        parts.append('<p class="ht-missing">meta.json is missing: no run metadata was recorded.</p>')
    for key, title in (("config", "Monitor configuration"), ("extra", "Extra (optimizer hyper-parameters, trainer)")):
        if key in run.meta:
            parts.append(f"<details><summary>{esc(title)}</summary><pre>{_pretty(run.meta[key])}</pre></details>")
    params = run.meta.get("params")
    if isinstance(params, list) and params:
        head = "<tr><th>parameter</th><th>shape</th><th class='num'>numel</th><th>dtype</th></tr>"
        body = "".join(
            f"<tr><td class='ht-layer'>{esc(p.get('name', '?'))}</td><td class='mono'>{esc(p.get('shape', ''))}</td>"
            f"<td class='num'>{esc(fmt(p.get('numel')))}</td><td>{esc(p.get('dtype', ''))}</td></tr>"
            for p in params[:5000]
            if isinstance(p, Mapping)
        )
        parts.append(
            f"<details><summary>Parameters ({len(params):,})</summary><div class='ht-scroll'>"
            f"<table class='ht-table'>{head}{body}</table></div></details>"
        )
    return "\n".join(parts)


def render_alerts(run: Run, limit: int = 2000) -> str:
    """The alert list as a table (newest last)."""
    if not run.alerts:
        return '<p class="ht-missing">No alerts were raised in this run.</p>'
    head = (
        "<tr><th class='num'>step</th><th>severity</th><th>rule</th><th>layer / metric</th>"
        "<th class='num'>value</th><th class='num'>threshold</th><th>message</th></tr>"
    )
    rows = []
    for a in run.alerts[:limit]:
        where = a.get("layer") or a.get("metric") or "—"
        rows.append(
            f"<tr class='ht-alert-row'><td class='num'>{esc(fmt(a.get('step')))}</td><td>{_badge(a.get('severity'))}</td>"
            f"<td class='mono'>{esc(a.get('rule', '?'))}</td><td class='ht-layer'>{esc(where)}</td>"
            f"<td class='num'>{esc(fmt(a.get('value')))}</td><td class='num'>{esc(fmt(a.get('threshold')))}</td>"
            f"<td>{esc(a.get('message', ''))}</td></tr>"
        )
    more = ""
    if len(run.alerts) > limit:
        more = f'<p class="ht-desc">Showing the first {limit:,} of {len(run.alerts):,} alerts; all are in alerts.jsonl.</p>'
    counts = ", ".join(f"{n} {esc(k)}" for k, n in Counter(str(a.get("rule")) for a in run.alerts).most_common())
    return (
        f"<p class=\"ht-desc\">{len(run.alerts):,} alerts: {counts}. Each alert's flight record (the last steps' "
        f"per-layer statistics) is in the run directory's <code>flight/</code> folder.</p>"
        f"<div class='ht-scroll'><table class='ht-table' id='alert-table'>{head}{''.join(rows)}</table></div>{more}"
    )


def render_heaviest(run: Run, top: int = 20) -> str:
    """The layers with the heaviest gradient tails (lowest median α), with their kurtosis and ratios."""
    stats = layer_stats(run)
    ranked = [(name, s) for name, s in stats.items() if "alpha_median" in s]
    if not ranked:
        return missing("grad/hill_alpha")
    ranked.sort(key=lambda t: (math.isnan(t[1]["alpha_median"]), t[1]["alpha_median"]))
    has_se = any("alpha_se_median" in s for _, s in ranked)
    has_gauss = any("kurtosis_gauss_median" in s for _, s in ranked)
    rf = ratio_family(run)
    head = ["<th class='num'>#</th><th>layer</th><th class='num'>median α</th>"]
    if has_se:
        head.append("<th class='num'>± s.e.</th>")
    head.append(
        "<th class='num'>min α</th><th class='num'>checkpoints α &lt; 2</th><th class='num'>median excess kurtosis</th>"
    )
    if has_gauss:
        head.append("<th class='num'>Gaussian 99% ref.</th>")
    ratio_label = esc(rf) if rf else "ratio"
    head.append(f"<th class='num'>median {ratio_label}</th><th class='num'>max {ratio_label}</th>")
    rows = []
    for i, (name, s) in enumerate(ranked[:top], start=1):
        under = int(s.get("alpha_under2", 0))
        cells = [
            f"<td class='num'>{i}</td><td class='ht-layer'>{esc(name)}</td>",
            cell(s.get("alpha_median"), ALPHA_SCALE, 3, low=s.get("alpha_median", 9) < 2),
        ]
        if has_se:
            cells.append(cell(s.get("alpha_se_median"), None, 2))
        cells.append(cell(s.get("alpha_min"), ALPHA_SCALE, 3, low=s.get("alpha_min", 9) < 2))
        cells.append(f"<td class='num{' ht-low' if under else ''}'>{under} / {int(s.get('alpha_count', 0))}</td>")
        cells.append(cell(s.get("kurtosis_median"), None, 3))
        if has_gauss:
            cells.append(cell(s.get("kurtosis_gauss_median"), None, 3))
        cells.append(cell(s.get("ratio_median"), None, 3))
        cells.append(cell(s.get("ratio_max"), None, 3))
        rows.append(f"<tr>{''.join(cells)}</tr>")
    note = (
        f'<p class="ht-desc">The {min(top, len(ranked))} of {len(ranked)} layers with the lowest median tail index '
        "over the run. “Checkpoints α &lt; 2” counts the checkpoints at which the layer's gradient entries had an "
        "infinite-variance tail.</p>"
    )
    return f"{note}<div class='ht-scroll'><table class='ht-table' id='heaviest-table'><tr>{''.join(head)}</tr>{''.join(rows)}</table></div>"


def render_noise_table(run: Run) -> str:
    """Per layer, the median over the run of every noise source's tail index and the probe's figures."""
    columns = [(f.key, f.column) for f in families() if f.column and run.layers(f.key)]
    if not columns:
        return missing("noise/hill_alpha")
    medians: dict[str, dict[str, float]] = {}
    for family, _ in columns:
        layers, _, values = run.matrix(family)
        for name, row in zip(layers, values):
            finite = row[np.isfinite(row)]
            medians.setdefault(name, {})[family] = float(np.median(finite)) if finite.size else math.nan
    order = [name for name in run.layers("grad/hill_alpha") if name in medians]
    order += [name for name in medians if name not in order]
    verdicts = {f: verdict_by_layer(run, verdict_key(f)) for f, _ in columns if f.endswith("hill_alpha")}
    actives = {f: median_by_layer(run, verdict_key(f)[: -len("tail_class")] + "active_frac") for f in verdicts}
    head = "<tr><th>layer</th>" + "".join(f"<th class='num'>{esc(label)}</th>" for _, label in columns) + "</tr>"
    rows = []
    for name in order:
        cells = [f"<td class='ht-layer'>{esc(name)}</td>"]
        for family, _ in columns:
            v = medians[name].get(family, math.nan)
            is_alpha = family.endswith("hill_alpha")
            verdict = verdicts.get(family, {}).get(name)
            if verdict is None:
                cells.append(cell(v, ALPHA_SCALE if is_alpha else None, 3, low=is_alpha and v < 2))
                continue
            text = (
                verdict
                if verdict != "sparse"
                else f"sparse, {fmt(100 * actives[family].get(name, math.nan), 2)}% active"
            )
            value = fmt(v, 3) + " " if math.isfinite(v) and verdict != "light" else ""
            low = verdict == "power" and v < 2
            cells.append(
                f"<td class='num{' ht-low' if low else ''}'>{value}<span class='ht-verdict'>{esc(text)}</span></td>"
            )
        rows.append(f"<tr>{''.join(cells)}</tr>")
    gauss = all_values(run, "probe/hill_alpha_gauss")
    ref = (
        f" The probe's per-coordinate Hill estimator (probe α per coordinate) reads {fmt(float(np.median(gauss)), 3)} "
        "on Gaussian noise of its number of mini-batches: a value near that is a light tail."
        if gauss.size
        else ""
    )
    batch = all_values(run, "probe/batch_size")
    if batch.size:
        ref += f" The probe's mini-batches held {fmt(float(np.median(batch)), 3)} rows of its batch."
    note = (
        '<p class="ht-desc">Median over the run of each noise source, per layer, with the verdict most '
        "checkpoints gave: <i>light</i> (no power-law tail), <i>power</i> (the tail index α beside it), "
        "<i>sparse</i> (most draws are zero: the share of active draws, and the tail of the active part when it "
        "could be read). Temporal: each sampled "
        "coordinate's gradient over the last steps around its median; micro-batch: under gradient accumulation; rank: "
        "per data-parallel rank; probe: mini-batch gradients of a held-out batch at checkpoints, with its stable "
        "index (2 = Gaussian), mean excess kurtosis, and the slope of log E|ξ|<sup>p</sup> against "
        "log |∇f|<sup>p</sup> across coordinates (0: noise independent of the gradient, bounded p-th moment; "
        "1: noise proportional to the gradient), fitted on the coordinates whose gradient the probe resolves "
        f"(the resolved fraction).{ref}</p>"
    )
    return f"{note}<div class='ht-scroll'><table class='ht-table' id='noise-table'>{head}{''.join(rows)}</table></div>"


def severity_order(item: tuple[str, int]) -> int:
    """Sort key of ``(severity, count)`` pairs: critical first."""
    return SEVERITY_RANK.get(item[0], 9)


def _noise_sources(ctx: Context) -> str | None:
    columns = [f.key for f in families() if f.column]
    # Shown when a source beyond the temporal one (the first column) was recorded.
    return render_noise_table(ctx.run) if any(ctx.run.layers(key) for key in columns[1:]) else None


def _alerts_compare(ctx: Context) -> str:
    return "".join(f"<h3>{esc(name)}</h3>{render_alerts(run)}" for name, run in ctx.runs.items())


def _meta_compare(ctx: Context) -> list[Part]:
    grid = "".join(f"<div><h3>{esc(name)}</h3>{render_meta(run)}</div>" for name, run in ctx.runs.items())
    return [Part("sec-meta", "Runs", "Runs", f"<div class='ht-grid'>{grid}</div>")]


NOISE_TABLE_SECTION = Section(
    id="sec-noise-sources",
    title="Noise sources per layer",
    keys=tuple(f.key for f in families() if f.column),
    draw=_noise_sources,
    nav="Noise sources",
)
HEAVIEST_SECTION = Section(
    id="sec-heaviest",
    title="Layers with the heaviest tails",
    keys=("grad/hill_alpha", "grad/hill_alpha_se", "grad/kurtosis", "grad/kurtosis_gauss"),
    draw=lambda ctx: render_heaviest(ctx.run),
    nav="Heaviest tails",
)
ALERTS_SECTION = Section(
    id="sec-alerts",
    title="Alerts",
    keys=(),
    draw=lambda ctx: render_alerts(ctx.run),
    compare=_alerts_compare,
)
META_SECTION = Section(
    id="sec-meta", title="Run details", keys=(), draw=lambda ctx: render_meta(ctx.run), compare=_meta_compare
)
