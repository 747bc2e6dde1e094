"""The comparison runner: same init, data and budget per optimizer; summary.json and compare.html."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from heavytail.compare import (
    DENOMINATOR_FAMILIES,
    parse_lrs,
    parse_optimizers,
    run_compare,
    run_summary,
)
from heavytail.report import Run
from tests.conftest import read_records
from tests.test_demo import one_thread, small_text  # noqa: F401  (fixtures)


def test_compare_writes_summary_and_report(tmp_path: Path, small_text: Path) -> None:  # noqa: F811
    out = tmp_path / "cmp"
    result = run_compare(
        ["adamw", "lion", "sgd"],
        steps=4,
        every=2,
        out=out,
        size="tiny",
        text=small_text,
        lrs={"lion": 3e-4, "sgd": 0.05},
        progress=None,
        command="heavytail sweep (test)",
    )
    summary = json.loads((out / "summary.json").read_text())
    assert result.summary_path == out / "summary.json" and result.report == out / "compare.html"
    assert list(summary["optimizers"]) == ["adamw", "lion", "sgd"]
    assert summary["learning_rates"] == {"adamw": 1e-3, "lion": 3e-4, "sgd": 0.05}
    assert summary["differs"] == ["optimizer", "lr"]
    assert {"model init", "data order", "seed", "steps", "batch", "monitor config"} <= set(summary["held_equal"])
    assert summary["settings"]["steps"] == 4 and summary["settings"]["size"] == "tiny"
    for name, s in summary["optimizers"].items():
        assert (out / name / "metrics.jsonl").is_file()
        assert s["run_dir"] == name
        last = read_records(out / name)[-1]["metrics"]["loss"]
        assert s["final_loss"] == last  # the last checkpoint's loss (documented)
        assert s["steps"] == 4 and s["checkpoints"] == 2
        assert isinstance(s["loss_spikes"], int) and isinstance(s["alerts_by_rule"], dict)
        assert sum(s["alerts_by_rule"].values()) == s["alerts"]
        tails = s["tail_index"]
        assert "grad/hill_alpha" in tails and "noise/hill_alpha" in tails
        assert "head.weight" in tails["grad/hill_alpha"]
        den = s["denominator"]
        assert "shadow999/ratio_max" in den and "shadow95/ratio_max" in den  # every optimizer has the shadows
        assert ("adam/ratio_max" in den) == (name == "adamw")  # only AdamW has a denominator of its own
        assert isinstance(s["memory"], dict)
    # Final loss is the mean over the last checkpoint's interval, as recorded.
    last = json.loads((out / "adamw" / "metrics.jsonl").read_text().splitlines()[-1])
    assert summary["optimizers"]["adamw"]["final_loss"] == pytest.approx(last["metrics"]["loss"])
    # Every run started from the same weights on the same data.
    metas = [json.loads((out / n / "meta.json").read_text()) for n in ("adamw", "lion", "sgd")]
    assert len({m["extra"]["init_checksum"] for m in metas}) == 1
    assert len({m["extra"]["data_checksum"] for m in metas}) == 1
    html = (out / "compare.html").read_text(encoding="utf-8")
    assert 'id="fair-note"' in html and "Held equal" in html and "Differs: the optimizer" in html
    assert "shadow999/ratio_max" in html and "sec-family-tables" in html


def test_same_initial_weights_and_first_loss(tmp_path: Path, small_text: Path) -> None:  # noqa: F811
    run_compare(
        ["sgd", "adamw"], steps=2, every=1, out=tmp_path, size="tiny", text=small_text, progress=None, probe=False
    )
    firsts = [
        json.loads((tmp_path / n / "metrics.jsonl").read_text().splitlines()[0])["metrics"]["loss"]
        for n in ("sgd", "adamw")
    ]
    assert firsts[0] == firsts[1]  # step 1's loss is computed before any update: identical model and batch


def test_summary_without_memory_or_denominator() -> None:
    run = Run(
        path=Path("x"),
        meta={"optimizer": "Lion"},
        records=[
            (1, 0.0, {"loss": 3.0, "grad/hill_alpha/w": 2.5, "shadow999/ratio_max/w": 4.0}),
            (2, 1.0, {"loss": 2.0, "grad/hill_alpha/w": 3.5, "shadow999/ratio_max/w": None}),
        ],
    )
    s = run_summary(run, lr=1e-4)
    assert s["final_loss"] == 2.0 and s["loss_spikes"] == 0 and s["alerts"] == 0
    assert s["tail_index"] == {"grad/hill_alpha": {"w": 3.0}}
    assert s["denominator"] == {"shadow999/ratio_max": {"w": 4.0}}
    assert s["memory"] == {}
    assert set(DENOMINATOR_FAMILIES) >= set(s["denominator"])


def test_summary_reads_memory_figures_when_present() -> None:
    run = Run(
        path=Path("x"),
        meta={},
        records=[
            (1, 0.0, {"adam/memory_steps/w": 12.0, "shadow999/memory_steps/w": math.nan}),
            (2, 1.0, {"adam/memory_steps/w": 20.0, "shadow999/memory_steps/w": 40.0}),
        ],
    )
    s = run_summary(run)
    assert s["memory"] == {"adam/memory_steps": {"w": 16.0}, "shadow999/memory_steps": {"w": 40.0}}


def test_parse_optimizers_and_lrs() -> None:
    assert parse_optimizers("AdamW, lion,adamw") == ["adamw", "lion"]
    assert parse_lrs("adamw=3e-4, muon=0.01") == {"adamw": 3e-4, "muon": 0.01}
    assert parse_lrs(None) == {}
    with pytest.raises(ValueError, match="unknown optimizer 'adam'"):
        parse_optimizers("adam")
    with pytest.raises(ValueError, match="no optimizer"):
        parse_optimizers(" , ")
    for bad, match in (
        ("adamw", "optimizer=value"),
        ("adam=1", "optimizer=value"),
        ("sgd=x", "not a number"),
        ("sgd=-1", "must be positive"),
        ("sgd=nan", "must be positive"),
    ):
        with pytest.raises(ValueError, match=match):
            parse_lrs(bad)


def test_compare_rejects_bad_settings(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown size"):
        run_compare(["sgd"], out=tmp_path, size="huge", progress=None)
    with pytest.raises(ValueError, match="unknown optimizer"):
        run_compare(["sgd"], out=tmp_path, lrs={"rmsprop": 1.0}, progress=None)
    assert torch.get_num_threads() == 1  # the fixture is active here too
