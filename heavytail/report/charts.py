"""Charts as inline SVG: colour scales, layer x step heatmaps (cells as one PNG data URI), legends, line charts.

Everything here returns markup strings with every run-supplied string escaped, and registers the numbers that
the page's hover read-out needs in a :class:`ChartData`.
"""

from __future__ import annotations

import base64
import html as _html
import json
import math
import struct
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np

# ----------------------------------------------------------------------------------------------------------------
# Escaping and formatting


def esc(value: Any) -> str:
    """HTML-escape any value for text or a quoted attribute (``& < > " '``)."""
    return _html.escape(value if isinstance(value, str) else str(value), quote=True)


def json_for_script(obj: Any) -> str:
    """JSON safe inside ``<script type="application/json">``: no ``<``, ``>`` or ``&`` survive literally.

    ``\\u003c`` is the same string to ``JSON.parse`` but can never form ``</script>`` or ``<!--``.
    """
    text = json.dumps(obj, ensure_ascii=True, allow_nan=False, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def fmt(value: Any, digits: int = 4) -> str:
    """A number for a table cell: 4 significant digits (whole numbers up to 99,999 written out), exponent form
    when very large or small, '—' for none."""
    if value is None:
        return "—"
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return f"{int(value):,}"
    try:
        v = float(value)
    except (TypeError, ValueError):
        return str(value)
    if math.isnan(v):
        return "—"
    if math.isinf(v):
        return "∞" if v > 0 else "−∞"
    a = abs(v)
    if a != 0 and (a >= 1e5 or a < 1e-3):
        return f"{v:.{digits - 2}e}"
    text = f"{v:.{digits}g}"
    # Under 1e5, a value with more integer digits than ``digits`` reads better written out (1,001, not 1e+03).
    return f"{v:,.0f}" if "e" in text else text


def _num(value: Any, digits: int = 5) -> float | None:
    """A JSON-safe float rounded to ``digits`` significant digits (None for NaN/Inf)."""
    v = float(value)
    if not math.isfinite(v):
        return None
    return float(f"{v:.{digits}g}")


# ----------------------------------------------------------------------------------------------------------------
# Colour scales


def _hex(c: str) -> tuple[int, int, int]:
    return int(c[1:3], 16), int(c[3:5], 16), int(c[5:7], 16)


@dataclass(frozen=True)
class ColorScale:
    """Piecewise-linear colours over a linear or log axis, with an optional break (a hard colour change).

    ``lo``, ``hi`` and the stops are on the scale's axis, which is the value plus ``shift``: excess kurtosis
    (Gaussian 0, never under -2) is coloured on a log axis of ``excess + 3``, the Pearson kurtosis, so negative
    values have a place. Values under ``break_at`` (value units) take the ``below`` stops, the others the
    ``stops``; values outside ``[lo, hi]`` are clamped; NaN takes ``missing``.
    """

    lo: float
    hi: float
    stops: tuple[tuple[float, str], ...]
    log: bool = False
    below: tuple[tuple[float, str], ...] = ()
    break_at: float | None = None
    missing: str = "#d3d8e0"
    shift: float = 0.0

    def _axis(self, a: np.ndarray) -> np.ndarray:
        a = np.clip(a, self.lo, self.hi)
        return np.log10(a) if self.log else a

    def _t(self, v: np.ndarray) -> np.ndarray:
        return self._axis(v + self.shift)

    def value_at(self, f: float) -> float:
        """The value (not the axis position) at fraction ``f`` of the legend bar."""
        if self.log:
            a = 10 ** (math.log10(self.lo) + f * (math.log10(self.hi) - math.log10(self.lo)))
        else:
            a = self.lo + f * (self.hi - self.lo)
        return a - self.shift

    def pos(self, v: float) -> float:
        """Where ``v`` sits on the legend bar, 0 at ``lo`` and 1 at ``hi``."""
        t = self._t(np.asarray([v], dtype=np.float64))[0]
        t0, t1 = self._axis(np.asarray([self.lo, self.hi], dtype=np.float64))
        return float((t - t0) / (t1 - t0)) if t1 > t0 else 0.0

    def _interp(self, t: np.ndarray, stops: tuple[tuple[float, str], ...]) -> np.ndarray:
        xs = self._axis(np.asarray([s[0] for s in stops], dtype=np.float64))
        cols = np.asarray([_hex(s[1]) for s in stops], dtype=np.float64)
        return np.stack([np.interp(t, xs, cols[:, k]) for k in range(3)], axis=-1)

    def rgb(self, values: np.ndarray) -> np.ndarray:
        """uint8 colours, shape ``values.shape + (3,)``."""
        v = np.asarray(values, dtype=np.float64)
        nan = ~np.isfinite(v) & ~np.isinf(v)
        t = self._t(np.where(nan, self.lo - self.shift, v))
        out = self._interp(t, self.stops)
        if self.break_at is not None and self.below:
            under = v < self.break_at
            out[under] = self._interp(t[under], self.below)
        out[nan] = _hex(self.missing)
        return np.clip(np.rint(out), 0, 255).astype(np.uint8)

    def css(self, v: float) -> str:
        """One colour as ``#rrggbb``."""
        r, g, b = self.rgb(np.asarray([v]))[0]
        return f"#{r:02x}{g:02x}{b:02x}"


# Tail index: red under 2 (infinite variance), orange to pale between 2 and 4 (finite variance, infinite
# kurtosis), blue above 4; the hard change at 2 makes a dip visible at a glance.
ALPHA_SCALE = ColorScale(
    lo=1.0,
    hi=8.0,
    log=True,  # each doubling of alpha gets the same width: 1-2, 2-4 and 4-8 a third of the bar each
    below=((1.0, "#4a0018"), (1.5, "#9b0d26"), (1.999, "#dd2a25")),
    break_at=2.0,
    stops=((2.0, "#fca55d"), (3.0, "#fee090"), (4.0, "#e3f2f7"), (5.66, "#8fbfdc"), (8.0, "#3b6fb0")),
)

_MAGNITUDE_COLOURS = {
    "kurtosis": ("#fcfdbf", "#feb47b", "#f1605d", "#b5367a", "#6a1c81", "#2b1160"),
    "ratio": ("#f7fcf0", "#c7e9c0", "#7bccc4", "#2b8cbe", "#0c4a8c", "#081d58"),
}


def log_scale(kind: str, lo: float, hi: float, shift: float = 0.0) -> ColorScale:
    """A log colour scale from pale (``lo``) to dark (``hi``) in the palette ``kind`` (kurtosis or ratio).

    ``lo`` and ``hi`` are on the axis ``value + shift`` (see :class:`ColorScale`).
    """
    colours = _MAGNITUDE_COLOURS[kind]
    n = len(colours) - 1
    stops = tuple((lo * (hi / lo) ** (i / n), c) for i, c in enumerate(colours))
    return ColorScale(lo=lo, hi=hi, stops=stops, log=True, shift=shift)


KURTOSIS_SHIFT = 3.0
"""Excess kurtosis is coloured on a log axis of ``excess + 3`` (Pearson's kurtosis: 1 at the least possible
value, 3 for a Gaussian)."""


def kurtosis_scale(matrices: Sequence[np.ndarray]) -> ColorScale:
    """The colour scale of excess kurtosis: log of ``excess + 3`` from 1 (excess -2) to the decade above the
    largest value (at least 100)."""
    shifted = [np.asarray(m, dtype=np.float64) + KURTOSIS_SHIFT for m in matrices]
    return log_scale("kurtosis", 1.0, decade_hi(shifted, 100.0), shift=KURTOSIS_SHIFT)


def decade_hi(matrices: Sequence[np.ndarray], floor: float) -> float:
    """The upper end of a log scale: the decade above the largest finite value, at least ``floor``."""
    top = floor
    for m in matrices:
        finite = m[np.isfinite(m)]
        if finite.size:
            top = max(top, float(finite.max()))
    return float(10 ** math.ceil(math.log10(top) - 1e-9))


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
# Axes


def nice_ticks(lo: float, hi: float, n: int = 7) -> list[float]:
    """Round tick values (1, 2, 5 x 10^k steps) covering ``[lo, hi]``, about ``n`` of them."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return []
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / max(n - 1, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.ceil(lo / step - 1e-9) * step
    ticks = []
    k = 0
    while start + k * step <= hi + 1e-9 * step:
        ticks.append(round(start + k * step, 12))
        k += 1
    return ticks


def tick_label(v: float) -> str:
    if v == int(v) and abs(v) < 1e7:
        return f"{int(v):,}"
    return fmt(v, 3)


def truncate(name: str, n: int) -> str:
    return name if len(name) <= n else "…" + name[-(n - 1) :]


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


@dataclass
class _Canvas:
    """Pixel layout of one chart in its viewBox."""

    width: int
    left: int
    right: int
    top: int
    plot_h: int
    bottom: int

    @property
    def plot_w(self) -> int:
        return self.width - self.left - self.right

    @property
    def height(self) -> int:
        return self.top + self.plot_h + self.bottom


class ChartData:
    """Collects the embedded data of a page's interactive charts."""

    def __init__(self) -> None:
        self.heatmaps: dict[str, Any] = {}
        self.lines: dict[str, Any] = {}
        self._n = 0

    def new_id(self, prefix: str) -> str:
        self._n += 1
        return f"{prefix}{self._n}"

    def data_script(self) -> str:
        blob = json_for_script({"heatmaps": self.heatmaps, "lines": self.lines})
        return f'<script type="application/json" id="ht-data">{blob}</script>'


def _x_axis(c: _Canvas, ticks: list[tuple[float, str]], label: str) -> list[str]:
    y = c.top + c.plot_h
    out = [f'<line x1="{c.left}" x2="{c.left + c.plot_w}" y1="{y}" y2="{y}" stroke="#8a93a5"/>']
    for x, text in ticks:
        out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{y}" y2="{y + 5}" stroke="#8a93a5"/>')
        out.append(f'<text x="{x:.1f}" y="{y + 18}" font-size="11" text-anchor="middle">{esc(text)}</text>')
    out.append(
        f'<text x="{c.left + c.plot_w / 2:.1f}" y="{y + 36}" font-size="12" text-anchor="middle" '
        f'fill="#5c6577">{esc(label)}</text>'
    )
    return out


def _step_ticks(lo_steps: np.ndarray, hi_steps: np.ndarray, c: _Canvas) -> list[tuple[float, str]]:
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
    c = _Canvas(width=width, left=max(left, 80), right=22, top=6, plot_h=int(math.ceil(row_h * n_rows)), bottom=44)
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
    out += _x_axis(c, _step_ticks(lo, hi, c), "optimizer step")
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
    c = _Canvas(width=width, left=70, right=20, top=24 if legend else 14, plot_h=height, bottom=46)
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
    out += _x_axis(c, xt, "optimizer step")
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
        data_series.append({"label": s.label, "steps": [_num(x, 12) for x in st], "values": [_num(v) for v in vals]})
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
