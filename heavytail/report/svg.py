"""Markup basics of the report's charts: escaping, number formats, axes, and the page's embedded chart data."""

from __future__ import annotations

import html as _html
import json
import math
from dataclasses import dataclass
from typing import Any

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


def json_float(value: Any, digits: int = 5) -> float | None:
    """A JSON-safe float rounded to ``digits`` significant digits (None for NaN/Inf)."""
    v = float(value)
    if not math.isfinite(v):
        return None
    return float(f"{v:.{digits}g}")


# ----------------------------------------------------------------------------------------------------------------
# Ticks


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
# Canvas, axes and the embedded data


@dataclass
class Canvas:
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


def x_axis(c: Canvas, ticks: list[tuple[float, str]], label: str) -> list[str]:
    """The optimizer-step axis under a chart: its line, ticks and label, as SVG elements."""
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
