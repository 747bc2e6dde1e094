"""The step path never synchronizes the host with the device (CPU: counted; CUDA: sync debug mode)."""

from __future__ import annotations

import sys

import pytest
import torch

import heavytail as ht
from tests.conftest import TinyNet, train

TRANSFERS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")


class TransferCounter:
    """Counts host-transfer calls on tensors made from heavytail's own code (not from the training loop)."""

    def __init__(self, monkeypatch):
        self.calls: list[str] = []
        for name in TRANSFERS:
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._wrap(name, original))

    def _wrap(self, name, original):
        counter = self

        def wrapped(tensor, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if "/heavytail/" in caller.replace("\\", "/"):
                counter.calls.append(f"{name} from {caller}:{sys._getframe(1).f_lineno}")
            return original(tensor, *args, **kwargs)

        return wrapped


def test_cpu_step_path_makes_no_host_transfer(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    mon = ht.Monitor(model, opt, every=1000, log_dir=tmp_path)
    train(model, opt, mon, steps=3)  # plans and caches are built on the first steps
    counter = TransferCounter(monkeypatch)
    train(model, opt, mon, steps=20, start=3)
    steps_calls = list(counter.calls)
    monkeypatch.undo()
    mon.close()
    # The only transfer-like call allowed: reading the flag vector, which is already in host memory (on CUDA
    # it was copied asynchronously into pinned memory one step earlier), once per step.
    assert not [c for c in steps_calls if not c.startswith("numpy from")], steps_calls
    flag_reads = [c for c in steps_calls if c.startswith("numpy from")]
    assert 0 < len(flag_reads) <= 20


def test_checkpoint_makes_one_packed_copy(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    mon = ht.Monitor(model, opt, every=5, log_dir=tmp_path, alerts=())
    train(model, opt, mon, steps=3)
    counter = TransferCounter(monkeypatch)
    train(model, opt, mon, steps=2, start=3)  # step 5 is a checkpoint
    calls = list(counter.calls)
    monkeypatch.undo()
    mon.close()
    copies = [c for c in calls if c.startswith("cpu from")]
    assert len(copies) == 1, calls


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_training_loop_under_sync_debug_mode_error(tmp_path):
    torch.manual_seed(0)
    model = TinyNet().cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    mon = ht.Monitor(model, opt, every=50, log_dir=tmp_path)
    data = [(torch.randint(0, 50, (16, 8), device="cuda"), torch.randn(16, 1, device="cuda")) for _ in range(60)]

    def run(steps):
        for idx, y in data[:steps]:
            loss = torch.nn.functional.mse_loss(model(idx), y)
            loss.backward()
            mon.observe_loss(loss)
            opt.step()
            opt.zero_grad(set_to_none=True)

    run(5)  # warm-up: plans, allocator, cuBLAS handles
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        run(40)  # steps 6..45: no checkpoint
    finally:
        torch.cuda.set_sync_debug_mode("default")
    mon.close()
