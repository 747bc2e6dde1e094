"""Bad input at attach time is a clear error that names the problem, and a failed attach leaves nothing behind.

tests/test_monitor.py already covers: ``every`` 0 and negative, an unknown backend name, an include pattern matching
nothing, an exclude leaving nothing, an unknown alert rule, ``sample_size`` 0, a model with no trainable
parameters, an optimizer that owns none of the parameters, and attaching twice. This file covers the rest: wrong
types, every ``MonitorConfig`` field's validation naming the field, partial ownership, wrappers, unwritable run
directories, and that a refused attach registers no hook and keeps the model attachable.
"""

from __future__ import annotations

import dataclasses
import math
import re

import pytest
import torch
from torch import nn

import heavytail as ht
from heavytail import MonitorConfig
from tests.reliability import one_intra_op_thread  # noqa: F401 (autouse fixture)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))


def _assert_untouched(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
    for p in model.parameters():
        assert not getattr(p, "_post_accumulate_grad_hooks", None)
        assert not p._backward_hooks
    if optimizer is not None:
        assert not optimizer._optimizer_step_pre_hooks and not optimizer._optimizer_step_post_hooks


# ---------------------------------------------------------------------------------------------- wrong types


@pytest.mark.parametrize(
    "model, got",
    [(object(), "object"), (torch.zeros(3), "Tensor"), ([nn.Parameter(torch.zeros(2))], "list"), (None, "NoneType")],
)
def test_model_must_be_a_module(tmp_path, model, got):
    with pytest.raises(TypeError, match=f"model must be a torch.nn.Module, got {got}"):
        ht.Monitor(model, log_dir=tmp_path)


@pytest.mark.parametrize("optimizer, got", [("adamw", "str"), (object(), "object"), (torch.optim.AdamW, "type")])
def test_optimizer_must_be_an_optimizer(tmp_path, optimizer, got):
    with pytest.raises(TypeError, match=f"optimizer must be a torch.optim.Optimizer, got {got}"):
        ht.Monitor(_model(), optimizer, log_dir=tmp_path)


def test_a_wrapper_around_something_else_is_not_an_optimizer(tmp_path):
    class Wrapper:  # shaped like Accelerate's AcceleratedOptimizer, but wrapping a non-optimizer
        optimizer = "sgd"

    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer, got (Wrapper|str)"):
        ht.Monitor(_model(), Wrapper(), log_dir=tmp_path)


@pytest.mark.parametrize("field", ["include", "exclude"])
@pytest.mark.parametrize("pattern", [3, 3.5, b"0.*", nn.Linear(2, 2), None])
def test_pattern_of_a_wrong_type(tmp_path, field, pattern):
    # A module *instance* where a module type was meant is the likely mistake; bytes and numbers too.
    with pytest.raises(
        TypeError,
        match=r"a pattern must be a glob string, 're:<regex>', a compiled regex or a "
        r"module type, got ",
    ):
        ht.Monitor(_model(), log_dir=tmp_path, **{field: ["0.weight", pattern] if field == "include" else [pattern]})


def test_invalid_regex_names_the_pattern(tmp_path):
    with pytest.raises(ValueError, match=re.escape("invalid regex 're:(weight'")):
        ht.Monitor(_model(), log_dir=tmp_path, include=["re:(weight"])


@pytest.mark.parametrize("backend", [object(), 3, None, print])
def test_backend_that_is_neither_a_name_nor_a_backend(tmp_path, backend):
    with pytest.raises(TypeError, match="is neither a known name nor an object with log\\(\\) and close\\(\\)"):
        ht.Monitor(_model(), log_dir=tmp_path, backends=["jsonl", backend])


# ---------------------------------------------------------------------------------------------- MonitorConfig

# (field, bad value, error type). Every field of MonitorConfig appears here, or in ATTACH_VALIDATED.
CONFIG_CASES = [
    ("every", 2.5, ValueError),
    ("every", True, ValueError),
    ("every", "10", ValueError),
    ("log_dir", 123, ValueError),
    ("run_name", 5, ValueError),
    ("sample_size", -1, ValueError),
    ("sample_size", "256", ValueError),
    ("sample_budget", 0, ValueError),
    ("sample_budget", True, ValueError),
    ("sample_budget", 2.5, ValueError),
    ("noise_window", 0, ValueError),
    ("noise_beta", 1.0, ValueError),
    ("noise_beta", -0.1, ValueError),
    ("noise_beta", math.nan, ValueError),
    ("noise_beta", "0.9", ValueError),
    ("spike_threshold", 0.0, ValueError),
    ("spike_threshold", math.nan, ValueError),
    ("spike_threshold", "big", ValueError),
    ("memory_inflation", 1.0, ValueError),
    ("memory_inflation", math.nan, ValueError),
    ("memory_inflation", "2", ValueError),
    ("memory_window", -1, ValueError),
    ("memory_window", 2.5, ValueError),
    ("hill_plot_unit", 3, ValueError),
    ("shadow_betas", (1.0,), ValueError),
    ("shadow_betas", (0.0, 0.9), ValueError),
    ("shadow_betas", ("a",), ValueError),
    ("min_tail_samples", 0, ValueError),
    ("tail_top_max", 0, ValueError),
    ("seed", "0", ValueError),
    ("seed", 1.5, ValueError),
    ("stats_dtype", torch.float16, ValueError),
    ("stats_dtype", "float64", ValueError),
    ("chunk_numel", 0, ValueError),
    ("flight_steps", 0, ValueError),
    ("alerts", ("bogus",), ValueError),
    ("alerts", 3, ValueError),
    ("alert_cooldown", -1, ValueError),
    ("alert_cooldown", 1.5, ValueError),
    ("tail_alpha_threshold", 0.0, ValueError),
    ("tail_alpha_threshold", math.nan, ValueError),
    ("hidden_spike_frac", 1.0, ValueError),
    ("hidden_spike_frac", -0.1, ValueError),
    ("hidden_spike_frac", None, ValueError),
    ("spike_z", 0.0, ValueError),
    ("spike_z", "3", ValueError),
    ("spike_warmup", 1, ValueError),
    ("false_alarm_rate", 0.0, ValueError),
    ("false_alarm_rate", 1.5, ValueError),
    ("false_alarm_rate", "1e-4", ValueError),
    ("track_gns", "yes", ValueError),
    ("gns_beta", 1.5, ValueError),
    ("gns_beta", "0.99", ValueError),
    ("batch_size", 0, ValueError),
    ("batch_size", 8.0, ValueError),
    ("batch_size", True, ValueError),
    ("skip_spikes", 1, ValueError),
    ("spike_warmup", 2.5, ValueError),
    ("track_preclip", "yes", ValueError),
    ("probe_every", -1, ValueError),
    ("probe_every", 1.5, ValueError),
    ("extra", [1, 2], ValueError),
    ("group_by", 3, ValueError),
    ("group_by", "blocks.(", ValueError),
    ("kernel", "cuda", ValueError),
    ("ratio_warmup", -1, ValueError),
    ("ratio_warmup", 2.5, ValueError),
    ("resume", "yes", ValueError),
    ("overwrite", 1, ValueError),
]
# Validated when the monitor attaches, with the errors tested above (a backend or pattern of a wrong type).
ATTACH_VALIDATED = {"backends", "include", "exclude"}


@pytest.mark.parametrize(
    "field, value, error",
    [pytest.param(f, v, e, id=f"{f}={v!r}") for f, v, e in CONFIG_CASES],
)
def test_config_field_validation_names_the_field(field, value, error):
    with pytest.raises(error, match=rf"MonitorConfig\.{field}\b"):
        MonitorConfig(**{field: value})


def test_every_config_field_has_a_validation_case():
    fields = {f.name for f in dataclasses.fields(MonitorConfig)}
    covered = {case[0] for case in CONFIG_CASES} | ATTACH_VALIDATED
    assert fields - covered == set(), "add a bad-value case for each new MonitorConfig field"
    assert covered - fields == set()


def test_config_defaults_are_valid_and_overrides_are_revalidated(tmp_path):
    config = MonitorConfig(log_dir=tmp_path)
    with pytest.raises(ValueError, match=r"MonitorConfig\.every must be a positive integer, got 0"):
        ht.Monitor(_model(), config=config, every=0)


# ---------------------------------------------------------------------------------------------- ownership, twice


def test_optimizer_owning_some_parameters_names_the_first_missing(tmp_path):
    model = _model()
    optimizer = torch.optim.SGD(model[0].parameters(), lr=0.1)
    with pytest.raises(ValueError, match=re.escape("does not own the watched parameter '2.weight' (and 1 more)")):
        ht.Monitor(model, optimizer, log_dir=tmp_path)
    # What the error suggests works: watch only what the optimizer trains.
    ht.Monitor(model, optimizer, log_dir=tmp_path / "ok", include=["0.*"]).close()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.compile imports torch.jit
def test_attaching_twice_through_a_compile_wrapper(tmp_path):
    model = _model()
    with ht.Monitor(model, log_dir=tmp_path / "a"):
        with pytest.raises(RuntimeError, match="already attached to this Sequential; close\\(\\) it first"):
            ht.Monitor(torch.compile(model), log_dir=tmp_path / "b")


def test_log_dir_that_cannot_be_a_directory_fails_at_attach_naming_the_path(tmp_path):
    # Root-proof stand-in for an unwritable directory: a path below a regular file.
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("x")
    with pytest.raises(OSError, match=re.escape(str(blocker / "run"))):
        ht.Monitor(_model(), log_dir=blocker / "run")


def test_read_only_log_dir_fails_at_attach_naming_the_file(tmp_path):
    run = tmp_path / "ro"
    run.mkdir()
    run.chmod(0o500)
    try:
        probe = run / "probe"
        try:
            probe.write_text("x")
        except PermissionError:
            pass
        else:
            probe.unlink()
            pytest.skip("permission bits do not stop this user (root): see test_backend_faults for the simulation")
        with pytest.raises(PermissionError, match="metrics.jsonl"):
            ht.Monitor(_model(), log_dir=run)
    finally:
        run.chmod(0o700)


# ---------------------------------------------------------------------------------------------- nothing left behind


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"backends": ["jsonl", "nope"]}, ValueError),
        ({"backends": ["jsonl", object()]}, TypeError),
        ({"include": ["nothing*"]}, ValueError),
        ({"include": [3]}, TypeError),
        ({"alerts": ["bogus"]}, ValueError),
        ({"every": -1}, ValueError),
        ({"wrong_optimizer": True}, ValueError),
    ],
)
def test_a_refused_attach_leaves_no_hook_and_the_model_attachable(tmp_path, kwargs, error):
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters())
    if kwargs.pop("wrong_optimizer", False):
        attach_optimizer = torch.optim.AdamW(nn.Linear(2, 2).parameters())
    else:
        attach_optimizer = optimizer
    with pytest.raises(error):
        ht.Monitor(model, attach_optimizer, log_dir=tmp_path / "bad", **kwargs)
    _assert_untouched(model, optimizer)
    with ht.Monitor(model, optimizer, log_dir=tmp_path / "good", every=1) as mon:
        x = torch.randn(3, 4)
        model(x).sum().backward()
        optimizer.step()
        assert mon.step_count == 1
    _assert_untouched(model, optimizer)
