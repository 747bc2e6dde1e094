"""The demo runner: a tiny monitored run writes its run directory and report and prints a summary."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import pytest
import torch

from heavytail.demo import (
    DEFAULT_LR,
    OPTIMIZERS,
    ProgressBar,
    make_optimizer,
    run_demo,
    warmup_steps,
)
from heavytail.report import load_run
from heavytail.workload import build_demo


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on a shared two-core machine, two spinning OpenMP threads make tiny steps 10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def small_text(tmp_path_factory) -> Path:
    """A Zipfian word salad of 30,000 words: enough for the tiny workload, tokenized in milliseconds."""
    rng = random.Random(0)
    words = [f"w{i}" for i in range(400)]
    weights = [1.0 / (i + 1) for i in range(len(words))]
    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    lines = [" ".join(rng.choices(words, weights, k=15)) for _ in range(2000)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_demo_writes_run_directory_report_and_summary(tmp_path: Path, small_text: Path) -> None:
    out = tmp_path / "demo"
    bar = io.StringIO()
    result = run_demo(steps=6, out=out, text=small_text, size="tiny", every=3, progress=bar)
    assert (out / "metrics.jsonl").is_file() and (out / "meta.json").is_file()
    assert result.report == out / "report.html" and result.report.stat().st_size > 10_000
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [3, 6]
    assert "grad/hill_alpha/head.weight" in records[-1]["metrics"]
    text = result.summary
    assert "6 steps of GPT" in text and "AdamW" in text
    # the validation loss (tests/test_compare.py checks its value) is the summary's second line
    assert text.splitlines()[1] == (
        f"Validation loss (all the held-out text, final weights): {result.trained.val_loss:.3f}."
    )
    assert "Heaviest-tailed layers" in text and "Alerts:" in text
    assert f"Report:        {out / 'report.html'}" in text
    assert "6/6" in bar.getvalue()  # the progress bar reached the end
    meta = json.loads((out / "meta.json").read_text())
    assert meta["extra"]["lr"] == DEFAULT_LR["adamw"] and meta["extra"]["workload/size"] == "tiny"
    assert result.trained.probe  # the noise probe ran at every checkpoint
    assert all(any(k.startswith("probe/hill_alpha/") for k in r["metrics"]) for r in records)
    assert "probe (probe/hill_alpha)" in text


def test_demo_replaces_a_previous_run(tmp_path: Path, small_text: Path) -> None:
    out = tmp_path / "demo"
    run_demo(steps=2, out=out, text=small_text, size="tiny", every=1, progress=None, probe=False)
    run_demo(steps=3, out=out, text=small_text, size="tiny", every=1, progress=None, probe=False, optimizer="sgd")
    run = load_run(out)
    assert list(run.steps) == [1, 2, 3]  # not appended to the first run's records
    assert run.meta["optimizer"] == "SGD"


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_optimizer_trains_the_tiny_workload(name: str, small_text: Path) -> None:
    work = build_demo(seed=0, text=small_text, steps=30, size="tiny")
    model = work.new_model()
    opt = make_optimizer(name, model)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: min(1.0, (t + 1) / warmup_steps(30)))
    losses = []
    for step in range(30):
        x, y = work.batches.get(step)
        _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        sched.step()
        losses.append(float(loss.detach()))
    assert sum(losses[-5:]) / 5 < losses[0] - 0.3, (name, losses[0], losses[-5:])


def test_make_optimizer_rejects_unknown_names_and_bad_rates() -> None:
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="unknown optimizer 'adam'"):
        make_optimizer("adam", model)
    with pytest.raises(ValueError, match="must be positive"):
        make_optimizer("sgd", model, lr=0.0)
    assert make_optimizer("ADAMW", model).param_groups[0]["betas"] == (0.9, 0.95)


def test_run_demo_rejects_bad_settings(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown size"):
        run_demo(out=tmp_path, size="huge", progress=None)
    with pytest.raises(ValueError, match="steps must be positive"):
        run_demo(out=tmp_path, steps=0, progress=None)


def test_progress_bar_writes_lines_to_a_pipe() -> None:
    stream = io.StringIO()
    bar = ProgressBar(100, label="adamw", stream=stream)
    for step in range(1, 101):
        if bar.needs_draw(step):
            bar.update(step, 5.0 - step / 100)
    bar.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 11  # the first step, then one line per 10% on a pipe; no carriage returns
    assert "\r" not in stream.getvalue()
    assert lines[-1].startswith("adamw [########################] 100/100 loss 4.0000")
    assert "it/s" in lines[-1]
    assert not ProgressBar(10, stream=None).needs_draw(10)
