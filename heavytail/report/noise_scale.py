"""The gradient noise scale section: global B_simple and its robust counterpart over steps, with the batch size."""

from __future__ import annotations

import math

import numpy as np

from heavytail.report.heatmap import HeatmapSpec
from heavytail.report.linechart import RUN_COLOURS, Series, render_line_chart
from heavytail.report.sections import Context, Section
from heavytail.report.svg import esc

# The global figures drawn, with their labels and line colours: the streaming estimate (micro-batch or rank
# source, smoothed over steps) and the probe's (the held batch at each probing checkpoint).
_LINES = (
    ("gns/b_simple", "B_simple (variance-based)", "#2f6db5"),
    ("gns/b_robust", "robust (typical norms)", "#d1495b"),
    ("gns/big_batch", "training batch B", "#7a8599"),
)
_PROBE_LINES = (
    ("gns/probe_b_simple", "B_simple, held batch (probe)", "#1b9e77"),
    ("gns/probe_b_robust", "robust, held batch (probe)", "#e6a817"),
)


def _unit(ctx: Context) -> str:
    """Examples where the run declared ``batch_size``, else micro-batches."""
    declared = (ctx.run.meta.get("config") or {}).get("batch_size")
    return "examples" if declared else "micro-batches"


def _recorded(run) -> bool:
    """Whether the run had a streaming source: B is written with every gns record, B_simple may be null."""
    return bool(np.isfinite(run.series("gns/big_batch")[1]).any())


def _probed(run) -> bool:
    """Whether the probe measured the noise scale at some checkpoint."""
    return bool(np.isfinite(run.series("gns/probe_big_batch")[1]).any())


def _flag_note(run) -> str:
    flag = run.final("gns/variance_flag")
    if flag == 1.0:
        return (
            " <strong>The noise tail index of at least one tensor is under 2 (<code>gns/variance_flag</code>): "
            "the noise has no finite variance there, B_simple means nothing and grows with the steps it averages; "
            "read the robust figure.</strong>"
        )
    return ""


def _draw(ctx: Context) -> str | None:
    run = ctx.run
    streaming, probed = _recorded(run), _probed(run)
    if not (streaming or probed):
        return None
    unit = _unit(ctx)
    # The probe's figures are in rows of the held batch: on the streaming figures' axis only where those are in
    # examples too (batch_size declared), or alone.
    with_probe = probed and (not streaming or unit == "examples")
    lines = (_LINES if streaming else ()) + (_PROBE_LINES if with_probe else ())
    series = [
        Series(label, *run.series(key), colour) for key, label, colour in lines if np.isfinite(run.series(key)[1]).any()
    ]
    parts = []
    if streaming:
        parts.append(
            f"Last reading: B_simple {_fmt(_last(run, 'gns/b_simple'))}, robust {_fmt(_last(run, 'gns/b_robust'))} "
            f"{esc(unit)}, at a training batch of {_fmt(run.final('gns/big_batch'))} {esc(unit)}."
        )
    if probed:
        probe_unit = unit if streaming else "rows of the held batch"
        parts.append(
            f"The probe's held batch (last probing checkpoint, mini-batches of "
            f"{_fmt(_last(run, 'gns/probe_small_batch', 'gns/probe_big_batch'))} rows, "
            f"{_fmt(_last(run, 'gns/probe_big_batch', 'gns/probe_big_batch'))} in all): B_simple "
            f"{_fmt(_last(run, 'gns/probe_b_simple', 'gns/probe_big_batch'), 'held batch')}, robust "
            f"{_fmt(_last(run, 'gns/probe_b_robust', 'gns/probe_big_batch'), 'held batch')} {esc(probe_unit)}"
            + ("." if with_probe else " (not drawn: the streaming figures are in micro-batches; declare batch_size).")
        )
    parts.append(
        "A batch well above B_simple buys little per example (McCandlish et al. 2018); well below it, a larger "
        f"batch would cut the noise almost for free.{_flag_note(run)}"
    )
    text = f'<p class="ht-desc">{" ".join(parts)}</p>'
    ylabel = f"batch size ({unit if streaming else 'rows'})"
    chart = render_line_chart(ctx.page, series, ylabel=ylabel, legend=True, height=200)
    return text + "\n" + chart


def _last(run, key: str, anchor: str = "gns/big_batch") -> float:
    """The value at the last record with a noise scale (NaN for a null there), not the last finite one."""
    steps, batch = run.series(anchor)
    at = np.flatnonzero(np.isfinite(batch))[-1]
    return float(run.series(key)[1][at])


def _compare(ctx: Context) -> str | None:
    series = []
    for i, (name, run) in enumerate(ctx.runs.items()):
        steps, values = run.series("gns/b_simple")
        if np.isfinite(values).any():
            series.append(Series(f"{name} · B_simple", steps, values, RUN_COLOURS[i % len(RUN_COLOURS)]))
    if not series:
        return None
    return render_line_chart(ctx.page, series, ylabel="B_simple", legend=True, height=200)


def _fmt(value: float, batch: str = "training batch") -> str:
    # A null B_simple is an infinite one: the |G|^2 estimate is <= 0, the noise dominates even the big batch.
    return f"{value:.3g}" if math.isfinite(value) else f"not finite (noise dominates even the {batch})"


NOISE_SCALE_SECTION = Section(
    id="sec-noise-scale",
    title="Gradient noise scale",
    keys=tuple(key for key, _, _ in _LINES + _PROBE_LINES),
    draw=_draw,
    compare=_compare,
    description="The whole model's simple noise scale B_simple = tr(Σ)/|G|² (<code>gns/b_simple</code>, an estimate "
    "of the critical batch size) and its robust counterpart from typical norm ratios (<code>gns/b_robust</code>, "
    "finite under heavy-tailed noise), with the batch the optimizer steps with (<code>gns/big_batch</code>), all in "
    "one unit; where the noise probe runs, the same two figures of its held batch at the checkpoint's weights "
    "(<code>gns/probe_b_simple</code>, <code>gns/probe_b_robust</code>; docs/metrics.md, Gradient noise scale).",
    nav="Noise scale",
)

GNS_HEATMAP = HeatmapSpec(
    "gns/b_simple",
    "sec-gns-heatmap",
    "Gradient noise scale per layer",
    "Each tensor's B_simple (<code>gns/b_simple/&lt;p&gt;</code>) at each checkpoint, on a log colour scale: the "
    "batch size at which that tensor's gradient noise equals its signal. Grey where it is not finite (no signal "
    "resolved) or not recorded.",
    label="B_simple",
    worst="max",
)
