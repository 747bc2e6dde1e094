"""The comparison report: several runs (optimizers) side by side, every registered section drawn for all of them."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

from heavytail.report import contents  # noqa: F401  (importing it registers the built-in sections)
from heavytail.report.page import as_run, document, footer, write
from heavytail.report.rundir import Run
from heavytail.report.sections import Context, draw_sections
from heavytail.report.svg import ChartData, esc


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
    loaded = {str(name): as_run(r) for name, r in runs.items()}
    names = list(loaded)
    ctx = Context(loaded, ChartData(), compare=True, max_columns=max_columns, summary=summary, note=note)
    title = "heavytail comparison: " + ", ".join(names)
    optimizers = ", ".join(f"{n} ({r.meta.get('optimizer') or '—'})" for n, r in loaded.items())
    header = (
        f'<header class="ht-head"><div class="ht-wrap"><div class="ht-brand">heavytail · comparison</div>'
        f"<h1>{esc(', '.join(names))}</h1><div class='ht-sub'>{esc(optimizers)}</div></div></header>"
    )
    nav, body = draw_sections(ctx)
    return document(title, header, nav, body, ctx.page, footer(list(loaded.values())))


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
    return write(render_compare_report(runs, summary, note, max_columns=max_columns), Path(out))
