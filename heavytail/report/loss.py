"""The loss section: the loss and the global gradient norm over steps, with the alerts marked."""

from __future__ import annotations

import numpy as np

from heavytail.report.linechart import RUN_COLOURS, Marker, Series, alert_markers, render_line_chart
from heavytail.report.sections import Context, Part, Section

# The global gradient norms, after and before clipping, with their line colours.
_NORMS = (
    ("grad/norm", "grad/norm (after clipping)", "#5a6b8c"),
    ("grad/norm_preclip", "grad/norm_preclip (before clipping)", "#d1495b"),
)


def _loss(ctx: Context) -> str:
    run = ctx.run
    steps, loss = run.series("loss")
    markers = alert_markers(run.alerts)
    if np.isfinite(loss).any():
        chart = render_line_chart(ctx.page, [Series("loss", steps, loss)], ylabel="loss", markers=markers)
    else:
        chart = '<p class="ht-missing">Not recorded in this run: metrics.jsonl has no <code>loss</code> values.</p>'
    parts = [chart]
    norms = [
        Series(label, *run.series(key), colour)
        for key, label, colour in _NORMS
        if np.isfinite(run.series(key)[1]).any()
    ]
    if norms:
        parts.append("<h3>Global gradient norm</h3>")
        if len(norms) > 1:
            post, pre = norms[0].values, norms[1].values
            both = np.isfinite(post) & np.isfinite(pre)
            same = bool(both.any()) and bool(np.allclose(post[both], pre[both], rtol=1e-6, atol=0.0))
            parts.append(
                '<p class="ht-desc"><code>grad/norm</code> is the gradient the optimizer steps with (after clipping '
                "and unscaling), <code>grad/norm_preclip</code> the one backward produced; where they part, "
                "clipping cut the step."
                + (" Here they agree at every checkpoint (the lines overlap): nothing was clipped." if same else "")
                + "</p>"
            )
        parts.append(
            render_line_chart(
                ctx.page,
                norms,
                ylabel="global gradient norm" if len(norms) > 1 else norms[0].label.split(" ")[0],
                markers=markers,
                height=170,
                legend=len(norms) > 1,
            )
        )
    return "\n".join(parts)


def _loss_compare(ctx: Context) -> list[Part]:
    series = []
    markers: list[Marker] = []
    for i, (name, run) in enumerate(ctx.runs.items()):
        colour = RUN_COLOURS[i % len(RUN_COLOURS)]
        steps, loss = run.series("loss")
        if np.isfinite(loss).any():
            series.append(Series(name, steps, loss, colour))
        markers += alert_markers(run.alerts, colour=colour, prefix=f"{name} · ")
    chart = (
        render_line_chart(ctx.page, series, ylabel="loss", markers=markers, legend=True)
        if series
        else '<p class="ht-missing">Not recorded in these runs: no <code>loss</code> values.</p>'
    )
    description = (
        "Loss of every run on one axis; dashed lines in a run's colour mark its alerts (hover for the rule and "
        "message)."
    )
    return [Part("sec-loss", "Loss", LOSS_SECTION.title, chart, description)]


LOSS_SECTION = Section(
    id="sec-loss",
    title="Loss and alerts",
    keys=("loss", *(key for key, _, _ in _NORMS)),
    draw=_loss,
    compare=_loss_compare,
    description="Loss at each checkpoint. Dashed lines mark alerts (red: critical, orange: warning, blue: info); "
    "hover a marker for the rule and message.",
    nav="Loss & alerts",
)
