"""The gradient noise scale (``gns/``): the estimator against its textbook formulas, every record key against a
recomputation by hand, B_simple against the analytic value of a linear regression, and the robust figure under
Student-t(1.5) noise, all through the public Monitor API."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import heavytail
from heavytail.config import MonitorConfig
from heavytail.estimators import gns
from tests.conftest import TinyNet, read_records, tiny_batch, train

# ------------------------------------------------------------------ the estimator


def test_update_and_compute_follow_the_formulas_in_float64():
    """Two steps with the running mean's weights (1, then 1/2), then an EMA step, against NumPy."""
    rng = np.random.default_rng(0)
    L, b, B, beta = 3, 2.0, 8.0, 0.9
    state = gns.init(L, dtype=torch.float64)
    ref = {"g": np.zeros(L + 1), "t": np.zeros(L + 1), "r": np.zeros(L + 1)}
    for n in range(1, 4):
        s, S = rng.uniform(2, 3, L), rng.uniform(1, 2, L)
        state = gns.update(state, torch.from_numpy(s), torch.from_numpy(S), b, B, beta=beta)
        s1, S1 = np.append(s, s.sum()), np.append(S, S.sum())
        w = max(1 - beta, 1 / n)
        k = B / b
        ref["g"] += w * ((B * S1 - b * s1) / (B - b) - ref["g"])
        ref["t"] += w * ((s1 - S1) / (1 / b - 1 / B) - ref["t"])
        ref["r"] += w * (np.log(np.clip(s1 / S1, 1 / k**2, k**2)) - ref["r"])
    out = gns.compute(state)
    np.testing.assert_allclose(out.grad_sq.numpy(), ref["g"], rtol=1e-12)
    np.testing.assert_allclose(out.trace_sigma.numpy(), ref["t"], rtol=1e-12)
    want = np.where(ref["t"] <= 0, 0.0, np.where(ref["g"] <= 0, np.inf, ref["t"] / ref["g"]))
    np.testing.assert_allclose(out.b_simple.numpy(), want, rtol=1e-12)
    r = np.exp(ref["r"])
    np.testing.assert_allclose(out.robust.numpy(), b * B * (r - 1) / (B - r * b), rtol=1e-12)
    assert out.count.tolist() == [3.0] * (L + 1)


def test_robust_equals_b_simple_when_norms_equal_their_expectations():
    """With |G_b|^2 and |G_B|^2 exactly |G|^2 + N/b and |G|^2 + N/B, both figures are N / |G|^2."""
    G2, N, b, B = 2.0, 30.0, 4.0, 32.0
    s, S = torch.tensor([G2 + N / b]), torch.tensor([G2 + N / B])
    out = gns.compute(gns.update(gns.init(1), s, S, b, B))
    assert out.b_simple[0].item() == pytest.approx(N / G2, rel=1e-12)
    assert out.robust[0].item() == pytest.approx(N / G2, rel=1e-12)


def test_invalid_rows_keep_their_state_and_stay_out_of_the_whole_model_row():
    state = gns.update(gns.init(2), torch.tensor([4.0, 9.0]), torch.tensor([1.0, 2.0]), 1, 4)
    state = gns.update(state, torch.tensor([5.0, math.nan]), torch.tensor([1.0, 2.0]), 1, 4)
    assert state.count.tolist() == [2.0, 1.0, 2.0]
    one = gns.update(gns.init(1), torch.tensor([9.0]), torch.tensor([2.0]), 1, 4)
    assert state.trace_sigma[1].item() == pytest.approx(one.trace_sigma[0].item())


@pytest.mark.parametrize("beta", [0.99, 0.5, 1.0, 0.0])
@pytest.mark.parametrize("steps", [1, 5, 32])
def test_update_many_equals_one_update_per_step(beta, steps):
    """The family folds its buffered steps in at once: the same EMAs as one ``update`` a step, with steps left
    out (invalid, NaN, inf, no gradient at all) and a state that has already taken a step."""
    gen = torch.Generator().manual_seed(steps)
    L = 7
    start = gns.update(gns.init(L), 3 * torch.rand(L, generator=gen), torch.rand(L, generator=gen), 1, 4, beta=beta)
    small = 3 * torch.rand(steps, L, dtype=torch.float64, generator=gen)
    big = torch.rand(steps, L, dtype=torch.float64, generator=gen)
    small[0, 2], big[-1, 3] = math.nan, math.inf
    small[:, 5] = big[:, 5] = 0.0
    valid = torch.rand(steps, L, generator=gen) > 0.2
    one_by_one = start
    for t in range(steps):
        one_by_one = gns.update(one_by_one, small[t], big[t], 1, 4, valid[t], beta)
    at_once = gns.update_many(start, small, big, 1, 4, valid, beta)
    for name, want, got in zip(gns.GnsState._fields, one_by_one, at_once):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=0, msg=name)


def test_variance_flag_reads_the_noise_tail_index():
    flag = gns.variance_flag(torch.tensor([1.5, 3.0, math.inf, math.nan], dtype=torch.float64))
    assert flag[:3].tolist() == [1.0, 0.0, 0.0] and math.isnan(flag[3].item()) and flag[4].item() == 1.0
    assert gns.variance_flag(torch.tensor([3.0, math.inf], dtype=torch.float64)).tolist() == [0.0, 0.0, 0.0]


def test_update_rejects_batches_that_cannot_separate_signal_from_noise():
    with pytest.raises(ValueError, match="0 < b < B"):
        gns.update(gns.init(1), torch.ones(1), torch.ones(1), 4, 4)


# ------------------------------------------------------------------ the family, by hand


def _train_by_hand(tmp_path, steps, accumulate, *, clip=None, **config):
    """TinyNet with gradient accumulation; each step's first-pass and pre-clip gradients kept for the check."""
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    mon = heavytail.Monitor(model, opt, config=MonitorConfig(log_dir=str(tmp_path), **config))
    seen = []
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        first = None
        for m in range(accumulate):
            idx, y = tiny_batch(step * accumulate + m, batch=8)
            loss = torch.nn.functional.mse_loss(model(idx), y)
            (loss / accumulate).backward()
            if m == 0:
                first = {n: p.grad.double().clone() for n, p in model.named_parameters()}
        final = {n: p.grad.double().clone() for n, p in model.named_parameters()}
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        seen.append((first, final))
    mon.close()
    return mon, read_records(tmp_path), seen


def _expected(seen, members, accumulate, per_pass, skip_first):
    """Running means (gns_beta=1) of the two estimates from the kept gradients, summed over ``members``."""
    b, B = per_pass, per_pass * accumulate
    g2, tr = [], []
    for first, final in seen[1 if skip_first else 0 :]:
        s = sum(float((first[n] * accumulate).pow(2).sum()) for n in members)
        S = sum(float(final[n].pow(2).sum()) for n in members)
        g2.append((B * S - b * s) / (B - b))
        tr.append((s - S) / (1 / b - 1 / B))
    return np.mean(g2), np.mean(tr)


@pytest.mark.parametrize("group_by", [None, r"fc\d"])
def test_every_key_equals_a_recomputation_from_the_first_micro_batch_and_the_preclip_gradient(tmp_path, group_by):
    """Clipping after the backward pass does not reach the big batch (the pre-clip norm is used); the first
    step is not seen (the monitor learns of accumulation from it)."""
    mon, records, seen = _train_by_hand(
        tmp_path, 6, 3, clip=0.05, every=6, gns_beta=1.0, group_by=group_by, batch_size=8
    )
    last = records[-1]["metrics"]
    names = [n for n, _ in TinyNet().named_parameters()]
    units = {u: [n for n in names if n.startswith(u)] for u in ("fc1", "fc2")} if group_by else {n: [n] for n in names}
    for unit, members in [*units.items(), (None, names)]:
        g2, tr = _expected(seen, members, 3, 8, skip_first=True)
        suffix = "" if unit is None else f"/{unit}"
        assert last[f"gns/grad_sq{suffix}"] == pytest.approx(g2, rel=1e-6)
        assert last[f"gns/trace_sigma{suffix}"] == pytest.approx(tr, rel=1e-6)
        want = 0.0 if tr <= 0 else math.inf if g2 <= 0 else tr / g2
        got = last[f"gns/b_simple{suffix}"]
        assert (math.inf if got is None else got) == pytest.approx(want, rel=1e-6)  # JSON writes inf as null
    assert (last["gns/small_batch"], last["gns/big_batch"], last["gns/micro_batches"], last["gns/ranks"]) == (
        8.0,
        24.0,
        3.0,
        1.0,
    )
    assert "gns" in mon.state_dict()["families"]


def test_the_buffered_steps_fold_in_as_an_ema_across_the_fold_and_a_change_of_accumulation(tmp_path):
    """40 steps: the family folds every 32 steps and at the checkpoint; the EMA (beta = 0.9) over the 39 steps
    it sees equals the recursion by hand. Then a step of 3 micro-batches after steps of 2 folds the buffer first
    (one B per fold): the record's B is the last step's."""
    beta = 0.9
    _, records, seen = _train_by_hand(tmp_path / "a", 40, 2, every=40, gns_beta=beta, batch_size=8)
    b, B = 8, 16
    ema = {"g": 0.0, "t": 0.0}
    names = [n for n, _ in TinyNet().named_parameters()]
    for n, (first, final) in enumerate(seen[1:], start=1):
        s = sum(float((first[k] * 2).pow(2).sum()) for k in names)
        S = sum(float(final[k].pow(2).sum()) for k in names)
        w = max(1 - beta, 1 / n)
        ema["g"] += w * ((B * S - b * s) / (B - b) - ema["g"])
        ema["t"] += w * ((s - S) / (1 / b - 1 / B) - ema["t"])
    last = records[-1]["metrics"]
    assert last["gns/grad_sq"] == pytest.approx(ema["g"], rel=1e-6)
    assert last["gns/trace_sigma"] == pytest.approx(ema["t"], rel=1e-6)

    # Steps of 2, then of 3 micro-batches (b = 1, B = 2 or 3): each step's estimates with its own B, running mean.
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    mon = heavytail.Monitor(model, opt, config=MonitorConfig(log_dir=str(tmp_path / "b"), every=100, gns_beta=1.0))
    estimates, batch = [], 0
    for passes in [2, 2, 2, 2, 3, 3]:
        for m in range(passes):
            idx, y = tiny_batch(batch, batch=8)
            batch += 1
            (torch.nn.functional.mse_loss(model(idx), y) / passes).backward()
            if m == 0:
                s = sum(float((p.grad.double() * passes).pow(2).sum()) for p in model.parameters())
        S = sum(float(p.grad.double().pow(2).sum()) for p in model.parameters())
        estimates.append(((passes * S - s) / (passes - 1), (s - S) / (1 - 1 / passes)))
        opt.step()
        opt.zero_grad(set_to_none=True)
    state = mon.families["gns"].state_tensors()
    assert state["count"][-1].item() == 5.0  # the first step is not seen
    assert (state["small_batch"][-1].item(), state["big_batch"][-1].item()) == (1.0, 3.0)
    want = np.mean(estimates[1:], axis=0)
    assert state["grad_sq"][-1].item() == pytest.approx(want[0], rel=1e-6)
    assert state["trace_sigma"][-1].item() == pytest.approx(want[1], rel=1e-6)
    mon.close()


def test_the_loss_scaling_moves_the_squared_norms_and_leaves_the_noise_scale(tmp_path):
    """(loss / M).backward() or loss.backward(): |G|^2 and tr(Sigma) are on the scale of the gradient the
    optimizer steps with (M^2 apart), B_simple is the same; without batch_size it is in micro-batches. Same seed,
    same draws, parameters fixed: the three runs see the same gradients."""
    mean, _ = _regression_run(tmp_path / "mean", 0, 40, per_pass=8, accumulate=4, batch_size=8)
    summed, _ = _regression_run(tmp_path / "sum", 0, 40, per_pass=8, accumulate=4, divide=False, batch_size=8)
    micro, _ = _regression_run(tmp_path / "micro", 0, 40, per_pass=8, accumulate=4)
    assert 0 < mean["gns/b_simple"] < math.inf and 0 < mean["gns/b_robust"] < math.inf
    assert summed["gns/grad_sq"] == pytest.approx(16 * mean["gns/grad_sq"], rel=1e-6)
    assert summed["gns/trace_sigma"] == pytest.approx(16 * mean["gns/trace_sigma"], rel=1e-6)
    assert summed["gns/b_simple"] == pytest.approx(mean["gns/b_simple"], rel=1e-6)
    assert micro["gns/b_simple"] == pytest.approx(mean["gns/b_simple"] / 8, rel=1e-6)
    assert micro["gns/b_robust"] == pytest.approx(mean["gns/b_robust"] / 8, rel=1e-6)
    assert micro["gns/trace_sigma"] == pytest.approx(mean["gns/trace_sigma"] / 8, rel=1e-6)
    assert micro["gns/grad_sq"] == pytest.approx(mean["gns/grad_sq"], rel=1e-6)
    assert (micro["gns/small_batch"], micro["gns/big_batch"]) == (1.0, 4.0)


def test_no_source_no_keys(tmp_path):
    """One process without accumulation has no small batch: no ``gns/`` key at all."""
    _, records, _ = _train_by_hand(tmp_path, 4, 1, every=2)
    assert records and not [k for r in records for k in r["metrics"] if k.startswith("gns/")]


def test_config_fields_are_validated():
    with pytest.raises(ValueError, match="MonitorConfig.gns_beta"):
        MonitorConfig(gns_beta=1.5)
    with pytest.raises(ValueError, match="MonitorConfig.batch_size"):
        MonitorConfig(batch_size=0)
    with pytest.raises(ValueError, match="MonitorConfig.track_gns"):
        MonitorConfig(track_gns="yes")


def test_track_gns_false_leaves_the_family_out(tmp_path):
    mon, records, _ = _train_by_hand(tmp_path, 4, 2, every=4, track_gns=False)
    assert "gns" not in mon.families and not [k for k in records[-1]["metrics"] if k.startswith("gns/")]


# ------------------------------------------------------------------ known truths


def _regression_model(seed, d):
    """The regression's model at w = w* + N(0, I / d), its w*, delta = w - w* (float64) and an SGD at lr = 0."""
    torch.manual_seed(seed)
    model = torch.nn.Linear(d, 1, bias=False)
    w_star = torch.randn(d)
    with torch.no_grad():
        model.weight.copy_((w_star + torch.randn(d) / math.sqrt(d))[None])
    delta = model.weight[0].detach().double() - w_star.double()
    return model, w_star, delta, torch.optim.SGD(model.parameters(), lr=0.0)


def _regression_run(path, seed, steps, per_pass, accumulate, d=10, noise=1.0, divide=True, **config):
    """Linear regression y = x . w* + eps, x ~ N(0, I_d), at a fixed w (lr = 0) with delta = w - w*.

    The per-example gradient of (x . w - y)^2 / 2 is x (x . delta - eps): its mean is G = delta and its covariance
    Sigma = (|delta|^2 + noise^2) I + delta delta^T (Gaussian x: E[x x^T A x x^T] = tr(A) I + 2A for symmetric A),
    so B_simple = tr(Sigma) / |G|^2 = (d (|delta|^2 + noise^2) + |delta|^2) / |delta|^2 examples.
    """
    model, w_star, delta, opt = _regression_model(seed, d)
    mon = heavytail.Monitor(model, opt, config=MonitorConfig(log_dir=str(path), every=steps, **config))
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        for _ in range(accumulate):
            x = torch.randn(per_pass, d)
            y = x @ w_star + noise * torch.randn(per_pass)
            loss = 0.5 * ((model(x)[:, 0] - y) ** 2).mean()
            (loss / accumulate if divide else loss).backward()
        opt.step()
    mon.close()
    dd = float(delta @ delta)
    truth = (d * (dd + noise**2) + dd) / dd
    return read_records(path)[-1]["metrics"], truth


def test_b_simple_matches_the_analytic_noise_scale_of_a_linear_regression(tmp_path):
    """Median over five seeds within 10% of the analytic value (in examples, batch_size declared)."""
    errors = []
    for seed in range(5):
        metrics, truth = _regression_run(
            tmp_path / str(seed), seed, 1600, per_pass=8, accumulate=4, batch_size=8, gns_beta=1.0
        )
        errors.append(metrics["gns/b_simple"] / truth - 1)
        assert metrics["gns/b_simple"] == metrics["gns/b_simple/weight"]  # one tensor: the whole model
    assert np.median(np.abs(errors)) < 0.10, errors


def _student_run(path, seed, df, steps, d=16, per_pass=4, accumulate=4):
    """Per-example gradient -(1 + xi), xi ~ Student-t(df) per coordinate, at a fixed parameter (lr = 0):
    |G|^2 = d, and tr(Sigma) = d df / (df - 2) for df > 2, infinite for df <= 2."""
    torch.manual_seed(seed)
    w = torch.nn.Parameter(torch.zeros(d))
    opt = torch.optim.SGD([w], lr=0.0)
    t = torch.distributions.StudentT(df)
    config = MonitorConfig(
        log_dir=str(path),
        every=steps // 2,
        batch_size=per_pass,
        gns_beta=1.0,
        # every coordinate sampled once, 4096 noise deviations: the temporal noise tail index is estimated
        sample_size=d,
        noise_window=256,
        min_tail_samples=500,
    )
    mon = heavytail.Monitor(torch.nn.ParameterList([w]), opt, config=config)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        for _ in range(accumulate):
            z = 1.0 + t.sample((per_pass, d))
            (-(w * z.mean(dim=0)).sum() / accumulate).backward()
        opt.step()
    mon.close()
    return [r["metrics"] for r in read_records(path)]


def _change(records, key):
    """|log| of the figure's change from the middle of the run to its end (inf where either is not finite)."""
    half, end = (r[key] for r in records)
    if half is None or end is None or not (0 < half < math.inf and 0 < end < math.inf):
        return math.inf
    return abs(math.log(end / half))


def test_under_student_t_1_5_noise_b_simple_drifts_while_the_robust_figure_settles(tmp_path):
    """Infinite variance: the running B_simple moves without settling (its |G|^2 estimate is thrown below zero
    by single huge examples: inf), the robust figure moves by under 10% from the middle of the run to its end,
    and the variance flag says B_simple means nothing where the noise tail index is under 2. The Gaussian control settles both ways, flag off."""
    heavy = [_student_run(tmp_path / f"t{seed}", seed, 1.5, 1000) for seed in range(5)]
    assert np.median([_change(r, "gns/b_simple") for r in heavy]) > 0.5
    assert np.median([_change(r, "gns/b_robust") for r in heavy]) < 0.10
    # The flag follows noise/hill_alpha, whose Hill estimate on 4096 deviations of this case scatters (1.5 to
    # above 3 over seeds): most runs, not all, are flagged.
    assert sum(r[-1]["gns/variance_flag"] == 1.0 for r in heavy) >= 3
    light = [_student_run(tmp_path / f"g{seed}", seed, 1000.0, 1000) for seed in range(3)]
    assert np.median([_change(r, "gns/b_simple") for r in light]) < 0.10
    assert np.median([_change(r, "gns/b_robust") for r in light]) < 0.10
    # Gaussian truth: tr(Sigma) = |G|^2 = d per example, B_simple = 1 example
    assert np.median([r[-1]["gns/b_simple"] for r in light]) == pytest.approx(1.0, rel=0.15)
    assert all(r[-1]["gns/variance_flag"] == 0.0 for r in light)


# ------------------------------------------------------------------ no host synchronisation


def _accumulating_steps(model, opt, steps, start, accumulate=3, device="cpu"):
    for step in range(start, start + steps):
        for m in range(accumulate):
            idx, y = tiny_batch(step * accumulate + m, batch=8)
            loss = torch.nn.functional.mse_loss(model(idx.to(device)), y.to(device))
            (loss / accumulate).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def test_the_micro_batch_source_makes_no_host_transfer(tmp_path, monkeypatch):
    """Under accumulation the first pass's read and the step's update stay on the device (CPU: counted)."""
    from tests.test_no_sync import TransferCounter

    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    mon = heavytail.Monitor(model, opt, every=1000, log_dir=tmp_path)
    _accumulating_steps(model, opt, 3, 0)  # accumulation learnt, plans built
    counter = TransferCounter(monkeypatch)
    _accumulating_steps(model, opt, 10, 3)
    calls = list(counter.calls)
    monkeypatch.undo()
    mon.close()
    assert not [c for c in calls if not c.startswith("numpy from")], calls  # the flag vector's host reads only
    assert read_records(tmp_path)[-1]["metrics"]["gns/micro_batches"] == 3.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_micro_batch_source_under_cuda_sync_debug_mode_error(tmp_path):
    torch.manual_seed(0)
    model = TinyNet().cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    mon = heavytail.Monitor(model, opt, every=50, log_dir=tmp_path)
    _accumulating_steps(model, opt, 5, 0, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _accumulating_steps(model, opt, 40, 5, device="cuda")  # steps 6..45: no checkpoint
    finally:
        torch.cuda.set_sync_debug_mode("default")
    mon.close()
    metrics = read_records(tmp_path)[-1]["metrics"]
    assert metrics["gns/big_batch"] == 3.0 and metrics["gns/b_simple"] is not None


# ------------------------------------------------------------------ report and summary


def test_report_and_summary_show_the_noise_scale_only_where_it_was_recorded(tmp_path):
    import heavytail.report.contents  # noqa: F401 (registers the sections)
    from heavytail.report.html import render_report
    from heavytail.report.rundir import load_run
    from heavytail.report.summary import num, summary_text

    _, records, _ = _train_by_hand(tmp_path / "acc", 8, 2, every=4, batch_size=8)
    last = records[-1]["metrics"]
    run = load_run(tmp_path / "acc")
    page = render_report(run)
    assert 'id="sec-noise-scale"' in page and 'id="sec-gns-heatmap"' in page
    assert 'data-legend="magnitude"' in page
    for name, _ in TinyNet().named_parameters():
        assert name in page
    text = summary_text(run)
    assert "Gradient noise scale (last checkpoint, in examples)" in text
    figures = [math.inf if last[k] is None else last[k] for k in ("gns/b_simple", "gns/b_robust")]
    assert f"B_simple {num(figures[0])} (gns/b_simple), robust {num(figures[1])} (gns/b_robust)" in text
    assert "training batch 16" in text
    _train_by_hand(tmp_path / "plain", 8, 1, every=4)
    plain = load_run(tmp_path / "plain")
    page = render_report(plain)
    assert 'id="sec-noise-scale"' not in page and 'id="sec-gns-heatmap"' not in page
    assert "Gradient noise scale" not in summary_text(plain)


def test_state_dict_carries_the_running_estimates(tmp_path):
    """A resumed monitor goes on from the saved EMAs (it learns of the accumulation again from its first step)."""
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    mon = heavytail.Monitor(model, opt, config=MonitorConfig(log_dir=str(tmp_path / "a"), every=100, gns_beta=1.0))
    _accumulating_steps(model, opt, 6, 0, accumulate=2)
    torch.save(mon.state_dict(), tmp_path / "mon.pt")
    saved = {k: v.clone() for k, v in mon.families["gns"].state_tensors().items()}
    assert saved["count"][-1].item() == 5.0  # the first step is not seen
    mon.close()
    resumed = heavytail.Monitor(model, opt, config=MonitorConfig(log_dir=str(tmp_path / "b"), every=100, gns_beta=1.0))
    resumed.load_state_dict(torch.load(tmp_path / "mon.pt", weights_only=True))
    for key, value in saved.items():
        torch.testing.assert_close(resumed.families["gns"].state_tensors()[key], value, rtol=0, atol=0)
    _accumulating_steps(model, opt, 3, 6, accumulate=2)
    # state_tensors folds the buffered steps in (the family folds every 32 steps and at checkpoints)
    assert resumed.families["gns"].state_tensors()["count"][-1].item() == 7.0  # 5 + the two after the first
    resumed.close()


# ------------------------------------------------------------------ the probe's source


def _probe_loss(model, batch):
    idx, y = batch
    return torch.nn.functional.mse_loss(model(idx), y)


@pytest.mark.parametrize("group_by", [None, r"fc\d"])
def test_probe_keys_equal_a_recomputation_from_the_mini_batch_gradients(tmp_path, group_by):
    """Every ``gns/probe_*`` key against the two-batch formulas in float64 NumPy, from each mini-batch's gradient
    recomputed by hand at the checkpoint's weights (one process, no accumulation: no streaming source)."""
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    config = MonitorConfig(log_dir=str(tmp_path), every=3, probe_every=1, group_by=group_by)
    mon = heavytail.Monitor(model, opt, config=config)
    held = tiny_batch(999, batch=24)
    mon.set_probe(_probe_loss, held, batch_size=3)  # 8 mini-batches of 3 rows
    for step in range(3):
        opt.zero_grad(set_to_none=True)
        idx, y = tiny_batch(step)
        torch.nn.functional.mse_loss(model(idx), y).backward()
        opt.step()
    # The checkpoint (and its probe) ran in the third step's post-step hook: at these weights.
    grads = []
    for m in range(8):
        probe_model = TinyNet()
        probe_model.load_state_dict(model.state_dict())
        _probe_loss(probe_model, (held[0][3 * m : 3 * m + 3], held[1][3 * m : 3 * m + 3])).backward()
        grads.append({n: p.grad.double().numpy() for n, p in probe_model.named_parameters()})
    mon.close()
    metrics = read_records(tmp_path)[-1]["metrics"]
    assert "gns/b_simple" not in metrics  # no streaming source
    units = {n: [n] for n, _ in model.named_parameters()}
    if group_by is not None:
        units = {"embed.weight": ["embed.weight"], "fc1": ["fc1.weight", "fc1.bias"], "fc2": ["fc2.weight", "fc2.bias"]}
        units |= {"head.weight": ["head.weight"], "head.bias": ["head.bias"]}
    units[None] = [n for n, _ in model.named_parameters()]
    b, B = 3.0, 24.0
    for unit, members in units.items():
        small = np.array([sum(float((g[n] ** 2).sum()) for n in members) for g in grads])
        big = sum(float((np.mean([g[n] for g in grads], axis=0) ** 2).sum()) for n in members)
        grad_sq = (B * big - b * small.mean()) / (B - b)
        trace = (small.mean() - big) / (1 / b - 1 / B)
        r = np.exp(np.mean(np.log(np.clip(small / big, (b / B) ** 2, (B / b) ** 2))))
        # 0 where no noise is resolved, inf (null in JSON) where the |G|^2 estimate is not positive
        b_simple = 0.0 if trace <= 0 else math.inf if grad_sq <= 0 else trace / grad_sq
        robust = 0.0 if r <= 1 else math.inf if B - r * b <= 0 else b * B * (r - 1) / (B - r * b)
        want = {"grad_sq": grad_sq, "trace_sigma": trace, "b_simple": b_simple, "b_robust": robust}
        for key, value in want.items():
            name = f"gns/probe_{key}" if unit is None else f"gns/probe_{key}/{unit}"
            got = math.inf if metrics[name] is None else metrics[name]
            assert got == pytest.approx(value, rel=1e-4), (name, got, value)
    assert metrics["gns/probe_small_batch"] == b and metrics["gns/probe_big_batch"] == B


def test_probe_b_simple_matches_the_analytic_noise_scale_of_a_linear_regression(tmp_path):
    """The probe's B_simple of a held batch of 512 examples (64 mini-batches of 8), median over seven seeds,
    within 10% of the analytic value (the linear regression of ``_regression_run``)."""
    errors = []
    d = 10
    for seed in range(7):
        model, w_star, delta, opt = _regression_model(seed, d)
        mon = heavytail.Monitor(model, opt, log_dir=tmp_path / str(seed), every=1, probe_every=1)
        x = torch.randn(512, d)
        y = x @ w_star + torch.randn(512)
        mon.set_probe(lambda m, batch: 0.5 * ((m(batch[0])[:, 0] - batch[1]) ** 2).mean(), (x, y), batch_size=8)
        opt.zero_grad()
        model(x[:8]).sum().backward()
        opt.step()
        mon.close()
        dd = float(delta @ delta)
        metrics = read_records(tmp_path / str(seed))[-1]["metrics"]
        errors.append(metrics["gns/probe_b_simple"] / ((d * (dd + 1) + dd) / dd) - 1)
        assert metrics["gns/probe_big_batch"] == 512.0
    assert np.median(np.abs(errors)) < 0.10, errors


def test_report_and_summary_show_the_probe_noise_scale_of_a_run_without_a_streaming_source(tmp_path):
    import heavytail.report.contents  # noqa: F401 (registers the sections)
    from heavytail.report.html import render_report
    from heavytail.report.rundir import load_run
    from heavytail.report.summary import num, summary_text

    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    mon = heavytail.Monitor(model, opt, log_dir=tmp_path, every=4, probe_every=1)
    idx, y = tiny_batch(999, batch=32)
    mon.set_probe(_probe_loss, (idx, y + 10.0), batch_size=4)  # targets far off: a signal the noise leaves visible
    train(model, opt, mon, 8)
    mon.close()
    last = read_records(tmp_path)[-1]["metrics"]
    run = load_run(tmp_path)
    page = render_report(run)
    assert last["gns/probe_b_simple"] is not None and last["gns/probe_b_robust"] is not None
    assert 'id="sec-noise-scale"' in page and "The probe's held batch" in page
    assert "B_simple, held batch (probe)" in page and "robust, held batch (probe)" in page
    assert 'id="sec-gns-heatmap"' not in page  # per-tensor streaming figures only
    text = summary_text(run)
    figures = [math.inf if last[k] is None else last[k] for k in ("gns/probe_b_simple", "gns/probe_b_robust")]
    assert (
        f"Gradient noise scale of the probe's held batch (last probing checkpoint, in rows): B_simple "
        f"{num(figures[0])} (gns/probe_b_simple), robust {num(figures[1])} (gns/probe_b_robust); held batch 32 rows."
    ) in text


def _scaled_run(path, skip_at):
    """TinyNet, two accumulated micro-batches per step under a CPU GradScaler; at iteration ``skip_at`` the
    loss is made inf, so the scaler skips that step (no optimizer step: the monitor sees it at update())."""
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    config = MonitorConfig(log_dir=str(path), every=6, gns_beta=1.0, batch_size=8)
    mon = heavytail.Monitor(model, opt, config=config, scaler=scaler)
    batch = 0
    for iteration in range(7 if skip_at is not None else 6):
        for _ in range(2):
            idx, y = tiny_batch(batch, batch=8)
            batch += iteration != skip_at  # the skipped iteration's batches are trained on next
            loss = torch.nn.functional.mse_loss(model(idx), y) / 2
            if iteration == skip_at:
                loss = loss * math.inf
            scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
    mon.close()
    return read_records(path)[-1]["metrics"]


def test_a_step_the_grad_scaler_skips_is_not_counted_as_micro_batches_of_the_next(tmp_path):
    """Without the skip's iteration, the same six steps (the scale halves at the skip; the squared norms are
    unscaled): every gns/ and micro-batch noise figure as if the skipped iteration had not happened."""
    skipped = _scaled_run(tmp_path / "skipped", skip_at=3)
    clean = _scaled_run(tmp_path / "clean", skip_at=None)
    assert skipped["gns/micro_batches"] == 2.0
    keys = [k for k in clean if k.startswith(("gns/", "noise/microbatch_"))]
    assert any(k.startswith("noise/microbatch_") for k in keys) and "gns/b_simple" in keys
    for key in keys:
        if clean[key] is None:
            assert skipped[key] is None, key
        else:
            assert skipped[key] == pytest.approx(clean[key], rel=1e-5, abs=1e-12), key
