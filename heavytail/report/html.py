"""The self-contained HTML report of one run, or of several runs side by side: the names other code imports.

The report is drawn by :mod:`~heavytail.report.run_report` (one run) and :mod:`~heavytail.report.comparison`
(runs side by side) from the sections registered in :mod:`~heavytail.report.sections`.
"""

from heavytail.report.comparison import render_compare_report, write_compare_report
from heavytail.report.layer_maps import NOISE_SOURCE_SPECS, heatmap_specs, noise_source_specs, ratio_spec
from heavytail.report.run_report import render_report, write_report
from heavytail.report.tables import render_alerts, render_heaviest, render_meta, render_noise_table

__all__ = [
    "NOISE_SOURCE_SPECS",
    "heatmap_specs",
    "noise_source_specs",
    "ratio_spec",
    "render_alerts",
    "render_compare_report",
    "render_heaviest",
    "render_meta",
    "render_noise_table",
    "render_report",
    "write_compare_report",
    "write_report",
]
