"""The comparison runner: same init, data and budget per optimizer; summary.json and compare.html."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from heavytail.compare import (
    DENOMINATOR_FAMILIES,
    aggregate_seeds,
    parse_lrs,
    parse_optimizers,
    parse_seeds,
    run_compare,
    run_seeds,
    run_summary,
)
from heavytail.demo import make_optimizer, train_monitored, validation_loss
from heavytail.report import Run
from heavytail.workload import build_demo, load_corpus, split_held_out
from heavytail.workload.tokenizer import split_tokens
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


def _reference_loss(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> float:
    """Mean next-token cross-entropy over every token, in one pass, in float64: the obvious reference."""
    with torch.no_grad():
        logits, _ = model.eval()(batch[0])
    logits = logits.double().reshape(-1, logits.shape[-1])
    return float(F.cross_entropy(logits, batch[1].reshape(-1), reduction="sum") / batch[1].numel())


def test_validation_windows_are_all_the_held_out_text_and_no_training_text(small_text: Path) -> None:  # noqa: F811
    w = build_demo(seed=3, text=small_text, steps=4, size="tiny")
    x, y = w.validation
    block = w.model_config.block_size
    tokens = w.tokenizer.encode_pieces(split_tokens(load_corpus(small_text)))
    n_train, n_held = w.config["n_train_tokens"], w.config["n_held_out_tokens"]
    assert len(w.batches.tokens) == n_train and w.config["n_tokens"] == n_train + n_held
    # Consecutive non-overlapping windows: inputs tile the tail from its first token, targets are shifted by one.
    assert x.shape == y.shape == ((n_held - 1) // block, block) == (w.config["n_validation_sequences"], block)
    assert torch.equal(x.reshape(-1), tokens[n_train : n_train + x.numel()])
    assert torch.equal(y.reshape(-1), tokens[n_train + 1 : n_train + 1 + y.numel()])
    # Training windows are drawn from the first n_train tokens only (Batches holds nothing else): no validation
    # token is in any training window. The validation text is the same whatever the seed.
    assert torch.equal(w.batches.tokens, tokens[:n_train])
    assert torch.equal(split_held_out(tokens)[1], tokens[n_train:])
    other = build_demo(seed=4, text=small_text, steps=4, size="tiny")
    assert torch.equal(other.validation[0], x) and torch.equal(other.validation[1], y)
    assert not torch.equal(other.held_out[0], w.held_out[0])  # the probe's batch does follow the seed


def test_validation_loss_matches_a_float64_reference(small_text: Path) -> None:  # noqa: F811
    w = build_demo(seed=0, text=small_text, steps=4, size="tiny")
    w.model.train()
    reference = _reference_loss(w.model, w.validation)
    w.model.train()
    for chunk in (1, 5, 64, 10_000):
        assert float(validation_loss(w.model, w.validation, chunk=chunk)) == pytest.approx(reference, rel=1e-6)
    assert w.model.training  # the training mode is restored


def test_trained_run_validation_loss_is_the_final_weights_loss(tmp_path: Path, small_text: Path) -> None:  # noqa: F811
    w = build_demo(seed=0, text=small_text, steps=3, size="tiny")
    model = w.new_model()
    before = _reference_loss(model, w.validation)
    trained = train_monitored(
        w,
        model,
        make_optimizer("adamw", model),
        steps=3,
        log_dir=tmp_path / "run",
        every=1,
        probe=False,
        progress=None,
    )
    after = _reference_loss(model, w.validation)  # the model object holds the final weights
    assert trained.val_loss == pytest.approx(after, rel=1e-6)
    assert after != pytest.approx(before, rel=1e-6)  # the weights moved, so this is not the initial loss


def test_compare_summary_records_the_validation_loss(tmp_path: Path, small_text: Path) -> None:  # noqa: F811
    result = run_compare(
        ["sgd", "lion"], steps=3, every=1, out=tmp_path, size="tiny", text=small_text, progress=None, probe=False
    )
    summary = json.loads((tmp_path / "summary.json").read_text())
    w = build_demo(seed=0, text=small_text, steps=3, size="tiny")
    for name in ("sgd", "lion"):
        # An independent recomputation: train the same model on the same batches without the monitor.
        model = w.new_model()
        optimizer = make_optimizer(name, model)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: 1.0)  # warm-up of 1 step at 3 steps
        for step in range(3):
            x, y = w.batches.get(step)
            for xm, ym in zip(x.tensor_split(2), y.tensor_split(2)):
                (model(xm, ym)[1] / 2).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
        expected = _reference_loss(model, w.validation)
        assert summary["optimizers"][name]["val_loss"] == pytest.approx(expected, rel=1e-5)
        assert result.trained[name].val_loss == summary["optimizers"][name]["val_loss"]
    html = (tmp_path / "compare.html").read_text(encoding="utf-8")
    assert "validation loss (held-out text, final weights)" in html


def test_parse_seeds() -> None:
    assert parse_seeds("2, 0,2") == [2, 0]
    assert parse_seeds([1, 1, 3]) == [1, 3]
    for bad, match in (("x", "not an integer"), ("-1", "non-negative"), (" , ", "no seed")):
        with pytest.raises(ValueError, match=match):
            parse_seeds(bad)


def test_aggregate_seeds_against_numpy() -> None:
    import numpy as np

    def one(val: float, alpha: float | None) -> dict:
        tails = {"grad/hill_alpha": {"w": alpha}} if alpha is not None else {}
        overall = {"grad/hill_alpha": alpha} if alpha is not None else {}
        return {"lr": 0.1, "val_loss": val, "final_loss": val + 1, "alerts": 2, "tail_index": tails, "overall": overall}

    summaries = {
        0: {"optimizers": {"sgd": one(3.0, 2.0)}},
        1: {"optimizers": {"sgd": one(3.5, None)}},
        2: {"optimizers": {"sgd": one(4.5, 3.0)}},
    }
    agg = aggregate_seeds(summaries)["sgd"]
    vals = np.array([3.0, 3.5, 4.5])
    assert agg["lr"] == 0.1
    assert agg["val_loss"]["mean"] == pytest.approx(vals.mean())
    assert agg["val_loss"]["std"] == pytest.approx(vals.std(ddof=1))
    assert (agg["val_loss"]["min"], agg["val_loss"]["max"], agg["val_loss"]["n"]) == (3.0, 4.5, 3)
    assert agg["val_loss"]["values"] == [3.0, 3.5, 4.5]
    assert agg["final_loss"]["mean"] == pytest.approx(vals.mean() + 1)
    assert agg["alerts"]["std"] == 0.0
    # A seed without the figure counts as missing, not as zero.
    alpha = agg["tail_index"]["grad/hill_alpha"]["w"]
    assert alpha["values"] == [2.0, None, 3.0] and alpha["mean"] == 2.5 and alpha["n"] == 2
    assert agg["overall"]["grad/hill_alpha"]["std"] == pytest.approx(np.std([2.0, 3.0], ddof=1))


def test_run_seeds_writes_one_sweep_per_seed_and_the_aggregate(tmp_path: Path, small_text: Path) -> None:  # noqa: F811
    result = run_seeds(
        ["sgd"], [0, 1], out=tmp_path, steps=2, every=1, size="tiny", text=small_text, progress=None, probe=False
    )
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["seeds"] == [0, 1] and summary["learning_rates"] == {"sgd": 0.05}
    assert summary["per_seed"] == {"0": "seed0/summary.json", "1": "seed1/summary.json"}
    per_seed = [json.loads((tmp_path / f"seed{k}" / "summary.json").read_text()) for k in (0, 1)]
    assert [p["settings"]["seed"] for p in per_seed] == [0, 1]
    assert per_seed[0]["settings"]["init_checksum"] != per_seed[1]["settings"]["init_checksum"]
    assert (tmp_path / "seed1" / "sgd" / "metrics.jsonl").is_file() and (tmp_path / "seed1" / "compare.html").is_file()
    vals = [p["optimizers"]["sgd"]["val_loss"] for p in per_seed]
    agg = summary["optimizers"]["sgd"]["val_loss"]
    assert agg["values"] == vals and agg["mean"] == pytest.approx(sum(vals) / 2)
    assert result.summary_path == tmp_path / "summary.json" and set(result.per_seed) == {0, 1}
