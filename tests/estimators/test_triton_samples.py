"""The Triton sample estimators against the monitor's torch code (on CUDA, or in Triton's interpreter on the CPU)."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None
if HAS_TRITON and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # run the kernels on CPU tensors: slow, exact

pytestmark = [
    pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed"),
    # the interpreter's NumPy reports the IEEE divisions by zero and 0 * inf the formulas rely on
    pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter"),
]

from tests.estimators.test_cpu_samples import _random_inputs, _run, assert_same_states  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_triton_sample_states_equal_the_torch_code(optimizer, tmp_path):
    """36 steps of Cauchy gradients with NaN, Inf, zero and missing gradients (test_cpu_samples.py's run): every
    state bitwise equal to the torch code's, sums over the samples to float64 rounding. On a GPU too: the kernels
    turn FMA contraction off (each multiply and add rounds on its own, as in torch's one-op-at-a-time code), their
    divisions and square roots are IEEE-rounded, and no NaN reaches a max (tl.max skips NaN on a GPU and
    propagates it in the interpreter)."""
    from heavytail.estimators import triton_samples

    kernel = _run(triton_samples, optimizer, tmp_path / "triton", device=DEVICE)
    reference = _run(None, optimizer, tmp_path / "torch", device=DEVICE)
    assert kernel._kernels.samples is triton_samples and reference._kernels.samples is None  # neither fell back
    assert_same_states(kernel, reference, optimizer)
    kernel.close()
    reference.close()


def _copies(inputs: dict, device) -> dict:
    out = {k: (v.clone().to(device) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
    out["memory"] = [tuple(t.clone().to(device) for t in f) for f in inputs["memory"]]
    return out


@pytest.mark.parametrize("S, with_denominator", [(40, True), (40, False), (1000, True)])  # 1000: 16 warps
def test_triton_quantile_and_states_match_the_c_kernel(S, with_denominator):
    from heavytail.estimators import cpu_pass, triton_samples

    if not cpu_pass.available():
        pytest.skip(f"no CPU kernels: {cpu_pass.unavailable_reason()}")
    inputs = _random_inputs(6, S, 2, 3, seed=3)
    inputs["g"][3, :4] = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e-300], dtype=torch.float64)
    inputs["g"][4] = 0.0
    if not with_denominator:
        inputs.update(ratio=None, den=None, bias_correction=None)
    a, b = _copies(inputs, "cpu"), _copies(inputs, DEVICE)
    for step in range(3):
        a["slot"] = b["slot"] = step
        out_c = cpu_pass.sample_step(**a)
        out_t = triton_samples.sample_step(**b)
    torch.testing.assert_close(out_t.quantile.cpu(), out_c.quantile, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(out_t.events.cpu(), out_c.events, rtol=0, atol=0)
    for key in ("shadow_v", "shadow_t", "shadow_sum", "noise_mean", "ring", "ring_valid", "memory_sum"):
        torch.testing.assert_close(
            b[key].cpu(), a[key], rtol=0, atol=0, equal_nan=True, msg=lambda m, key=key: f"{key}: {m}"
        )
    for got, want in zip(b["memory"], a["memory"]):
        for x, y in zip(got, want):
            torch.testing.assert_close(x.cpu(), y, rtol=0, atol=0)
    # the max of correctly rounded ratios: exact in any order (sums over S are not compared exactly)
    torch.testing.assert_close(b["shadow_max"].cpu(), a["shadow_max"], rtol=0, atol=0, equal_nan=True)

    # and the update step after it, at the events of both families
    gen = torch.Generator().manual_seed(S)
    before = torch.randn(6, S, generator=gen, dtype=torch.float64)
    after = before + torch.randn(6, S, generator=gen, dtype=torch.float64) * 1e-3
    after[1, 2] = float("inf")
    events = [None if not with_denominator else out_c.events[0], out_c.events[1]]
    sums = {}
    for name, module, device in (("c", cpu_pass, "cpu"), ("triton", triton_samples, DEVICE)):
        upd = torch.zeros(6, 8, dtype=torch.float64, device=device)
        module.update_step(
            before.to(device),
            after.to(device),
            inputs["g"].to(device),
            inputs["valid"].to(device),
            [None if e is None else e.to(device) for e in events],
            upd,
            [7, 6, 5, 4, 3, 2],
        )
        sums[name] = upd.cpu()
    torch.testing.assert_close(sums["triton"], sums["c"], rtol=1e-12, atol=0)  # sums over S: another order
