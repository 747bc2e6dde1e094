"""Tests for the console backend: the table and alert lines, captured from the stream."""

from __future__ import annotations

import io
import math

import pytest

from heavytail.backends import backend_factory
from heavytail.backends.console import ConsoleBackend, format_value, shorten, worst_layers


def record() -> dict[str, float]:
    metrics = {"loss": 2.84312, "grad/norm": 1.23456}
    alphas = {
        "embed.weight": 3.1,
        "blocks.0.attn.qkv.weight": 1.52,
        "blocks.0.mlp.fc.weight": math.nan,
        "blocks.1.attn.qkv.weight": 2.2,
        "blocks.1.mlp.fc.weight": 1.9,
        "lm_head.weight": 4.0,
        "blocks.2.attn.qkv.weight": 2.9,
    }
    for layer, alpha in alphas.items():
        metrics[f"grad/hill_alpha/{layer}"] = alpha
        metrics[f"grad/kurtosis/{layer}"] = 50.0
    ratios = {
        "embed.weight": 3.0,
        "blocks.0.attn.qkv.weight": 412.0,
        "blocks.1.mlp.fc.weight": math.inf,
        "lm_head.weight": 7.5,
    }
    for layer, ratio in ratios.items():
        metrics[f"adam/ratio_max/{layer}"] = ratio
    return metrics


def test_table_layout_and_ranking():
    stream = io.StringIO()
    backend = ConsoleBackend(None, None, stream=stream, top=3)
    backend.log(record(), 1200)
    lines = stream.getvalue().splitlines()
    assert lines[0] == "heavytail step 1200  loss 2.843  grad/norm 1.235"
    assert lines[1].split() == ["lowest", "grad/hill_alpha", "highest", "adam/ratio_max"]
    rows = [line.split() for line in lines[2:]]
    assert rows == [
        ["1.52", "blocks.0.attn.qkv.weight", "inf", "blocks.1.mlp.fc.weight"],
        ["1.9", "blocks.1.mlp.fc.weight", "412", "blocks.0.attn.qkv.weight"],
        ["2.2", "blocks.1.attn.qkv.weight", "7.5", "lm_head.weight"],
    ]
    # fixed width: a column is 9 characters of right-aligned value, a space, 32 of name; columns 2 apart
    second = 2 + 9 + 1 + 32 + 2
    assert lines[1][second:].startswith("highest adam/ratio_max")
    assert [line[second : second + 9] for line in lines[2:]] == ["      inf", "      412", "      7.5"]
    assert [line[second + 10 :] for line in lines[2:]] == [
        "blocks.1.mlp.fc.weight",
        "blocks.0.attn.qkv.weight",
        "lm_head.weight",
    ]


def test_nan_shown_as_dash_and_ranked_last():
    stream = io.StringIO()
    ConsoleBackend(stream=stream, top=10).log(record(), 5)
    lines = stream.getvalue().splitlines()
    alpha_rows = [line[: 2 + 9 + 1 + 32].split() for line in lines[2:]]
    assert alpha_rows[-1] == ["-", "blocks.0.mlp.fc.weight"]
    assert len(alpha_rows) == 7
    # the shorter column is padded with blanks
    assert lines[-1].split() == ["-", "blocks.0.mlp.fc.weight"]


def test_missing_families_and_globals():
    stream = io.StringIO()
    backend = ConsoleBackend(stream=stream)
    backend.log({"grad/hill_alpha/w": 2.5, "loss": math.nan}, 3)
    assert stream.getvalue().splitlines() == [
        "heavytail step 3  loss -  grad/norm -",
        "  lowest grad/hill_alpha",
        "        2.5 w",
    ]


def test_alert_lines():
    stream = io.StringIO()
    backend = ConsoleBackend(stream=stream)
    backend.alert(
        {
            "step": 412,
            "wall_time": 0.0,
            "rule": "loss_spike",
            "severity": "warning",
            "metric": "loss",
            "layer": None,
            "value": 7.9,
            "threshold": 4.1,
            "message": "loss 7.9 is 6.3 sd above",
            "flight_record": "flight/000412_loss_spike.json",
        }
    )
    backend.alert(
        {
            "step": 413,
            "rule": "nonfinite_grad",
            "severity": "critical",
            "layer": "blocks.0.w",
            "message": "3 non-finite entries",
            "flight_record": None,
        }
    )
    assert stream.getvalue().splitlines() == [
        "heavytail ALERT WARNING step 412 loss_spike: loss 7.9 is 6.3 sd above (flight/000412_loss_spike.json)",
        "heavytail ALERT CRITICAL step 413 nonfinite_grad [blocks.0.w]: 3 non-finite entries",
    ]


def test_default_stream_is_stderr_at_write_time(capsys):
    backend = backend_factory("console")(log_dir=None, config=None)
    backend.log({"loss": 1.0}, 7)
    backend.close()
    backend.close()
    backend.log({"loss": 2.0}, 8)  # after close: dropped
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == "heavytail step 7  loss 1  grad/norm -\n"


def test_helpers_and_validation():
    assert format_value(None) == "-"
    assert format_value(-math.inf) == "-inf"
    assert format_value(123456.0) == "1.235e+05"
    assert format_value(-1.2345e-100) == "-1.2e-100"
    name = "transformer.h.11.attn.c_attn.weight.long.name"
    short = shorten(name, 20)
    assert len(short) == 20 and short.startswith("transfor") and short.endswith("name")
    assert worst_layers({"a/b/x": 1.0, "a/bc/y": 0.0}, "a/b", "min", 5) == [("x", 1.0)]
    with pytest.raises(ValueError, match="top"):
        ConsoleBackend(top=0)
    with pytest.raises(ValueError, match="'min' or 'max'"):
        ConsoleBackend(rankings=(("grad/hill_alpha", "lowest"),))
