"""Line charts over optimizer steps as inline SVG, with alert markers and a hover read-out."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from heavytail.report.svg import Canvas, ChartData, esc, fmt, json_float, nice_ticks, tick_label, truncate, x_axis

# ----------------------------------------------------------------------------------------------------------------
# Line charts


SEVERITY_COLOURS = {"critical": "#c0392b", "warning": "#d9822b", "info": "#2f7ebc"}
SEVERITY_RANK = {"critical": 0, "warning": 1, "info": 2}
RUN_COLOURS = ("#2b5ea7", "#d1495b", "#2e9e6a", "#8e5cc2", "#e08b1a", "#7a5a3a", "#d45fb0", "#1aa3b8")


def _decimate(steps: np.ndarray, values: np.ndarray, max_points: int = 2400) -> tuple[np.ndarray, np.ndarray]:
    """Keep each bin's first, lowest and highest point so spikes survive thinning."""
    n = len(steps)
    if n <= max_points:
        return steps, values
    bins = max_points // 3
    edges = np.linspace(0, n, bins + 1).astype(np.int64)
    keep: list[int] = []
    for a, b in zip(edges[:-1], edges[1:]):
        seg = values[a:b]
        keep.append(int(a))
        if np.isfinite(seg).any():
            keep.append(int(a + np.nanargmin(seg)))
            keep.append(int(a + np.nanargmax(seg)))
    idx = np.unique(np.asarray(keep))
    return steps[idx], values[idx]


@dataclass
class Series:
    """One line of a line chart."""

    label: str
    steps: np.ndarray
    values: np.ndarray
    colour: str = RUN_COLOURS[0]


@dataclass
class Marker:
    """Alerts at one step: a vertical line with a tooltip listing them."""

    step: float
    colour: str
    text: str  # plain text, lines separated by \n


def alert_markers(alerts: Sequence[Mapping[str, Any]], colour: str | None = None, prefix: str = "") -> list[Marker]:
    """One marker per alerted step, coloured by its most severe alert (or by ``colour``)."""
    by_step: dict[float, list[Mapping[str, Any]]] = {}
    for a in alerts:
        step = a.get("step")
        if isinstance(step, (int, float)) and not isinstance(step, bool) and math.isfinite(step):
            by_step.setdefault(float(step), []).append(a)
    markers = []
    for step, group in sorted(by_step.items()):
        group = sorted(group, key=lambda a: SEVERITY_RANK.get(str(a.get("severity")), 9))
        lines = [f"{prefix}step {tick_label(step)}: {len(group)} alert{'s' if len(group) > 1 else ''}"]
        for a in group[:8]:
            lines.append(f"{a.get('rule', '?')} ({a.get('severity', '?')}): {a.get('message', '')}")
        if len(group) > 8:
            lines.append(f"… and {len(group) - 8} more")
        top = str(group[0].get("severity"))
        markers.append(Marker(step, colour or SEVERITY_COLOURS.get(top, "#7a8396"), "\n".join(lines)))
    return markers


def render_line_chart(
    page: ChartData,
    series: Sequence[Series],
    *,
    ylabel: str,
    markers: Sequence[Marker] = (),
    width: int = 1160,
    height: int = 250,
    log_y: bool | None = None,
    legend: bool = False,
) -> str:
    """An SVG line chart over optimizer steps, with alert markers and a hover read-out."""
    c = Canvas(width=width, left=70, right=20, top=24 if legend else 14, plot_h=height, bottom=46)
    cid = page.new_id("ln")
    cleaned = []
    for s in series:
        st, vals = _decimate(np.asarray(s.steps, dtype=np.float64), np.asarray(s.values, dtype=np.float64))
        ok = np.isfinite(vals)
        cleaned.append((s, st[ok], vals[ok]))
    all_steps = np.concatenate([st for _, st, _ in cleaned] + [np.asarray([m.step for m in markers], dtype=np.float64)])
    all_vals = np.concatenate([v for _, _, v in cleaned]) if cleaned else np.zeros(0)
    if all_vals.size == 0 or all_steps.size == 0:
        return '<p class="ht-missing">No finite values to plot.</p>'
    xmin, xmax = float(all_steps.min()), float(all_steps.max())
    if xmax == xmin:
        xmin, xmax = xmin - 1, xmax + 1
    ymin, ymax = float(all_vals.min()), float(all_vals.max())
    if log_y is None:
        log_y = ymin > 0 and ymax / ymin > 100
    if log_y:
        tmin, tmax = math.floor(math.log10(ymin)), math.ceil(math.log10(ymax))
        tmax = max(tmax, tmin + 1)
        yticks = [10.0**k for k in range(tmin, tmax + 1)]
        t0, t1 = float(tmin), float(tmax)
        to_t: Callable[[np.ndarray], np.ndarray] = np.log10
    else:
        pad = (ymax - ymin) * 0.06 or abs(ymax) * 0.1 or 1.0
        yticks = nice_ticks(ymin - pad, ymax + pad, 6)
        t0, t1 = min(yticks[0], ymin - pad), max(yticks[-1], ymax + pad)
        to_t = np.asarray

    def sx(x: np.ndarray) -> np.ndarray:
        return c.left + (x - xmin) / (xmax - xmin) * c.plot_w

    def sy(y: np.ndarray) -> np.ndarray:
        return c.top + c.plot_h - (to_t(y) - t0) / (t1 - t0) * c.plot_h

    out = [
        f'<svg class="ht-chart ht-line" data-chart="{cid}" viewBox="0 0 {c.width} {c.height}" role="img" '
        f'aria-label="{esc(ylabel)} over optimizer steps">',
        f'<rect x="{c.left}" y="{c.top}" width="{c.plot_w}" height="{c.plot_h}" fill="#fbfcfe" stroke="#8a93a5"/>',
    ]
    for t in yticks:
        y = float(sy(np.asarray([t]))[0])
        if c.top - 0.5 <= y <= c.top + c.plot_h + 0.5:
            out.append(f'<line x1="{c.left}" x2="{c.left + c.plot_w}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e4e8ef"/>')
            out.append(
                f'<text x="{c.left - 7}" y="{y + 4:.1f}" font-size="11" text-anchor="end">{esc(tick_label(t) if not log_y else fmt(t, 3))}</text>'
            )
    out.append(
        f'<text transform="translate(16 {c.top + c.plot_h / 2:.1f}) rotate(-90)" font-size="12" '
        f'text-anchor="middle" fill="#5c6577">{esc(ylabel)}{" (log scale)" if log_y else ""}</text>'
    )
    xt = [(float(sx(np.asarray([t]))[0]), tick_label(t)) for t in nice_ticks(xmin, xmax, 9)]
    out += x_axis(c, xt, "optimizer step")
    for m in markers:
        x = float(sx(np.asarray([m.step]))[0])
        out.append(
            f'<g class="ht-alert-marker" data-tip="{esc(m.text)}"><title>{esc(m.text)}</title>'
            f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{c.top}" y2="{c.top + c.plot_h}" stroke="{m.colour}" '
            f'stroke-width="1.5" stroke-dasharray="4 3"/>'
            f'<path d="M{x - 5:.1f} {c.top - 1} L{x + 5:.1f} {c.top - 1} L{x:.1f} {c.top + 7}Z" fill="{m.colour}"/>'
            f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{c.top}" y2="{c.top + c.plot_h}" stroke="transparent" '
            f'stroke-width="9"/></g>'
        )
    data_series = []
    for s, st, vals in cleaned:
        if len(st):
            pts = np.stack([sx(st), sy(vals)], axis=1)
            d = "M" + " L".join(f"{x:.1f} {y:.1f}" for x, y in pts)
            out.append(
                f'<path class="ht-series" d="{d}" fill="none" stroke="{s.colour}" stroke-width="1.6" stroke-linejoin="round"/>'
            )
            if len(st) == 1:
                out.append(f'<circle cx="{pts[0, 0]:.1f}" cy="{pts[0, 1]:.1f}" r="3" fill="{s.colour}"/>')
        data_series.append(
            {"label": s.label, "steps": [json_float(x, 12) for x in st], "values": [json_float(v) for v in vals]}
        )
    if legend:
        x = c.left
        for s, _, _ in cleaned:
            out.append(f'<rect x="{x}" y="4" width="14" height="4" fill="{s.colour}"/>')
            out.append(f'<text x="{x + 19}" y="10" font-size="11">{esc(truncate(s.label, 36))}</text>')
            x += 30 + 7 * min(len(s.label), 36)
    out.append(
        f'<line class="ht-guide" x1="0" x2="0" y1="{c.top}" y2="{c.top + c.plot_h}" stroke="#1c2230" '
        f'stroke-width="0.8" visibility="hidden" pointer-events="none"/>'
    )
    out.append("</svg>")
    page.lines[cid] = {
        "x0": c.left,
        "x1": c.left + c.plot_w,
        "y0": c.top,
        "y1": c.top + c.plot_h,
        "xmin": xmin,
        "xmax": xmax,
        "ylabel": ylabel,
        "series": data_series,
    }
    return "\n".join(out)
