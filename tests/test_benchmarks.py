"""The performance benchmarks run end to end with tiny settings, so they never rot (figures are not checked)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
NUMBER = r"-?\d+\.\d+"


def run(script: str, *args: str, expect_ok: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=BENCHMARKS.parent,
    )
    if expect_ok:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def last_line(proc: subprocess.CompletedProcess) -> str:
    return proc.stdout.strip().splitlines()[-1]


def test_overhead_prints_every_variant_and_the_final_line():
    proc = run(
        "overhead.py",
        "--model",
        "smoke",
        "--steps",
        "2",
        "--every",
        "2",
        "--rounds",
        "2",
        "--warmup",
        "1",
        "--threads",
        "1",
    )
    assert re.fullmatch(
        rf"overhead_pct={NUMBER} floor_pct={NUMBER} naive_pct={NUMBER} histogram_pct={NUMBER}", last_line(proc)
    ), last_line(proc)
    for variant in ("baseline", "monitored", "floor", "naive", "histogram"):
        assert re.search(rf"^{variant}\s", proc.stdout, re.M), variant
    assert "2 checkpoints in all" in proc.stdout  # 2 rounds x 2 steps at every=2


def test_overhead_cpu_clock_and_a_subset_of_variants():
    proc = run(
        "overhead.py",
        "--model",
        "smoke",
        "--steps",
        "1",
        "--every",
        "1",
        "--rounds",
        "1",
        "--warmup",
        "0",
        "--variants",
        "monitored",
        "--clock",
        "cpu",
    )
    assert re.fullmatch(rf"overhead_pct={NUMBER} floor_pct=nan naive_pct=nan histogram_pct=nan", last_line(proc))


@pytest.mark.parametrize(
    "args, message",
    [
        (["--steps", "3", "--every", "2"], "multiple of --every"),
        (["--model", "gpt2-small"], "--device cuda"),
    ],
)
def test_overhead_refuses_settings_it_cannot_time_honestly(args, message):
    proc = run("overhead.py", *args, expect_ok=False)
    assert proc.returncode == 2 and message in proc.stderr


def test_scaling_prints_both_sweeps():
    proc = run(
        "scaling.py",
        "--counts",
        "3,30",
        "--total",
        "6000",
        "--base",
        "2000",
        "--size-count",
        "3",
        "--steps",
        "2",
        "--checkpoints",
        "1",
        "--threads",
        "1",
        "--profile",
        "30",
    )
    keys = ["tensors_3_ms", "tensors_30_ms", "size_1x_ms", "size_4x_ms", "size_16x_ms"]
    assert re.fullmatch(" ".join(rf"{k}={NUMBER}" for k in keys), last_line(proc)), last_line(proc)
    assert "where a streaming step's time goes at 30 tensors" in proc.stdout


def test_memory_names_the_state_and_prints_the_final_line():
    proc = run("memory.py", "--models", "smoke")
    assert re.fullmatch(rf"extra_bytes=\d+ param_bytes=\d+ extra_pct={NUMBER[2:]}", last_line(proc)), last_line(proc)
    assert "families.shadow" in proc.stdout and "transient peak of the hooks" in proc.stdout


@pytest.mark.parametrize(
    "sample_code, part", [("kernel", "sample estimators: cpu_pass"), ("torch", "sample estimators: torch code")]
)
def test_step_parts_prints_the_breakdown_and_the_final_line(sample_code, part):
    proc = run(
        "step_parts.py",
        "--model",
        "smoke",
        "--steps",
        "4",
        "--every",
        "2",
        "--warmup",
        "1",
        "--threads",
        "1",
        "--sample-code",
        sample_code,
    )
    assert "_step_view" in proc.stdout and "samples.update" in proc.stdout and "denominators" in proc.stdout
    if sample_code == "torch" or "sample estimators: cpu_pass" in proc.stdout:  # the kernel needs a C compiler
        assert part in proc.stdout
    match = re.fullmatch(rf"hooks_ms={NUMBER} pass_ms=({NUMBER}|nan) ops=(\d+)", last_line(proc))
    assert match and int(match.group(2)) > 0


def test_device_check_script_names_what_exists_and_parses():
    """The GPU check runs only where a GPU is lent: here, that it parses and that every file it names exists."""
    script = BENCHMARKS / "device_check.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    named = set(re.findall(r"\b((?:tests|benchmarks)/[\w/]+\.py)\b", text))
    assert {"benchmarks/overhead.py", "tests/test_no_sync.py", "tests/estimators/test_triton_samples.py"} <= named
    missing = [p for p in named if not (BENCHMARKS.parent / p).exists()]
    assert not missing, missing


def test_kernel_report_compiles_each_triton_kernel_ahead_of_time():
    """One specialization of every Triton kernel for sm_90, on this CPU-only machine (skipped where Triton or its
    ptxas is missing): the figures' table and the final line."""
    pytest.importorskip("triton")
    proc = run("kernel_report.py", "--quick", expect_ok=False)
    if proc.returncode == 2:
        pytest.skip(proc.stderr.strip())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for kernel in ("_stats_kernel", "_samples_kernel", "_sample_step_kernel", "_update_kernel"):
        assert re.search(rf"^{kernel} .* sm_90 +\d+ +\d+/\d+ +\d+( +\d+){{5}}$", proc.stdout, re.M), kernel
    match = re.fullmatch(r"max_regs=(\d+) kernels_with_spills=(\d+) kernels=4", last_line(proc))
    assert match, last_line(proc)


@pytest.mark.parametrize(
    "extra", [(), ("--rate", "1e-3", "--set", "warmup=50"), ("--rate", "1e-3", "--calibrated", "--kind", "gradnorm")]
)
def test_spike_detection_prints_the_final_line(extra):
    proc = run("spike_detection.py", "--traces", "4", "--steps", "600", "--first-spike", "100", *extra)
    assert re.fullmatch(rf"recall={NUMBER} false_per_10k={NUMBER}", last_line(proc)), last_line(proc)
    assert ("calibrated to rate=0.001" in proc.stdout) == bool(extra)
    rules = re.findall(
        rf"spike.detect at rate=0.001, (spike rule|drift rule|both): recall={NUMBER} false alerts/10\^4 steps={NUMBER}",
        proc.stdout,
    )
    assert rules == (["spike rule", "drift rule", "both"] if "--calibrated" in extra else []), proc.stdout
    if "--calibrated" in extra:  # the monitor runs no drift rule on a gradient norm
        assert re.search(r"drift rule: recall=0\.0000 false alerts/10\^4 steps=0\.000 \(false flags 0 ", proc.stdout)


def test_overhead_with_gradient_accumulation():
    proc = run(
        "overhead.py",
        "--model",
        "smoke",
        "--steps",
        "1",
        "--every",
        "1",
        "--rounds",
        "1",
        "--warmup",
        "1",
        "--variants",
        "monitored",
        "--accumulate",
        "2",
    )
    assert "2 micro-batches a step" in proc.stdout
    assert re.fullmatch(rf"overhead_pct={NUMBER} floor_pct=nan naive_pct=nan histogram_pct=nan", last_line(proc))


def test_critical_batch_fits_the_sweep_and_reads_the_noise_scale(tmp_path):
    svg = tmp_path / "cb.svg"
    proc = run("critical_batch.py", "--batches", "4,8", "--budget", "32", "--window", "8", "--svg", str(svg))
    assert re.search(r"^fit S = S_min \(1 \+ B_crit / B\): S_min \S+ steps, B_crit \S+ sequences$", proc.stdout, re.M)
    assert svg.read_text().startswith("<svg") and "B_simple at B = 8" in svg.read_text()


def test_spike_detection_table_prints_every_condition_and_the_summary_line():
    proc = run("spike_detection.py", "--quick")
    for stream in ("loss", "gradnorm"):
        for noise in ("gauss", "t3", "t2.5"):
            for level in ("1%", "2%", "5%"):
                assert re.search(rf"^{stream} +{re.escape(noise)} +{level} ", proc.stdout, re.M), (stream, noise, level)
    assert re.fullmatch(
        rf"calibrated: conditions_within_0.02_of_oracle=\d+/18 worst_recall_gap={NUMBER} "
        rf"worst_false_per_10k={NUMBER} ramps_before_half={NUMBER} conditions_within_0.02_of_law_aware=\d+/18 "
        rf"worst_gap_to_law_aware={NUMBER} worst_pooled_false_per_10k={NUMBER} "
        rf"worst_gap_to_law_aware_at_same_false={NUMBER}",
        last_line(proc),
    ), last_line(proc)
    assert re.search(
        rf"^false alerts per 10\^4 steps pooled .*: calibrated {NUMBER}-{NUMBER}, law-aware {NUMBER}-{NUMBER}$",
        proc.stdout,
        re.M,
    )


def test_spike_detection_table_filters_columns_and_rows_with_the_full_tables_cells():
    full = run("spike_detection.py", "--quick")
    part = run("spike_detection.py", "--quick", "--detectors", "calibrated,zclip", "--noises", "t3")
    header = next(line for line in part.stdout.splitlines() if line.startswith("stream") and "oracle" in line)
    assert header.split()[4:] == ["law-aware", "calibrated", "zclip"]
    rows = [line for line in part.stdout.splitlines() if re.match(r"^(loss|gradnorm) +\S+ +\d+% +\S+ +\S+ / ", line)]
    assert [line.split()[1] for line in rows] == ["t3"] * 6
    # A condition's traces do not depend on which others run: the law-aware and calibrated cells are the full table's.
    for line in rows:
        stream, noise, level, oracle, law, _, law_false, recall, _, false = line.split()[:10]
        match = re.search(
            rf"^{stream} +{noise} +{level} +{oracle} +{law} / +{law_false} +{recall} / +{false} ", full.stdout, re.M
        )
        assert match, line
    assert re.fullmatch(r"calibrated: conditions_within_0.02_of_oracle=\d+/6 .*", last_line(part)), last_line(part)
    bad = run("spike_detection.py", "--quick", "--detectors", "nope", expect_ok=False)
    assert bad.returncode != 0 and "--detectors: no detector 'nope'" in bad.stderr


def test_skip_spikes_benchmark_compares_the_two_runs():
    proc = run("skip_spikes.py", "--size", "tiny", "--steps", "160", "--spike-at", "100")
    rows = {m.group(1): m for m in re.finditer(r"^ +(False|True) .* +(\d+)  \[(.*)\]", proc.stdout, re.M)}
    assert set(rows) == {"False", "True"}
    # The garbage batch is flagged on the loss and skipped only with the option.
    assert (rows["False"].group(2), rows["True"].group(2)) == ("0", "1")
    assert "(101, 'loss_spike', 1)" in rows["True"].group(3) and "(101, 'loss_spike', 0)" in rows["False"].group(3)
    assert re.fullmatch(rf"held_out_loss_50_after: without={NUMBER} with_skip={NUMBER}", last_line(proc))


def test_fault_forensics_prints_every_fault():
    proc = run("fault_forensics.py", "--size", "tiny", "--steps", "150", "--at", "100")
    for fault in ("lr_x10", "shuffled_batch", "repeated_token_batch", "nan_layer", "zeroed_layer"):
        assert re.search(rf"^{fault} ", proc.stdout, re.M), fault
    # NaN written into a layer's gradient is reported at its own step, on that layer.
    assert re.search(r"^nan_layer +\+1 nonfinite_grad, blocks\.0\.mlp\.fc\.weight", proc.stdout, re.M)
    assert re.fullmatch(r"faults_where_a_layer_alert_came_before_the_loss=\d/5", last_line(proc))


def test_profile_families_prints_every_family_and_the_final_line():
    proc = run(
        "profile_families.py", "--model", "smoke", "--steps", "4", "--every", "2", "--warmup", "1", "--threads", "1"
    )
    for line in ("moments", "memory", "spike detect", "alert rules", "step view", "packer", "hooks"):
        assert re.search(rf"^{line}\s+{NUMBER}", proc.stdout, re.M), proc.stdout
    assert re.fullmatch(rf"profile( \w+={NUMBER})+", last_line(proc)), last_line(proc)


def test_calibration_pure_model_prints_each_source_and_the_worst_bias():
    proc = run("calibration.py", "--pure", "--seeds", "5", "--laws", "t(3),gauss")
    lines = proc.stdout.strip().splitlines()
    assert lines[1].split() == ["law", "temporal", "microbatch", "rank"]
    row = lines[2].split()
    assert row[0] == "t(3)" and len(lines) == 4  # gauss has no alpha to compare: left out
    biases = [float(row[i]) for i in (1, 6, 11)]
    assert all(abs(b) < 0.5 for b in biases), row
    assert re.fullmatch(rf"worst_pure_bias={NUMBER}", last_line(proc))
    assert float(last_line(proc).split("=")[1]) == max(abs(b) for b in biases)


def test_alert_example_shows_both_injected_faults():
    """docs/alerts.md's worked example, shortened: the garbage batch is a loss spike at its step, the inf entries a
    ``nonfinite_grad`` alert whose flight record has that layer's cell at that step as its only null."""
    proc = run("alert_example.py", "--steps", "110", "--garbage-at", "80", "--inf-at", "95")
    assert re.search(r"^step  80 loss_spike ", proc.stdout, re.M), proc.stdout
    assert re.search(r"^step  95 nonfinite_grad ", proc.stdout, re.M), proc.stdout
    assert "cells with a null: [(95, 'blocks.3.mlp.proj.weight', " in proc.stdout, proc.stdout
    assert re.search(rf"^step 80 loss: observed {NUMBER}, forecast", proc.stdout, re.M), proc.stdout


def test_calibration_table_prints_each_row_its_spread_and_the_final_line():
    proc = run("calibration.py", "--seeds", "3", "--laws", "t(3),gauss", "--scales", "equal", "--sources", "temporal")
    lines = proc.stdout.strip().splitlines()
    assert lines[0].split()[:8] == ["law", "scales", "source", "alpha", "verdict", "truth", "ok", "spread"]
    power, light = lines[1].split(), lines[2].split()
    readings = [float(cell[:-1]) for cell in power[8:]]
    spread = float(power[7].rstrip("%")) / 100
    assert spread == pytest.approx(sorted(abs(a / 3 - 1) for a in readings)[1], abs=6e-3)  # the median of three
    assert light[7] == "-"  # no truth to compare a light law's alpha with
    assert re.fullmatch(r"calibrated=\d/2", last_line(proc)), last_line(proc)


def _spike_detection_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("spike_detection", BENCHMARKS / "spike_detection.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("df", [None, 3.0, 2.5])
def test_the_law_aware_column_flags_healthy_noise_at_exactly_the_requested_rate(df):
    # The table's law-aware detector knows the curve and the noise law: on traces of healthy noise its flags come
    # at the requested rate (4,000 expected here, a standard deviation of 63).
    import numpy as np

    sd = _spike_detection_module()
    rng = np.random.default_rng(0)
    e = rng.standard_normal((4, 10**6)) if df is None else rng.standard_t(df, (4, 10**6)) / np.sqrt(df / (df - 2))
    curve = np.full(e.shape, 2.5)
    flags = sd.law_aware_flags(curve * np.exp(0.05 * e), curve, df, 0.05, 1e-3)
    assert abs(int(flags.sum()) - 4000) < 4 * 63
    assert sd.law_quantile(None, 1e-3) == pytest.approx(3.0902, abs=1e-4)
