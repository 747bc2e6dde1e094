"""Tests for the TensorBoard backend: what it writes is read back with TensorBoard's own EventAccumulator."""

from __future__ import annotations

import math
import re
import subprocess
import sys
import threading

import pytest

pytest.importorskip("tensorboard")

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402
from tensorboard.plugins.custom_scalar import layout_pb2  # noqa: E402

from heavytail.backends import backend_factory  # noqa: E402
from heavytail.backends.tensorboard import (  # noqa: E402
    TensorBoardBackend,
    block_of,
    custom_scalars_layout,
    split_layer_key,
)

LAYERS = ["embed.weight", "blocks.0.attn.qkv.weight", "blocks.0.mlp.fc.weight", "blocks.1.attn.qkv.weight"]


def record(step: int, shift: float = 0.0) -> dict[str, float]:
    metrics = {"loss": 3.0 - 0.1 * step, "grad/norm": 1.5 + shift}
    for i, layer in enumerate(LAYERS):
        metrics[f"grad/hill_alpha/{layer}"] = 1.5 + i + shift
        metrics[f"grad/kurtosis/{layer}"] = 10.0 * (i + 1)
        metrics[f"adam/ratio_max/{layer}"] = 100.0 + i
    return metrics


def accumulator(path) -> EventAccumulator:
    acc = EventAccumulator(
        str(path),
        size_guidance={"scalars": 0, "histograms": 0, "tensors": 0, "compressedHistograms": 0, "images": 0},
    )
    acc.Reload()
    return acc


def test_scalars_histograms_text_and_layout(tmp_path):
    backend = TensorBoardBackend(tmp_path, config=None)
    first, second = record(10), record(20, shift=0.25)
    second["grad/hill_alpha/embed.weight"] = math.nan  # a layer with no usable tail that step
    second["adam/ratio_max/blocks.1.attn.qkv.weight"] = math.inf
    backend.log(first, 10)
    backend.log(second, 20)
    alert = {
        "step": 20,
        "wall_time": 0.0,
        "rule": "tail_index_drop",
        "severity": "warning",
        "metric": "grad/hill_alpha",
        "layer": "blocks.0.attn.qkv.weight",
        "value": 1.75,
        "threshold": 2.0,
        "message": "tail index of blocks.0.attn.qkv.weight fell to 1.75",
        "flight_record": "flight/000020_x.json",
    }
    backend.alert(alert)
    backend.close()
    backend.close()  # idempotent

    acc = accumulator(tmp_path / "tensorboard")
    tags = acc.Tags()

    # scalars: every key, with optimizer steps, values as float32, NaN and Inf kept
    assert set(record(10)) <= set(tags["scalars"])
    for key in first:
        events = acc.Scalars(key)
        assert [e.step for e in events] == [10, 20]
        assert events[0].value == pytest.approx(first[key], rel=1e-6)
        if math.isfinite(second[key]):
            assert events[1].value == pytest.approx(second[key], rel=1e-6)
    assert math.isnan(acc.Scalars("grad/hill_alpha/embed.weight")[1].value)
    assert acc.Scalars("adam/ratio_max/blocks.1.attn.qkv.weight")[1].value == math.inf

    # histograms over layers of the tail index only, finite values only
    assert tags["histograms"] == ["grad/hill_alpha_hist"]
    hist = acc.Histograms("grad/hill_alpha_hist")
    assert [h.step for h in hist] == [10, 20]
    assert hist[0].histogram_value.num == 4
    assert hist[0].histogram_value.min == pytest.approx(1.5)
    assert hist[0].histogram_value.max == pytest.approx(4.5)
    assert hist[1].histogram_value.num == 3  # the NaN is left out
    assert hist[1].histogram_value.sum == pytest.approx(sum(1.5 + i + 0.25 for i in range(1, 4)))

    # alerts as Markdown text
    text_tags = [t for t in tags["tensors"] if t.startswith("alerts")]
    assert text_tags == ["alerts/text_summary"]
    (text,) = acc.Tensors("alerts/text_summary")
    assert text.step == 20
    markdown = text.tensor_proto.string_val[0].decode()
    assert "**WARNING** `tail_index_drop` at step 20" in markdown
    assert "tail index of blocks.0.attn.qkv.weight fell to 1.75" in markdown
    assert "flight/000020_x.json" in markdown

    # the custom-scalars layout, written once
    configs = acc.Tensors("custom_scalars__config__")
    assert len(configs) == 1
    layout = layout_pb2.Layout()
    layout.ParseFromString(configs[0].tensor_proto.string_val[0])
    categories = {c.title: c for c in layout.category}
    assert list(categories) == ["grad/hill_alpha", "grad/kurtosis", "adam/ratio_max"]
    scalar_tags = tags["scalars"]
    for family, category in categories.items():
        all_layers = category.chart[0]
        assert all_layers.title == f"{family} (all layers)"
        (regex,) = all_layers.multiline.tag
        # TensorBoard's custom-scalars plugin selects tags with re.match
        assert sorted(t for t in scalar_tags if re.match(regex, t)) == sorted(f"{family}/{l}" for l in LAYERS)
        per_block = {c.title: c.multiline.tag[0] for c in category.chart[1:]}
        assert list(per_block) == [f"{family} blocks.0", f"{family} blocks.1", f"{family} embed"]
        matched = [t for t in scalar_tags if re.match(per_block[f"{family} blocks.0"], t)]
        assert sorted(matched) == sorted(f"{family}/{l}" for l in LAYERS[1:3])


def test_tb_dir_histogram_families_and_registry(tmp_path):
    factory = backend_factory("tensorboard")
    assert factory is TensorBoardBackend
    backend = factory(
        log_dir=tmp_path / "run", config=None, tb_dir=tmp_path / "tb", histogram_families=("grad/kurtosis",)
    )
    backend.log(record(1), 1)
    backend.close()
    assert not (tmp_path / "run" / "tensorboard").exists()
    acc = accumulator(tmp_path / "tb")
    assert acc.Tags()["histograms"] == ["grad/kurtosis_hist"]


def test_no_writer_thread_left_and_closed_backend_drops(tmp_path):
    before = set(threading.enumerate())
    backend = TensorBoardBackend(tmp_path)
    backend.log({"loss": 1.0}, 1)  # global keys only: no layout, no histogram
    backend.close()
    backend.log({"loss": 2.0}, 2)
    backend.alert({"step": 2, "rule": "loss_spike", "severity": "warning", "message": "m"})
    assert set(threading.enumerate()) <= before
    acc = accumulator(tmp_path / "tensorboard")
    assert [e.value for e in acc.Scalars("loss")] == [1.0]
    assert "custom_scalars__config__" not in acc.Tags()["tensors"]


def test_needs_a_directory():
    with pytest.raises(ValueError, match="log_dir"):
        TensorBoardBackend(None)


def test_missing_tensorboard_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ImportError, match=r"pip install heavytail\[tensorboard\]"):
        TensorBoardBackend(tmp_path)


def test_module_import_does_not_import_tensorboard():
    code = (
        "import sys, heavytail.backends.tensorboard\n"
        "assert 'tensorboard' not in sys.modules and 'torch.utils.tensorboard' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_key_helpers():
    assert split_layer_key("grad/hill_alpha/blocks.0.w") == ("grad/hill_alpha", "blocks.0.w")
    assert split_layer_key("grad/norm") is None
    assert split_layer_key("loss") is None
    assert split_layer_key("grad/hill_alpha/odd/name") == ("grad/hill_alpha", "odd/name")
    assert block_of("blocks.0.attn.qkv.weight") == "blocks.0"
    assert block_of("model.layers.11.mlp.up_proj.weight") == "model.layers.11"
    assert block_of("embed.weight") == "embed"
    assert block_of("weight") == "weight"
    assert block_of("0.weight") == "0"
    many = {"grad/hill_alpha": [f"h.{i}.w" for i in range(100)]}
    assert list(custom_scalars_layout(many)["grad/hill_alpha"]) == ["grad/hill_alpha (all layers)"]
    assert (
        "grad/hill_alpha h.10"
        == list(custom_scalars_layout({"grad/hill_alpha": ["h.2.w", "h.10.w"]})["grad/hill_alpha"])[2]
    )
