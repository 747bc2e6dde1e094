"""The self-contained HTML report of one run, or of several runs side by side (optimizer comparison).

One file, readable offline: the styles, the script, the data (embedded JSON) and the heatmap images (PNG data
URIs) are inline, and a Content-Security-Policy in the page forbids every fetch. Charts are SVG written here;
the inline script only adds hover read-outs, so the report is complete with scripts disabled.
Every string that comes from the run (layer names, messages, metadata) is HTML-escaped; embedded JSON is
escaped so that no ``</script>`` can close its element.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html as _html
import json
import math
import os
import struct
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from heavytail.report.assets import CSP, SCRIPT, STYLE
from heavytail.report.rundir import Run, load_run

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
    """A number for a table cell: 4 significant digits, exponent form when very large or small, '—' for none."""
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
    return f"{v:.{digits}g}"


def _num(value: Any, digits: int = 5) -> float | None:
    """A JSON-safe float rounded to ``digits`` significant digits (None for NaN/Inf)."""
    v = float(value)
    if not math.isfinite(v):
        return None
    return float(f"{v:.{digits}g}")


def _nanstat(fn: Callable[[np.ndarray], Any], values: np.ndarray) -> float:
    finite = np.asarray(values, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    return float(fn(finite)) if finite.size else math.nan


# ----------------------------------------------------------------------------------------------------------------
# Colour scales


def _hex(c: str) -> tuple[int, int, int]:
    return int(c[1:3], 16), int(c[3:5], 16), int(c[5:7], 16)


@dataclass(frozen=True)
class ColorScale:
    """Piecewise-linear colours over a linear or log axis, with an optional break (a hard colour change).

    Values under ``break_at`` take the ``below`` stops, the others the ``stops``; values outside ``[lo, hi]`` are
    clamped; NaN takes ``missing``.
    """

    lo: float
    hi: float
    stops: tuple[tuple[float, str], ...]
    log: bool = False
    below: tuple[tuple[float, str], ...] = ()
    break_at: float | None = None
    missing: str = "#d3d8e0"

    def _t(self, v: np.ndarray) -> np.ndarray:
        v = np.clip(v, self.lo, self.hi)
        return np.log10(v) if self.log else v

    def pos(self, v: float) -> float:
        """Where ``v`` sits on the legend bar, 0 at ``lo`` and 1 at ``hi``."""
        t = self._t(np.asarray([v], dtype=np.float64))[0]
        t0, t1 = self._t(np.asarray([self.lo, self.hi], dtype=np.float64))
        return float((t - t0) / (t1 - t0)) if t1 > t0 else 0.0

    def _interp(self, t: np.ndarray, stops: tuple[tuple[float, str], ...]) -> np.ndarray:
        xs = self._t(np.asarray([s[0] for s in stops], dtype=np.float64))
        cols = np.asarray([_hex(s[1]) for s in stops], dtype=np.float64)
        return np.stack([np.interp(t, xs, cols[:, k]) for k in range(3)], axis=-1)

    def rgb(self, values: np.ndarray) -> np.ndarray:
        """uint8 colours, shape ``values.shape + (3,)``."""
        v = np.asarray(values, dtype=np.float64)
        nan = ~np.isfinite(v) & ~np.isinf(v)
        t = self._t(np.where(nan, self.lo, v))
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


def log_scale(kind: str, lo: float, hi: float) -> ColorScale:
    """A log colour scale from pale (``lo``) to dark (``hi``) in the palette ``kind`` (kurtosis or ratio)."""
    colours = _MAGNITUDE_COLOURS[kind]
    n = len(colours) - 1
    stops = tuple((lo * (hi / lo) ** (i / n), c) for i, c in enumerate(colours))
    return ColorScale(lo=lo, hi=hi, stops=stops, log=True)


def _decade_hi(matrices: Sequence[np.ndarray], floor: float) -> float:
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


def _tick_label(v: float) -> str:
    if v == int(v) and abs(v) < 1e7:
        return f"{int(v):,}"
    return fmt(v, 3)


def _truncate(name: str, n: int) -> str:
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
            "Gradient kurtosis",
            "Sample kurtosis of each layer's gradient entries (<code>grad/kurtosis</code>), log colour scale; "
            "a Gaussian gives 3. When α &lt; 4 the true kurtosis is infinite and the sample value grows with the "
            "number of entries, so read it next to the Gaussian reference for the same count "
            "(<code>grad/kurtosis_gauss</code>, in the table below).",
            "kurtosis",
            "max",
        ),
        HeatmapSpec(
            ratio,
            "sec-ratio",
            "Denominator ratio (AdamW)" if ratio.startswith("adam/") else "Shadow denominator ratio",
            (
                "Largest |g<sub>t</sub>| / (√v̂<sub>t−1</sub> + ε) over each layer's coordinates "
                "(<code>adam/ratio_max</code>): how far a new gradient stands above what the optimizer's "
                "second-moment denominator expects. Large values mean a gradient spike arrives bigger than the "
                "denominator remembers; r² over 5000 (r ≈ 71) is the SPAM spike threshold. Log colour scale."
                if ratio.startswith("adam/")
                else "The same ratio against a <i>shadow</i> denominator (<code>shadow/ratio_max</code>): an EMA "
                "of g² with AdamW's β₂ kept on sampled coordinates, showing what AdamW's denominator would have "
                "done on this optimizer's gradients. Log colour scale."
            ),
            "ratio max",
            "max",
        ),
    ]
    return specs


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


class _Page:
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
        return [(float(xs[0]), _tick_label(float(centres[0])))]
    ticks = nice_ticks(float(centres[0]), float(centres[-1]), 8)
    return [(float(np.interp(t, centres, xs)), _tick_label(t)) for t in ticks]


def render_heatmap(
    page: _Page,
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
    every = max(1, math.ceil(12.0 / row_h))
    for i, name in enumerate(layers):
        y = c.top + (i + 0.5) * row_h
        if under[i]:
            out.append(
                f'<rect class="ht-under" x="{c.left + c.plot_w + 4}" y="{c.top + i * row_h:.2f}" width="7" '
                f'height="{max(row_h, 1.0):.2f}" fill="#c0392b"><title>{esc(name)}: α under 2 at '
                f"{int(n_under[i])} of {int(n_valid[i])} checkpoints</title></rect>"
            )
        if i % every == 0:
            weight = ' font-weight="600" fill="#b3261e"' if under[i] else ""
            out.append(
                f'<text x="{c.left - 6}" y="{y + 3.8:.2f}" font-size="11" text-anchor="end" '
                f'class="mono"{weight}>{esc(_truncate(name, max_chars))}<title>{esc(name)}</title></text>'
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
        if scale.log:
            v = 10 ** (math.log10(scale.lo) + (f0 + 0.5 / n) * (math.log10(scale.hi) - math.log10(scale.lo)))
        else:
            v = scale.lo + (f0 + 0.5 / n) * (scale.hi - scale.lo)
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
        out.append(f'<line x1="{x2:.1f}" x2="{x2:.1f}" y1="{bar_y - 3}" y2="{bar_y + bar_h + 3}" stroke="#1c2230" stroke-width="2"/>')
        band(scale.lo, 2.0, "α < 2: infinite variance", "#b3261e", bold=True)
        band(2.0, 4.0, "infinite kurtosis")
        band(4.0, scale.hi, "light tails")
    else:
        decades = range(round(math.log10(scale.lo)), round(math.log10(scale.hi)) + 1)
        stride = max(1, math.ceil(len(decades) / 7))
        for i, d in enumerate(decades):
            if i % stride == 0 or d == decades[-1]:
                tick(10.0**d, _tick_label(10.0**d) if d >= 0 else f"{10.0**d:g}")
        if kind == "kurtosis":
            g = gauss if gauss is not None and math.isfinite(gauss) and gauss > 0 else 3.0
            x = bar_x + scale.pos(g) * bar_w
            out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{bar_y - 3}" y2="{bar_y + bar_h}" stroke="#1c2230" stroke-width="1.5"/>')
            out.append(f'<text x="{x:.1f}" y="{bar_y - 6}" font-size="11" text-anchor="start">Gaussian ({fmt(g, 3)})</text>')
        else:
            r = math.sqrt(5000.0)
            x = bar_x + scale.pos(r) * bar_w
            out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{bar_y - 3}" y2="{bar_y + bar_h}" stroke="#1c2230" stroke-width="1.5"/>')
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
_SEVERITY_RANK = {"critical": 0, "warning": 1, "info": 2}
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
        group = sorted(group, key=lambda a: _SEVERITY_RANK.get(str(a.get("severity")), 9))
        lines = [f"{prefix}step {_tick_label(step)}: {len(group)} alert{'s' if len(group) > 1 else ''}"]
        for a in group[:8]:
            lines.append(f"{a.get('rule', '?')} ({a.get('severity', '?')}): {a.get('message', '')}")
        if len(group) > 8:
            lines.append(f"… and {len(group) - 8} more")
        top = str(group[0].get("severity"))
        markers.append(Marker(step, colour or SEVERITY_COLOURS.get(top, "#7a8396"), "\n".join(lines)))
    return markers


def render_line_chart(
    page: _Page,
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
            out.append(f'<text x="{c.left - 7}" y="{y + 4:.1f}" font-size="11" text-anchor="end">{esc(_tick_label(t) if not log_y else fmt(t, 3))}</text>')
    out.append(
        f'<text transform="translate(16 {c.top + c.plot_h / 2:.1f}) rotate(-90)" font-size="12" '
        f'text-anchor="middle" fill="#5c6577">{esc(ylabel)}{" (log scale)" if log_y else ""}</text>'
    )
    xt = [(float(sx(np.asarray([t]))[0]), _tick_label(t)) for t in nice_ticks(xmin, xmax, 9)]
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
            out.append(f'<path class="ht-series" d="{d}" fill="none" stroke="{s.colour}" stroke-width="1.6" stroke-linejoin="round"/>')
            if len(st) == 1:
                out.append(f'<circle cx="{pts[0, 0]:.1f}" cy="{pts[0, 1]:.1f}" r="3" fill="{s.colour}"/>')
        data_series.append(
            {"label": s.label, "steps": [_num(x, 12) for x in st], "values": [_num(v) for v in vals]}
        )
    if legend:
        x = c.left
        for s, _, _ in cleaned:
            out.append(f'<rect x="{x}" y="4" width="14" height="4" fill="{s.colour}"/>')
            out.append(f'<text x="{x + 19}" y="10" font-size="11">{esc(_truncate(s.label, 36))}</text>')
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


# ----------------------------------------------------------------------------------------------------------------
# Statistics for tables


def ratio_family(run: Run) -> str | None:
    """The denominator-ratio family a run has: AdamW's own, else the shadow denominator's, else None."""
    for family in ("adam/ratio_max", "shadow/ratio_max"):
        if run.layers(family):
            return family
    return None


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
    add("grad/kurtosis", {"kurtosis_median": lambda r: _nanstat(np.median, r)})
    add("grad/kurtosis_gauss", {"kurtosis_gauss_median": lambda r: _nanstat(np.median, r)})
    rf = ratio_family(run)
    if rf:
        add(rf, {"ratio_median": lambda r: _nanstat(np.median, r), "ratio_max": lambda r: _nanstat(np.max, r)})
    return stats


def _all_values(run: Run, family: str) -> np.ndarray:
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
    ratios = _all_values(run, rf) if rf else np.zeros(0)
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
        kurtosis_median=_nanstat(np.median, _all_values(run, "grad/kurtosis")),
        ratio_family=rf,
        ratio_median=_nanstat(np.median, ratios),
        ratio_max=_nanstat(np.max, ratios),
        spike_frac_median=_nanstat(np.median, _all_values(run, spike_family)) if spike_family else math.nan,
        duration_s=duration,
    )


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "—"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h {m:02d}m" if h else (f"{m}m {s:02d}s" if m else f"{s}s")


def _timestamp(value: Any) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        try:
            return _dt.datetime.fromtimestamp(float(value), tz=_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        except (OverflowError, OSError, ValueError):
            pass
    return str(value) if value is not None else "—"


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
        ("Started", _timestamp(meta.get("started"))),
        ("Duration", _duration(summary.duration_s)),
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
        f'<p class="ht-desc">{len(run.alerts):,} alerts: {counts}. Each alert\'s flight record (the last steps\' '
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
    head.append("<th class='num'>min α</th><th class='num'>checkpoints α &lt; 2</th><th class='num'>median kurtosis</th>")
    if has_gauss:
        head.append("<th class='num'>Gaussian ref.</th>")
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
        cells.append(
            f"<td class='num{' ht-low' if under else ''}'>{under} / {int(s.get('alpha_count', 0))}</td>"
        )
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
    kurt = [r.matrix("grad/kurtosis")[2] for r in runs]
    out["grad/kurtosis"] = (log_scale("kurtosis", 1.0, _decade_hi(kurt, 100.0)), "kurtosis")
    ratios = [r.matrix(f)[2] for r in runs for f in ("adam/ratio_max", "shadow/ratio_max")]
    ratio_scale = log_scale("ratio", 1.0, _decade_hi(ratios, 100.0))
    out["adam/ratio_max"] = (ratio_scale, "ratio")
    out["shadow/ratio_max"] = (ratio_scale, "ratio")
    return out


def _gauss_reference(runs: Sequence[Run]) -> float | None:
    vals = np.concatenate([_all_values(r, "grad/kurtosis_gauss") for r in runs] or [np.zeros(0)])
    return float(np.median(vals)) if vals.size else None


def _legend_block(spec: HeatmapSpec, scale: ColorScale, kind: str, gauss: float | None) -> str:
    return (
        f'<div class="ht-legend-row"><span class="ht-legend-title">colour: {esc(spec.label)}</span>'
        f"{render_legend(scale, kind, gauss=gauss)}</div>"
    )


def _document(title: str, header: str, nav: list[tuple[str, str]], body: list[str], page: _Page, footer: str) -> str:
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


def _card(label: str, value: str, bad: bool = False) -> str:
    return f'<div class="ht-card{" bad" if bad else ""}"><div class="k">{esc(label)}</div><div class="v">{esc(value)}</div></div>'


def _alert_count_text(s: RunSummary) -> str:
    if not s.alerts:
        return "0"
    parts = [f"{s.alerts_by_severity[k]} {k}" for k in ("critical", "warning", "info") if s.alerts_by_severity[k]]
    return f"{s.alerts} ({', '.join(parts)})" if parts else str(s.alerts)


# ----------------------------------------------------------------------------------------------------------------
# Single-run report


def _as_run(run: str | os.PathLike[str] | Run) -> Run:
    return run if isinstance(run, Run) else load_run(run)


def render_report(run: Run, *, max_columns: int = 600) -> str:
    """The report of one run as an HTML string."""
    page = _Page()
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
    cards = "".join(
        [
            _card("final loss", fmt(s.final_loss)),
            _card("last step", f"{s.steps:,}"),
            _card("alerts", _alert_count_text(s), bad=bool(s.alerts_by_severity["critical"])),
            _card("layers with α < 2", f"{s.layers_under2} / {s.layers}" if s.layers else "—", bad=s.layers_under2 > 0),
            _card("median tail index α", fmt(s.alpha_median, 3)),
            _card(f"max {s.ratio_family or 'denominator ratio'}", fmt(s.ratio_max, 3)),
        ]
    )
    body = [f'<div class="ht-cards" id="summary-cards">{cards}</div>']
    nav = [("sec-meta", "Run"), ("sec-loss", "Loss & alerts")]
    body.append(_section("sec-meta", "Run", render_meta(run)))

    steps, loss = run.series("loss")
    markers = alert_markers(run.alerts)
    if np.isfinite(loss).any():
        chart = render_line_chart(page, [Series("loss", steps, loss)], ylabel="loss", markers=markers)
    else:
        chart = '<p class="ht-missing">Not recorded in this run: metrics.jsonl has no <code>loss</code> values.</p>'
    parts = [chart]
    gsteps, gnorm = run.series("grad/norm")
    if np.isfinite(gnorm).any():
        parts.append("<h3>Global gradient norm</h3>")
        parts.append(
            render_line_chart(
                page, [Series("grad/norm", gsteps, gnorm, "#5a6b8c")], ylabel="grad/norm", markers=markers, height=170
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
    specs = heatmap_specs("adam/ratio_max" if rf != "shadow/ratio_max" else rf)
    if rf == "adam/ratio_max" and run.layers("shadow/ratio_max"):
        specs.append(heatmap_specs("shadow/ratio_max")[-1])
        specs[-1] = HeatmapSpec(**{**specs[-1].__dict__, "section_id": "sec-shadow-ratio"})
    for spec in specs:
        nav.append((spec.section_id, spec.title.split(" (")[0]))
        layers, hsteps, values = run.matrix(spec.family)
        scale, kind = scales[spec.family]
        if layers:
            chart = _legend_block(spec, scale, kind, gauss) + render_heatmap(
                page, spec, layers, hsteps, values, scale, max_columns=max_columns
            )
        else:
            chart = _missing(spec.family)
        body.append(_section(spec.section_id, spec.title, chart, spec.description))

    nav += [("sec-heaviest", "Heaviest tails"), ("sec-alerts", "Alerts")]
    body.append(_section("sec-heaviest", "Layers with the heaviest tails", render_heaviest(run)))
    body.append(_section("sec-alerts", "Alerts", render_alerts(run)))
    return _document(title, header, nav, body, page, _footer([run]))


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
) -> Path:
    """Write the self-contained HTML report of one run; returns its path (default ``<run_dir>/report.html``).

    ``run_dir`` is a run directory or a loaded :class:`Run`. Heatmaps show at most ``max_columns`` step
    columns; with more checkpoints each column shows the worst value of its bin (lowest α, highest kurtosis or
    ratio). Raises :class:`~heavytail.report.rundir.RunDirError` if the directory cannot be read.
    """
    run = _as_run(run_dir)
    target = Path(out) if out is not None else run.path / "report.html"
    return _write(render_report(run, max_columns=max_columns), target)


# ----------------------------------------------------------------------------------------------------------------
# Comparison report


def _consistency_checks(runs: Mapping[str, Run]) -> list[tuple[bool, str]]:
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
        return f"{len(params)} tensors, {sum(int(p.get('numel', 0) or 0) for p in params if isinstance(p, Mapping)):,} values"

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


def _summary_table(runs: Mapping[str, Run], summaries: Mapping[str, RunSummary], summary: Mapping[str, Any] | None) -> str:
    names = list(runs)
    rows: list[tuple[str, list[str]]] = []

    def row(label: str, values: list[str]) -> None:
        rows.append((label, values))

    row("optimizer", [esc(runs[n].meta.get("optimizer") or "—") for n in names])
    row("model", [esc(runs[n].meta.get("model") or "—") for n in names])
    row("last step / checkpoints", [f"{summaries[n].steps:,} / {summaries[n].checkpoints:,}" for n in names])
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
    row("median kurtosis", [esc(fmt(summaries[n].kurtosis_median, 3)) for n in names])
    row("denominator ratio source", [esc(summaries[n].ratio_family or "not recorded") for n in names])
    row("median ratio max", [esc(fmt(summaries[n].ratio_median, 3)) for n in names])
    row("largest ratio max", [esc(fmt(summaries[n].ratio_max, 3)) for n in names])
    row("median spike fraction (r² > threshold)", [esc(fmt(summaries[n].spike_frac_median, 3)) for n in names])
    row("wall time", [esc(_duration(summaries[n].duration_s)) for n in names])
    if summary:
        per_run = {k: v for k, v in summary.items() if k in runs and isinstance(v, Mapping)}
        figures: list[str] = []
        for v in per_run.values():
            figures += [str(f) for f in v if str(f) not in figures]
        for f in figures:
            row(f, [esc(_value_text(per_run.get(n, {}).get(f))) for n in names])
    head = "<tr><th>figure</th>" + "".join(
        f"<th class='num'><span class='ht-swatch' style='background:{RUN_COLOURS[i % len(RUN_COLOURS)]}'></span>{esc(n)}</th>"
        for i, n in enumerate(names)
    ) + "</tr>"
    body = "".join(f"<tr><td>{esc(label)}</td>" + "".join(f"<td class='num'>{v}</td>" for v in values) + "</tr>" for label, values in rows)
    return f"<div class='ht-scroll'><table class='ht-table' id='summary-table'>{head}{body}</table></div>"


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
    head1 = "<tr><th rowspan='2'>layer</th>" + "".join(
        f"<th colspan='2' class='num'>{esc(n)}</th>" for n in names
    ) + "</tr>"
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
    page = _Page()
    summaries = {n: summarize(r) for n, r in loaded.items()}
    scales = _scales(list(loaded.values()))
    gauss = _gauss_reference(list(loaded.values()))
    width = 1160 if len(loaded) == 1 else 700

    title = "heavytail comparison: " + ", ".join(names)
    optimizers = ", ".join(f"{n} ({r.meta.get('optimizer') or '—'})" for n, r in loaded.items())
    header = (
        f'<header class="ht-head"><div class="ht-wrap"><div class="ht-brand">heavytail · comparison</div>'
        f"<h1>{esc(', '.join(names))}</h1><div class='ht-sub'>{esc(optimizers)}</div></div></header>"
    )
    body: list[str] = []
    nav = [("sec-comparison", "Comparison"), ("sec-loss", "Loss"), ("sec-layers", "Per layer")]
    checks = _consistency_checks(loaded)
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

    for spec in heatmap_specs():
        nav.append((spec.section_id, spec.title.split(" (")[0]))
        scale, kind = scales[spec.family]
        cells = []
        any_layers = False
        for n, r in loaded.items():
            family = spec.family
            if spec.section_id == "sec-ratio" and not r.layers(family):
                family = ratio_family(r) or family
            layers, hsteps, values = r.matrix(family)
            fspec = spec if family == spec.family else heatmap_specs(family)[-1]
            inner = (
                render_heatmap(page, fspec, layers, hsteps, values, scales[family][0], width=width, max_columns=max_columns)
                if layers
                else _missing(spec.family)
            )
            any_layers = any_layers or bool(layers)
            label = f"{n} · {r.meta.get('optimizer') or '—'}" + (f" · {family}" if family != spec.family else "")
            cells.append(f"<div><h3>{esc(label)}</h3>{inner}</div>")
        legend = _legend_block(spec, scale, kind, gauss) if any_layers else ""
        body.append(
            _section(spec.section_id, spec.title, legend + f"<div class='ht-grid'>{''.join(cells)}</div>", spec.description)
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
            "<div class='ht-grid'>" + "".join(f"<div><h3>{esc(n)}</h3>{render_meta(r)}</div>" for n, r in loaded.items()) + "</div>",
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
    "ALPHA_SCALE",
    "ColorScale",
    "esc",
    "json_for_script",
    "render_compare_report",
    "render_report",
    "write_compare_report",
    "write_report",
]
