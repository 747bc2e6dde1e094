"""Layer x step heatmaps as inline SVG (the cells as one PNG data URI), and their colour legends."""

from __future__ import annotations

import base64
import math
import struct
import zlib
from dataclasses import dataclass

import numpy as np

from heavytail.report.scales import ColorScale
from heavytail.report.svg import Canvas, ChartData, esc, fmt, nice_ticks, tick_label, truncate, x_axis

# ----------------------------------------------------------------------------------------------------------------
# PNG (the heatmap cells), written by hand: zlib and a CRC are all it takes


def png_data_uri(rgb: np.ndarray) -> str:
    """An RGB image (H x W x 3 uint8) as a ``data:image/png;base64`` URI."""
    h, w, _ = rgb.shape
    raw = np.concatenate([np.zeros((h, 1), dtype=np.uint8), rgb.reshape(h, w * 3)], axis=1).tobytes()

    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body) & 0xFFFFFFFF)

    png = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(raw, 9))
        + chunk(b"IEND", b"")
    )
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


# ----------------------------------------------------------------------------------------------------------------
# Heatmaps


@dataclass(frozen=True)
class HeatmapSpec:
    """What a per-layer family's heatmap shows and how."""

    family: str
    section_id: str
    title: str
    description: str  # HTML (trusted: written here)
    label: str  # the value's name in read-outs and legends
    worst: str  # "min" or "max": which value of a bin a downsampled column shows


def _downsample(steps: np.ndarray, values: np.ndarray, max_columns: int, worst: str):
    """Bin checkpoints into at most ``max_columns`` columns, each showing its bin's worst value.

    The worst (lowest α, highest kurtosis or ratio), not the mean, so a one-checkpoint event survives.
    """
    n = len(steps)
    if n <= max_columns:
        return steps.copy(), steps.copy(), values
    edges = np.linspace(0, n, max_columns + 1).astype(np.int64)
    starts = edges[:-1]
    reduce = np.fmin if worst == "min" else np.fmax  # fmin/fmax skip NaN unless a whole bin is NaN
    binned = reduce.reduceat(values, starts, axis=1)
    return steps[starts], steps[edges[1:] - 1], binned


def _step_ticks(lo_steps: np.ndarray, hi_steps: np.ndarray, c: Canvas) -> list[tuple[float, str]]:
    n = len(lo_steps)
    centres = (lo_steps + hi_steps) / 2.0
    xs = c.left + (np.arange(n) + 0.5) / n * c.plot_w
    if n == 1:
        return [(float(xs[0]), tick_label(float(centres[0])))]
    ticks = nice_ticks(float(centres[0]), float(centres[-1]), 8)
    return [(float(np.interp(t, centres, xs)), tick_label(t)) for t in ticks]


def _label_rows(n_rows: int, row_h: float, priority: np.ndarray, spacing: float = 14.0) -> set[int]:
    """Rows that get a name: every k-th row so that names do not overlap, and every ``priority`` row
    (a layer that went under alpha = 2), which displaces the regular names too close to it."""
    every = max(1, math.ceil(spacing / row_h))
    rows = set(range(0, n_rows, every))
    if every > 1:
        near = math.ceil(spacing / row_h)
        chosen: list[int] = []
        for i in np.flatnonzero(priority).tolist():
            if not chosen or i - chosen[-1] >= near:
                chosen.append(i)
        for i in chosen:
            rows -= set(range(i - near + 1, i + near))
        rows |= set(chosen)
    return rows


def render_heatmap(
    page: ChartData,
    spec: HeatmapSpec,
    layers: list[str],
    steps: np.ndarray,
    values: np.ndarray,
    scale: ColorScale,
    *,
    width: int = 1160,
    max_columns: int = 600,
) -> str:
    """An SVG layer x step heatmap (cells as one pixelated PNG), with row labels, a step axis and hover data."""
    lo, hi, binned = _downsample(steps, values, max(1, max_columns), spec.worst)
    n_rows, n_cols = binned.shape
    row_h = min(18.0, max(1.0, 720.0 / max(n_rows, 1)))
    label_chars = max((len(name) for name in layers), default=4)
    max_chars = 40 if width > 900 else 28
    left = int(min(max_chars, label_chars) * 6.7) + 14
    c = Canvas(width=width, left=max(left, 80), right=22, top=6, plot_h=int(math.ceil(row_h * n_rows)), bottom=44)
    hid = page.new_id("hm")
    under = np.zeros(n_rows, dtype=bool)
    if spec.worst == "min" and scale.break_at is not None:
        under = np.any(values < scale.break_at, axis=1)
    n_under = np.sum(values < scale.break_at, axis=1) if under.any() else np.zeros(n_rows, dtype=np.int64)
    n_valid = np.sum(np.isfinite(values), axis=1)

    out = [
        f'<svg class="ht-chart ht-heatmap" data-chart="{hid}" data-family="{esc(spec.family)}" '
        f'viewBox="0 0 {c.width} {c.height}" role="img" aria-label="{esc(spec.title)}">',
        f'<image class="ht-cells" x="{c.left}" y="{c.top}" width="{c.plot_w}" height="{c.plot_h}" '
        f'preserveAspectRatio="none" href="{png_data_uri(scale.rgb(binned))}"/>',
        f'<rect x="{c.left}" y="{c.top}" width="{c.plot_w}" height="{c.plot_h}" fill="none" stroke="#8a93a5"/>',
    ]
    labelled = _label_rows(n_rows, row_h, under)
    for i, name in enumerate(layers):
        y = c.top + (i + 0.5) * row_h
        if under[i]:
            out.append(
                f'<rect class="ht-under" x="{c.left + c.plot_w + 4}" y="{c.top + i * row_h:.2f}" width="7" '
                f'height="{max(row_h, 1.0):.2f}" fill="#c0392b"><title>{esc(name)}: α under 2 at '
                f"{int(n_under[i])} of {int(n_valid[i])} checkpoints</title></rect>"
            )
        if i in labelled:
            weight = ' font-weight="600" fill="#b3261e"' if under[i] else ""
            out.append(
                f'<text x="{c.left - 6}" y="{y + 3.8:.2f}" font-size="11" text-anchor="end" '
                f'class="mono"{weight}>{esc(truncate(name, max_chars))}<title>{esc(name)}</title></text>'
            )
    out += x_axis(c, _step_ticks(lo, hi, c), "optimizer step")
    if n_cols < len(steps):
        out.append(
            f'<text x="{c.left + c.plot_w}" y="{c.top + c.plot_h + 36}" font-size="11" text-anchor="end" '
            f'fill="#8a93a5">{len(steps)} checkpoints in {n_cols} columns ({"lowest" if spec.worst == "min" else "highest"} '
            f"value per column)</text>"
        )
    out.append("</svg>")
    page.heatmaps[hid] = {
        "rows": n_rows,
        "cols": n_cols,
        "layers": list(layers),
        "lo": [int(s) for s in lo],
        "hi": [int(s) for s in hi],
        "label": spec.label,
        "agg": "lowest in bin" if spec.worst == "min" else "highest in bin",
        "values": base64.b64encode(np.ascontiguousarray(binned, dtype="<f4").tobytes()).decode("ascii"),
    }
    return "\n".join(out)


def render_legend(scale: ColorScale, kind: str, *, gauss: float | None = None) -> str:
    """The colour bar of a heatmap, with what the colours mean for a training run."""
    bar_x, bar_w, bar_y, bar_h = 14, 540, 20, 13
    width = 880
    out = [f'<svg class="ht-legend" data-legend="{esc(kind)}" viewBox="0 0 {width} 58" width="{width}">']
    n = 160
    for i in range(n):
        f0 = i / n
        v = scale.value_at(f0 + 0.5 / n)
        out.append(
            f'<rect x="{bar_x + f0 * bar_w:.2f}" y="{bar_y}" width="{bar_w / n + 0.4:.2f}" height="{bar_h}" '
            f'fill="{scale.css(v)}"/>'
        )
    out.append(f'<rect x="{bar_x}" y="{bar_y}" width="{bar_w}" height="{bar_h}" fill="none" stroke="#8a93a5"/>')

    def tick(v: float, text: str) -> None:
        x = bar_x + scale.pos(v) * bar_w
        out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{bar_y + bar_h}" y2="{bar_y + bar_h + 4}" stroke="#5c6577"/>')
        out.append(f'<text x="{x:.1f}" y="{bar_y + bar_h + 16}" font-size="11" text-anchor="middle">{esc(text)}</text>')

    def band(v0: float, v1: float, text: str, colour: str = "#2a3140", bold: bool = False) -> None:
        x0, x1 = bar_x + scale.pos(v0) * bar_w, bar_x + scale.pos(v1) * bar_w
        weight = ' font-weight="600"' if bold else ""
        out.append(
            f'<text x="{(x0 + x1) / 2:.1f}" y="{bar_y - 6}" font-size="11" text-anchor="middle" '
            f'fill="{colour}"{weight}>{esc(text)}</text>'
        )

    if kind == "alpha":
        tick(scale.lo, f"≤{scale.lo:g}")
        for v in (1.5, 2, 3, 4, 6):
            tick(v, f"{v:g}")
        tick(scale.hi, f"≥{scale.hi:g}")
        x2 = bar_x + scale.pos(2.0) * bar_w
        out.append(
            f'<line x1="{x2:.1f}" x2="{x2:.1f}" y1="{bar_y - 3}" y2="{bar_y + bar_h + 3}" stroke="#1c2230" stroke-width="2"/>'
        )
        band(scale.lo, 2.0, "α < 2: infinite variance", "#b3261e", bold=True)
        band(2.0, 4.0, "infinite kurtosis")
        band(4.0, scale.hi, "light tails")
    elif kind == "kurtosis":
        # Ticks in excess-kurtosis units on the log axis of excess + shift.
        top = scale.hi - scale.shift
        values = [-2.0, 0.0] + [10.0**d for d in range(1, 12) if 10.0**d <= top + 1e-9]
        stride = max(1, math.ceil((len(values) - 2) / 6))
        for i, v in enumerate(values):
            if v >= scale.lo - scale.shift - 1e-9 and (i < 2 or (i - 2) % stride == 0 or v == values[-1]):
                tick(v, tick_label(v) if v >= 0 else f"{v:g}")
        g = gauss if gauss is not None and math.isfinite(gauss) else 0.0
        x = bar_x + scale.pos(g) * bar_w
        out.append(
            f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{bar_y - 3}" y2="{bar_y + bar_h}" stroke="#1c2230" stroke-width="1.5"/>'
        )
        out.append(
            f'<text x="{x:.1f}" y="{bar_y - 6}" font-size="11" text-anchor="start">Gaussian 99% ({fmt(g, 2)})</text>'
        )
    else:
        decades = range(round(math.log10(scale.lo)), round(math.log10(scale.hi)) + 1)
        stride = max(1, math.ceil(len(decades) / 7))
        for i, d in enumerate(decades):
            if i % stride == 0 or d == decades[-1]:
                tick(10.0**d, tick_label(10.0**d) if d >= 0 else f"{10.0**d:g}")
        if kind == "ratio":  # the hidden-spike cut; a "magnitude" scale has no threshold
            r = math.sqrt(5000.0)
            x = bar_x + scale.pos(r) * bar_w
            out.append(
                f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{bar_y - 3}" y2="{bar_y + bar_h}" stroke="#1c2230" stroke-width="1.5"/>'
            )
            out.append(f'<text x="{x:.1f}" y="{bar_y - 6}" font-size="11" text-anchor="middle">r² = 5000</text>')
    sx = bar_x + bar_w + 26
    out.append(f'<rect x="{sx}" y="{bar_y}" width="13" height="13" fill="{scale.missing}" stroke="#8a93a5"/>')
    out.append(f'<text x="{sx + 19}" y="{bar_y + 11}" font-size="11">no value</text>')
    if kind == "alpha":
        out.append(f'<rect x="{sx + 90}" y="{bar_y}" width="6" height="13" fill="#c0392b"/>')
        out.append(f'<text x="{sx + 102}" y="{bar_y + 11}" font-size="11">layer went under α = 2</text>')
    out.append("</svg>")
    return "\n".join(out)
