"""The heavytail command: demo, summary, report (--watch), compare and sweep; one-line errors and exit codes."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace

import pytest

import heavytail.report.watch as watch_module
from heavytail.cli import EXIT_ERROR, EXIT_RUN_DIR, main
from tests.conftest import read_alerts, read_records
from tests.report.conftest import make_run_dir, monitored  # noqa: F401  (fixture)
from tests.test_demo import one_thread, small_text  # noqa: F401  (fixtures)

REPO = Path(__file__).resolve().parents[1]


def _python_m(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("HEAVYTAIL_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "heavytail", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd or REPO,
        timeout=120,
    )


def test_python_m_heavytail_help() -> None:
    done = _python_m("--help")
    assert done.returncode == 0
    for command in ("demo", "summary", "report", "compare", "sweep"):
        assert re.search(rf"^\s+{command}\s", done.stdout, re.M), command


def test_report_errors_are_one_line_in_a_real_process(tmp_path: Path) -> None:
    done = _python_m("report", str(tmp_path / "missing"))
    assert done.returncode == EXIT_RUN_DIR
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().count("\n") == 0
    assert done.stderr.startswith("heavytail: error: ") and "no such run directory" in done.stderr


def test_a_reader_that_goes_away_is_no_error(tmp_path: Path) -> None:
    """`heavytail summary DIR | head -1`: the pipe closes before the summary is written; no traceback, no message."""
    run = make_run_dir(tmp_path / "run", n_checkpoints=3)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "heavytail", "summary", str(run)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        cwd=REPO,
    )
    proc.stdout.close()  # before the command has even imported heavytail
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == EXIT_ERROR
    assert err == ""


@pytest.mark.parametrize("case", ["missing", "empty_dir", "empty_metrics", "corrupt_metrics", "not_a_dir"])
def test_report_errors(case: str, tmp_path: Path, capsys) -> None:
    path = tmp_path / "run"
    if case == "empty_dir":
        path.mkdir()
    elif case == "empty_metrics":
        path.mkdir()
        (path / "metrics.jsonl").write_text("")
    elif case == "corrupt_metrics":
        path.mkdir()
        (path / "metrics.jsonl").write_text('{"step": 1, "metrics": {}}\n{not json\n{"step": 3, "metrics": {}}\n')
    elif case == "not_a_dir":
        path.write_text("hello")
    assert main(["report", str(path)]) == EXIT_RUN_DIR
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("heavytail: error: ") and "Traceback" not in err


def test_report_writes_the_report(tmp_path: Path, capsys) -> None:
    run = make_run_dir(tmp_path / "run", n_checkpoints=5)
    assert main(["report", str(run)]) == 0
    assert (run / "report.html").is_file()
    out = tmp_path / "elsewhere" / "r.html"
    assert main(["report", str(run), "-o", str(out)]) == 0
    assert out.is_file() and str(out) in capsys.readouterr().out


def test_report_to_an_unwritable_place_is_one_line(tmp_path: Path, capsys) -> None:
    run = make_run_dir(tmp_path / "run", n_checkpoints=3)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["report", str(run), "-o", str(blocker / "r.html")]) == EXIT_ERROR
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("heavytail: error: ")


@pytest.mark.parametrize(
    "argv",
    [
        ["demo", "--steps", "0"],
        ["demo", "--size", "huge"],
        ["demo", "--optimizer", "adam"],
        ["compare", "--steps", "-3"],
        ["sweep", "--steps", "-3"],
        ["sweep", "/some/run"],
        ["report"],
        ["report", "run", "--interval", "0"],
        ["summary"],
        ["summary", "run", "--top", "0"],
        ["nonsense"],
        [],
    ],
)
def test_bad_arguments_exit_2_with_usage(argv: list[str], capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert "usage: heavytail" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["sweep", "--optimizers", "adamw,adam"], "unknown optimizer 'adam'"),
        (["sweep", "--optimizers", "sgd", "--lr", "lion=1e-4"], "not in --optimizers"),
        (["sweep", "--lr", "sgd=fast"], "not a number"),
        (["demo", "--text", "/no/such/corpus"], "does not exist"),
    ],
)
def test_bad_settings_are_one_line_errors(argv: list[str], message: str, tmp_path: Path, capsys) -> None:
    assert main([*argv, "--out", str(tmp_path / "o")]) == EXIT_ERROR
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err


def test_demo_command(tmp_path: Path, small_text: Path, capsys) -> None:  # noqa: F811
    out = tmp_path / "demo"
    code = main(
        [
            "demo",
            "--size",
            "tiny",
            "--steps",
            "4",
            "--every",
            "2",
            "--out",
            str(out),
            "--text",
            str(small_text),
            "--quiet",
            "--optimizer",
            "lion",
            "--seed",
            "3",
        ]
    )
    assert code == 0
    stdout = capsys.readouterr().out
    assert "4 steps of GPT" in stdout and "Lion" in stdout and str(out / "report.html") in stdout
    assert (out / "report.html").is_file() and (out / "metrics.jsonl").is_file()
    assert json.loads((out / "meta.json").read_text())["extra"]["seed"] == 3


def test_sweep_command(tmp_path: Path, small_text: Path, capsys) -> None:  # noqa: F811
    out = tmp_path / "cmp"
    code = main(
        [
            "sweep",
            "--optimizers",
            "muon,sgd",
            "--steps",
            "12",
            "--every",
            "6",
            "--size",
            "tiny",
            "--out",
            str(out),
            "--text",
            str(small_text),
            "--lr",
            "sgd=0.1",
            "--quiet",
            "--no-probe",
        ]
    )
    assert code == 0
    stdout = capsys.readouterr().out
    assert "Compared muon, sgd" in stdout and "summary.json" in stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["learning_rates"] == {"muon": 0.02, "sgd": 0.1}
    assert summary["command"].startswith("heavytail sweep --optimizers muon,sgd")
    assert summary["optimizers"]["muon"]["optimizer_class"] == "MuonWithAdamW"
    # Muon's AdamW half has a real denominator on the embeddings and head (past its 10-step ratio warm-up, so
    # the checkpoint at step 12 has a value), none on the hidden matrices.
    adam = summary["optimizers"]["muon"]["denominator"]["adam/ratio_max"]
    records = [json.loads(line) for line in (out / "muon" / "metrics.jsonl").read_text().splitlines()]
    head = [r["metrics"]["adam/ratio_max/head.weight"] for r in records]
    assert head[0] is None and adam["head.weight"] == pytest.approx(head[1])
    assert adam["blocks.0.mlp.fc.weight"] is None
    assert (out / "compare.html").is_file()


def test_sweep_over_seeds(tmp_path: Path, small_text: Path, capsys) -> None:  # noqa: F811
    out = tmp_path / "seeds"
    argv = ["sweep", "--optimizers", "sgd", "--steps", "2", "--every", "1", "--size", "tiny", "--out", str(out)]
    argv += ["--text", str(small_text), "--quiet", "--no-probe", "--seeds", "0,1"]
    assert main(argv) == 0
    stdout = capsys.readouterr().out
    assert "Compared sgd over seeds 0,1: 2 steps each" in stdout and "val loss" in stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["seeds"] == [0, 1] and summary["command"] == "heavytail " + " ".join(argv)
    vals = [
        json.loads((out / f"seed{k}" / "summary.json").read_text())["optimizers"]["sgd"]["val_loss"] for k in (0, 1)
    ]
    assert summary["optimizers"]["sgd"]["val_loss"]["values"] == vals
    assert f"{summary['optimizers']['sgd']['val_loss']['mean']:.4g}" in stdout
    # --seed and --seeds together are refused, with the error on stderr (exit code 1, as for a bad --lr).
    assert main([*argv, "--seed", "3"]) == 1
    assert "give --seed or --seeds, not both" in capsys.readouterr().err


def test_compare_without_run_dirs_is_the_old_sweep(tmp_path: Path, small_text: Path, capsys) -> None:  # noqa: F811
    """Users' scripts call `heavytail compare --optimizers ...`: it still trains, and says to use `sweep`."""
    out = tmp_path / "old"
    argv = ["compare", "--optimizers", "sgd", "--steps", "2", "--every", "1", "--size", "tiny", "--out", str(out)]
    argv += ["--text", str(small_text), "--quiet", "--no-probe"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    warning = [line for line in captured.err.splitlines() if line.startswith("heavytail: warning: ")]
    assert len(warning) == 1 and "`heavytail sweep`" in warning[0] and "compare RUN_DIR" in warning[0]
    assert "Compared sgd: 2 steps each" in captured.out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["command"] == "heavytail " + " ".join(argv)
    assert summary["settings"]["steps"] == 2 and list(summary["optimizers"]) == ["sgd"]


def test_console_script_is_installed() -> None:
    script = Path(sys.executable).with_name("heavytail")
    if not script.exists():
        pytest.skip("the heavytail console script is not installed in this environment")
    done = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.startswith("heavytail ")


# ------------------------------------------------------------------------------------------------ run directories
# The expected texts below are recomputed from the files the monitor wrote (JSON read here, medians and maxima
# taken here), never from heavytail.report.


def _stamp(t: float) -> str:
    return datetime.fromtimestamp(t, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _fig(v: float) -> str:
    """The terminal's figure format: 3 significant digits, whole numbers written out from 1,000 to 99,999."""
    return f"{v:,.0f}" if 1000 <= abs(v) < 1e5 else f"{v:.3g}"


def _truth(run_dir: Path) -> SimpleNamespace:
    """What a run directory holds, read with json and reduced with statistics."""
    records = read_records(run_dir)
    alerts = read_alerts(run_dir)
    meta = json.loads((run_dir / "meta.json").read_text())
    losses = [(r["step"], r["metrics"]["loss"]) for r in records if r["metrics"].get("loss") is not None]
    ratios = [
        (v, r["step"], k)
        for r in records
        for k, v in r["metrics"].items()
        if k.startswith("adam/ratio_max/") and v is not None
    ]
    numel = {p["name"]: p["numel"] for p in meta["params"]}
    alpha = {}
    for name in numel:
        values = [r["metrics"].get(f"grad/hill_alpha/{name}") for r in records]
        values = [v for v in values if v is not None]
        if values and numel[name] >= 1000:  # the ranking leaves out tensors under 1,000 entries
            alpha[name] = statistics.median(values)
    rules = Counter(a["rule"] for a in alerts)
    return SimpleNamespace(
        records=records,
        alerts=alerts,
        meta=meta,
        losses=losses,
        ratio=max(ratios) if ratios else None,
        ratio_median=statistics.median(v for v, _, _ in ratios) if ratios else math.nan,
        heaviest=sorted(alpha.items(), key=lambda t: (t[1], t[0])),
        alert_text=f"{len(alerts)} (" + ", ".join(f"{k} x{v}" for k, v in rules.most_common()) + ")",
        last=records[-1],
    )


def test_summary_of_a_trainer_output_dir(monitored, capsys) -> None:  # noqa: F811
    truth = _truth(monitored.adamw)
    assert truth.alerts and truth.ratio is not None  # the run's spike was seen, so the lines below have content
    assert main(["summary", str(monitored.trainer_out)]) == 0
    captured = capsys.readouterr()
    assert captured.err == f"heavytail: using the run in {monitored.adamw}\n"
    lines = captured.out.splitlines()
    n = len(truth.records)
    assert lines[0].startswith(
        f"tiny-adamw: {truth.last['step']} steps of TinyNet with AdamW, {n} checkpoints (every 4)"
    )
    assert lines[1] == f"Finished at {_stamp(truth.meta['finished'])}, final step {truth.meta['final_step']}."
    (_, first), (s1, last) = truth.losses[0], truth.losses[-1]
    low_step, low = min(truth.losses, key=lambda t: t[1])
    assert lines[2] == (
        f"Loss (checkpoint means): {first:.3f} at the first checkpoint, {last:.3f} at the last (step {s1}); "
        f"lowest {low:.3f} at step {low_step}."
    )
    at = lines.index("Heaviest-tailed layers (median over 8 checkpoints; alpha < 2: infinite variance):")
    rows = [line.split() for line in lines[at + 2 : at + 2 + len(truth.heaviest)]]
    assert [(r[0], r[1]) for r in rows] == [(name, f"{a:.3g}") for name, a in truth.heaviest]
    value, step, key = truth.ratio
    assert (
        f"Largest denominator ratio: {_fig(value)} ({key} at step {step}; median over layers and checkpoints "
        f"{_fig(truth.ratio_median)})." in lines
    )
    assert f"Alerts: {truth.alert_text}" in lines
    first_alert = truth.alerts[0]
    # Cut to 100 characters in the terminal; whole in alerts.jsonl and the report.
    message = first_alert["message"] if len(first_alert["message"]) <= 100 else first_alert["message"][:99] + "…"
    assert lines[lines.index(f"Alerts: {truth.alert_text}") + 1] == (
        f"  step {first_alert['step']} [{first_alert['severity']}] {first_alert['rule']}: {message}"
    )
    assert lines[-1] == f"Run directory: {monitored.adamw}"


def test_summary_of_a_killed_run_says_incomplete(monitored, capsys) -> None:  # noqa: F811
    truth = _truth(monitored.killed)
    assert "finished" not in truth.meta
    assert main(["summary", str(monitored.killed)]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""  # given the run directory itself: nothing to say about finding it
    assert captured.out.splitlines()[1] == (
        "Incomplete: the run is still going or was stopped without closing (killed); last record at step "
        f"{truth.last['step']}, {_stamp(truth.last['wall_time'])}."
    )


def test_run_lookup_depth_and_ambiguity(monitored, tmp_path: Path, capsys) -> None:  # noqa: F811
    deep = tmp_path / "deep"
    shutil.copytree(monitored.lion, deep / "runs" / "exp" / "lion")  # 3 levels down: found
    assert main(["summary", str(deep)]) == 0
    captured = capsys.readouterr()
    assert captured.err == f"heavytail: using the run in {deep / 'runs' / 'exp' / 'lion'}\n"
    assert captured.out.startswith("tiny-lion: 32 steps of TinyNet with Lion")

    too_deep = tmp_path / "too_deep"
    shutil.copytree(monitored.lion, too_deep / "a" / "b" / "c" / "lion")  # 4 levels down: not searched
    assert main(["summary", str(too_deep)]) == EXIT_RUN_DIR
    assert capsys.readouterr().err == (
        f"heavytail: error: {too_deep}: no metrics.jsonl here or in the folders under it (3 levels), so this is not "
        "a heavytail run directory\n"
    )

    two = tmp_path / "two"
    shutil.copytree(monitored.lion, two / "b")
    shutil.copytree(monitored.adamw, two / "a" / "heavytail")
    assert main(["report", str(two)]) == EXIT_RUN_DIR
    assert capsys.readouterr().err == (
        f"heavytail: error: {two}: holds 2 runs, name one of them: {two / 'a' / 'heavytail'}, {two / 'b'}\n"
    )
    # The integrations' folder wins over any other run below the trainer's output directory.
    shutil.copytree(monitored.adamw, two / "heavytail")
    assert main(["summary", str(two)]) == 0
    assert capsys.readouterr().err == f"heavytail: using the run in {two / 'heavytail'}\n"


def test_report_prints_status_alerts_and_heaviest_layers(monitored, tmp_path: Path, capsys) -> None:  # noqa: F811
    truth = _truth(monitored.adamw)
    out = tmp_path / "r.html"
    assert main(["report", str(monitored.trainer_out), "-o", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    heaviest = ", ".join(f"{name} {a:.3g}" for name, a in truth.heaviest[:3])
    assert lines == [
        f"Report:  {out}",
        f"Run:     tiny-adamw, {truth.last['step']} steps, finished at {_stamp(truth.meta['finished'])}, final step "
        f"{truth.meta['final_step']}",
        f"Alerts:  {truth.alert_text}",
        f"Heaviest-tailed layers (median grad/hill_alpha): {heaviest}",
    ]
    assert "<title>heavytail report: tiny-adamw</title>" in out.read_text()


def test_report_watch_stops_at_a_finished_run(monitored, tmp_path: Path, capsys) -> None:  # noqa: F811
    run = Path(shutil.copytree(monitored.adamw, tmp_path / "run"))
    truth = _truth(run)
    assert main(["report", "--watch", str(run), "--interval", "0.01"]) == 0
    lines = capsys.readouterr().out.splitlines()
    report = run / "report.html"
    assert len(lines) == 3 and lines[0].startswith(f"Watching {run} every 0.01 s")
    assert re.fullmatch(
        rf"\[\d\d:\d\d:\d\d\] step {truth.last['step']} \(8 checkpoints\), alerts {re.escape(truth.alert_text)}: "
        rf"{re.escape(str(report))}",
        lines[1],
    )
    assert lines[2] == (
        f"The run finished at {_stamp(truth.meta['finished'])}, final step {truth.meta['final_step']}. Report: {report}"
    )
    html = report.read_text()
    assert 'http-equiv="refresh"' not in html and 'id="run-status"' not in html


def test_report_watch_follows_a_growing_run(monitored, tmp_path: Path, capsys, monkeypatch) -> None:  # noqa: F811
    """The watcher sees the run directory appear, then each new record, then the run finish.

    The run is replayed from a real one's files: each sleep of the watcher is one more checkpoint written.
    """
    source = _truth(monitored.adamw)
    lines = (monitored.adamw / "metrics.jsonl").read_text().splitlines(keepends=True)
    alerts = (monitored.adamw / "alerts.jsonl").read_text()
    running = {k: v for k, v in source.meta.items() if k not in ("finished", "final_step")}
    trainer_out = tmp_path / "out"  # watched before the trainer made it; the run appears in out/heavytail
    run = trainer_out / "heavytail"
    seen = []  # (records written, what the report showed) at each sleep after the first

    def sleep(seconds: float) -> None:
        assert seconds == 0.5
        written = len(seen)
        if written:
            html = (run / "report.html").read_text()
            step = re.search(r'id="card-step"><div class="k">last step</div><div class="v">([\d,]+)<', html)
            seen.append((written, step.group(1), 'http-equiv="refresh" content="1"' in html, 'id="run-status"' in html))
        else:
            seen.append(None)
            run.mkdir(parents=True)
            (run / "meta.json").write_text(json.dumps(running))
        if written < len(lines):
            with open(run / "metrics.jsonl", "a") as f:
                f.write(lines[written])
            if source.records[written]["step"] >= source.alerts[0]["step"]:
                (run / "alerts.jsonl").write_text(alerts)
        elif written == len(lines):
            (run / "meta.json").write_text(json.dumps(source.meta))  # close() adds finished and final_step
        else:
            raise AssertionError("the watcher did not stop when the run finished")

    monkeypatch.setattr(watch_module, "time", SimpleNamespace(sleep=sleep))
    assert main(["report", "--watch", str(trainer_out), "--interval", "0.5"]) == 0
    captured = capsys.readouterr()
    assert captured.err == f"heavytail: using the run in {run}\n"
    out = captured.out.splitlines()
    assert out[0] == (f"Waiting for records ({trainer_out}: no such run directory); Ctrl-C to stop.")
    steps = [r["step"] for r in source.records]
    # One report per new record, each with the last step written and the banner and reload of a running run.
    assert seen[1:] == [(i + 1, f"{s:,}", True, True) for i, s in enumerate(steps)]
    renders = [line for line in out if line.startswith("[")]
    assert [int(re.search(r"step ([\d,]+) ", line).group(1)) for line in renders] == [*steps, steps[-1]]
    assert "alerts none" in renders[0] and renders[-1].split(", alerts ")[1].startswith(source.alert_text)
    assert (
        out[-1]
        == f"The run finished at {_stamp(source.meta['finished'])}, final step 32. Report: {run / 'report.html'}"
    )
    html = (run / "report.html").read_text()
    assert 'http-equiv="refresh"' not in html and 'id="run-status"' not in html


def _table(text: str) -> dict[str, list[str]]:
    """The compare table's rows by label (cells are separated by two spaces or more)."""
    rows = {}
    for line in text.splitlines():
        cells = re.split(r"\s{2,}", line.strip())
        if len(cells) > 1:
            rows[cells[0]] = cells[1:]
    return rows


def test_compare_run_dirs(monitored, tmp_path: Path, capsys) -> None:  # noqa: F811
    adamw, lion = _truth(monitored.adamw), _truth(monitored.lion)
    out = tmp_path / "c.html"
    assert main(["compare", str(monitored.trainer_out), str(monitored.lion), "-o", str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.err == f"heavytail: using the run in {monitored.adamw}\n"
    text = captured.out
    assert text.splitlines()[:3] == [
        "Compared 2 runs:",
        f"  tiny-adamw  {monitored.adamw}",
        f"  tiny-lion   {monitored.lion}",
    ]
    rows = _table(text.split("\n\n")[1])
    assert rows["tiny-adamw"] == ["tiny-lion"]  # the header row
    assert rows["optimizer"] == ["AdamW", "Lion"]
    assert rows["status"] == ["finished", "finished"]
    assert rows["final loss"] == [f"{adamw.losses[-1][1]:.4g}", f"{lion.losses[-1][1]:.4g}"]
    assert rows["ratio family"] == ["adam/ratio_max", "shadow999/ratio_max"]  # Lion has no denominator of its own
    value, step, _ = adamw.ratio
    shadow = max(
        (v, r["step"])
        for r in lion.records
        for k, v in r["metrics"].items()
        if k.startswith("shadow999/ratio_max/") and v is not None
    )
    assert rows["largest ratio (step)"] == [f"{_fig(value)} ({step})", f"{_fig(shadow[0])} ({shadow[1]})"]
    cell = rows["alerts"][0]  # the table cuts a long cell with an ellipsis
    assert cell == adamw.alert_text or (cell.endswith("…") and adamw.alert_text.startswith(cell[:-1])), cell
    assert "same: model: the same in every run (TinyNet)" in text
    assert text.splitlines()[-1] == f"Report: {out}"
    assert "<title>heavytail comparison: tiny-adamw, tiny-lion</title>" in out.read_text()


def test_compare_a_directory_of_runs_and_runs_of_one_name(monitored, tmp_path: Path, capsys) -> None:  # noqa: F811
    sweep = tmp_path / "sweep"
    shutil.copytree(monitored.adamw, sweep / "adamw")
    shutil.copytree(monitored.killed, sweep / "killed")
    out = tmp_path / "c.html"
    # The sweep's folder adds both of its runs; naming one of them again adds nothing.
    assert main(["compare", str(sweep), str(sweep / "adamw"), "-o", str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.err == (
        f"heavytail: {sweep} holds 2 runs; comparing them all: {sweep / 'adamw'}, {sweep / 'killed'}\n"
    )
    # Both runs are named tiny-adamw: their folders tell them apart.
    assert captured.out.splitlines()[1:3] == [
        f"  tiny-adamw (adamw)   {sweep / 'adamw'}",
        f"  tiny-adamw (killed)  {sweep / 'killed'}",
    ]
    rows = _table(captured.out.split("\n\n")[1])
    assert rows["status"] == ["finished", "incomplete"]


def test_compare_refuses_training_options_with_run_dirs(monitored, capsys) -> None:  # noqa: F811
    with pytest.raises(SystemExit) as info:
        main(["compare", str(monitored.adamw), "--steps", "3", "--seed", "1"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--steps, --seed train runs, which `heavytail sweep` does" in err
