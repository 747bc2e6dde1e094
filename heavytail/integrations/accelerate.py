"""Hugging Face Accelerate: a monitor for a loop whose model and optimizer went through ``accelerator.prepare``."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from heavytail.config import MonitorConfig
from heavytail.integrations import unwrap_model, unwrap_optimizer
from heavytail.monitor import Monitor

if TYPE_CHECKING:  # the helper only reads attributes: it never imports accelerate itself
    from accelerate import Accelerator

__all__ = ["monitor", "unwrap"]


def unwrap(model: nn.Module, optimizer: Any = None) -> tuple[nn.Module, Any]:
    """The user's model and the ``torch.optim.Optimizer`` inside what ``accelerator.prepare`` returned.

    ``prepare`` wraps the model in ``DistributedDataParallel`` when there are several processes (and in
    ``torch.compile``'s module when asked), and the optimizer always in an ``AcceleratedOptimizer``, whose
    ``step()`` skips the inner optimizer while gradients accumulate. Parameters are shared, not copied, so hooks
    on the unwrapped objects see every step of the prepared ones.
    """
    return unwrap_model(model), unwrap_optimizer(optimizer) if optimizer is not None else None


def monitor(accelerator: "Accelerator", model: nn.Module, optimizer: Any = None, **monitor_kwargs: Any) -> Monitor:
    """A :class:`heavytail.Monitor` on a prepared model and optimizer::

        model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
        with heavytail.integrations.accelerate.monitor(accelerator, model, optimizer, every=50) as mon:
            for batch in loader:
                with accelerator.accumulate(model):
                    loss = model(**batch).loss
                    accelerator.backward(loss)
                    mon.observe_loss(loss)           # the micro-batch loss, before accelerate's scaling
                    optimizer.step()                 # skipped while accumulating: not counted
                    optimizer.zero_grad()

    What it adds to ``Monitor(model, optimizer)``: the unwrapped model and optimizer (:func:`unwrap`), the
    accelerator's ``GradScaler`` under fp16 (so ``grad/norm_preclip`` is unscaled on the device), ``log_dir``
    defaulting to ``<accelerator.project_dir>/heavytail`` when the accelerator has a project directory, and the
    accelerator's settings in ``meta.json``. Steps are counted by the inner optimizer's hooks, so an update is
    counted once, when the accumulated gradient is applied (the optimizer's own step count; fp16 steps the
    scaler skips are not counted). Every process builds its own monitor (they merge statistics at checkpoints);
    rank 0 writes.

    ``monitor_kwargs`` are :class:`heavytail.MonitorConfig` fields, or ``config=``, ``scaler=``,
    ``process_group=``.
    """
    import accelerate

    inner_model, inner_optimizer = unwrap(model, optimizer)
    monitor_args = {k: monitor_kwargs.pop(k) for k in ("scaler", "process_group") if k in monitor_kwargs}
    monitor_args.setdefault("scaler", getattr(accelerator, "scaler", None))
    config = monitor_kwargs.pop("config", None)
    fields = {**(config.to_init_dict() if config is not None else {}), **monitor_kwargs}
    fields["extra"] = {
        "trainer": "accelerate",
        "accelerate_version": accelerate.__version__,
        "gradient_accumulation_steps": accelerator.gradient_accumulation_steps,
        "mixed_precision": str(accelerator.mixed_precision),
        "num_processes": accelerator.num_processes,
        **fields.get("extra", {}),
    }
    project_dir = getattr(accelerator, "project_dir", None)
    if fields.get("log_dir") is None and project_dir is not None:
        fields["log_dir"] = Path(project_dir) / "heavytail"
    return Monitor(inner_model, inner_optimizer, config=MonitorConfig(**fields), **monitor_args)
