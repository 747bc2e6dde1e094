"""The report's built-in sections in report order; importing this module registers them in ``SECTIONS``.

Each section is declared next to what draws it (``loss``, ``layer_maps``, ``hill_plot``, ``tables``,
``comparison_tables``); this list only orders them. A section that is in one kind of report only has no draw
function for the other.
"""

from __future__ import annotations

from heavytail.report.comparison_tables import COMPARISON_SECTION, FAMILY_TABLES_SECTION, LAYERS_SECTION
from heavytail.report.families import Family as ReportFamily
from heavytail.report.families import register_family
from heavytail.report.hill_plot import HILL_PLOT_SECTION
from heavytail.report.layer_maps import (
    KURTOSIS_SECTION,
    NOISE_SECTIONS,
    RATIO_SECTION,
    SHADOW_RATIO_SECTION,
    TAIL_INDEX_SECTION,
    heatmap_section,
)
from heavytail.report.loss import LOSS_SECTION
from heavytail.report.noise_scale import GNS_HEATMAP, NOISE_SCALE_SECTION
from heavytail.report.sections import SECTIONS, Section, register_section
from heavytail.report.tables import ALERTS_SECTION, HEAVIEST_SECTION, META_SECTION, NOISE_TABLE_SECTION

BUILTIN_SECTIONS: tuple[Section, ...] = (
    COMPARISON_SECTION,  # comparison report only
    LOSS_SECTION,
    LAYERS_SECTION,  # comparison report only
    FAMILY_TABLES_SECTION,  # comparison report only
    TAIL_INDEX_SECTION,
    HILL_PLOT_SECTION,  # one-run report only, and only where the run wrote hill_plot.jsonl
    *NOISE_SECTIONS,
    KURTOSIS_SECTION,
    RATIO_SECTION,
    SHADOW_RATIO_SECTION,
    NOISE_TABLE_SECTION,  # one-run report only
    HEAVIEST_SECTION,  # one-run report only
    ALERTS_SECTION,
    META_SECTION,
)

for _section in BUILTIN_SECTIONS:
    register_section(_section)

# The gradient noise scale (families/gns.py): its chart after the noise tail sections, its layer x step heatmap
# after the chart, on a log colour scale of its own (a batch size, not a tail index).
register_family(ReportFamily("gns/b_simple", scale="magnitude"))
register_section(NOISE_SCALE_SECTION, before="sec-kurtosis")
register_section(heatmap_section(GNS_HEATMAP, optional=True), before="sec-kurtosis")

__all__ = ["BUILTIN_SECTIONS", "SECTIONS"]
