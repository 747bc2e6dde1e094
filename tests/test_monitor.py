"""The monitor end to end on CPU: records, exactness against NumPy/SciPy, hooks, state, attach-time errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import scipy.stats
import torch
from torch import nn

import heavytail as ht
from heavytail.estimators import hill
from heavytail.estimators.kurtosis import gaussian_kurtosis_quantile
from tests import denominator_reference
from tests.conftest import TinyNet, read_records, tiny_batch, train


def _capture_grads(optimizer, names, params):
    """Record every gradient the optimizer is about to consume (registered after the monitor's hook)."""
    seen = []

    def hook(opt, args, kwargs):
        seen.append({n: p.grad.detach().clone() for n, p in zip(names, params) if p.grad is not None})

    optimizer.register_step_pre_hook(hook)
    return seen


def test_every_one_matches_numpy_and_scipy(tmp_path, tiny_model):
    opt = torch.optim.AdamW(tiny_model.parameters(), lr=1e-3)
    names = [n for n, _ in tiny_model.named_parameters()]
    params = list(tiny_model.parameters())
    with ht.Monitor(tiny_model, opt, every=1, log_dir=tmp_path) as mon:
        grads = _capture_grads(opt, names, params)
        train(tiny_model, opt, mon, steps=4)
    records = read_records(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for record, step_grads in zip(records, grads):
        m = record["metrics"]
        total = 0.0
        for name, g in step_grads.items():
            x = g.double().numpy().reshape(-1)
            total += float((x**2).sum())
            assert m[f"grad/norm/{name}"] == pytest.approx(np.linalg.norm(x), rel=1e-9)
            expected_kurtosis = scipy.stats.kurtosis(x)
            if np.isfinite(expected_kurtosis):
                assert m[f"grad/kurtosis/{name}"] == pytest.approx(expected_kurtosis, rel=1e-6, abs=1e-9)
            else:  # a one-entry tensor: NaN, written as null
                assert m[f"grad/kurtosis/{name}"] is None
            assert m[f"grad/max/{name}"] == pytest.approx(np.abs(x).max(), rel=1e-9)
            if x.size >= 1000:
                expected = hill(torch.from_numpy(x))
                if math.isfinite(float(expected.alpha)):
                    assert m[f"grad/hill_alpha/{name}"] == pytest.approx(float(expected.alpha), rel=1e-4)
                    assert m[f"grad/hill_alpha_se/{name}"] == pytest.approx(float(expected.se), rel=1e-4)
                else:  # no power-law tail: alpha = inf, written as null
                    assert m[f"grad/hill_alpha/{name}"] is None
                assert m[f"grad/hill_k/{name}"] == float(expected.k)
            else:
                assert m[f"grad/hill_alpha/{name}"] is None  # too few entries: documented NaN
        assert m["grad/norm"] == pytest.approx(math.sqrt(total), rel=1e-9)
        assert math.isfinite(m["loss"])


def test_adam_ratio_matches_adamw_state(tmp_path, tiny_model):
    opt = torch.optim.AdamW(tiny_model.parameters(), lr=1e-3, betas=(0.9, 0.99), eps=1e-8)
    named = list(tiny_model.named_parameters())
    expected = []

    def hook(o, args, kwargs):
        row = {}
        for name, p in named:
            state = o.state.get(p)
            if not state:
                continue
            bc = 1 - 0.99 ** float(state["step"])
            v = state["exp_avg_sq"].double()
            r = p.grad.double().abs() / ((v / bc).sqrt() + 1e-8)
            r = torch.where(v > 0, r, 0.0)  # never-seen coordinates are no spike (documented)
            row[name] = (float(r.max()), float((r**2 > 5000).double().mean()))
        expected.append(row)

    with ht.Monitor(tiny_model, opt, every=1, log_dir=tmp_path, ratio_warmup=0) as mon:
        opt.register_step_pre_hook(hook)
        train(tiny_model, opt, mon, steps=3)
    records = read_records(tmp_path)
    assert records[0]["metrics"]["adam/ratio_max/fc1.weight"] is None  # no denominator before the first step
    for record, row in zip(records[1:], expected[1:]):
        for name, (rmax, frac) in row.items():
            assert record["metrics"][f"adam/ratio_max/{name}"] == pytest.approx(rmax, rel=1e-9)
            assert record["metrics"][f"adam/spike_frac/{name}"] == pytest.approx(frac, abs=1e-12)
            assert record["metrics"][f"adam/ratio_p99/{name}"] <= rmax + 1e-9


def test_records_every_n_steps_with_the_documented_keys(tmp_path, tiny_model):
    opt = torch.optim.AdamW(tiny_model.parameters(), lr=1e-3)
    with ht.Monitor(tiny_model, opt, every=10, log_dir=tmp_path) as mon:
        train(tiny_model, opt, mon, steps=25)
    records = read_records(tmp_path)
    assert [r["step"] for r in records] == [10, 20, 25]  # close() flushes the partial interval
    m = records[1]["metrics"]
    for name, _ in tiny_model.named_parameters():
        for family in (
            "grad/norm",
            "grad/kurtosis",
            "grad/hill_alpha",
            "grad/hill_alpha_se",
            "noise/hill_alpha",
            "noise/kurtosis",
            "noise/tail_class",
            "noise/active_frac",
            "adam/ratio_max",
            "adam/ratio_p99",
            "adam/spike_frac",
        ):
            assert f"{family}/{name}" in m
    assert m["steps"] == 10
    assert set(records[1]) == {"step", "wall_time", "metrics"}
    big = "fc1.weight"
    numel = dict(tiny_model.named_parameters())[big].numel()
    assert m[f"grad/kurtosis_gauss/{big}"] == pytest.approx(gaussian_kurtosis_quantile(numel), rel=1e-9)
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["every"] == 10 and meta["optimizer"] == "AdamW"
    assert [p["name"] for p in meta["params"]] == [n for n, _ in tiny_model.named_parameters()]


def test_interval_kurtosis_pools_the_intervals_entries(tmp_path, tiny_model):
    opt = torch.optim.SGD(tiny_model.parameters(), lr=1e-2)
    names = [n for n, _ in tiny_model.named_parameters()]
    with ht.Monitor(tiny_model, opt, every=3, log_dir=tmp_path) as mon:
        grads = _capture_grads(opt, names, list(tiny_model.parameters()))
        train(tiny_model, opt, mon, steps=3)
    m = read_records(tmp_path)[0]["metrics"]
    pooled = np.concatenate([g["fc2.weight"].double().numpy().reshape(-1) for g in grads])
    assert m["grad/kurtosis/fc2.weight"] == pytest.approx(scipy.stats.kurtosis(pooled), rel=1e-6)
    rms = math.sqrt(np.mean([float((g["fc2.weight"].double() ** 2).sum()) for g in grads]))
    assert m["grad/norm/fc2.weight"] == pytest.approx(rms, rel=1e-9)
    assert "adam/ratio_max/fc2.weight" not in m  # SGD has no denominator: shadow figures instead
    assert m["shadow999/ratio_max/fc2.weight"] is None  # three gradients: still in the shadows' warm-up


def test_without_optimizer_step_counts(tmp_path, tiny_model):
    opt = torch.optim.SGD(tiny_model.parameters(), lr=1e-2)
    mon = ht.Monitor(tiny_model, every=2, log_dir=tmp_path)
    for step in range(4):
        idx, y = tiny_batch(step)
        nn.functional.mse_loss(tiny_model(idx), y).backward()
        mon.step()
        opt.step()
        opt.zero_grad()
    mon.close()
    assert [r["step"] for r in read_records(tmp_path)] == [2, 4]


def test_frozen_and_unused_parameters_are_handled(tmp_path):
    torch.manual_seed(0)
    model = TinyNet()
    model.fc2.bias.requires_grad_(False)
    extra = nn.Linear(3, 3)
    model.unused = extra  # never called in forward: its gradient stays None
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    seen = []
    opt.register_step_pre_hook(lambda o, a, k: seen.append(float(model.fc1.weight.grad.double().square().sum())))
    with ht.Monitor(model, opt, every=2, log_dir=tmp_path) as mon:
        train(model, opt, mon, steps=4)
    m = read_records(tmp_path)[-1]["metrics"]
    assert "grad/norm/fc2.bias" not in m  # frozen: not watched
    assert m["grad/norm/unused.weight"] is None  # no gradient: NaN, never a crash
    assert m["grad/norm/fc1.weight"] == pytest.approx(math.sqrt(sum(seen[2:]) / 2), rel=1e-9)  # steps 3-4, as ever


def test_close_is_idempotent_and_removes_every_hook(tmp_path, tiny_model):
    opt = torch.optim.AdamW(tiny_model.parameters(), lr=1e-3)
    mon = ht.Monitor(tiny_model, opt, every=5, log_dir=tmp_path)
    train(tiny_model, opt, mon, steps=3)
    mon.close()
    mon.close()
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
    for p in tiny_model.parameters():
        assert not getattr(p, "_post_accumulate_grad_hooks", None)
    # A new monitor may attach once the old one is closed.
    ht.Monitor(tiny_model, opt, every=5, log_dir=tmp_path / "again").close()


def test_default_log_dir_is_timestamped(tmp_path, monkeypatch, tiny_model):
    monkeypatch.chdir(tmp_path)
    with ht.Monitor(tiny_model) as mon:
        pass
    assert mon.log_dir.parent.name == "heavytail_runs"
    assert (tmp_path / mon.log_dir / "meta.json").exists()


def test_constructible_from_config(tmp_path, tiny_model):
    config = ht.MonitorConfig(every=3, log_dir=tmp_path, sample_size=32)
    with ht.Monitor(tiny_model, config=config) as mon:
        assert mon.config.every == 3 and mon.config.sample_size == 32


def test_sample_budget_shares_the_coordinates_out_over_many_tensors(tmp_path):
    # 40 tensors x sample_size 32 = 1280 coordinates over a budget of 600: 15 each; the rest of the monitor runs
    # on (L, 15) samples, and meta.json says so.
    model = nn.Sequential(*[nn.Linear(8, 8, bias=False) for _ in range(40)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with ht.Monitor(model, opt, every=2, log_dir=tmp_path, sample_size=32, sample_budget=600, ratio_warmup=0) as mon:
        trace = denominator_reference.record_steps(model, opt)
        assert mon.sample_size == 15
        assert tuple(mon._sample_index.shape) == (40, 15)
        for _ in range(4):
            model(torch.randn(4, 8)).square().mean().backward()
            opt.step()
            opt.zero_grad()
        assert mon.families["shadow"].state.v.shape[-1] == 15
        # distinct coordinates within each tensor
        assert all(len(set(row.tolist())) == 15 for row in mon._sample_index)
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["sample_size"] == 15 and meta["config"]["sample_budget"] == 600
    # The sample figures read those 15 coordinates: recomputed from the gradients and AdamW's state there.
    index = {"0.weight": mon._sample_index[0].numpy()}
    metrics = [r["metrics"] for r in read_records(tmp_path)]
    spans = denominator_reference.intervals(4, 2)
    sampled = denominator_reference.shadow_figures(
        trace.sampled(index), "0.weight", spans, betas=(0.999, 0.95), warmup=0
    )
    adam = denominator_reference.adam_figures(
        trace, "0.weight", spans, beta2=0.999, eps=1e-8, warmup=0, index=index["0.weight"]
    )
    numbers = denominator_reference.check_records(metrics, [{**a, **b} for a, b in zip(sampled, adam)], "0.weight")
    assert {"shadow999/ratio_max", "adam/ratio_p99"} <= numbers


@pytest.mark.parametrize(
    "count, budget, expected",
    [
        (10, 1 << 16, 256),  # within the budget: sample_size
        (256, 1 << 16, 256),  # exactly the budget
        (257, 1 << 16, 255),
        (1000, 1 << 16, 65),
        (8192, 1 << 16, 8),  # the budget holds up to 8,192 tensors (README, Cost)
        (8193, 1 << 16, 8),  # past it: 8 per tensor, the total grows
        (10_000, 1 << 16, 8),  # never fewer than MIN_SAMPLE_SIZE
        (10_000, None, 256),  # no budget
    ],
)
def test_effective_sample_size(count, budget, expected):
    from heavytail.monitor import effective_sample_size

    assert effective_sample_size(ht.MonitorConfig(sample_budget=budget), count) == expected
    # a sample_size under the floor is kept as asked
    assert effective_sample_size(ht.MonitorConfig(sample_size=4, sample_budget=budget), count) == 4


def test_state_dict_round_trip_with_weights_only(tmp_path, tiny_model):
    opt = torch.optim.AdamW(tiny_model.parameters(), lr=1e-3)
    mon = ht.Monitor(tiny_model, opt, every=100, log_dir=tmp_path / "a")
    train(tiny_model, opt, mon, steps=30)
    torch.save(mon.state_dict(), tmp_path / "mon.pt")
    mon.close()
    state = torch.load(tmp_path / "mon.pt", weights_only=True)
    resumed = ht.Monitor(tiny_model, opt, every=100, log_dir=tmp_path / "b")
    resumed.load_state_dict(state)
    assert resumed.step_count == 30
    tensors = {(f, k): v for f, s in state["families"].items() for k, v in s["tensors"].items()}
    assert {f for f, _ in tensors} >= {"moments", "shadow", "memory", "noise", "spikes", "loss"}
    for (family, key), value in tensors.items():
        torch.testing.assert_close(resumed.families[family].state_tensors()[key].cpu(), value, equal_nan=True)
    saved = {key: value.clone() for key, value in tensors.items()}
    train(tiny_model, opt, resumed, steps=5, start=30)
    assert resumed.step_count == 35
    for key, value in tensors.items():  # the monitor's in-place updates never reach the caller's dict
        torch.testing.assert_close(value, saved[key], rtol=0, atol=0, equal_nan=True)
    resumed.close()
    assert read_records(tmp_path / "b")[-1]["step"] == 35


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"every": 0}, ValueError, "every must be a positive integer"),
        ({"every": -5}, ValueError, "every must be a positive integer"),
        ({"backends": ("nope",)}, ValueError, "unknown backend 'nope'"),
        ({"include": ["does.not.exist*"]}, ValueError, "matches no trainable parameter"),
        ({"exclude": ["*"]}, ValueError, "leave no parameter"),
        ({"alerts": ("loss_spike", "bogus")}, ValueError, "unknown rule 'bogus'"),
        ({"sample_size": 0}, ValueError, "sample_size"),
        ({"sample_budget": 0}, ValueError, "sample_budget must be a positive integer or None"),
        ({"sample_budget": 1.5}, ValueError, "sample_budget"),
    ],
)
def test_attach_time_errors(tmp_path, tiny_model, kwargs, error, match):
    with pytest.raises(error, match=match):
        ht.Monitor(tiny_model, log_dir=tmp_path, **kwargs)


def test_no_trainable_parameters_is_an_error(tmp_path):
    model = nn.Linear(3, 3).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        ht.Monitor(model, log_dir=tmp_path)


def test_optimizer_must_own_the_parameters(tmp_path, tiny_model):
    other = torch.optim.AdamW(nn.Linear(3, 3).parameters())
    with pytest.raises(ValueError, match="does not own the watched parameter 'embed.weight'"):
        ht.Monitor(tiny_model, other, log_dir=tmp_path)


def test_attaching_twice_is_an_error(tmp_path, tiny_model):
    with ht.Monitor(tiny_model, log_dir=tmp_path / "a"):
        with pytest.raises(RuntimeError, match="already attached"):
            ht.Monitor(tiny_model, log_dir=tmp_path / "b")


def test_include_by_pattern_and_module_type(tmp_path, tiny_model):
    with ht.Monitor(tiny_model, include=["fc*"], exclude=["*.bias"], log_dir=tmp_path / "a") as mon:
        assert mon.names == ["fc1.weight", "fc2.weight"]
    with ht.Monitor(tiny_model, include=[nn.Embedding], log_dir=tmp_path / "b") as mon:
        assert mon.names == ["embed.weight"]
    with ht.Monitor(tiny_model, include=["re:^(fc2|head)\\.weight$"], log_dir=tmp_path / "c") as mon:
        assert mon.names == ["fc2.weight", "head.weight"]


def test_group_by_merges_tensors_exactly(tmp_path):
    records = {}
    captured = []
    for mode, group_by in (("tensors", None), ("groups", r"fc\d")):
        torch.manual_seed(0)
        model = TinyNet()
        opt = torch.optim.SGD(model.parameters(), lr=1e-2)
        if mode == "tensors":
            opt.register_step_pre_hook(
                lambda o, a, k, m=model: captured.append(
                    torch.cat([m.fc1.weight.grad.reshape(-1), m.fc1.bias.grad.reshape(-1)]).double()
                )
            )
        with ht.Monitor(model, opt, every=1, log_dir=tmp_path / mode, group_by=group_by) as mon:
            train(model, opt, mon, steps=2)
        records[mode] = read_records(tmp_path / mode)
    meta = json.loads((tmp_path / "groups" / "meta.json").read_text())
    assert meta["groups"]["fc1"] == ["fc1.weight", "fc1.bias"]
    for tensors, groups, g in zip(records["tensors"], records["groups"], captured):
        t, m = tensors["metrics"], groups["metrics"]
        assert "grad/norm/fc1.weight" not in m and "grad/norm/embed.weight" in m
        assert m["grad/norm/fc1"] == pytest.approx(math.hypot(t["grad/norm/fc1.weight"], t["grad/norm/fc1.bias"]))
        assert m["grad/max/fc1"] == max(t["grad/max/fc1.weight"], t["grad/max/fc1.bias"])
        assert m["grad/kurtosis/fc1"] == pytest.approx(scipy.stats.kurtosis(g.numpy()), rel=1e-6)
        assert m["grad/hill_alpha/fc1"] == pytest.approx(float(hill(g).alpha), rel=1e-4)
        assert m["grad/norm/embed.weight"] == t["grad/norm/embed.weight"]


def test_group_by_rejects_a_bad_regex(tmp_path, tiny_model):
    with pytest.raises(ValueError, match="MonitorConfig.group_by: invalid regex"):
        ht.Monitor(tiny_model, log_dir=tmp_path, group_by="blocks.(")


def test_a_failing_fused_pass_falls_back_to_torch(tmp_path):
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    seen = []
    opt.register_step_pre_hook(lambda o, a, k: seen.append(float(model.fc1.weight.grad.double().square().sum())))
    with ht.Monitor(model, opt, every=2, log_dir=tmp_path, kernel="torch") as mon:

        def broken(*args, **kwargs):
            raise RuntimeError("no kernel for this GPU")

        mon._kernels.gradient_pass = broken
        with pytest.warns(RuntimeWarning, match="using the torch pass"):
            train(model, opt, mon, steps=2)
        assert mon._kernels.gradient_pass is None
    # The torch pass measured both steps: the RMS over them of the gradient's norm.
    norm = read_records(tmp_path)[0]["metrics"]["grad/norm/fc1.weight"]
    assert norm == pytest.approx(math.sqrt(sum(seen) / 2), rel=1e-9)


@pytest.mark.parametrize(
    "rows", [4096, 3]
)  # 3: intervals longer than the per-step rows (heavytail.families.loss.STEP_ROWS)
def test_loss_max_and_norm_max_are_the_largest_step_values(tmp_path, tiny_model, monkeypatch, rows):
    monkeypatch.setattr("heavytail.families.loss.STEP_ROWS", rows)
    # Kept per step of the interval (summed over ranks under DDP/FSDP2, tests/test_distributed.py); here against
    # the step losses and the global norms recomputed from the gradients the optimizer saw.
    opt = torch.optim.AdamW(tiny_model.parameters(), lr=1e-3)
    norms = []
    opt.register_step_pre_hook(
        lambda o, a, k: norms.append(
            math.sqrt(sum(float(p.grad.double().square().sum()) for p in tiny_model.parameters()))
        )
    )
    with ht.Monitor(tiny_model, opt, every=4, log_dir=tmp_path) as mon:
        losses = train(tiny_model, opt, mon, steps=10)  # records at 4, 8 and the partial interval 9-10
    records = read_records(tmp_path)
    for record, (lo, hi) in zip(records, [(0, 4), (4, 8), (8, 10)], strict=True):
        assert record["metrics"]["loss/max"] == pytest.approx(max(losses[lo:hi]), rel=1e-6)
        assert record["metrics"]["grad/norm_max"] == pytest.approx(max(norms[lo:hi]), rel=1e-9)
