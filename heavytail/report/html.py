"""The self-contained HTML report of one run, or of several runs side by side (optimizer comparison).

One file, readable offline: the styles, the script, the data (embedded JSON) and the heatmap images (PNG data
URIs) are inline, and a Content-Security-Policy in the page forbids every fetch. Charts are SVG written here;
the inline script only adds hover read-outs, so the report is complete with scripts disabled.
Every string that comes from the run (layer names, messages, metadata) is HTML-escaped; embedded JSON is
escaped so that no ``</script>`` can close its element.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import math
import os
from collections import Counter
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from heavytail.report.assets import CSP, SCRIPT, STYLE
from heavytail.report.charts import (
    ALPHA_SCALE,
    RUN_COLOURS,
    SEVERITY_COLOURS,
    SEVERITY_RANK,
    ChartData,
    ColorScale,
    HeatmapSpec,
    Marker,
    Series,
    alert_markers,
    decade_hi,
    esc,
    fmt,
    kurtosis_scale,
    log_scale,
    render_heatmap,
    render_legend,
    render_line_chart,
)
from heavytail.report.rundir import Run, load_run
from heavytail.report.stats import (
    INCOMPLETE,
    RunSummary,
    all_values,
    consistency_checks,
    layer_stats,
    ratio_family,
    shadow_beta,
    shadow_ratio_families,
    summarize,
    timestamp,
)

# ----------------------------------------------------------------------------------------------------------------
# Sections of a report


def heatmap_specs(ratio_family: str | None = None) -> list[HeatmapSpec]:
    """The heatmap sections of a report, in order."""
    ratio = ratio_family or "adam/ratio_max"
    specs = [
        HeatmapSpec(
            "grad/hill_alpha",
            "sec-tail-index",
            "Gradient tail index α (coordinate tail)",
            "Hill estimate of the tail index of |g| over each layer's gradient entries at each checkpoint "
            "(<code>grad/hill_alpha</code>). Lower α means a heavier tail. <b>Red: α &lt; 2</b>, the entries "
            "behave like draws with infinite variance, which the bounded-variance theory behind AdamW does not "
            "cover; orange: 2 ≤ α &lt; 4, finite variance but infinite kurtosis; blue: α ≥ 4, light tails. "
            "A red bar right of a row marks a layer that went under 2.",
            "tail index α",
            "min",
        ),
        HeatmapSpec(
            "noise/hill_alpha",
            "sec-noise-tail-index",
            "Gradient-noise tail index α",
            "Tail index of the gradient <i>noise</i> (<code>noise/hill_alpha</code>): the distribution over steps "
            "or mini-batches of a coordinate's stochastic gradient minus its mean. This is the tail the "
            "convergence theory speaks about; same colours as above.",
            "noise tail index α",
            "min",
        ),
        HeatmapSpec(
            "grad/kurtosis",
            "sec-kurtosis",
            "Gradient excess kurtosis",
            "Sample <i>excess</i> kurtosis of each layer's gradient entries (<code>grad/kurtosis</code>, "
            "m₄/m₂² − 3): 0 for a Gaussian, −2 at the least, large for heavy tails. Coloured on a log scale of "
            "excess + 3 (Pearson's kurtosis), so values under 0 (flatter than a Gaussian) have colours too. When "
            "α &lt; 4 the true kurtosis is infinite and the sample value grows with the number of entries, so read "
            "it next to the Gaussian reference for the same count (<code>grad/kurtosis_gauss</code>, the 0.99 "
            "quantile of a Gaussian sample's excess kurtosis, near 0 for large layers; marked on the legend and in "
            "the table below).",
            "excess kurtosis",
            "max",
        ),
        HeatmapSpec(
            ratio,
            "sec-ratio",
            "Denominator ratio (AdamW)" if ratio.startswith("adam/") else _shadow_title(ratio),
            (
                "Largest |g<sub>t</sub>| / (√v̂<sub>t−1</sub> + ε) over each layer's coordinates "
                "(<code>adam/ratio_max</code>): how far a new gradient stands above what the optimizer's "
                "second-moment denominator expects. Large values mean a gradient spike arrives bigger than the "
                "denominator remembers; r² over 5000 (r ≈ 71) is the SPAM spike threshold. Log colour scale."
                if ratio.startswith("adam/")
                else f"The same ratio against a <i>shadow</i> denominator (<code>{esc(ratio)}</code>): an EMA "
                f"of g² with β₂ = {_beta_text(ratio)} kept on sampled coordinates, showing what an AdamW "
                "denominator would have done on this run's gradients, whatever the optimizer. Log colour scale."
            ),
            "ratio max",
            "max",
        ),
    ]
    return specs


def _beta_text(family: str) -> str:
    beta = shadow_beta(family)
    return f"{beta:g}" if math.isfinite(beta) else "AdamW's"


def _shadow_title(family: str) -> str:
    beta = shadow_beta(family)
    return f"Shadow denominator ratio (β₂ = {beta:g})" if math.isfinite(beta) else "Shadow denominator ratio"


def ratio_spec(family: str, section_id: str) -> HeatmapSpec:
    """The heatmap of one denominator-ratio family (AdamW's own or a shadow's) under ``section_id``."""
    return dataclasses.replace(heatmap_specs(family)[-1], section_id=section_id)


# Noise sources other than the temporal one, with what each sees.
NOISE_SOURCES: tuple[tuple[str, str, str, str], ...] = (
    (
        "noise/microbatch_hill_alpha",
        "sec-noise-microbatch",
        "Noise tail index α, micro-batch source",
        "Tail index of the deviations of each micro-batch's gradient from their mean under gradient "
        "accumulation (<code>noise/microbatch_hill_alpha</code>).",
    ),
    (
        "noise/rank_hill_alpha",
        "sec-noise-rank",
        "Noise tail index α, per-rank source",
        "Tail index of each data-parallel rank's local gradient minus the all-reduced one "
        "(<code>noise/rank_hill_alpha</code>).",
    ),
    (
        "probe/hill_alpha",
        "sec-noise-probe",
        "Noise tail index α, probe",
        "The noise probe (<code>probe/hill_alpha</code>): many mini-batch gradients of one held-out batch at a "
        "checkpoint, weights fixed, noise = a mini-batch gradient minus their mean (Simsekli et al. 2019). Hill "
        "with a threshold per coordinate over its mini-batches; with few mini-batches a Gaussian noise reads "
        "about 4 (<code>probe/hill_alpha_gauss</code>), not infinity. Same colours as above.",
    ),
)


def noise_source_specs(runs: Sequence[Run]) -> list[HeatmapSpec]:
    """Heatmaps of the noise sources beyond the temporal one that any of ``runs`` recorded."""
    return [
        HeatmapSpec(family, section_id, title, description, "noise tail index α", "min")
        for family, section_id, title, description in NOISE_SOURCES
        if any(r.layers(family) for r in runs)
    ]


_NOISE_COLUMNS: tuple[tuple[str, str], ...] = (
    ("noise/hill_alpha", "temporal α"),
    ("noise/microbatch_hill_alpha", "micro-batch α"),
    ("noise/rank_hill_alpha", "rank α"),
    ("probe/hill_alpha", "probe α"),
    ("probe/stable_alpha", "probe stable α"),
    ("probe/kurtosis", "probe excess kurtosis"),
    ("probe/moment_slope_p1", "probe slope p=1"),
    ("probe/moment_slope_p1.5", "probe slope p=1.5"),
    ("probe/resolved_frac", "probe resolved"),
)


def render_noise_table(run: Run) -> str:
    """Per layer, the median over the run of every noise source's tail index and the probe's figures."""
    columns = [(f, label) for f, label in _NOISE_COLUMNS if run.layers(f)]
    if not columns:
        return _missing("noise/hill_alpha")
    medians: dict[str, dict[str, float]] = {}
    for family, _ in columns:
        layers, _, values = run.matrix(family)
        for name, row in zip(layers, values):
            finite = row[np.isfinite(row)]
            medians.setdefault(name, {})[family] = float(np.median(finite)) if finite.size else math.nan
    order = [name for name in run.layers("grad/hill_alpha") if name in medians]
    order += [name for name in medians if name not in order]
    head = "<tr><th>layer</th>" + "".join(f"<th class='num'>{esc(label)}</th>" for _, label in columns) + "</tr>"
    rows = []
    for name in order:
        cells = [f"<td class='ht-layer'>{esc(name)}</td>"]
        for family, _ in columns:
            v = medians[name].get(family, math.nan)
            is_alpha = family.endswith("hill_alpha")
            cells.append(_cell(v, ALPHA_SCALE if is_alpha else None, 3, low=is_alpha and v < 2))
        rows.append(f"<tr>{''.join(cells)}</tr>")
    gauss = all_values(run, "probe/hill_alpha_gauss")
    ref = (
        f" The probe's Hill estimator reads {fmt(float(np.median(gauss)), 3)} on Gaussian noise of its number of "
        "mini-batches: a probe α near that is a light tail."
        if gauss.size
        else ""
    )
    note = (
        '<p class="ht-desc">Median over the run of each noise source, per layer. Temporal: each sampled '
        "coordinate's gradient minus its running mean over steps; micro-batch: under gradient accumulation; rank: "
        "per data-parallel rank; probe: mini-batch gradients of a held-out batch at checkpoints, with its stable "
        "index (2 = Gaussian), mean excess kurtosis, and the slope of log E|ξ|<sup>p</sup> against "
        "log |∇f|<sup>p</sup> across coordinates (0: noise independent of the gradient, bounded p-th moment; "
        "1: noise proportional to the gradient), fitted on the coordinates whose gradient the probe resolves "
        f"(the resolved fraction).{ref}</p>"
    )
    return f"{note}<div class='ht-scroll'><table class='ht-table' id='noise-table'>{head}{''.join(rows)}</table></div>"


def _nav_label(spec: HeatmapSpec) -> str:
    return spec.title if "β₂" in spec.title or "," in spec.title else spec.title.split(" (")[0]


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "—"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h {m:02d}m" if h else (f"{m}m {s:02d}s" if m else f"{s}s")


# ----------------------------------------------------------------------------------------------------------------
# HTML pieces


def _section(section_id: str, title: str, body: str, description: str = "") -> str:
    desc = f'<p class="ht-desc">{description}</p>' if description else ""
    return f'<section class="ht-sec" id="{esc(section_id)}">\n<h2>{esc(title)}</h2>\n{desc}\n{body}\n</section>'


def _missing(family: str) -> str:
    return (
        f'<p class="ht-missing">Not recorded in this run: metrics.jsonl has no '
        f"<code>{esc(family)}/&lt;layer&gt;</code> keys.</p>"
    )


def _badge(severity: Any) -> str:
    sev = str(severity)
    cls = f"sev-{sev}" if sev in SEVERITY_COLOURS else "sev-other"
    return f'<span class="ht-badge {cls}">{esc(sev)}</span>'


def _cell(value: Any, scale: ColorScale | None = None, digits: int = 4, low: bool = False) -> str:
    text = fmt(value, digits)
    swatch = ""
    if scale is not None and isinstance(value, (int, float)) and math.isfinite(float(value)):
        swatch = f'<span class="ht-swatch" style="background:{scale.css(float(value))}"></span>'
    cls = "num ht-low" if low else "num"
    return f'<td class="{cls}">{swatch}{esc(text)}</td>'


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
        ("Duration", _duration(summary.duration_s)),
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
        return _missing("grad/hill_alpha")
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
            _cell(s.get("alpha_median"), ALPHA_SCALE, 3, low=s.get("alpha_median", 9) < 2),
        ]
        if has_se:
            cells.append(_cell(s.get("alpha_se_median"), None, 2))
        cells.append(_cell(s.get("alpha_min"), ALPHA_SCALE, 3, low=s.get("alpha_min", 9) < 2))
        cells.append(f"<td class='num{' ht-low' if under else ''}'>{under} / {int(s.get('alpha_count', 0))}</td>")
        cells.append(_cell(s.get("kurtosis_median"), None, 3))
        if has_gauss:
            cells.append(_cell(s.get("kurtosis_gauss_median"), None, 3))
        cells.append(_cell(s.get("ratio_median"), None, 3))
        cells.append(_cell(s.get("ratio_max"), None, 3))
        rows.append(f"<tr>{''.join(cells)}</tr>")
    note = (
        f'<p class="ht-desc">The {min(top, len(ranked))} of {len(ranked)} layers with the lowest median tail index '
        "over the run. “Checkpoints α &lt; 2” counts the checkpoints at which the layer's gradient entries had an "
        "infinite-variance tail.</p>"
    )
    return f"{note}<div class='ht-scroll'><table class='ht-table' id='heaviest-table'><tr>{''.join(head)}</tr>{''.join(rows)}</table></div>"


def _scales(runs: Sequence[Run]) -> dict[str, tuple[ColorScale, str]]:
    """Colour scales shared by every run on a page, by family (so compared runs read on one scale)."""
    out: dict[str, tuple[ColorScale, str]] = {
        "grad/hill_alpha": (ALPHA_SCALE, "alpha"),
        "noise/hill_alpha": (ALPHA_SCALE, "alpha"),
    }
    for family, *_ in NOISE_SOURCES:
        out[family] = (ALPHA_SCALE, "alpha")
    out["grad/kurtosis"] = (kurtosis_scale([r.matrix("grad/kurtosis")[2] for r in runs]), "kurtosis")
    families = {"adam/ratio_max", "shadow/ratio_max"} | {f for r in runs for f in shadow_ratio_families(r)}
    ratios = [r.matrix(f)[2] for r in runs for f in families]
    ratio_scale = log_scale("ratio", 1.0, decade_hi(ratios, 100.0))
    for family in families:
        out[family] = (ratio_scale, "ratio")
    return out


def _gauss_reference(runs: Sequence[Run]) -> float | None:
    vals = np.concatenate([all_values(r, "grad/kurtosis_gauss") for r in runs] or [np.zeros(0)])
    return float(np.median(vals)) if vals.size else None


def _legend_block(spec: HeatmapSpec, scale: ColorScale, kind: str, gauss: float | None) -> str:
    return (
        f'<div class="ht-legend-row"><span class="ht-legend-title">colour: {esc(spec.label)}</span>'
        f"{render_legend(scale, kind, gauss=gauss)}</div>"
    )


def _reload_seconds(refresh: float) -> int:
    return max(1, math.ceil(refresh))


def _document(
    title: str,
    header: str,
    nav: list[tuple[str, str]],
    body: list[str],
    page: ChartData,
    footer: str,
    refresh: float | None = None,
) -> str:
    links = "".join(f'<a href="#{esc(i)}">{esc(t)}</a>' for i, t in nav)
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en">',
            "<head>",
            '<meta charset="utf-8">',
            f'<meta http-equiv="Content-Security-Policy" content="{esc(CSP)}">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            '<meta name="referrer" content="no-referrer">',
            '<meta name="generator" content="heavytail">',
            # Reloading the file itself is no fetch the CSP could forbid; it is how a watched report stays fresh.
            *([f'<meta http-equiv="refresh" content="{_reload_seconds(refresh)}">'] if refresh else []),
            f"<title>{esc(title)}</title>",
            f"<style>{STYLE}</style>",
            "</head>",
            "<body>",
            header,
            f'<nav class="ht-nav"><div class="ht-wrap">{links}</div></nav>',
            "<main>",
            *body,
            "</main>",
            f'<footer class="ht-foot">{footer}</footer>',
            page.data_script(),
            f"<script>{SCRIPT}</script>",
            "</body>",
            "</html>",
        ]
    )


def _footer(sources: Sequence[Run]) -> str:
    now = _dt.datetime.now(tz=_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    where = "; ".join(str(r.path) for r in sources)
    return f"Generated by heavytail on {esc(now)} from {esc(where)}. Self-contained: this file loads nothing."


def _card(label: str, value: str, bad: bool = False, note: str = "", card_id: str = "") -> str:
    sub = f'<div class="n">{esc(note)}</div>' if note else ""
    ident = f' id="{esc(card_id)}"' if card_id else ""
    return (
        f'<div class="ht-card{" bad" if bad else ""}"{ident}><div class="k">{esc(label)}</div>'
        f'<div class="v">{esc(value)}</div>{sub}</div>'
    )


def _severity_order(item: tuple[str, int]) -> int:
    return SEVERITY_RANK.get(item[0], 9)


def _alert_count_text(s: RunSummary) -> str:
    if not s.alerts:
        return "0"
    parts = [f"{n} {k}" for k, n in sorted(s.alerts_by_severity.items(), key=_severity_order)]
    return f"{s.alerts} ({', '.join(parts)})"


# ----------------------------------------------------------------------------------------------------------------
# Single-run report


def _as_run(run: str | os.PathLike[str] | Run) -> Run:
    return run if isinstance(run, Run) else load_run(run)


def _status_banner(s: RunSummary, refresh: float | None = None) -> str:
    """A banner on a run the monitor did not close (still going, or killed); nothing on a finished run."""
    if s.status.complete:
        return ""
    reload = (
        f" This page reloads every {_reload_seconds(refresh)} s while <code>heavytail report --watch</code> runs."
        if refresh
        else ""
    )
    return (
        f'<div class="ht-banner" id="run-status" role="status"><b>Incomplete run</b>: {esc(INCOMPLETE)}; '
        f"{esc(s.status.last_record())}. meta.json has no <code>finished</code> time, which the monitor writes when "
        f"it closes.{reload}</div>"
    )


def _cards(run: Run, s: RunSummary) -> str:
    """The headline cards; each names the key it read and the step (or steps) it read it at."""
    loss = s.final_loss_at
    low = s.min_loss_at
    alpha_steps = run.matrix("grad/hill_alpha")[1]
    span = f"steps {int(alpha_steps[0]):,}–{int(alpha_steps[-1]):,}" if len(alpha_steps) else "not recorded"
    by_severity = " · ".join(f"{n} {k}" for k, n in sorted(s.alerts_by_severity.items(), key=_severity_order))
    steps = [a.get("step") for a in run.alerts if isinstance(a.get("step"), int) and not isinstance(a["step"], bool)]
    alerts_note = "alerts.jsonl" + (f": {by_severity}" if by_severity else "")
    alerts_note += f", last at step {max(steps):,}" if steps else ""
    under = s.first_under2
    if under is not None:
        under_note = f"first: {under.key} = {fmt(under.value, 3)} at step {under.step:,}"
    else:
        under_note = f"grad/hill_alpha, {span}" if len(alpha_steps) else "grad/hill_alpha not recorded"
    rf, top = s.ratio_family, s.ratio_peak
    if rf is None:
        ratio_value, ratio_note = "—", "not recorded"
    elif top is None:
        ratio_value = "none yet"
        ratio_note = f"{rf}: null at every checkpoint so far (the optimizer's denominator is warming up)"
    else:
        ratio_value = fmt(top.value, 3)
        ratio_note = f"{top.key} at step {top.step:,} · median {fmt(s.ratio_median, 3)}"
    cards = [
        _card(
            "final loss",
            fmt(loss.value) if loss else "—",
            note=f"loss at step {loss.step:,} · lowest {fmt(low.value)} at step {low.step:,}"
            if loss and low
            else "loss not recorded",
            card_id="card-loss",
        ),
        _card(
            "last step",
            f"{s.steps:,}",
            note=f"step of the last record · {s.checkpoints:,} checkpoints"
            + ("" if s.status.complete else " · run incomplete"),
            card_id="card-step",
        ),
        _card(
            "alerts", str(s.alerts), bad=bool(s.alerts_by_severity["critical"]), note=alerts_note, card_id="card-alerts"
        ),
        _card(
            "layers with α < 2",
            f"{s.layers_under2} / {s.layers}" if s.layers else "—",
            bad=s.layers_under2 > 0,
            note=under_note,
            card_id="card-under2",
        ),
        _card(
            "median tail index α",
            fmt(s.alpha_median, 3),
            note=f"grad/hill_alpha, all layers, {span}",
            card_id="card-alpha",
        ),
        _card("largest ratio", ratio_value, note=ratio_note, card_id="card-ratio"),
    ]
    return f'<div class="ht-cards" id="summary-cards">{"".join(cards)}</div>'


def render_report(run: Run, *, max_columns: int = 600, refresh: float | None = None) -> str:
    """The report of one run as an HTML string; ``refresh`` (seconds) makes the page reload itself (the watch
    mode sets it while the run is going)."""
    page = ChartData()
    s = summarize(run)
    scales = _scales([run])
    gauss = _gauss_reference([run])
    title = f"heavytail report: {run.name}"
    subtitle = " · ".join(
        str(x)
        for x in (
            run.meta.get("model"),
            run.meta.get("optimizer"),
            f"{s.checkpoints:,} checkpoints to step {s.steps:,}",
        )
        if x
    )
    header = (
        f'<header class="ht-head"><div class="ht-wrap"><div class="ht-brand">heavytail</div><h1>{esc(run.name)}</h1>'
        f'<div class="ht-sub">{esc(subtitle)}</div></div></header>'
    )
    body = [_status_banner(s, refresh), _cards(run, s)]
    nav = [("sec-loss", "Loss & alerts")]

    steps, loss = run.series("loss")
    markers = alert_markers(run.alerts)
    if np.isfinite(loss).any():
        chart = render_line_chart(page, [Series("loss", steps, loss)], ylabel="loss", markers=markers)
    else:
        chart = '<p class="ht-missing">Not recorded in this run: metrics.jsonl has no <code>loss</code> values.</p>'
    parts = [chart]
    norms = [
        Series(label, *run.series(key), colour)
        for key, label, colour in (
            ("grad/norm", "grad/norm (after clipping)", "#5a6b8c"),
            ("grad/norm_preclip", "grad/norm_preclip (before clipping)", "#d1495b"),
        )
        if np.isfinite(run.series(key)[1]).any()
    ]
    if norms:
        parts.append("<h3>Global gradient norm</h3>")
        if len(norms) > 1:
            post, pre = norms[0].values, norms[1].values
            both = np.isfinite(post) & np.isfinite(pre)
            same = bool(both.any()) and bool(np.allclose(post[both], pre[both], rtol=1e-6, atol=0.0))
            parts.append(
                '<p class="ht-desc"><code>grad/norm</code> is the gradient the optimizer steps with (after clipping '
                "and unscaling), <code>grad/norm_preclip</code> the one backward produced; where they part, "
                "clipping cut the step."
                + (" Here they agree at every checkpoint (the lines overlap): nothing was clipped." if same else "")
                + "</p>"
            )
        parts.append(
            render_line_chart(
                page,
                norms,
                ylabel="global gradient norm" if len(norms) > 1 else norms[0].label.split(" ")[0],
                markers=markers,
                height=170,
                legend=len(norms) > 1,
            )
        )
    body.append(
        _section(
            "sec-loss",
            "Loss and alerts",
            "\n".join(parts),
            "Loss at each checkpoint. Dashed lines mark alerts (red: critical, orange: warning, blue: info); "
            "hover a marker for the rule and message.",
        )
    )

    rf = ratio_family(run)
    specs = heatmap_specs(rf)
    # The noise sources beyond the temporal one go right after it.
    specs[2:2] = noise_source_specs([run])
    # Every other denominator ratio the run recorded: the shadows next to AdamW's own (to check the shadow
    # against the real one), or the other betas of the shadow.
    for i, family in enumerate(f for f in shadow_ratio_families(run) if f != rf):
        specs.append(ratio_spec(family, f"sec-shadow-ratio{'' if i == 0 else f'-{i + 1}'}"))
    for spec in specs:
        nav.append((spec.section_id, _nav_label(spec)))
        layers, hsteps, values = run.matrix(spec.family)
        scale, kind = scales.get(spec.family, (ALPHA_SCALE, "alpha"))
        if layers:
            chart = _legend_block(spec, scale, kind, gauss) + render_heatmap(
                page, spec, layers, hsteps, values, scale, max_columns=max_columns
            )
        else:
            chart = _missing(spec.family)
        body.append(_section(spec.section_id, spec.title, chart, spec.description))

    if any(run.layers(f) for f, _ in _NOISE_COLUMNS[1:]):
        nav.append(("sec-noise-sources", "Noise sources"))
        body.append(_section("sec-noise-sources", "Noise sources per layer", render_noise_table(run)))
    nav += [("sec-heaviest", "Heaviest tails"), ("sec-alerts", "Alerts"), ("sec-meta", "Run details")]
    body.append(_section("sec-heaviest", "Layers with the heaviest tails", render_heaviest(run)))
    body.append(_section("sec-alerts", "Alerts", render_alerts(run)))
    body.append(_section("sec-meta", "Run details", render_meta(run)))
    return _document(title, header, nav, body, page, _footer([run]), refresh=refresh)


def _write(text: str, out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    # Write then rename, so a report being regenerated is never seen half-written.
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out


def write_report(
    run_dir: str | os.PathLike[str] | Run,
    out: str | os.PathLike[str] | None = None,
    *,
    max_columns: int = 600,
    refresh: float | None = None,
) -> Path:
    """Write the self-contained HTML report of one run; returns its path (default ``<run_dir>/report.html``).

    ``run_dir`` is a run directory or a loaded :class:`Run`. Heatmaps show at most ``max_columns`` step
    columns; with more checkpoints each column shows the worst value of its bin (lowest α, highest kurtosis or
    ratio). ``refresh`` (seconds) makes the page reload itself, for a report re-written as the run goes on.
    Raises :class:`~heavytail.report.rundir.RunDirError` if the directory cannot be read.
    """
    run = _as_run(run_dir)
    target = Path(out) if out is not None else run.path / "report.html"
    return _write(render_report(run, max_columns=max_columns, refresh=refresh), target)


# ----------------------------------------------------------------------------------------------------------------
# Comparison report


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
    row("wall time", [esc(_duration(summaries[n].duration_s)) for n in names])
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
        return _missing("grad/hill_alpha")
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
            cells.append(_cell(a, ALPHA_SCALE, 3, low=a < 2))
            cells.append(_cell(s.get("ratio_median", math.nan), None, 3))
        rows.append(f"<tr>{''.join(cells)}</tr>")
    return (
        "<div class='ht-scroll'><table class='ht-table' id='layer-table'>"
        f"<thead>{head1}{head2}</thead><tbody>{''.join(rows)}</tbody></table></div>"
    )


# Figures of the side-by-side per-layer tables, in order; each is shown when some run recorded it.
_FAMILY_TABLES: tuple[tuple[str, str], ...] = (
    ("grad/hill_alpha", "Gradient tail index α (coordinate tail)"),
    ("noise/hill_alpha", "Noise tail index α (temporal)"),
    ("noise/microbatch_hill_alpha", "Noise tail index α (micro-batch)"),
    ("noise/rank_hill_alpha", "Noise tail index α (rank)"),
    ("probe/hill_alpha", "Noise tail index α (probe, Hill)"),
    ("probe/stable_alpha", "Noise stable index α (probe; 2 = Gaussian)"),
    ("probe/moment_slope_p1", "Probe: slope of log E|ξ| against log |∇f|"),
    ("grad/kurtosis", "Gradient excess kurtosis"),
    ("adam/ratio_max", "Denominator ratio max (the optimizer's own)"),
    ("shadow999/ratio_max", "Shadow denominator ratio max (β₂ = 0.999)"),
    ("shadow95/ratio_max", "Shadow denominator ratio max (β₂ = 0.95)"),
    ("adam/spike_frac", "Spike fraction (the optimizer's own denominator)"),
    ("shadow999/spike_frac", "Spike fraction (shadow, β₂ = 0.999)"),
    ("shadow95/spike_frac", "Spike fraction (shadow, β₂ = 0.95)"),
    ("adam/memory_steps", "Denominator memory, steps (the optimizer's own)"),
    ("shadow999/memory_steps", "Denominator memory, steps (shadow, β₂ = 0.999)"),
    ("shadow95/memory_steps", "Denominator memory, steps (shadow, β₂ = 0.95)"),
)


def _family_tables(runs: Mapping[str, Run]) -> str:
    names = list(runs)
    blocks = []
    present = [(f, t) for f, t in _FAMILY_TABLES if any(r.layers(f) for r in runs.values())]
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
                cells.append(_cell(v, ALPHA_SCALE if is_alpha else None, 3, low=is_alpha and v < 2))
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
    return "\n".join(blocks) if blocks else _missing("grad/hill_alpha")


def render_compare_report(
    runs: Mapping[str, str | os.PathLike[str] | Run],
    summary: Mapping[str, Any] | None = None,
    note: str | None = None,
    *,
    max_columns: int = 400,
) -> str:
    """The comparison report as an HTML string (see :func:`write_compare_report`)."""
    if not runs:
        raise ValueError("write_compare_report: runs is empty; give at least one run directory")
    loaded = {str(name): _as_run(r) for name, r in runs.items()}
    names = list(loaded)
    page = ChartData()
    summaries = {n: summarize(r) for n, r in loaded.items()}
    scales = _scales(list(loaded.values()))
    gauss = _gauss_reference(list(loaded.values()))
    width = 1160 if len(loaded) == 1 else 580

    title = "heavytail comparison: " + ", ".join(names)
    optimizers = ", ".join(f"{n} ({r.meta.get('optimizer') or '—'})" for n, r in loaded.items())
    header = (
        f'<header class="ht-head"><div class="ht-wrap"><div class="ht-brand">heavytail · comparison</div>'
        f"<h1>{esc(', '.join(names))}</h1><div class='ht-sub'>{esc(optimizers)}</div></div></header>"
    )
    body: list[str] = []
    nav = [("sec-comparison", "Comparison"), ("sec-loss", "Loss"), ("sec-layers", "Per layer")]
    checks = consistency_checks(loaded)
    parts = []
    if note:
        parts.append(f'<div class="ht-note" id="fair-note">{esc(note)}</div>')
    if checks:
        items = "".join(
            f"<li><span class='{'ht-ok' if ok else 'ht-diff'}'>{'same' if ok else 'differs'}</span> {esc(text)}</li>"
            for ok, text in checks
        )
        parts.append(f"<ul class='ht-checks' id='consistency-checks'>{items}</ul>")
    parts.append(_settings_table(summary, loaded))
    parts.append("<h3>Figures per run</h3>")
    parts.append(_summary_table(loaded, summaries, summary))
    body.append(
        _section(
            "sec-comparison",
            "Comparison",
            "\n".join(parts),
            "A comparison is fair when the runs share the model, data order, seed and step budget and differ only "
            "in the optimizer. What the run directories record of that is checked below.",
        )
    )

    series = []
    markers: list[Marker] = []
    for i, (n, r) in enumerate(loaded.items()):
        colour = RUN_COLOURS[i % len(RUN_COLOURS)]
        st, loss = r.series("loss")
        if np.isfinite(loss).any():
            series.append(Series(n, st, loss, colour))
        markers += alert_markers(r.alerts, colour=colour, prefix=f"{n} · ")
    chart = (
        render_line_chart(page, series, ylabel="loss", markers=markers, legend=True)
        if series
        else '<p class="ht-missing">Not recorded in these runs: no <code>loss</code> values.</p>'
    )
    body.append(
        _section(
            "sec-loss",
            "Loss and alerts",
            chart,
            "Loss of every run on one axis; dashed lines in a run's colour mark its alerts (hover for the rule and message).",
        )
    )
    body.append(
        _section(
            "sec-layers",
            "Per-layer tail index and denominator ratio",
            _per_layer_table(loaded),
            "Median over the run of each layer's gradient tail index (red swatch: α &lt; 2) and of its denominator "
            "ratio (AdamW's own, or the shadow denominator for optimizers without one).",
        )
    )

    body.append(
        _section(
            "sec-family-tables",
            "Per-layer medians, side by side",
            _family_tables(loaded),
            "For each figure, the median over the run of every layer, one column per run. Tail indices: red swatch "
            "under 2. Denominators: <code>adam/</code> is the optimizer's own (AdamW, and the AdamW half of "
            "Muon+AdamW), <code>shadowNNN/</code> the shadow EMA of g² with β₂ = 0.NNN that every run keeps; "
            "spike fraction: the share of coordinates with r² over the threshold; memory: how many steps the "
            "denominator stays inflated after a spike.",
        )
    )
    nav.append(("sec-family-tables", "Per-layer medians"))

    specs = heatmap_specs()
    specs[2:2] = noise_source_specs(list(loaded.values()))
    shadows: list[str] = []
    for r in loaded.values():
        shadows += [f for f in shadow_ratio_families(r) if f not in shadows]
    for i, family in enumerate(shadows):
        specs.append(ratio_spec(family, f"sec-shadow-ratio{'' if i == 0 else f'-{i + 1}'}"))
    for spec in specs:
        nav.append((spec.section_id, _nav_label(spec)))
        scale, kind = scales.get(spec.family, (ALPHA_SCALE, "alpha"))
        cells = []
        any_layers = False
        for n, r in loaded.items():
            family = spec.family
            if spec.section_id == "sec-ratio" and not r.layers(family):
                family = ratio_family(r) or family
            layers, hsteps, values = r.matrix(family)
            fspec = spec if family == spec.family else heatmap_specs(family)[-1]
            inner = (
                render_heatmap(
                    page, fspec, layers, hsteps, values, scales[family][0], width=width, max_columns=max_columns
                )
                if layers
                else _missing(spec.family)
            )
            any_layers = any_layers or bool(layers)
            optimizer = str(r.meta.get("optimizer") or "")
            label = n + (f" ({optimizer})" if optimizer and optimizer != n else "")
            label += f" · {family}" if family != spec.family else ""
            cells.append(f"<div><h3>{esc(label)}</h3>{inner}</div>")
        legend = _legend_block(spec, scale, kind, gauss) if any_layers else ""
        body.append(
            _section(
                spec.section_id, spec.title, legend + f"<div class='ht-grid'>{''.join(cells)}</div>", spec.description
            )
        )

    nav += [("sec-alerts", "Alerts"), ("sec-meta", "Runs")]
    body.append(
        _section(
            "sec-alerts",
            "Alerts",
            "".join(f"<h3>{esc(n)}</h3>{render_alerts(r)}" for n, r in loaded.items()),
        )
    )
    body.append(
        _section(
            "sec-meta",
            "Runs",
            "<div class='ht-grid'>"
            + "".join(f"<div><h3>{esc(n)}</h3>{render_meta(r)}</div>" for n, r in loaded.items())
            + "</div>",
        )
    )
    return _document(title, header, nav, body, page, _footer(list(loaded.values())))


def write_compare_report(
    runs: Mapping[str, str | os.PathLike[str] | Run],
    out: str | os.PathLike[str],
    summary: Mapping[str, Any] | None = None,
    note: str | None = None,
    *,
    max_columns: int = 400,
) -> Path:
    """Write one self-contained HTML page comparing runs (optimizers) side by side; returns its path.

    ``runs`` maps a label (``"AdamW"``) to a run directory or :class:`Run`. The page has a table of per-run
    figures (final loss, alert counts, median tail index, denominator ratios), the losses on one chart with
    alerts marked, a per-layer table of median tail index and ratio, the same heatmaps for every run on shared
    colour scales, and checks of what makes the comparison fair (same model, steps, seed).
    ``summary`` adds figures: ``{label: {figure: value}}`` adds rows to the per-run table; any other
    ``key: value`` is listed under "Comparison settings". ``note`` is shown verbatim (escaped) at the top:
    the place to say how the comparison was made fair (same data order, seed, budget).
    """
    return _write(render_compare_report(runs, summary, note, max_columns=max_columns), Path(out))


__all__ = [
    "heatmap_specs",
    "render_compare_report",
    "render_report",
    "write_compare_report",
    "write_report",
]
