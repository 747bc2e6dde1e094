"""The report's charts, one name for all of them: markup basics, colour scales, heatmaps and line charts.

Each kind lives in its own module (``svg``, ``scales``, ``heatmap``, ``linechart``); every function returns
markup strings with every run-supplied string escaped, and registers the numbers that the page's hover read-out
needs in a :class:`ChartData`.
"""

from heavytail.report.heatmap import HeatmapSpec, png_data_uri, render_heatmap, render_legend
from heavytail.report.linechart import (
    RUN_COLOURS,
    SEVERITY_COLOURS,
    SEVERITY_RANK,
    Marker,
    Series,
    alert_markers,
    render_line_chart,
)
from heavytail.report.scales import ALPHA_SCALE, KURTOSIS_SHIFT, ColorScale, decade_hi, kurtosis_scale, log_scale
from heavytail.report.svg import ChartData, esc, fmt, json_for_script, nice_ticks, tick_label, truncate

__all__ = [
    "ALPHA_SCALE",
    "KURTOSIS_SHIFT",
    "RUN_COLOURS",
    "SEVERITY_COLOURS",
    "SEVERITY_RANK",
    "ChartData",
    "ColorScale",
    "HeatmapSpec",
    "Marker",
    "Series",
    "alert_markers",
    "decade_hi",
    "esc",
    "fmt",
    "json_for_script",
    "kurtosis_scale",
    "log_scale",
    "nice_ticks",
    "png_data_uri",
    "render_heatmap",
    "render_legend",
    "render_line_chart",
    "tick_label",
    "truncate",
]
