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

from tests.estimators.test_cpu_samples import ROUNDED, _random_inputs, _run, assert_same_states  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_triton_sample_states_equal_the_torch_code(optimizer, tmp_path):
    from heavytail.estimators import triton_samples

    kernel = _run(triton_samples, optimizer, tmp_path / "triton", device=DEVICE)
    reference = _run(None, optimizer, tmp_path / "torch", device=DEVICE)
    assert kernel._samples is triton_samples and reference._samples is None  # neither fell back
    if DEVICE == "cpu":  # the interpreter computes with NumPy: the same roundings as the C kernel's
        assert_same_states(kernel, reference, optimizer)
    else:  # the GPU's roundings are IEEE too; no claim of bitwise equality is tested there
        floats = {k for k, v in reference._state.items() if isinstance(v, torch.Tensor) and v.is_floating_point()}
        assert_same_states(kernel, reference, optimizer, rounded=ROUNDED | floats, rtol=1e-6)
    kernel.close()
    reference.close()


def test_triton_quantile_and_states_match_the_c_kernel():
    from heavytail.estimators import cpu_pass, triton_samples

    if not cpu_pass.available():
        pytest.skip(f"no CPU kernels: {cpu_pass.unavailable_reason()}")
    inputs = _random_inputs(6, 40, 2, 3, seed=3)
    a = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
    a["memory"] = [tuple(t.clone() for t in f) for f in inputs["memory"]]
    b = {k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
    b["memory"] = [tuple(t.to(DEVICE) for t in f) for f in inputs["memory"]]
    for _ in range(3):
        out_c = cpu_pass.sample_step(**a)
        out_t = triton_samples.sample_step(**b)
    torch.testing.assert_close(out_t.quantile.cpu(), out_c.quantile, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(out_t.events.cpu(), out_c.events, rtol=0, atol=0)
    for key in ("shadow_v", "shadow_t", "noise_mean", "ring", "ring_valid", "memory_sum"):
        torch.testing.assert_close(
            b[key].cpu(), a[key], rtol=0, atol=0, equal_nan=True, msg=lambda m, key=key: f"{key}: {m}"
        )
