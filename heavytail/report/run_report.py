"""The report of one run: header, status banner and headline cards, then every registered section."""

from __future__ import annotations

import os
from pathlib import Path

from heavytail.report import contents  # noqa: F401  (importing it registers the built-in sections)
from heavytail.report.page import as_run, document, footer, reload_seconds, write
from heavytail.report.rundir import Run
from heavytail.report.sections import Context, draw_sections
from heavytail.report.stats import INCOMPLETE, RunSummary
from heavytail.report.svg import ChartData, esc, fmt
from heavytail.report.tables import severity_order


def _card(label: str, value: str, bad: bool = False, note: str = "", card_id: str = "") -> str:
    sub = f'<div class="n">{esc(note)}</div>' if note else ""
    ident = f' id="{esc(card_id)}"' if card_id else ""
    return (
        f'<div class="ht-card{" bad" if bad else ""}"{ident}><div class="k">{esc(label)}</div>'
        f'<div class="v">{esc(value)}</div>{sub}</div>'
    )


def _status_banner(s: RunSummary, refresh: float | None = None) -> str:
    """A banner on a run the monitor did not close (still going, or killed); nothing on a finished run."""
    if s.status.complete:
        return ""
    reload = (
        f" This page reloads every {reload_seconds(refresh)} s while <code>heavytail report --watch</code> runs."
        if refresh
        else ""
    )
    return (
        f'<div class="ht-banner" id="run-status" role="status"><b>Incomplete run</b>: {esc(INCOMPLETE)}; '
        f"{esc(s.status.last_record())}. meta.json has no <code>finished</code> time, which the monitor writes when "
        f"it closes.{reload}</div>"
    )


def _cards(run: Run, s: RunSummary) -> str:
    """The headline cards; each names the key it read and the step (or steps) it read it at."""
    loss = s.final_loss_at
    low = s.min_loss_at
    alpha_steps = run.matrix("grad/hill_alpha")[1]
    span = f"steps {int(alpha_steps[0]):,}–{int(alpha_steps[-1]):,}" if len(alpha_steps) else "not recorded"
    by_severity = " · ".join(f"{n} {k}" for k, n in sorted(s.alerts_by_severity.items(), key=severity_order))
    steps = [a.get("step") for a in run.alerts if isinstance(a.get("step"), int) and not isinstance(a["step"], bool)]
    alerts_note = "alerts.jsonl" + (f": {by_severity}" if by_severity else "")
    alerts_note += f", last at step {max(steps):,}" if steps else ""
    under = s.first_under2
    if under is not None:
        under_note = f"first: {under.key} = {fmt(under.value, 3)} at step {under.step:,}"
    else:
        under_note = f"grad/hill_alpha, {span}" if len(alpha_steps) else "grad/hill_alpha not recorded"
    rf, top = s.ratio_family, s.ratio_peak
    if rf is None:
        ratio_value, ratio_note = "—", "not recorded"
    elif top is None:
        ratio_value = "none yet"
        ratio_note = f"{rf}: null at every checkpoint so far (the optimizer's denominator is warming up)"
    else:
        ratio_value = fmt(top.value, 3)
        ratio_note = f"{top.key} at step {top.step:,} · median {fmt(s.ratio_median, 3)}"
    cards = [
        _card(
            "final loss",
            fmt(loss.value) if loss else "—",
            note=f"loss at step {loss.step:,} · lowest {fmt(low.value)} at step {low.step:,}"
            if loss and low
            else "loss not recorded",
            card_id="card-loss",
        ),
        _card(
            "last step",
            f"{s.steps:,}",
            note=f"step of the last record · {s.checkpoints:,} checkpoints"
            + ("" if s.status.complete else " · run incomplete"),
            card_id="card-step",
        ),
        _card(
            "alerts", str(s.alerts), bad=bool(s.alerts_by_severity["critical"]), note=alerts_note, card_id="card-alerts"
        ),
        _card(
            "layers with α < 2",
            f"{s.layers_under2} / {s.layers}" if s.layers else "—",
            bad=s.layers_under2 > 0,
            note=under_note,
            card_id="card-under2",
        ),
        _card(
            "median tail index α",
            fmt(s.alpha_median, 3),
            note=f"grad/hill_alpha, all layers, {span}",
            card_id="card-alpha",
        ),
        _card("largest ratio", ratio_value, note=ratio_note, card_id="card-ratio"),
    ]
    return f'<div class="ht-cards" id="summary-cards">{"".join(cards)}</div>'


def render_report(run: Run, *, max_columns: int = 600, refresh: float | None = None) -> str:
    """The report of one run as an HTML string; ``refresh`` (seconds) makes the page reload itself (the watch
    mode sets it while the run is going)."""
    ctx = Context({run.name: run}, ChartData(), compare=False, max_columns=max_columns)
    s = ctx.summaries[run.name]
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
    nav, sections = draw_sections(ctx)
    body = [_status_banner(s, refresh), _cards(run, s), *sections]
    return document(title, header, nav, body, ctx.page, footer([run]), refresh=refresh)


def write_report(
    run_dir: str | os.PathLike[str] | Run,
    out: str | os.PathLike[str] | None = None,
    *,
    max_columns: int = 600,
    refresh: float | None = None,
) -> Path:
    """Write the self-contained HTML report of one run; returns its path (default ``<run_dir>/report.html``).

    ``run_dir`` is a run directory or a loaded :class:`Run`. Heatmaps show at most ``max_columns`` step
    columns; with more checkpoints each column shows the worst value of its bin (lowest α, highest kurtosis or
    ratio). ``refresh`` (seconds) makes the page reload itself, for a report re-written as the run goes on.
    Raises :class:`~heavytail.report.rundir.RunDirError` if the directory cannot be read.
    """
    run = as_run(run_dir)
    target = Path(out) if out is not None else run.path / "report.html"
    return write(render_report(run, max_columns=max_columns, refresh=refresh), target)
