"""Accelerate: a monitor on ``accelerator.prepare``d objects counts real updates and sees the accumulated gradient."""

from __future__ import annotations

import logging

import pytest
import torch
from accelerate import Accelerator  # the dev extra installs the frameworks: these tests run, never skip, in CI
from accelerate.state import AcceleratorState, GradientState
from torch import nn

import heavytail as ht
from heavytail.integrations.accelerate import monitor as accelerate_monitor
from heavytail.integrations.accelerate import unwrap
from tests.conftest import TinyNet, read_records, tiny_batch

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")


@pytest.fixture(autouse=True)
def _fresh_accelerator_state():
    """Accelerate keeps process-wide singletons; each test gets its own accumulation setting."""
    logging.getLogger("accelerate").setLevel(logging.ERROR)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


class Batches(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 16

    def __getitem__(self, i: int):
        return tiny_batch(i)


def prepared(accumulation: int, **kw):
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=accumulation, **kw)
    torch.manual_seed(0)
    model = TinyNet()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loader = torch.utils.data.DataLoader(Batches(), batch_size=None)
    return accelerator, *accelerator.prepare(model, optimizer, loader)


def run(accelerator, model, optimizer, loader, mon):
    """The canonical accumulate loop; returns the micro-batch losses and each real update's gradient norms."""
    inner = unwrap(model, optimizer)[1]
    norms, losses = [], []
    inner.register_step_pre_hook(  # after the monitor's: the gradient the update is about to consume
        lambda opt, args, kwargs: norms.append({n: float(p.grad.norm()) for n, p in model.named_parameters()})
    )
    for idx, y in loader:
        with accelerator.accumulate(model):
            loss = nn.functional.mse_loss(model(idx), y)
            accelerator.backward(loss)
            mon.observe_loss(loss)
            losses.append(float(loss.detach()))
            optimizer.step()
            optimizer.zero_grad()
    return losses, norms


@pytest.mark.parametrize("accumulation", [1, 2])
def test_accelerate_helper_counts_updates_and_sees_accumulated_gradient(tmp_path, accumulation):
    accelerator, model, optimizer, loader = prepared(accumulation)
    with accelerate_monitor(accelerator, model, optimizer, every=1, log_dir=tmp_path) as mon:
        assert mon.optimizer is optimizer.optimizer  # hooks on the optimizer that really steps
        losses, norms = run(accelerator, model, optimizer, loader, mon)
    steps = 16 // accumulation
    adam_steps = {int(state["step"]) for state in optimizer.optimizer.state.values()}
    assert mon.step_count == len(norms) == steps and adam_steps == {steps}
    records = read_records(tmp_path)
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    for k, (record, step_norms) in enumerate(zip(records, norms)):
        m = record["metrics"]
        for name, norm in step_norms.items():
            assert m[f"grad/norm/{name}"] == pytest.approx(norm, rel=1e-6)
        micro = losses[k * accumulation : (k + 1) * accumulation]
        assert m["loss"] == pytest.approx(sum(micro) / accumulation, rel=1e-6)
    meta_extra = __import__("json").loads((tmp_path / "meta.json").read_text())["extra"]
    assert meta_extra["trainer"] == "accelerate"
    assert meta_extra["gradient_accumulation_steps"] == accumulation


def test_plain_monitor_accepts_prepared_objects(tmp_path):
    """``Monitor(model, optimizer)`` straight on what ``prepare`` returned: the core unwraps AcceleratedOptimizer."""
    accelerator, model, optimizer, loader = prepared(2)
    with ht.Monitor(model, optimizer, every=4, log_dir=tmp_path) as mon:
        run(accelerator, model, optimizer, loader, mon)
    assert mon.step_count == 8
    assert [r["step"] for r in read_records(tmp_path)] == [4, 8]


def test_log_dir_defaults_to_the_project_dir(tmp_path):
    accelerator, model, optimizer, loader = prepared(1, project_dir=str(tmp_path / "project"))
    with accelerate_monitor(accelerator, model, optimizer, every=8) as mon:
        run(accelerator, model, optimizer, loader, mon)
    assert mon.log_dir == tmp_path / "project" / "heavytail"
    assert [r["step"] for r in read_records(mon.log_dir)] == [8, 16]


def test_unwrap_helpers_reach_the_real_objects():
    from heavytail.integrations import loss_scaler, unwrap_model, unwrap_optimizer

    accelerator, model, optimizer, _ = prepared(1)
    real = optimizer.optimizer
    assert unwrap_optimizer(optimizer) is real and unwrap_optimizer(real) is real
    assert unwrap_optimizer(None) is None
    assert loss_scaler(optimizer) is None  # no scaler without fp16
    scaler = torch.amp.GradScaler("cpu")
    optimizer.scaler = scaler
    assert loss_scaler(optimizer) is scaler and loss_scaler(real) is None
    net = TinyNet()
    assert unwrap_model(torch.compile(nn.DataParallel(net))) is net  # compile is lazy: nothing is compiled here
    assert unwrap(model, optimizer) == (model, real)
