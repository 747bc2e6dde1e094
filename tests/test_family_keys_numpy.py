"""Every ``adam/``, ``shadow*/``, ``update/``, ``lion/`` and ``muon/`` record key against an independent float64
NumPy recomputation (tests/denominator_reference.py), for AdamW, Lion, Muon (``torch.optim.Muon``, alone and as the
Muon half of ``muon_with_adamw``) and SGD, with and without gradient accumulation and the noise probe.

The model's loss is ``(P * xi).sum() + (W * zeta).sum()``, so its gradients are draws the test makes (Gaussian
with lognormal coordinate scales, and large spikes at chosen steps and coordinates that open denominator
episodes). ``sample_size`` equals every tensor's size, so every coordinate is sampled once and the references need
no sample index. A step pre-hook and post-hook record what the optimizer saw (``p.grad``, its state) and did (the
parameters before and after); the references follow the definitions of docs/metrics.md on those arrays, without
calling heavytail. Each test also requires every figure to have been a nonzero number in some record (not only
null or 0), and every key of these prefixes in the record to have been compared.

Inventory: the keys of the noise and denominator families (``<p>`` a parameter name; collected from docs/metrics.md,
heavytail/families/ and the records of AdamW, Lion, Muon, Muon+AdamW and SGD runs with and without accumulation
and the probe), and the tests that check each against an independent recomputation:

==========================================================  ====================================================
key                                                         checked by
==========================================================  ====================================================
noise/{hill_alpha,hill_alpha_se,tail_class,active_frac,      test_noise_records.py::test_temporal_noise_keys (also
kurtosis}/<p> (the temporal source)                         C and torch paths, the sparse verdict),
                                                            ::test_microbatch_noise_keys, ::test_a_group_pools_*
noise/microbatch_{hill_alpha,hill_alpha_se,tail_class,       test_noise_records.py::test_microbatch_noise_keys
active_frac,kurtosis}/<p> (under gradient accumulation)
noise/rank_{...}/<p> (DDP only)                             test_distributed.py::test_rank_noise_of_four_ranks_*
probe/{hill_alpha,hill_alpha_se,tail_class,active_frac,      test_noise_records.py::test_probe_keys (it requires
hill_alpha_2x,tail_class_2x,hill_alpha_coord,stable_alpha,   every probe/ key to be compared); hill_alpha_gauss
kurtosis,moment_slope_p1,moment_intercept_p1,                is a Monte Carlo figure: against an independent
moment_slope_p1.5,moment_intercept_p1.5,resolved_frac,       simulation, within 2%; test_probe.py: grad_norm's
grad_norm,micro_batches,batch_size,hill_alpha_gauss}/<p>     per-mini-batch norms
adam/{ratio_max,ratio_p99,spike_frac}/<p>                   here; on TinyNet's sampled coordinates:
                                                            test_denominators.py (Muon+AdamW, Adafactor),
                                                            test_monitor.py (AdamW state; sample budget),
                                                            test_first_hour.py (the warm-up)
adam/{memory_events,memory_steps,memory_event_r,             here (many events, overlapping episodes and
memory_event_r_max,event_update_ratio,memory_damping}/<p>    windows); test_denominators.py (one event; TinyNet)
shadow<b>/{ratio_max,spike_frac}/<p>, every b in             here (shadow999 and shadow95 by default, and other
shadow_betas                                                betas), for every optimizer; test_denominators.py
shadow<b>/{memory_events,memory_steps,memory_event_r,        here (the first shadow only, as documented);
memory_event_r_max,event_update_ratio,memory_damping}/<p>    test_denominators.py
update/rms_ratio/<p>                                        here, for every optimizer; test_denominators.py
lion/sign_flip_frac/<p>                                     here; test_denominators.py (TinyNet)
muon/{sv_cond,sv_max_median}/<p>                            here; test_denominators.py (TinyNet's fc1)
==========================================================  ====================================================
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import heavytail as ht
from heavytail.optim import Lion, muon_with_adamw
from tests import denominator_reference as ref
from tests.conftest import read_records

ROWS, COLS = 8, 12
N = ROWS * COLS  # coordinates of each tensor: every one is sampled


class TwoTensors(nn.Module):
    """``P`` (a vector: AdamW's half under Muon+AdamW) and ``W`` (a matrix: Muon's); loss (P xi).sum() + (W zeta).sum()."""

    def __init__(self, names: tuple[str, ...]) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(7)
        for name in names:
            shape = (N,) if name == "P" else (ROWS, COLS)
            self.register_parameter(name, nn.Parameter(0.1 * torch.randn(shape, generator=gen)))

    def forward(self, draws: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum((getattr(self, name) * x).sum() for name, x in draws.items())


def _draws(steps: int, micro: int, names: tuple[str, ...], spike: float, first_spike: int, seed: int) -> list:
    """Per step and micro-batch, the gradient of each tensor: Gaussian times lognormal coordinate scales, and
    ``spike`` times that at about 4% of the (step, coordinate) pairs from step ``first_spike`` on."""
    rng = np.random.default_rng(seed)
    out = []
    scales = {n: np.exp(rng.standard_normal(N)) for n in names}
    for t in range(1, steps + 1):
        step = []
        for _ in range(micro):
            draw = {}
            for n in names:
                x = rng.standard_normal(N) * scales[n]
                if t >= first_spike:
                    x = np.where(rng.random(N) < 0.04 / micro, spike * x, x)
                draw[n] = torch.from_numpy(x.reshape((N,) if n == "P" else (ROWS, COLS))).float()
            step.append(draw)
        out.append(step)
    return out


def _run(tmp_path, make_opt, names, *, steps, every, micro=1, spike=20.0, first_spike=1, seed=0, probe=False, **config):
    """Train on the drawn gradients; with ``probe``, the noise probe runs at every checkpoint on a held batch of
    32 more draws (its backward passes must leave every figure here untouched)."""
    model = TwoTensors(names)
    opt = make_opt(model)
    data = _draws(steps, micro, names, spike, first_spike, seed)
    with ht.Monitor(model, opt, every=every, log_dir=tmp_path, sample_size=N, probe_every=int(probe), **config) as mon:
        assert mon.sample_size == N and all((row == torch.arange(N)).all() for row in mon._sample_index)
        if probe:
            held = {n: torch.stack([step[0][n] for step in _draws(32, 1, names, 1.0, 1, seed + 1)]) for n in names}
            mon.set_probe(lambda m, batch: m({n: x.mean(dim=0) for n, x in batch.items()}), held, micro_batches=32)
        trace = ref.record_steps(model, opt)
        for step in data:
            for draw in step:
                loss = model(draw) / 1.0
                loss.backward()
                mon.observe_loss(loss)
            opt.step()
            opt.zero_grad(set_to_none=True)
    records = read_records(tmp_path)
    assert len(records) == steps // every and len(trace.after) == steps
    assert all(("probe/hill_alpha/" + names[0] in r["metrics"]) == probe for r in records)
    return trace, [r["metrics"] for r in records]


# ----------------------------------------------------------------------------------------------- the tests

STEPS, EVERY = 60, 15
CONFIG = dict(ratio_warmup=3, spike_threshold=30.0, shadow_betas=(0.8, 0.95), memory_window=4)
"""Short denominators (beta2 0.8, a cut at r^2 = 30) so that episodes open and close within the run."""

OPTIMIZERS = {
    "adamw": (("P", "W"), lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2, betas=(0.9, 0.8), weight_decay=0.1)),
    "sgd": (("P", "W"), lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, weight_decay=0.01)),
    "lion": (("P", "W"), lambda m: Lion(m.parameters(), lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1)),
    "muon": (("W",), lambda m: torch.optim.Muon([m.W], lr=0.02, momentum=0.95)),
    "muon+adamw": (("P", "W"), lambda m: muon_with_adamw(m, lr=0.02, adamw_lr=1e-2, adamw_betas=(0.9, 0.8))),
}


@pytest.mark.parametrize(
    "optimizer, micro, kernel, probe",
    [
        ("adamw", 1, "auto", False),
        ("adamw", 1, "torch", False),
        ("adamw", 2, "auto", True),  # gradient accumulation, and the probe's backward passes at the checkpoints
        ("sgd", 1, "auto", True),
        ("lion", 1, "auto", False),
        ("lion", 2, "torch", False),
        ("muon", 1, "auto", False),
        ("muon+adamw", 1, "auto", False),
    ],
)
def test_denominator_and_update_keys_against_numpy(tmp_path, optimizer, micro, kernel, probe):
    names, make_opt = OPTIMIZERS[optimizer]
    trace, metrics = _run(
        tmp_path, make_opt, names, steps=STEPS, every=EVERY, micro=micro, kernel=kernel, probe=probe, **CONFIG
    )
    spans = ref.intervals(STEPS, EVERY)
    common = dict(threshold=CONFIG["spike_threshold"], window=CONFIG["memory_window"])
    for name in names:
        expected = ref.shadow_figures(trace, name, spans, betas=CONFIG["shadow_betas"], warmup=3, **common)
        parts = [ref.update_figures(trace, name, spans)]
        if optimizer in ("adamw", "muon+adamw"):  # Muon+AdamW: W, Muon's, has no denominator (null adam/ keys)
            parts.append(ref.adam_figures(trace, name, spans, beta2=0.8, eps=1e-8, warmup=3, **common))
        else:
            assert not any(k.startswith("adam/") for k in metrics[-1])
        if optimizer == "lion":
            parts.append(ref.lion_figures(trace, name, spans, beta1=0.9))
        if optimizer.startswith("muon") and name == "W":
            parts.append(ref.muon_figures(trace, name, spans, momentum=0.95))
        for part in parts:
            for row, extra in zip(expected, part):
                row.update(extra)
        # float32 singular values of a 8 x 12 matrix: 1e-4; the rest 1e-5
        numbers = ref.check_records(metrics, expected, name, rel=1e-4 if optimizer.startswith("muon") else 1e-5)
        # Every figure was a number somewhere (episodes opened and closed, spikes were counted), not only null.
        null = {k for k in expected[-1] if k.startswith("adam/")} if (optimizer, name) == ("muon+adamw", "W") else set()
        assert numbers == set(expected[-1]) - null
        # Every key of these prefixes the record holds for this tensor was checked.
        recorded = {k.rsplit("/", 1)[0] for k in metrics[-1] if k.endswith(f"/{name}")}
        assert {k for k in recorded if k.startswith(("adam/", "shadow", "update/", "lion/", "muon/"))} == set(
            expected[-1]
        )


def test_default_shadow_and_adam_keys_against_numpy(tmp_path):
    """The default configuration (AdamW's beta2 = 0.999, shadow999 and shadow95, the cut r^2 > 5000, ratio_warmup
    10): large spikes from step 12 on are events; at beta2 = 0.999 their episodes outlast the run (null lengths)."""
    steps, every = 40, 10
    trace, metrics = _run(
        tmp_path,
        lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1),
        ("P", "W"),
        steps=steps,
        every=every,
        spike=300.0,
        first_spike=12,
        memory_window=4,
    )
    spans = ref.intervals(steps, every)
    for name in ("P", "W"):
        expected = ref.shadow_figures(trace, name, spans, betas=(0.999, 0.95), warmup=10, window=4)
        adam = ref.adam_figures(trace, name, spans, beta2=0.999, eps=1e-8, warmup=10, window=4)
        for row, a, u in zip(expected, adam, ref.update_figures(trace, name, spans)):
            row.update(a)
            row.update(u)
        assert math.isnan(expected[0]["adam/ratio_max"])  # steps 1-10: the warm-up
        numbers = ref.check_records(metrics, expected, name)
        assert numbers == {k for k in expected[-1] if not k.endswith("/memory_steps")}
        recorded = {k.rsplit("/", 1)[0] for k in metrics[-1] if k.endswith(f"/{name}")}
        assert {k for k in recorded if k.startswith(("adam/", "shadow", "update/"))} == set(expected[-1])


def test_muon_spread_at_every_step_from_the_first(tmp_path):
    """``every=1``: the first step's matrix is Muon's from buf_0 = 0 (torch.optim.Muon's start), not null."""
    trace, metrics = _run(tmp_path, OPTIMIZERS["muon"][1], ("W",), steps=4, every=1)
    expected = ref.muon_figures(trace, "W", ref.intervals(4, 1), momentum=0.95)
    assert ref.check_records(metrics, expected, "W", rel=1e-4) == {"muon/sv_cond", "muon/sv_max_median"}
