"""The Hill plot section of the one-run report, drawn from the run directory's hill_plot.jsonl."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from heavytail.report.hill_plot import MAX_PLOTS
from heavytail.report.html import render_compare_report, render_report
from heavytail.report.rundir import load_run


def _section(html: str) -> str:
    match = re.search(r'<section[^>]*id="sec-hill-plot".*?</section>', html, re.S)
    assert match, "no Hill plot section"
    return match.group(0)


def test_the_section_draws_every_checkpoint_of_a_monitored_run(monitored) -> None:
    lines = [json.loads(line) for line in (monitored.adamw / "hill_plot.jsonl").read_text().splitlines()]
    run = load_run(monitored.adamw)
    assert [p["step"] for p in run.hill_plots] == [line["step"] for line in lines] == [4, 8, 12, 16, 20, 24, 28, 32]
    html = render_report(load_run(monitored.adamw))
    section = _section(html)
    assert '<a href="#sec-hill-plot">Hill plot</a>' in html
    charts = re.findall(r'aria-label="Hill plot of ([^"]+) at step (\d+)"', section)
    assert charts == [(line["unit"], str(line["step"])) for line in lines]
    for line in lines:  # each caption gives the record's reading
        assert f"step {line['step']} · <code>{line['unit']}</code> (lowest alpha)" in section
        assert f"at k = {line['k']} of n = {line['n']:,}" in section
    # One marker per chart at the chosen k, and one hover point per k of Hill's curve.
    assert section.count('r="4.5" fill="#c0392b"') == len(lines)
    assert section.count('r="2" fill="#2b5ea7"') == sum(len(line["curve"]["k"]) for line in lines)
    assert "sec-hill-plot" not in render_compare_report(
        {"adamw": monitored.adamw, "lion": monitored.lion}
    )  # one-run report only


def test_long_runs_show_evenly_spaced_checkpoints_and_the_last(tmp_path: Path, monitored) -> None:
    run_dir = Path(shutil.copytree(monitored.adamw, tmp_path / "run"))
    line = json.loads((run_dir / "hill_plot.jsonl").read_text().splitlines()[-1])
    (run_dir / "hill_plot.jsonl").write_text("".join(json.dumps({**line, "step": s}) + "\n" for s in range(1, 21)))
    section = _section(render_report(load_run(run_dir)))
    steps = [int(s) for s in re.findall(r'aria-label="Hill plot of [^"]+ at step (\d+)"', section)]
    assert len(steps) == MAX_PLOTS and steps[0] == 1 and steps[-1] == 20
    assert f"{MAX_PLOTS} of 20 checkpoints" in section


def test_no_section_without_hill_plots(tmp_path: Path, monitored) -> None:
    run_dir = Path(shutil.copytree(monitored.adamw, tmp_path / "run"))
    (run_dir / "hill_plot.jsonl").unlink()
    assert load_run(run_dir).hill_plots == []
    assert "sec-hill-plot" not in render_report(load_run(run_dir))
