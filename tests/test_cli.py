"""The heavytail command: demo, compare and report; one-line errors and exit codes, no tracebacks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from heavytail.cli import EXIT_ERROR, EXIT_RUN_DIR, main
from tests.report.conftest import make_run_dir
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
    for command in ("demo", "compare", "report"):
        assert command in done.stdout


def test_report_errors_are_one_line_in_a_real_process(tmp_path: Path) -> None:
    done = _python_m("report", str(tmp_path / "missing"))
    assert done.returncode == EXIT_RUN_DIR
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().count("\n") == 0
    assert done.stderr.startswith("heavytail: error: ") and "no such run directory" in done.stderr


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
        ["report"],
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
        (["compare", "--optimizers", "adamw,adam"], "unknown optimizer 'adam'"),
        (["compare", "--optimizers", "sgd", "--lr", "lion=1e-4"], "not in --optimizers"),
        (["compare", "--lr", "sgd=fast"], "not a number"),
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


def test_compare_command(tmp_path: Path, small_text: Path, capsys) -> None:  # noqa: F811
    out = tmp_path / "cmp"
    code = main(
        [
            "compare",
            "--optimizers",
            "muon,sgd",
            "--steps",
            "2",
            "--every",
            "1",
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
    assert summary["command"].startswith("heavytail compare --optimizers muon,sgd")
    assert summary["optimizers"]["muon"]["optimizer_class"] == "MuonWithAdamW"
    # Muon's AdamW half has a real denominator on the embeddings and head, none on the hidden matrices.
    adam = summary["optimizers"]["muon"]["denominator"]["adam/ratio_max"]
    assert adam["head.weight"] is not None and adam["blocks.0.mlp.fc.weight"] is None
    assert (out / "compare.html").is_file()


def test_console_script_is_installed() -> None:
    script = Path(sys.executable).with_name("heavytail")
    if not script.exists():
        pytest.skip("the heavytail console script is not installed in this environment")
    done = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.startswith("heavytail ")
