"""The Hill plot section: alpha against k for one layer at each checkpoint, with the chosen k marked."""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np

from heavytail.report.sections import Context, Section
from heavytail.report.svg import Canvas, esc, fmt, nice_ticks, tick_label, truncate

MAX_PLOTS = 8
"""The most checkpoints drawn: evenly spaced over the run, the last one always among them."""

_HILL, _DEFAULT, _CHOSEN, _REFERENCE = "#2b5ea7", "#e08b1a", "#c0392b", "#9aa3b3"


def _finite(values: list[Any]) -> np.ndarray:
    """A curve's values as floats, NaN for null (JSON's inf and NaN)."""
    return np.asarray([v if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan for v in values])


def render_hill_plot(plot: Mapping[str, Any], *, width: int = 560, height: int = 200) -> str:
    """One Hill plot as inline SVG: Hill's alpha (solid) and the default's bias-reduced alpha (dashed) against k
    on a log axis, the chosen k as a vertical line and a dot at the recorded alpha, and alpha = 2 (the
    infinite-variance boundary) as a grey line when it is in view. Values beyond the y range sit on its top edge."""
    curve = plot["curve"]
    k = _finite(curve["k"])
    hill, default = _finite(curve["hill_alpha"]), _finite(curve["default_alpha"])
    ok = np.isfinite(k) & (k > 0)
    k, hill, default = k[ok], hill[ok], default[ok]
    chosen_k, alpha = plot.get("k"), plot.get("alpha")
    shown = np.concatenate([hill[np.isfinite(hill)], default[np.isfinite(default)]])
    if k.size == 0 or shown.size == 0:
        return '<p class="ht-missing">No finite values to plot.</p>'
    c = Canvas(width=width, left=52, right=14, top=10, plot_h=height, bottom=42)
    # The y range: the curves' bulk, not the default's wild small-k values (it is 3x noisier than Hill's).
    hi = float(np.percentile(shown, 95)) * 1.15
    if isinstance(alpha, (int, float)) and math.isfinite(alpha):
        hi = max(hi, alpha * 1.15)
    yticks = nice_ticks(0.0, hi, 6)
    y1 = max(yticks[-1], hi)
    x0, x1 = math.log10(k.min()), math.log10(k.max())
    if x1 == x0:
        x0, x1 = x0 - 0.5, x1 + 0.5

    def sx(x: float) -> float:
        return c.left + (math.log10(x) - x0) / (x1 - x0) * c.plot_w

    def sy(y: float) -> float:
        # Values over the range (the default's noisy small-k fits) sit on the frame's top edge.
        return c.top + c.plot_h - min(y, y1) / y1 * c.plot_h

    out = [
        # No data-chart: the page's line read-out is for step axes; the points carry their own tips.
        f'<svg class="ht-chart ht-hill" viewBox="0 0 {c.width} {c.height}" role="img" '
        f'aria-label="Hill plot of {esc(plot["unit"])} at step {esc(plot["step"])}">',
        f'<rect x="{c.left}" y="{c.top}" width="{c.plot_w}" height="{c.plot_h}" fill="#fbfcfe" stroke="#8a93a5"/>',
    ]
    for t in yticks:
        y = sy(t)
        out.append(f'<line x1="{c.left}" x2="{c.left + c.plot_w}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e4e8ef"/>')
        out.append(
            f'<text x="{c.left - 6}" y="{y + 4:.1f}" font-size="11" text-anchor="end">{esc(tick_label(t))}</text>'
        )
    out.append(
        f'<text transform="translate(14 {c.top + c.plot_h / 2:.1f}) rotate(-90)" font-size="12" '
        f'text-anchor="middle" fill="#5c6577">alpha</text>'
    )
    base = c.top + c.plot_h
    for e in range(math.ceil(x0 - 1e-9), math.floor(x1 + 1e-9) + 1):
        x = sx(10.0**e)
        out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{base}" y2="{base + 5}" stroke="#8a93a5"/>')
        out.append(
            f'<text x="{x:.1f}" y="{base + 18}" font-size="11" text-anchor="middle">{esc(tick_label(10.0**e))}</text>'
        )
    out.append(
        f'<text x="{c.left + c.plot_w / 2:.1f}" y="{base + 36}" font-size="12" text-anchor="middle" '
        f'fill="#5c6577">k (order statistics used, log scale)</text>'
    )
    if 2.0 < y1:
        y = sy(2.0)
        out.append(
            f'<line x1="{c.left}" x2="{c.left + c.plot_w}" y1="{y:.1f}" y2="{y:.1f}" stroke="{_REFERENCE}" '
            f'stroke-dasharray="2 3"><title>alpha = 2: under it the variance is infinite</title></line>'
        )
    body = ["<g>"]
    for values, colour, dash in ((hill, _HILL, ""), (default, _DEFAULT, ' stroke-dasharray="5 3"')):
        good = np.isfinite(values)
        if good.any():
            # A break in the line where the fit reads no power law (null), not a jump across it.
            segments, current = [], []
            for kk, v, g in zip(k, values, good):
                if g:
                    current.append(f"{sx(kk):.1f} {sy(v):.1f}")
                elif current:
                    segments.append(current)
                    current = []
            segments.append(current)
            d = " ".join("M" + " L".join(seg) for seg in segments if seg)
            body.append(f'<path d="{d}" fill="none" stroke="{colour}" stroke-width="1.6"{dash}/>')
    for kk, h, dv in zip(k, hill, default):
        if math.isfinite(h):
            tip = f"k = {int(kk)}: Hill alpha {fmt(h, 3)}, default alpha {fmt(dv, 3) if math.isfinite(dv) else 'none'}"
            body.append(
                f'<circle cx="{sx(kk):.1f}" cy="{sy(h):.1f}" r="2" fill="{_HILL}" data-tip="{esc(tip)}">'
                f"<title>{esc(tip)}</title></circle>"
            )
    if isinstance(chosen_k, (int, float)) and chosen_k > 0:
        x = sx(float(chosen_k))
        body.append(
            f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{c.top}" y2="{base}" stroke="{_CHOSEN}" stroke-width="1.2" '
            f'stroke-dasharray="4 3"/>'
        )
        if isinstance(alpha, (int, float)) and math.isfinite(alpha):
            tip = f"chosen k = {int(chosen_k)}: alpha {fmt(alpha, 3)} ± {fmt(plot.get('se'), 2)}"
            body.append(
                f'<circle cx="{x:.1f}" cy="{sy(alpha):.1f}" r="4.5" fill="{_CHOSEN}" stroke="#fff" data-tip="{esc(tip)}">'
                f"<title>{esc(tip)}</title></circle>"
            )
    body.append("</g>")
    out += body
    out.append("</svg>")
    return "\n".join(out)


def _caption(plot: Mapping[str, Any]) -> str:
    alpha = plot.get("alpha")
    if plot.get("light"):
        reading = "no power-law tail (alpha = inf)"
    elif isinstance(alpha, (int, float)):
        reading = f"alpha = {fmt(alpha, 3)} ± {fmt(plot.get('se'), 2)}"
    else:
        reading = "alpha not computed"
    n = plot.get("n")
    of = f" of n = {n:,}" if isinstance(n, int) else ""
    return (
        f"step {esc(tick_label(plot['step']))} · <code>{esc(truncate(plot['unit'], 48))}</code> "
        f"({esc(plot.get('selected', ''))}) · {esc(reading)} at k = {esc(plot.get('k'))}{esc(of)}"
    )


def _draw(ctx: Context) -> str | None:
    plots = ctx.run.hill_plots
    if not plots:
        return None  # the run wrote no hill_plot.jsonl (an older run, or no layer large enough)
    picks = sorted({int(round(i)) for i in np.linspace(0, len(plots) - 1, min(len(plots), MAX_PLOTS))})
    cells = [f"<div><p class='ht-sub'>{_caption(plots[i])}</p>{render_hill_plot(plots[i])}</div>" for i in picks]
    note = (
        f"<p class='ht-note'>{len(picks)} of {len(plots)} checkpoints, evenly spaced; every one is in "
        "<code>hill_plot.jsonl</code>.</p>"
        if len(picks) < len(plots)
        else ""
    )
    legend = (
        f"<p class='ht-desc'><span style='color:{_HILL}'>━</span> Hill's alpha at k · "
        f"<span style='color:{_DEFAULT}'>╍</span> the default's bias-reduced alpha at k · "
        f"<span style='color:{_CHOSEN}'>●</span> the k and alpha the record reports · "
        f"<span style='color:{_REFERENCE}'>┈</span> alpha = 2</p>"
    )
    return legend + note + f"<div class='ht-grid'>{''.join(cells)}</div>"


HILL_PLOT_SECTION = Section(
    id="sec-hill-plot",
    title="Hill plot",
    keys=("grad/hill_alpha",),
    draw=_draw,
    compare=None,
    description="The coordinate tail index of one layer against the number of order statistics k, at each "
    "checkpoint (the layer with the lowest <code>grad/hill_alpha</code>, or "
    "<code>MonitorConfig.hill_plot_unit</code>). A flat stretch of Hill's curve is a power-law tail; a drift with "
    "k is the bulk's bias, which the default extrapolates away; a sparse heavy component shows as low values at "
    "small k that rise once k passes its size. The default picks the largest k its references agree with, or, "
    "where a scan with references down to k = 60 reads a heavier tail by 3 standard deviations, that scan's k.",
    nav="Hill plot",
)
