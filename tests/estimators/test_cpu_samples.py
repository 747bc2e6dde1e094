"""The C sample estimators (cpu_samples.c) against the monitor's torch code: every state, bit for bit."""

from __future__ import annotations

import math

import pytest
import torch

import heavytail as ht
from heavytail.estimators import cpu_pass
from heavytail.estimators.quantile import upper_quantile as _upper_quantile

pytestmark = pytest.mark.skipif(not cpu_pass.available(), reason=f"no CPU kernels: {cpu_pass.unavailable_reason()}")

# Sums over the S samples, which torch adds pairwise and the kernel in order, and the shadow ratio's max, whose
# square root torch's vectorised CPU code does not always round correctly: float64 rounding apart. Everything
# else is bitwise equal.
ROUNDED = {"updates.sums", "shadow.maxes"}


def _params(seed: int, device: str = "cpu") -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    shapes = [(64, 48), (300,), (7,), (40, 40), (1000,)]  # (7,): fewer entries than samples
    return [torch.nn.Parameter((torch.randn(*s, generator=gen) * 0.1).to(device)) for s in shapes]


def _gradient(p: torch.Tensor, step: int, index: int, gen: torch.Generator) -> torch.Tensor | None:
    """Heavy-tailed draws (Cauchy) with a scale that jumps now and then, and the
    things a real run brings: a tensor without a gradient, non-finite entries, an all-zero gradient."""
    if index == 2 and step % 5 == 3:
        return None
    u = torch.rand(p.shape, generator=gen).clamp(1e-6, 1 - 1e-6)
    g = torch.tan(math.pi * (u - 0.5)) * 1e-3  # Cauchy: the heaviest tail, events at every threshold
    g = g * (50.0 if step % 11 == 7 else 1.0)
    if index == 0 and step == 9:
        g.view(-1)[3] = float("nan")
    if index == 1 and step == 14:
        g.view(-1)[0] = float("inf")
    if index == 3 and step == 17:
        g.zero_()
    return g.to(p.device)


def _run(implementation, optimizer: str, tmp_path, steps: int = 36, device: str = "cpu") -> ht.Monitor:
    """A monitored run of hand-set gradients with the sample estimators of ``implementation``: a module with
    ``sample_step``/``update_step`` (cpu_pass, triton_samples), or None for the torch code."""
    params = _params(0, device)
    if optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=1e-2, betas=(0.9, 0.95))
    else:
        opt = torch.optim.SGD(params, lr=1e-2, momentum=0.9)
    config = ht.MonitorConfig(
        every=13,
        sample_size=64,
        spike_threshold=4.0,
        memory_inflation=1.3,
        noise_beta=0.9,
        shadow_betas=(0.999, 0.95, 0.5),
        noise_window=5,
        kernel="cpu" if device == "cpu" else "auto",
    )
    model = torch.nn.ParameterList(params)
    mon = ht.Monitor(
        model, opt, config=config, log_dir=tmp_path / f"{optimizer}-{getattr(implementation, '__name__', 'torch')}"
    )
    if device == "cpu":
        assert mon._kernels.samples is cpu_pass  # the C path is what the CPU gets by default
    mon._kernels.samples = implementation
    gen = torch.Generator().manual_seed(1)
    for step in range(steps):
        for i, p in enumerate(params):
            p.grad = _gradient(p, step, i, gen)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return mon


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_sample_kernel_states_equal_the_torch_code(optimizer, tmp_path):
    kernel, reference = _run(cpu_pass, optimizer, tmp_path), _run(None, optimizer, tmp_path)
    assert kernel._kernels.samples is cpu_pass and reference._kernels.samples is None  # neither fell back
    assert_same_states(kernel, reference, optimizer)
    kernel.close()
    reference.close()


def assert_same_states(
    kernel: ht.Monitor, reference: ht.Monitor, optimizer: str, rounded: set[str] = ROUNDED, rtol: float = 1e-12
) -> None:
    """Every state tensor of the two monitors equal (those in ``rounded`` to ``rtol``), and the run did reach
    what it compares."""
    a, b = states(kernel), states(reference)
    assert a.keys() == b.keys()
    for key in a:
        tol = dict(rtol=rtol, atol=1e-300) if key in rounded else dict(rtol=0, atol=0)
        torch.testing.assert_close(a[key], b[key], equal_nan=True, msg=lambda m, key=key: f"{key}: {m}", **tol)
    # The run did exercise what it compares: episodes opened and closed, shadow spikes, update ratios at events.
    memory_sum = b["memory.sums"]
    if optimizer == "adamw":
        assert memory_sum[0, :, 0].sum() > 0 and memory_sum[0, :, 1].sum() > 0
    assert memory_sum[1, :, 0].sum() > 0 and memory_sum[1, :, 1].sum() > 0
    assert (b["shadow.spike_sum"] > 0).any() and b["noise.temporal_valid"].any()
    assert (b["updates.sums"][:, 5] > 0).any()


def states(mon: ht.Monitor) -> dict[str, torch.Tensor]:
    """Every family's state tensors, as ``family.field``."""
    return {f"{name}.{k}": v for name, fam in mon.families.items() for k, v in fam.state_tensors().items()}


def test_update_sums_are_finite_when_a_tensor_had_no_gradient(tmp_path):
    # Tensor 2 has no gradient at some steps: its NaN samples never count, and never poison the sums.
    for implementation in (cpu_pass, None):
        mon = _run(implementation, "adamw", tmp_path, steps=12)
        assert torch.isfinite(mon.families["updates"].state.sums).all(), implementation
        mon.close()


def _random_inputs(L: int, S: int, B: int, W: int, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    f32, f64 = torch.float32, torch.float64
    g = torch.randn(L, S, generator=gen, dtype=f64)
    den = torch.rand(L, S, generator=gen, dtype=f64) * 1e-2
    ratio = g.abs() / (den.sqrt() + 1e-8)
    ratio[0, :5] = float("nan")
    ratio[1] = float("nan")
    ratio[2, 3] = float("inf")
    return dict(
        g=g,
        valid=torch.ones(L, dtype=torch.bool),
        ratio=ratio,
        den=den,
        bias_correction=torch.ones(L, dtype=f64),
        ratio_ok=torch.ones(L, dtype=torch.bool),
        memory=[tuple(torch.zeros(L, S, dtype=f32) for _ in range(3)) for _ in range(2)],
        memory_sum=torch.zeros(2, L, 3, dtype=f64),
        betas=torch.tensor([0.999, 0.9][:B], dtype=f64),
        shadow_bias=torch.ones(B, L, dtype=f64),
        shadow_v=torch.zeros(B, L, S, dtype=f32),
        shadow_t=torch.zeros(B, L, dtype=f64),
        shadow_sum=torch.zeros(B, L, dtype=f64),
        shadow_max=torch.zeros(B, L, 2, dtype=f64),
        noise_mean=torch.zeros(L, S, dtype=f32),
        noise_seen=torch.zeros(L, dtype=f64),
        ring=torch.zeros(L, S, W, dtype=f32),
        ring_valid=torch.zeros(L, W, dtype=torch.bool),
        slot=0,
        threshold=5000.0,
        inflation=1.5,
        noise_beta=0.9,
        q=0.99,
    )


@pytest.mark.parametrize("S", [8, 9, 256, 1000])
def test_ratio_quantile_is_nanquantile(S):
    inputs = _random_inputs(6, S, 2, 3, seed=S)
    out = cpu_pass.sample_step(**inputs)
    # exactly the monitor's torch code; nanquantile interpolates with another formula, equal to rounding
    torch.testing.assert_close(out.quantile, _upper_quantile(inputs["ratio"], 0.99), rtol=0, atol=0, equal_nan=True)
    expected = torch.nanquantile(inputs["ratio"], 0.99, dim=1)
    torch.testing.assert_close(out.quantile, expected, rtol=1e-14, atol=0, equal_nan=True)
    assert math.isnan(out.quantile[1])  # no finite ratio at all: NaN, as nanquantile


def test_without_a_denominator_the_quantile_is_nan_and_the_real_memory_untouched():
    inputs = _random_inputs(4, 16, 2, 3, seed=0)
    inputs.update(ratio=None, den=None, bias_correction=None)
    out = cpu_pass.sample_step(**inputs)
    assert torch.isnan(out.quantile).all()
    assert not out.events[0].any() and not inputs["memory_sum"][0].any()
    assert (inputs["shadow_t"] == 1).all()  # the shadows run for every optimizer


@pytest.mark.parametrize("bad", ["dtype", "layout", "shape"])
def test_a_state_of_the_wrong_layout_is_refused_before_anything_is_written(bad):
    inputs = _random_inputs(4, 16, 2, 3, seed=0)
    v = inputs["shadow_v"]
    inputs["shadow_v"] = {
        "dtype": v.double(),
        "layout": v.transpose(1, 2).contiguous().transpose(1, 2),
        "shape": v[:, :, :8],
    }[bad]
    before = inputs["noise_mean"].clone()
    with pytest.raises(ValueError, match="shadow_v"):
        cpu_pass.sample_step(**inputs)
    assert torch.equal(inputs["noise_mean"], before)


def test_a_failing_sample_kernel_falls_back_to_the_torch_code(tmp_path, monkeypatch):
    def broken(**kwargs):
        raise MemoryError("no scratch")

    monkeypatch.setattr(cpu_pass, "sample_step", broken)
    with pytest.warns(RuntimeWarning, match="sample estimators' kernel failed"):
        mon = _run(cpu_pass, "adamw", tmp_path, steps=3)
    assert mon._kernels.samples is None
    assert mon.families["shadow"].state.t.max() == 3  # the failing step was measured by the torch code
    mon.close()
