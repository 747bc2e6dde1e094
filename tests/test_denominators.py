"""Denominator figures for every optimizer: AdamW, Adafactor, Lion, Muon(+AdamW), SGD."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import heavytail as ht
from heavytail.optim import Lion, muon_with_adamw
from tests import denominator_reference as ref
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


def _run_traced(tmp_path, make_optimizer, steps, every, **kwargs):
    """``_run`` with the optimizer's steps recorded (tests/denominator_reference.py): the trace, the sampled
    coordinates per tensor, the records' metrics and the records' intervals."""
    torch.manual_seed(0)
    model = TinyNet()
    opt = make_optimizer(model)
    with ht.Monitor(model, opt, every=every, log_dir=tmp_path, **kwargs) as mon:
        trace = ref.record_steps(model, opt)
        train(model, opt, mon, steps=steps)
        index = {name: mon._sample_index[i].numpy() for i, name in enumerate(mon.names)}
    metrics = [r["metrics"] for r in read_records(tmp_path)]
    return trace, index, metrics, ref.intervals(steps, every)


def _join(*parts: list[dict]) -> list[dict]:
    return [{k: v for row in rows for k, v in row.items()} for rows in zip(*parts)]


def test_lion_sign_flips_shadow_ratios_and_updates_against_numpy(tmp_path):
    # 12 steps: the last interval (steps 10-12) is past the shadows' warm-up of 10 gradients.
    trace, index, metrics, spans = _run_traced(tmp_path, lambda m: Lion(m.parameters(), lr=1e-4), steps=12, every=3)
    sampled = trace.sampled(index)
    for name in index:
        expected = _join(
            ref.lion_figures(sampled, name, spans, beta1=0.9),
            ref.shadow_figures(sampled, name, spans, betas=(0.999, 0.95), warmup=10),
            ref.update_figures(sampled, name, spans),
        )
        numbers = ref.check_records(metrics, expected, name)
        assert {"lion/sign_flip_frac", "shadow999/ratio_max", "shadow95/ratio_max", "update/rms_ratio"} <= numbers
    assert not any(k.startswith("adam/") for k in metrics[-1])  # Lion has no denominator: the shadows stand in


def test_muon_with_adamw_reports_both_families_against_numpy(tmp_path):
    # 12 steps: the last interval (steps 10-12) is past the AdamW half's ratio warm-up of 10 gradients.
    make = lambda m: muon_with_adamw(m, lr=0.02, adamw_lr=1e-3)  # noqa: E731
    trace, index, metrics, spans = _run_traced(tmp_path, make, steps=12, every=3)
    m = metrics[-1]
    assert "muon/sv_cond/embed.weight" not in m  # the embedding is trained by AdamW
    assert m["adam/ratio_max/fc2.weight"] is None  # Muon has none: the shadow stands in
    # The AdamW half's real denominator (AdamW's default betas (0.9, 0.95) in muon_with_adamw).
    adam = ref.adam_figures(trace, "embed.weight", spans, beta2=0.95, eps=1e-8, warmup=10, index=index["embed.weight"])
    assert {"adam/ratio_max", "adam/ratio_p99"} <= ref.check_records(metrics, adam, "embed.weight")
    # fc1's momentum has full rank from the first step on (fc2's gradient is rank one: its smaller singular values
    # are float32 rounding, so only fc1's spread can be recomputed).
    muon = ref.muon_figures(trace, "fc1.weight", spans, momentum=0.95)
    assert ref.check_records(metrics, muon, "fc1.weight", rel=1e-3) == {"muon/sv_cond", "muon/sv_max_median"}
    assert {"muon/sv_cond/fc2.weight", "muon/sv_max_median/fc2.weight"} <= set(m)
    shadow = ref.shadow_figures(trace.sampled(index), "fc2.weight", spans, betas=(0.999, 0.95), warmup=10)
    assert "shadow999/ratio_max" in ref.check_records(metrics, shadow, "fc2.weight")


def test_denominator_memory_is_reported_for_adam(tmp_path):
    # A tiny threshold makes every sampled coordinate an event, so episodes open and close within the run.
    make = lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3, betas=(0.9, 0.5))  # noqa: E731
    trace, index, metrics, spans = _run_traced(tmp_path, make, steps=30, every=30, spike_threshold=1.0)
    name = "fc1.weight"
    expected = _join(
        ref.adam_figures(trace, name, spans, beta2=0.5, eps=1e-8, warmup=10, threshold=1.0, index=index[name]),
        ref.shadow_figures(trace.sampled(index), name, spans, betas=(0.999, 0.95), warmup=10, threshold=1.0),
    )
    numbers = ref.check_records(metrics, expected, name)
    assert {"adam/memory_events", "adam/memory_steps", "adam/event_update_ratio", "shadow999/memory_events"} <= numbers


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
