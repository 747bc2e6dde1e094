"""The Triton kernels against the torch gradient pass (on CUDA, or in Triton's interpreter on the CPU)."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None
if HAS_TRITON and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # run the kernels on CPU tensors: slow, exact

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")

from heavytail.estimators.gradient_pass import Denominators, gradient_pass  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _case(seed: int, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(40, 30), (5,), (1,), (3000,), (17, 3, 2)]
    grads = [
        (torch.randn(*s, generator=gen) * 10 ** float(torch.randint(-6, 1, (1,), generator=gen))).to(dtype)
        for s in shapes
    ]
    grads[0][3, 4] = float("nan")
    grads[3][7] = float("inf")
    grads.insert(2, None)
    vs = [None if g is None else torch.rand(g.shape, generator=gen) * 1e-3 for g in grads]
    vs[1] = None
    vs[4][:10] = 0.0  # never-seen coordinates: r = 0
    grads = [None if g is None else g.to(DEVICE) for g in grads]
    vs = [None if v is None else v.to(DEVICE) for v in vs]
    n = len(grads)
    den = Denominators(
        vs,
        torch.linspace(0.1, 1.0, n, dtype=torch.float64, device=DEVICE),
        torch.full((n,), 1e-8, dtype=torch.float64, device=DEVICE),
    )
    index = torch.stack(
        [torch.randint(0, max(1, 1 if g is None else g.numel()), (32,), generator=gen) for g in grads]
    ).to(DEVICE)
    return grads, vs, den, index


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_denominator", [True, False])
def test_triton_kernels_match_the_torch_pass(dtype, with_denominator, monkeypatch):
    from heavytail.estimators import triton_pass

    monkeypatch.setattr(triton_pass, "CHUNK", 1024)  # several programs per large tensor
    grads, _, den, index = _case(0, dtype)
    den = den if with_denominator else None
    want = gradient_pass(grads, sample_index=index.cpu(), denominators=den, spike_threshold=50.0)
    got = triton_pass.triton_gradient_pass(grads, index, den, spike_threshold=50.0)
    for name in ("stats", "grad_samples", "ratio_samples", "denom_samples"):
        torch.testing.assert_close(
            getattr(got, name).cpu(),
            getattr(want, name).cpu().to(torch.float64),
            rtol=1e-9,
            atol=1e-30,
            equal_nan=True,
            msg=name,
        )


def test_monitor_with_the_triton_kernel_writes_the_same_records(tmp_path):
    import heavytail as ht
    from tests.conftest import TinyNet, read_records, tiny_batch

    runs = {}
    for kernel in ("torch", "triton"):
        torch.manual_seed(0)
        model = TinyNet().to(DEVICE)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        with ht.Monitor(model, opt, every=2, log_dir=tmp_path / kernel, kernel=kernel) as mon:
            for step in range(4):
                idx, y = tiny_batch(step)
                loss = torch.nn.functional.mse_loss(model(idx.to(DEVICE)), y.to(DEVICE))
                loss.backward()
                mon.observe_loss(loss)
                opt.step()
                opt.zero_grad(set_to_none=True)
        runs[kernel] = read_records(tmp_path / kernel)
    for a, b in zip(runs["torch"], runs["triton"], strict=True):
        for key, value in a["metrics"].items():
            if value is None:
                assert b["metrics"][key] is None, key
            else:
                assert b["metrics"][key] == pytest.approx(value, rel=1e-6, abs=1e-12), key
