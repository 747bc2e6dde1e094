"""Readings with their key and step, the finished/incomplete status, the terminal summaries, and the watcher."""

from __future__ import annotations

import json
import math
import shutil
import statistics
import warnings
from datetime import datetime, timezone
from pathlib import Path

import pytest

from heavytail.report import NoRunYet, Run, compare_text, load_run, summary_text, watch_report
from heavytail.report.stats import first_under, peak, run_status, series_reading
from tests.conftest import read_records


def _stamp(t: float) -> str:
    return datetime.fromtimestamp(t, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _warmup_run(path: Path) -> Run:
    """Ratios null at the first checkpoints (the optimizer's warm-up), then some values, one layer null later."""
    records = [
        (10, 100.0, {"loss": 5.0, "adam/ratio_max/a": None, "adam/ratio_max/b": None}),
        (20, 110.0, {"loss": 4.0, "adam/ratio_max/a": 5.0, "adam/ratio_max/b": None}),
        (30, 120.0, {"loss": None, "adam/ratio_max/a": float("nan"), "adam/ratio_max/b": 7.5}),
        (40, 130.0, {"loss": 4.5, "adam/ratio_max/a": 7.5, "adam/ratio_max/b": 2.0}),
    ]
    return Run(path=path, meta={"run_name": "warm", "params": [{"name": "a"}, {"name": "b"}]}, records=records)


# ------------------------------------------------------------------------------------------------ readings


def test_peak_skips_nulls_and_names_key_layer_and_step(tmp_path: Path) -> None:
    run = _warmup_run(tmp_path)
    # 7.5 twice: the earliest step wins (b at 30 before a at 40).
    assert peak(run, "adam/ratio_max") == (7.5, "adam/ratio_max/b", 30, "b")
    assert peak(run, "adam/ratio_max", lowest=True) == (2.0, "adam/ratio_max/b", 40, "b")
    assert peak(run, "shadow999/ratio_max") is None
    early = Run(path=tmp_path, meta={}, records=run.records[:1])
    assert peak(early, "adam/ratio_max") is None  # null at every checkpoint so far


def test_peak_matches_a_brute_force_search_on_a_real_run(monitored) -> None:
    run = load_run(monitored.adamw)
    best = None
    for record in read_records(monitored.adamw):
        for key, value in record["metrics"].items():
            if key.startswith("adam/ratio_max/") and value is not None and (best is None or value > best[0]):
                best = (value, key, record["step"], key[len("adam/ratio_max/") :])
    assert best is not None and peak(run, "adam/ratio_max") == pytest.approx(best)
    # The first checkpoints are inside the monitor's ratio warm-up: null, and skipped.
    assert read_records(monitored.adamw)[0]["metrics"]["adam/ratio_max/fc1.weight"] is None


def test_series_reading_and_first_under(tmp_path: Path, run_dir: Path, names) -> None:
    run = _warmup_run(tmp_path)
    assert series_reading(run, "loss") == (4.5, "loss", 40, None)  # the last non-null
    assert series_reading(run, "loss", "min") == (4.0, "loss", 20, None)
    assert series_reading(run, "loss", "max") == (5.0, "loss", 10, None)
    assert series_reading(run, "nothing") is None
    with pytest.raises(ValueError, match="how must be"):
        series_reading(run, "loss", "median")
    # The synthetic run's heavy layer dips under 2 around its spike: the first such checkpoint, read by hand.
    synthetic = load_run(run_dir)
    first = None
    for record in read_records(run_dir):
        under = {
            k: v for k, v in record["metrics"].items() if k.startswith("grad/hill_alpha/") and v is not None and v < 2
        }
        if under:
            key = min(under, key=under.get)
            first = (under[key], key, record["step"], key[len("grad/hill_alpha/") :])
            break
    assert first is not None and first[3] == names.heavy
    assert first_under(synthetic, "grad/hill_alpha", 2.0) == first


def test_status_of_finished_killed_and_old_runs(monitored, tmp_path: Path) -> None:
    meta = json.loads((monitored.adamw / "meta.json").read_text())
    last = read_records(monitored.adamw)[-1]
    done = run_status(load_run(monitored.adamw))
    assert done.complete and done.finished == meta["finished"] and done.final_step == meta["final_step"] == 32
    assert done.text() == f"finished at {_stamp(meta['finished'])}, final step 32"
    killed = run_status(load_run(monitored.killed))
    assert not killed.complete and killed.last_step == last["step"]
    assert killed.text() == (
        "incomplete: the run is still going or was stopped without closing (killed); last record at step "
        f"{last['step']}, {_stamp(last['wall_time'])}"
    )
    # A run that closed later than its last record says both.
    late = Run(path=tmp_path, meta={"finished": 1.0e9, "final_step": 50}, records=[(40, 1.0e9, {"loss": 1.0})])
    assert run_status(late).text() == "finished at 2001-09-09 01:46:40 UTC, final step 50 (last record at step 40)"
    # A value that is no time is no finish.
    odd = Run(path=tmp_path, meta={"finished": True}, records=[(1, math.nan, {"loss": 1.0})])
    assert run_status(odd).text().endswith("last record at step 1, time not recorded")


# ------------------------------------------------------------------------------------------------ text


def test_summary_text_of_the_synthetic_run(run_dir: Path, names) -> None:
    records = read_records(run_dir)
    run = load_run(run_dir)
    text = summary_text(run, top=3)
    lines = text.splitlines()
    assert lines[0] == "synthetic: 500 steps of GPT with AdamW, 50 checkpoints (every 10), 16m40s of wall time."
    assert lines[1] == (
        "Incomplete: the run is still going or was stopped without closing (killed); last record at step 500, "
        f"{_stamp(records[-1]['wall_time'])}."
    )
    # Heaviest-tailed layers: medians over the run by hand, every layer has 4,096 entries, so all are ranked.
    medians = {}
    for layer in names.layers:
        values = [r["metrics"][f"grad/hill_alpha/{layer}"] for r in records]
        medians[layer] = statistics.median(v for v in values if v is not None)
    ranked = sorted(medians, key=medians.get)[:3]
    at = lines.index("Heaviest-tailed layers (median over 50 checkpoints; alpha < 2: infinite variance):")
    assert [line.split()[:2] for line in lines[at + 2 : at + 5]] == [[n, f"{medians[n]:.3g}"] for n in ranked]
    assert "Alerts: 2 (tail_index_drop x1, loss_spike x1)" in lines
    assert lines[-1] == f"Run directory: {run_dir}"


def test_summary_says_none_yet_while_ratios_warm_up(tmp_path: Path) -> None:
    run = Run(path=tmp_path, meta={}, records=_warmup_run(tmp_path).records[:1])
    assert (
        "Largest denominator ratio: none yet (adam/ratio_max is null at every checkpoint so far: the optimizer's "
        "denominator is still warming up)." in summary_text(run)
    )
    assert "Largest denominator ratio: 7.5 (adam/ratio_max/b at step 30; median over layers and checkpoints 6.25)." in (
        summary_text(_warmup_run(tmp_path))
    )


def test_compare_text_puts_runs_side_by_side(monitored) -> None:
    runs = {"A": load_run(monitored.adamw), "B": load_run(monitored.killed)}
    lines = compare_text(runs).splitlines()
    rows = {line.split("  ")[0]: line.split()[-2:] for line in lines if line and not line.startswith(" ")}
    assert rows["status"] == ["finished", "incomplete"]
    final = read_records(monitored.adamw)[-1]["metrics"]["loss"]
    assert rows["final loss"] == [f"{final:.4g}", f"{final:.4g}"]
    assert "same: last step: the same in every run (32)" in lines


# ------------------------------------------------------------------------------------------------ watch


def test_watch_report_waits_renders_and_stops(monitored, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    lines = (monitored.adamw / "metrics.jsonl").read_text().splitlines(keepends=True)
    waits: list[str] = []
    renders: list[tuple[int, bool]] = []

    def sleep(seconds: float) -> None:
        if not run_dir.exists():
            shutil.copytree(monitored.killed, run_dir)
            (run_dir / "metrics.jsonl").write_text(lines[0] + lines[1][:20])  # a line cut mid-write
        elif len(renders) == 1:
            (run_dir / "metrics.jsonl").write_text("".join(lines[:3]))
        else:
            raise AssertionError("max_renders did not stop the watcher")

    def on_render(run: Run, report: Path) -> None:
        renders.append((int(run.steps[-1]), 'http-equiv="refresh" content="3"' in report.read_text()))

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the watcher hides the cut-last-line warning of a live run, and only that
        out = watch_report(
            run_dir,
            interval=2.5,
            max_renders=2,
            on_render=on_render,
            on_wait=lambda exc: waits.append(str(exc)),
            sleep=sleep,
        )
    assert out == run_dir / "report.html"
    assert waits == [f"{run_dir}: no such run directory"]
    steps = [json.loads(line)["step"] for line in lines[:3]]
    assert renders == [(steps[0], True), (steps[2], True)]  # the cut line was skipped without a warning


def test_watch_report_stops_on_an_ambiguous_place(monitored, tmp_path: Path) -> None:
    shutil.copytree(monitored.adamw, tmp_path / "a")
    shutil.copytree(monitored.lion, tmp_path / "b")
    with pytest.raises(Exception, match="holds 2 runs") as info:
        watch_report(tmp_path, sleep=lambda s: None)
    assert not isinstance(info.value, NoRunYet)
