"""The Lightning integration with a real ``lightning.Trainer``: records, loss, exact gradients, accumulation, resume."""

from __future__ import annotations

import json
import logging
import math
import warnings

import lightning.pytorch as pl  # the dev extra installs the frameworks: these tests run, never skip, in CI
import pytest
import torch
from torch import nn

from heavytail.integrations.lightning import HeavyTailCallback
from tests.conftest import TinyNet, read_records, tiny_batch

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")


@pytest.fixture(autouse=True)
def _quiet_lightning():
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


class TinyTask(pl.LightningModule):
    """TinyNet on the shared random batches; ``training_step`` returns the MSE loss."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = TinyNet()
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        idx, y = batch
        loss = nn.functional.mse_loss(self.net(idx), y)
        self.losses.append(float(loss.detach()))
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


class Batches(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int):
        return tiny_batch(i)


class GradientLog(pl.Callback):
    """Each step's per-layer gradient norms, read after the closure (backward, accumulation) and before the update."""

    def __init__(self) -> None:
        self.norms: list[dict[str, float]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.norms.append({n: float(p.grad.norm()) for n, p in pl_module.named_parameters() if p.grad is not None})


def fit(tmp_path, callbacks, *, max_steps=12, accumulation=1, ckpt_path=None, **kw):
    trainer = pl.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        logger=kw.pop("logger", False),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accumulate_grad_batches=accumulation,
        default_root_dir=tmp_path,
        callbacks=callbacks,
        **kw,
    )
    task = TinyTask()
    loader = torch.utils.data.DataLoader(Batches(), batch_size=None, shuffle=False)
    trainer.fit(task, loader, ckpt_path=ckpt_path)
    return trainer, task


def fp16_with_scaler():
    """``16-mixed`` with a real ``GradScaler`` (on CPU Lightning would pick bf16 without one): the loss reaches
    ``on_before_backward`` multiplied by the loss scale, and the gradients at the end of backward too."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    return {"plugins": [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=1024.0))]}


@pytest.mark.parametrize(("accumulation", "precision"), [(1, None), (2, None), (2, "fp16-scaler")])
def test_fit_records_exact_gradients_and_loss(tmp_path, accumulation, precision):
    callback, grads = HeavyTailCallback(every=1), GradientLog()
    kw = fp16_with_scaler() if precision else {}
    trainer, task = fit(tmp_path, [callback, grads], max_steps=6, accumulation=accumulation, **kw)

    monitor = callback.monitor
    assert monitor.log_dir == tmp_path / "heavytail"
    assert monitor.step_count == trainer.global_step == 6
    records = read_records(monitor.log_dir)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    names = [n for n, _ in task.named_parameters()]
    assert names[0] == "net.embed.weight"
    for step, (record, norms) in enumerate(zip(records, grads.norms)):
        m = record["metrics"]
        # The gradients of *this* step (Lightning computes them inside optimizer.step's closure).
        for name in names:
            assert m[f"grad/norm/{name}"] == pytest.approx(norms[name], rel=1e-5), (step, name)
            # No clipping here: before clipping is the same gradient, and under fp16 the scale is divided out.
            assert m[f"grad/norm_preclip/{name}"] == pytest.approx(norms[name], rel=1e-5), (step, name)
        # The loss: the mean of this step's micro-batch losses (Lightning's division by accumulation undone).
        micro = task.losses[step * accumulation : (step + 1) * accumulation]
        assert m["loss"] == pytest.approx(sum(micro) / accumulation, rel=1e-5)
    # Under accumulation the monitor sees every micro-batch's backward: the micro-batch noise source.
    assert ("noise/microbatch_kurtosis/net.fc1.weight" in records[-1]["metrics"]) == (accumulation > 1)
    # Hooks are gone after fit.
    optimizer = trainer.optimizers[0]
    assert not optimizer._optimizer_step_pre_hooks and not optimizer._optimizer_step_post_hooks
    assert all(not p._post_accumulate_grad_hooks for p in task.parameters())


def test_fit_every_four_with_clipping(tmp_path):
    callback = HeavyTailCallback(every=4)
    trainer, task = fit(tmp_path, [callback], max_steps=12, gradient_clip_val=1e-3)
    records = read_records(callback.monitor.log_dir)
    assert [r["step"] for r in records] == [4, 8, 12]
    for record in records:
        m = record["metrics"]
        assert m["steps"] == 4
        assert math.isfinite(m["loss"])
        assert m["grad/norm_max"] == pytest.approx(1e-3, rel=1e-3)  # clipped before the monitor reads it
        assert m["grad/norm_preclip"] > 10 * m["grad/norm"]
        assert all(math.isfinite(m[f"grad/kurtosis/{n}"]) for n in ("net.fc1.weight", "net.fc2.weight"))


def test_resume_from_checkpoint_restores_monitor(tmp_path):
    first = HeavyTailCallback(every=3)
    trainer, _ = fit(tmp_path, [first], max_steps=3)
    path = tmp_path / "three.ckpt"
    trainer.save_checkpoint(path)

    resumed = HeavyTailCallback(every=3)
    trainer, _ = fit(tmp_path, [resumed], max_steps=6, ckpt_path=str(path))
    assert resumed.monitor.step_count == trainer.global_step == 6
    assert [r["step"] for r in read_records(resumed.monitor.log_dir)] == [3, 6]


def test_bad_monitor_arguments_fail_when_the_callback_is_built():
    with pytest.raises(ValueError, match="sample_size"):
        HeavyTailCallback(sample_size=-1)


def test_the_run_is_titled_with_the_loggers_name_and_version(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    callback = HeavyTailCallback(every=3)
    fit(tmp_path, [callback], max_steps=3, logger=CSVLogger(tmp_path, name="tiny"))
    meta = json.loads((callback.monitor.log_dir / "meta.json").read_text())
    assert meta["run_name"] == "tiny/version_0"


def test_a_new_fit_into_the_same_directory_replaces_the_records_with_a_warning(tmp_path):
    fit(tmp_path, [HeavyTailCallback(every=3)], max_steps=6)
    again = HeavyTailCallback(every=3)
    with pytest.warns(RuntimeWarning, match=r"a new Lightning Trainer run in the same output directory: replacing"):
        fit(tmp_path, [again], max_steps=3)
    assert [r["step"] for r in read_records(again.monitor.log_dir)] == [3]
