"""A reduced calibration of the noise-tail readings (benchmarks/calibration.py runs the full table): noise of
known law through the public Monitor API, each source judged as the benchmark judges it, on seeds 0-2."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from heavytail.workload.noise_laws import SOURCES, run_source

_SPEC = importlib.util.spec_from_file_location(
    "calibration", Path(__file__).resolve().parents[1] / "benchmarks" / "calibration.py"
)
calibration = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(calibration)

CASES = [
    ("gauss", "zipf"),  # a scale mixture of Gaussians before per-coordinate standardisation: read alpha 1.0
    ("laplace", "lognormal"),
    ("bernoulli(0.05)", "lognormal"),
    ("raretoken", "zipf"),
    ("t(1.5)", "equal"),
    ("stable(1.5)", "equal"),
    ("stable(1.8)", "lognormal"),  # near-Gaussian body: read +16 to +35% before the pooled fit's fixed k = n / 20
]


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("law, scales", CASES)
def test_noise_source_reads_the_known_law(law, scales, source):
    readings = [calibration.reading(run_source(law, scales, source, seed), source) for seed in range(3)]
    median, verdict, ok = calibration.judge(law, [a for a, _ in readings], [v for _, v in readings])
    assert ok, (law, scales, source, median, verdict, readings)


def test_judge_applies_the_documented_criteria():
    assert calibration.judge("gauss", [9.0, 12.0, 8.0], ["light", "light", "power"])[1:] == ("light", True)
    assert not calibration.judge("gauss", [3.0, 12.0, 8.0], ["power", "light", "power"])[2]
    assert calibration.judge("t(3)", [2.6, 3.1, 3.5], ["power"] * 3)[2]  # median 3.1: within 15%
    assert not calibration.judge("t(3)", [2.5, 2.5, 3.5], ["power"] * 3)[2]  # median 2.5: 17% off
    assert not calibration.judge("raretoken", [2.4, 9.0, 9.0], ["sparse"] * 3)[2]  # one seed under 2.5
    assert calibration.judge("raretoken", [float("nan")] * 3, ["sparse", "light", "sparse"])[2]


@pytest.mark.parametrize("law, scales", [("gauss", "zipf"), ("t(1.5)", "lognormal")])
def test_rank_source_reads_the_known_law(law, scales):
    """The rank source (two processes under DDP, gloo): each rank's gradient minus the all-reduced mean is a
    difference of independent draws of the law, which keeps its truth. One seed per case: two spawns each.

    One seed's reading, six windows pooled, spreads by about 7-9% around the truth (21 seeds: every law in its
    class, power-law medians within 6%: docs/estimators.md), so one seed per case."""
    readings = [calibration.reading(run_source(law, scales, "rank", seed), "rank") for seed in range(1)]
    median, verdict, ok = calibration.judge(law, [a for a, _ in readings], [v for _, v in readings])
    assert ok, (law, scales, median, verdict, readings)
