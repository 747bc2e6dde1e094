"""Reading run directories: records, per-layer families, and clear errors for missing, empty or corrupt ones."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest

from heavytail.report import NoRunYet, Run, RunDirError, find_run_dir, find_runs, load_run, split_key


def _lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def _write_lines(path: Path, lines: list[str], trailing_newline: bool = True) -> None:
    path.write_text("\n".join(lines) + ("\n" if trailing_newline else ""), encoding="utf-8")


# ------------------------------------------------------------------------------------------------ loading


def test_load_synthetic_run(run_dir: Path, names) -> None:
    run = load_run(run_dir)
    assert isinstance(run, Run)
    assert run.path == run_dir
    assert run.name == "synthetic"
    assert run.meta["optimizer"] == "AdamW"
    assert len(run.records) == 50
    assert np.all(np.diff(run.steps) > 0)
    first = run.records[0]
    assert first.step == 10 and isinstance(first.wall_time, float)
    assert set(first.metrics) >= {"loss", "grad/norm", f"grad/hill_alpha/{names.heavy}"}
    assert [a["rule"] for a in run.alerts] == ["tail_index_drop", "loss_spike"]
    assert run.flight_record(run.alerts[1])["rule"] == "loss_spike"


def test_records_keep_null_as_none(run_dir: Path, names) -> None:
    run = load_run(run_dir)
    assert run.records[7].metrics[f"grad/kurtosis/{names.layers[0]}"] is None
    assert run.records[-1].metrics["loss"] == pytest.approx(run.final("loss"))
    assert [r.step for r in run.records[:3]] == [10, 20, 30]
    assert len(list(run.records)) == len(run.records)


def test_layers_in_model_order_and_families(run_dir: Path, names) -> None:
    run = load_run(run_dir)
    assert run.layers("grad/hill_alpha") == list(names.layers)
    assert run.layers("grad/hill_alpha_se") == list(names.layers)  # not confused with grad/hill_alpha
    assert run.layers("grad/norm") == list(names.layers)  # the global grad/norm is not a layer
    assert run.layers("shadow/ratio_max") == []
    assert set(run.families()) >= {"grad/hill_alpha", "grad/kurtosis", "adam/ratio_max", "noise/hill_alpha"}
    assert run.global_keys() == ["loss", "grad/norm"]
    assert run.key("grad/kurtosis", names.heavy) == f"grad/kurtosis/{names.heavy}"


def test_series_nan_for_missing_and_null(run_dir: Path, names) -> None:
    run = load_run(run_dir)
    steps, loss = run.series("loss")
    assert len(steps) == len(loss) == 50 and np.isfinite(loss).all()
    steps, alpha = run.series(f"grad/hill_alpha/{names.layers[-1]}")
    assert math.isnan(alpha[11]) and np.isfinite(np.delete(alpha, 11)).all()
    _, noise = run.series(f"noise/hill_alpha/{names.layers[0]}")
    assert np.isfinite(noise).sum() == 10  # written every 5th checkpoint
    _, absent = run.series("no/such/key")
    assert np.isnan(absent).all() and len(absent) == 50


def test_matrix(run_dir: Path, names) -> None:
    run = load_run(run_dir)
    layers, steps, values = run.matrix("grad/hill_alpha")
    assert layers == list(names.layers)
    assert values.shape == (6, 50) and len(steps) == 50
    heavy = values[layers.index(names.heavy)]
    assert np.nanmin(heavy) < 2.0
    assert np.nanmin(np.delete(values, layers.index(names.heavy), axis=0)) > 2.0
    # A family written at some checkpoints only gets those columns.
    layers, steps, values = run.matrix("noise/hill_alpha")
    assert values.shape == (6, 10) and steps.tolist() == list(range(50, 501, 50))
    assert run.matrix("absent/family")[2].shape == (0, 0)


def test_layer_names_without_meta_use_known_families(make_run, names) -> None:
    path = make_run(with_meta=False)
    with pytest.warns(UserWarning, match=r"meta\.json: missing"):
        run = load_run(path)
    assert run.meta == {}
    assert run.name == path.name
    assert run.layers("grad/hill_alpha") == list(names.layers)
    assert run.layers("grad/hill_alpha_se") == list(names.layers)


@pytest.mark.parametrize(
    ("key", "params", "expected"),
    [
        ("loss", set(), ("loss", None)),
        ("grad/norm", set(), ("grad/norm", None)),
        ("grad/norm", {"norm"}, ("grad/norm", None)),  # two parts: always global
        ("grad/norm/norm", {"norm"}, ("grad/norm", "norm")),
        ("grad/hill_alpha/blocks.0.attn.qkv.weight", set(), ("grad/hill_alpha", "blocks.0.attn.qkv.weight")),
        ("grad/hill_alpha_se/h.0.weight", set(), ("grad/hill_alpha_se", "h.0.weight")),
        ("custom/thing/enc.layer.weight", set(), ("custom/thing", "enc.layer.weight")),
        ("custom/deep/stat/enc.weight", {"enc.weight"}, ("custom/deep/stat", "enc.weight")),
        ("grad/max/tower/a.weight", {"tower/a.weight"}, ("grad/max", "tower/a.weight")),
    ],
)
def test_split_key(key: str, params: set[str], expected: tuple[str, str | None]) -> None:
    assert split_key(key, frozenset(params)) == expected


def test_unknown_family_split_with_meta_params(make_run, names) -> None:
    path = make_run()
    lines = _lines(path / "metrics.jsonl")
    rec = json.loads(lines[0])
    rec["metrics"][f"custom/deep/stat/{names.heavy}"] = 1.5
    lines[0] = json.dumps(rec)
    _write_lines(path / "metrics.jsonl", lines)
    run = load_run(path)
    assert run.layers("custom/deep/stat") == [names.heavy]


def test_run_in_memory() -> None:
    run = Run(
        path=Path("mem"),
        meta={},
        records=[(1, 0.0, {"loss": 2.0, "grad/hill_alpha/a.weight": None}), (2, 1.0, {"loss": float("nan")})],
    )
    assert run.records[0].metrics == {"loss": 2.0, "grad/hill_alpha/a.weight": None}
    assert run.records[1].metrics == {"loss": None}
    assert run.layers("grad/hill_alpha") == ["a.weight"]
    assert run.alerts == []


def test_resumed_run_keeps_the_later_lines(make_run) -> None:
    path = make_run(n_checkpoints=10)
    lines = _lines(path / "metrics.jsonl")
    again = []
    for line in lines[5:8]:  # steps 60..80 written again after a restart from step 50
        rec = json.loads(line)
        rec["metrics"]["loss"] = 99.0
        again.append(json.dumps(rec))
    _write_lines(path / "metrics.jsonl", lines[:8] + again)
    run = load_run(path)
    assert run.steps.tolist() == list(range(10, 81, 10))
    _, loss = run.series("loss")
    assert loss[5:].tolist() == [99.0, 99.0, 99.0]


def test_nan_and_infinity_tokens_are_read(make_run) -> None:
    path = make_run(n_checkpoints=3)
    _write_lines(
        path / "metrics.jsonl",
        _lines(path / "metrics.jsonl")
        + ['{"step": 40, "wall_time": 1.0, "metrics": {"loss": NaN, "grad/norm": Infinity}}'],
    )
    run = load_run(path)
    assert run.records[-1].metrics["loss"] is None
    assert run.records[-1].metrics["grad/norm"] == math.inf


# ------------------------------------------------------------------------------------------------ killed runs


def test_cut_last_metrics_line_is_skipped_with_warning(run_dir: Path) -> None:
    lines = _lines(run_dir / "metrics.jsonl")
    _write_lines(run_dir / "metrics.jsonl", lines + [lines[-1][: len(lines[-1]) // 2]], trailing_newline=False)
    with pytest.warns(UserWarning, match=r"metrics\.jsonl:51: skipped a cut last line"):
        run = load_run(run_dir)
    assert len(run.records) == 50


def test_cut_last_line_followed_by_blank_lines(run_dir: Path) -> None:
    lines = _lines(run_dir / "metrics.jsonl")
    _write_lines(run_dir / "metrics.jsonl", lines[:-1] + ['{"step": 500, "wall_ti', "", "  "])
    with pytest.warns(UserWarning, match="cut last line"):
        run = load_run(run_dir)
    assert len(run.records) == 49


def test_cut_last_alert_line_is_skipped_with_warning(run_dir: Path) -> None:
    lines = _lines(run_dir / "alerts.jsonl")
    _write_lines(run_dir / "alerts.jsonl", lines[:1] + [lines[1][:30]], trailing_newline=False)
    with pytest.warns(UserWarning, match=r"alerts\.jsonl:2: skipped a cut last line"):
        run = load_run(run_dir)
    assert len(run.alerts) == 1


def test_clean_run_loads_without_warnings(run_dir: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_run(run_dir)


def test_missing_alerts_file_means_no_alerts(make_run) -> None:
    run = load_run(make_run(with_alerts=False))
    assert run.alerts == []


# ------------------------------------------------------------------------------------------------ errors


def test_error_is_a_value_error() -> None:
    assert issubclass(RunDirError, ValueError)


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(RunDirError, match=r"nope: no such run directory"):
        load_run(tmp_path / "nope")


def test_path_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunDirError, match=r"file: not a directory"):
        load_run(tmp_path / "file")


def test_directory_without_metrics(tmp_path: Path) -> None:
    (tmp_path / "meta.json").write_text("{}")
    with pytest.raises(RunDirError, match=r"no metrics\.jsonl, so this is not a heavytail run directory"):
        load_run(tmp_path)


@pytest.mark.parametrize("content", ["", "\n\n   \n"])
def test_empty_metrics(run_dir: Path, content: str) -> None:
    (run_dir / "metrics.jsonl").write_text(content)
    with pytest.raises(RunDirError, match=r"metrics\.jsonl: empty, the run wrote no checkpoint record"):
        load_run(run_dir)


def test_only_line_cut_is_empty(run_dir: Path) -> None:
    (run_dir / "metrics.jsonl").write_text('{"step": 10, "wall')
    with pytest.warns(UserWarning, match="cut last line"), pytest.raises(RunDirError, match="empty"):
        load_run(run_dir)


def test_corrupt_middle_line(run_dir: Path) -> None:
    lines = _lines(run_dir / "metrics.jsonl")
    lines[2] = lines[2][:40]
    _write_lines(run_dir / "metrics.jsonl", lines)
    with pytest.raises(RunDirError, match=r"metrics\.jsonl:3: corrupt line \(") as info:
        load_run(run_dir)
    assert "\n" not in str(info.value)
    assert str(run_dir) in str(info.value)


def test_binary_garbage_in_the_middle(run_dir: Path) -> None:
    data = (run_dir / "metrics.jsonl").read_bytes().split(b"\n")
    data[4] = b"\xff\xfe\x00garbage"
    (run_dir / "metrics.jsonl").write_bytes(b"\n".join(data))
    with pytest.raises(RunDirError, match=r"metrics\.jsonl:5: corrupt line"):
        load_run(run_dir)


def test_corrupt_middle_alert_line(run_dir: Path) -> None:
    lines = _lines(run_dir / "alerts.jsonl")
    _write_lines(run_dir / "alerts.jsonl", ["{not json"] + lines)
    with pytest.raises(RunDirError, match=r"alerts\.jsonl:1: corrupt line"):
        load_run(run_dir)


def test_alert_not_an_object(run_dir: Path) -> None:
    _write_lines(run_dir / "alerts.jsonl", ["[1, 2]", "{}"])
    with pytest.raises(RunDirError, match=r"alerts\.jsonl:1: an alert must be a JSON object, got an array"):
        load_run(run_dir)


def test_corrupt_meta(run_dir: Path) -> None:
    (run_dir / "meta.json").write_text('{"model": "GPT",')
    with pytest.raises(RunDirError, match=r"meta\.json: corrupt \("):
        load_run(run_dir)


def test_meta_not_an_object(run_dir: Path) -> None:
    (run_dir / "meta.json").write_text("[]")
    with pytest.raises(RunDirError, match=r"meta\.json: corrupt \(expected a JSON object, got an array\)"):
        load_run(run_dir)


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ("[1, 2, 3]", r"a record must be a JSON object, got an array"),
        ('{"wall_time": 1.0, "metrics": {}}', r"a record needs a 'step' field"),
        ('{"step": 1, "wall_time": 1.0}', r"a record needs a 'metrics' field"),
        ('{"step": "1", "wall_time": 1.0, "metrics": {}}', r"'step' must be an integer, got a string"),
        ('{"step": 1.5, "wall_time": 1.0, "metrics": {}}', r"'step' must be an integer, got float"),
        ('{"step": 1, "wall_time": "now", "metrics": {}}', r"'wall_time' must be a number, got a string"),
        ('{"step": 1, "wall_time": 1.0, "metrics": []}', r"'metrics' must be a JSON object, got an array"),
        ('{"step": 1, "wall_time": 1.0, "metrics": {"loss": "high"}}', r"metric 'loss' must be a number or null"),
        ('{"step": 1, "wall_time": 1.0, "metrics": {"loss": true}}', r"metric 'loss' must be a number or null"),
    ],
)
def test_malformed_record(run_dir: Path, record: str, message: str) -> None:
    lines = _lines(run_dir / "metrics.jsonl")
    _write_lines(run_dir / "metrics.jsonl", lines[:1] + [record] + lines[1:])
    with pytest.raises(RunDirError, match=r"metrics\.jsonl:2: " + message):
        load_run(run_dir)


def test_malformed_last_record_is_an_error_not_a_cut_line(run_dir: Path) -> None:
    # Valid JSON of the wrong shape is not what a kill leaves behind.
    lines = _lines(run_dir / "metrics.jsonl")
    _write_lines(run_dir / "metrics.jsonl", lines + ['{"step": "x", "metrics": {}}'])
    with pytest.raises(RunDirError, match=r"metrics\.jsonl:51: 'step' must be an integer"):
        load_run(run_dir)


# ------------------------------------------------------------------------------------------------ finding a run


def test_find_run_dir(make_run, tmp_path: Path) -> None:
    run = make_run("plain")
    assert find_run_dir(run) == run
    assert find_run_dir(run / "metrics.jsonl") == run  # the file itself names its folder
    assert find_run_dir(tmp_path / "missing") == tmp_path / "missing"  # load_run says what is wrong

    trainer = tmp_path / "trainer"
    (trainer / "checkpoint-500").mkdir(parents=True)
    (trainer / "runs" / "Nov25").mkdir(parents=True)  # TensorBoard's folder: no metrics.jsonl
    make_run("trainer/heavytail")
    make_run("trainer/runs/old/heavytail")  # another run deeper: the integrations' folder still wins
    assert find_run_dir(trainer) == trainer / "heavytail"

    nested = make_run("nested/a/b/c")
    assert find_run_dir(tmp_path / "nested") == nested  # 3 levels down
    make_run("deep/a/b/c/d")
    with pytest.raises(NoRunYet, match=r"no metrics.jsonl here or in the folders under it \(3 levels\)"):
        find_run_dir(tmp_path / "deep")

    make_run("hidden/.cache/run")
    make_run("hidden/real")
    assert find_run_dir(tmp_path / "hidden") == tmp_path / "hidden" / "real"

    make_run("two/x")
    make_run("two/y/heavytail")
    with pytest.raises(RunDirError, match=r"two: holds 2 runs, name one of them: .*two/x, .*two/y/heavytail$"):
        find_run_dir(tmp_path / "two")


def test_find_runs_does_not_search_inside_a_run(make_run, tmp_path: Path) -> None:
    outer = make_run("outer")
    make_run("outer/flight/not-a-run")  # nothing inside a run directory is another run
    make_run("sweep/adamw")
    make_run("sweep/lion")
    assert find_runs(outer) == [outer]
    assert find_runs(tmp_path / "sweep") == [tmp_path / "sweep" / "adamw", tmp_path / "sweep" / "lion"]
    assert find_runs(tmp_path / "missing") == []


def test_no_run_yet_is_a_run_dir_error(tmp_path: Path) -> None:
    """What a watcher may wait for (missing, no or empty metrics.jsonl) is a NoRunYet; a corrupt file is not."""
    with pytest.raises(NoRunYet, match="no such run directory"):
        load_run(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(NoRunYet, match="no metrics.jsonl"):
        load_run(tmp_path / "empty")
    (tmp_path / "empty" / "metrics.jsonl").write_text("")
    with pytest.raises(NoRunYet, match="empty, the run wrote no checkpoint record"):
        load_run(tmp_path / "empty")
    (tmp_path / "empty" / "metrics.jsonl").write_text('{"step": "x", "metrics": {}}\n')
    with pytest.raises(RunDirError, match="'step' must be an integer") as info:
        load_run(tmp_path / "empty")
    assert not isinstance(info.value, NoRunYet)


def test_run_name_finished_and_final_step(tmp_path: Path) -> None:
    def run(path: Path, **meta) -> Run:
        return Run(path=path, meta=meta, records=[(1, 0.0, {"loss": 1.0})])

    assert run(tmp_path / "exp", run_name="gpt-small").name == "gpt-small"
    assert run(tmp_path / "exp").name == "exp"
    # The integrations write into <output_dir>/heavytail; that folder's name says nothing of the run.
    assert run(tmp_path / "my-run" / "heavytail", run_name="heavytail").name == "my-run"
    assert run(tmp_path / "my-run" / "heavytail").name == "my-run"
    assert run(tmp_path / "my-run" / "heavytail", run_name="hf-run-7").name == "hf-run-7"
    done = run(tmp_path, finished=1764097200.5, final_step=300)
    assert (done.finished, done.final_step) == (1764097200.5, 300)
    for odd in ({}, {"finished": None}, {"finished": "yes"}, {"finished": True}, {"final_step": 3.5}):
        r = run(tmp_path, **odd)
        assert r.finished is None and (r.final_step is None)
