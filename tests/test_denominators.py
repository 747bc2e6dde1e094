"""Denominator figures for every optimizer: AdamW, Adafactor, Lion, Muon(+AdamW), SGD."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import heavytail as ht
from heavytail.optim import Lion, muon_with_adamw
from tests.conftest import TinyNet, read_records, train


def _run(tmp_path, make_optimizer, steps=6, every=3, **kwargs):
    torch.manual_seed(0)
    model = TinyNet()
    opt = make_optimizer(model)
    with ht.Monitor(model, opt, every=every, log_dir=tmp_path, **kwargs) as mon:
        train(model, opt, mon, steps=steps)
    return model, opt, read_records(tmp_path)


def test_sgd_update_ratio_is_the_learning_rate(tmp_path):
    _, _, records = _run(tmp_path, lambda m: torch.optim.SGD(m.parameters(), lr=0.05))
    m = records[-1]["metrics"]
    # Plain SGD moves every coordinate by lr * g: update RMS over gradient RMS is exactly the learning rate.
    assert m["update/rms_ratio/fc1.weight"] == pytest.approx(0.05, rel=1e-6)
    assert "adam/ratio_max/fc1.weight" not in m


def test_shadow_ratio_is_an_adamw_denominator_on_the_sampled_coordinates(tmp_path):
    # SGD (no denominator of its own): the shadow's r at step t is |g_t| / (sqrt(v_{t-1} / (1 - beta^(t-1))) + 1e-8)
    # on the sampled coordinates, counted from its 10th gradient on (ratio_warmup); recomputed here in float64.
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    grads = []
    opt.register_step_pre_hook(lambda o, a, k: grads.append(model.fc1.weight.grad.detach().double().clone()))
    with ht.Monitor(model, opt, every=6, log_dir=tmp_path) as mon:
        train(model, opt, mon, steps=12)
        index = mon._sample_index[mon.names.index("fc1.weight")]
    records = read_records(tmp_path)
    expected = {}
    for beta in (0.999, 0.95):
        v, maxima, fracs = torch.zeros(len(index), dtype=torch.float64), [], []
        for t, g in enumerate(grads):  # t gradients folded into v before this one
            g = g.reshape(-1)[index]
            if t >= 10:
                r = g.abs() / ((v / (1 - beta**t)).sqrt() + 1e-8)
                maxima.append(float(r.max()))
                fracs.append(float((r * r > 5000).double().mean()))
            v = beta * v + (1 - beta) * g * g
            v = v.float().double()  # the shadow state is float32
        expected[beta] = (max(maxima), sum(fracs) / len(fracs))
    assert records[0]["metrics"]["shadow999/ratio_max/fc1.weight"] is None  # steps 1-6: warm-up
    m = records[1]["metrics"]
    assert m["shadow999/ratio_max/fc1.weight"] == pytest.approx(expected[0.999][0], rel=1e-6)
    assert m["shadow95/ratio_max/fc1.weight"] == pytest.approx(expected[0.95][0], rel=1e-6)
    assert m["shadow999/spike_frac/fc1.weight"] == pytest.approx(expected[0.999][1], abs=1e-12)


def test_adafactor_ratio_uses_the_factored_second_moment(tmp_path):
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.Adafactor(model.parameters(), lr=1e-2)
    expected = []

    def hook(o, args, kwargs):
        p = model.fc1.weight
        state = o.state.get(p)
        if not state:
            return
        eps1 = torch.finfo(p.dtype).eps
        row, col = state["row_var"], state["col_var"]
        v = ((row @ col) / row.mean(dim=-2, keepdim=True).clamp(min=eps1)).clamp(min=eps1 * eps1)
        r = p.grad.double().abs() / v.double().sqrt()
        expected.append(float(r.max()))

    with ht.Monitor(model, opt, every=1, log_dir=tmp_path, ratio_warmup=0) as mon:  # the formula at every step
        opt.register_step_pre_hook(hook)
        train(model, opt, mon, steps=4)
    records = read_records(tmp_path)
    got = [r["metrics"]["adam/ratio_max/fc1.weight"] for r in records[1:]]
    assert got == pytest.approx(expected, rel=1e-5)


def test_lion_reports_sign_flips_and_shadow_ratios(tmp_path):
    _, _, records = _run(tmp_path, lambda m: Lion(m.parameters(), lr=1e-4), steps=12)  # past the shadow warm-up
    m = records[-1]["metrics"]
    assert 0.0 <= m["lion/sign_flip_frac/fc1.weight"] <= 1.0
    assert "adam/ratio_max/fc1.weight" not in m
    assert m["shadow999/ratio_max/fc2.weight"] > 0
    assert m["update/rms_ratio/fc1.weight"] > 0


def test_muon_with_adamw_reports_both_families(tmp_path):
    # 12 steps: the last interval (steps 10-12) is past the AdamW half's ratio warm-up of 10 gradients.
    model, opt, records = _run(tmp_path, lambda m: muon_with_adamw(m, lr=0.02, adamw_lr=1e-3), steps=12)
    m = records[-1]["metrics"]
    # TinyNet's fc2 sees low-rank inputs: its momentum (32 x 128) has fewer than 16 singular values above
    # numpy.linalg.matrix_rank's cut, so both spreads are rounding and read inf (null). Checked on the buffer after
    # the last step (the checkpoint's matrix plus one more gradient).
    buf = opt.state[model.fc2.weight]["momentum_buffer"].double().numpy()
    sv = np.linalg.svd(buf, compute_uv=False)
    assert np.median(sv) <= sv[0] * max(buf.shape) * np.finfo(np.float32).eps
    assert m["muon/sv_cond/fc2.weight"] is None and m["muon/sv_max_median/fc2.weight"] is None
    assert "muon/sv_cond/embed.weight" not in m  # the embedding is trained by AdamW
    assert m["adam/ratio_max/embed.weight"] is not None  # the AdamW half has a real denominator
    assert m["adam/ratio_max/fc2.weight"] is None  # Muon has none: the shadow stands in
    assert m["shadow999/ratio_max/fc2.weight"] > 0


def test_denominator_memory_is_reported_for_adam(tmp_path):
    # A tiny threshold makes every sampled coordinate an event, so episodes open and close within the run.
    _, _, records = _run(
        tmp_path,
        lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3, betas=(0.9, 0.5)),
        steps=30,
        every=30,
        spike_threshold=1.0,
    )
    m = records[-1]["metrics"]
    assert m["adam/memory_events/fc1.weight"] > 0
    assert m["adam/memory_steps/fc1.weight"] >= 1
    assert m["adam/event_update_ratio/fc1.weight"] > 0
    assert m["shadow999/memory_events/fc1.weight"] > 0


@pytest.mark.parametrize("kernel", ["auto", "torch"])  # the sample kernels, or the torch code
def test_memory_event_size_and_damping_against_numpy(tmp_path, kernel):
    # loss = (P * x_t).sum(), so the gradient is x_t: Gaussian, except one sampled coordinate c that gets 1000 at
    # step 30 (r ~ 1000, r^2 far over 5000: one event, on the real denominator and the first shadow alike).
    # Recomputed in float64 from the gradients and the parameters AdamW produced.
    torch.manual_seed(0)
    n, steps, t0, s = 1024, 60, 30, 8
    P = torch.nn.Parameter(torch.randn(n) * 0.1)
    opt = torch.optim.AdamW([P], lr=1e-2, weight_decay=0.0)
    grads = np.random.default_rng(0).standard_normal((steps, n))
    params = [P.detach().double().clone().numpy()]
    with ht.Monitor(
        torch.nn.ParameterList([P]), opt, every=20, log_dir=tmp_path, memory_window=s, kernel=kernel
    ) as mon:
        index = mon._sample_index[0].numpy()
        c = int(index[0])
        grads[t0 - 1, c] = 1000.0
        grads = torch.from_numpy(grads).float().double().numpy()  # what the model sees
        for t in range(steps):
            loss = (P * torch.from_numpy(grads[t]).float()).sum()
            loss.backward()
            mon.observe_loss(loss)
            opt.step()
            opt.zero_grad(set_to_none=True)
            params.append(P.detach().double().clone().numpy())
    assert (index == c).sum() == 1  # one sampled coordinate carries the event
    m = read_records(tmp_path)[1]["metrics"]  # steps 21-40

    # r = |g_t| / (sqrt(v_{t-1} / (1 - beta2^(t-1))) + eps) at the event step t = t0 (AdamW's own v; eps 1e-8).
    g = grads[:, c]
    v = 0.0
    for t in range(1, t0):
        v = 0.999 * v + 0.001 * g[t - 1] ** 2
    r = abs(g[t0 - 1]) / (np.sqrt(v / (1 - 0.999 ** (t0 - 1))) + 1e-8)
    for prefix in ("adam", "shadow999"):
        assert m[f"{prefix}/memory_events/0"] == 1.0
        assert m[f"{prefix}/memory_event_r/0"] == pytest.approx(r, rel=1e-5)
        assert m[f"{prefix}/memory_event_r_max/0"] == pytest.approx(r, rel=1e-5)

    # Damping: sum|dp| / sum|g| over the s steps after the event step, over the same for the s steps before it.
    dp = np.abs(np.diff(np.stack(params), axis=0)[:, c])  # dp[t - 1]: the update of step t
    ag = np.abs(g)
    after = slice(t0, t0 + s)  # steps t0 + 1 .. t0 + s
    before = slice(t0 - 1 - s, t0 - 1)  # steps t0 - s .. t0 - 1
    damping = (dp[after].sum() / ag[after].sum()) / (dp[before].sum() / ag[before].sum())
    for prefix in ("adam", "shadow999"):
        assert m[f"{prefix}/memory_damping/0"] == pytest.approx(damping, rel=1e-5)
    for record in read_records(tmp_path)[::2]:  # no event, no window closed
        assert record["metrics"]["adam/memory_events/0"] == 0.0
        assert record["metrics"]["adam/memory_event_r/0"] is None
        assert record["metrics"]["adam/memory_damping/0"] is None


def test_memory_window_zero_switches_the_damping_off(tmp_path):
    _, _, records = _run(tmp_path, lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3), memory_window=0)
    keys = set(records[-1]["metrics"])
    assert not any("/memory_damping/" in k for k in keys)
    assert "adam/memory_event_r/fc1.weight" in keys and "shadow999/memory_steps/fc1.weight" in keys
