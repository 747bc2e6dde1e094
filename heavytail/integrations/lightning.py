"""PyTorch Lightning: a callback that attaches a monitor to ``Trainer.fit`` and feeds it the training loss."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

try:
    import lightning.pytorch as pl
except ImportError:  # the standalone package
    import pytorch_lightning as pl  # type: ignore[no-redef]

from heavytail.config import MonitorConfig
from heavytail.integrations import (
    explicit_run_dir_choice,
    follow_trainer,
    loss_scaler,
    unwrap_model,
    unwrap_optimizer,
)
from heavytail.monitor import Monitor

# Keyword arguments of Monitor that are not MonitorConfig fields.
_MONITOR_ARGS = ("scaler", "process_group")


class HeavyTailCallback(pl.Callback):
    """Attach a :class:`heavytail.Monitor` to a Lightning ``Trainer.fit`` run::

        trainer = lightning.Trainer(max_steps=10_000, callbacks=[HeavyTailCallback(every=50)])
        trainer.fit(module, datamodule)   # records in <default_root_dir>/heavytail/metrics.jsonl

    ``monitor_kwargs`` are :class:`heavytail.MonitorConfig` fields (or ``config=``, ``scaler=``,
    ``process_group=``), validated when the callback is built. ``log_dir`` defaults to
    ``<trainer.default_root_dir>/heavytail`` and ``run_name`` to the logger's ``name/version``. A fit resumed
    with ``ckpt_path`` continues the records there (``resume=True``); a new fit into a directory that holds an
    earlier run replaces its records with a warning (``overwrite=True``), as Lightning does with its own
    checkpoints. Pass ``resume`` or ``overwrite`` to decide yourself. The class derives from ``lightning.pytorch.Callback``, or from
    ``pytorch_lightning.Callback`` when only the standalone package is installed.

    Hooks used:

    - ``on_fit_start`` (optimizers are configured by then): builds the monitor on the LightningModule and on the
      ``torch.optim.Optimizer`` in ``trainer.optimizers[0]`` (inside a ``LightningOptimizer``, if any), with the
      precision plugin's ``GradScaler`` under ``16-mixed``. Steps are counted by that optimizer's step hooks: the
      monitor's step count follows ``trainer.global_step`` (except fp16 steps the scaler skips, which Lightning
      counts and the monitor does not). With several optimizers, watch the first one's parameters (``include``).
    - ``on_before_backward(loss)``: the loss of every micro-batch, before it is back-propagated, so it belongs to
      the optimizer step those gradients feed (``on_train_batch_end`` would come after that step). Lightning has
      divided it by ``accumulate_grad_batches`` (automatic optimization) and ``16-mixed`` has multiplied it by the
      loss scale; both are undone on the device, so the monitor's ``loss`` is the mean micro-batch loss of each
      step, with no host sync.
    - ``state_dict`` / ``load_state_dict``: the monitor's state travels in Lightning checkpoints, so a run resumed
      with ``fit(ckpt_path=...)`` continues with warm detectors and the same step count.
    - ``on_train_end`` (or ``on_exception``, ``teardown``): flushes and closes the monitor, removing its hooks
      (it stays readable in :attr:`monitor`).

    Gradients seen: Lightning steps through ``optimizer.step(closure)``, and the closure runs forward, backward
    and gradient clipping inside ``step()``; the monitor reads the gradients after the closure returns, so it sees
    the accumulated gradient after clipping (``gradient_clip_val``) and unscaling. ``grad/norm_preclip`` is
    measured at the end of each backward, before both.
    """

    def __init__(self, **monitor_kwargs: Any) -> None:
        super().__init__()
        self._monitor_args = {k: monitor_kwargs.pop(k) for k in _MONITOR_ARGS if k in monitor_kwargs}
        self._explicit = explicit_run_dir_choice(monitor_kwargs)
        self.config = MonitorConfig.from_arguments(monitor_kwargs.pop("config", None), **monitor_kwargs)
        self.monitor: Monitor | None = None
        self._pending_state: dict[str, Any] | None = None
        self._final_state: dict[str, Any] | None = None
        self._scaler: Any = None
        self._open = False

    # ------------------------------------------------------------------ Lightning hooks

    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._close()
        if not trainer.optimizers:
            raise RuntimeError("HeavyTailCallback: the Trainer has no optimizer (configure_optimizers returned none)")
        optimizer = trainer.optimizers[0]
        fields = self.config.to_init_dict()
        fields["extra"] = {
            "trainer": "lightning",
            "lightning_version": pl.__version__,
            "accumulate_grad_batches": trainer.accumulate_grad_batches,
            "gradient_clip_val": trainer.gradient_clip_val,
            "precision": str(trainer.precision),
            "world_size": trainer.world_size,
            **fields["extra"],
        }
        if fields["log_dir"] is None:
            fields["log_dir"] = Path(trainer.default_root_dir) / "heavytail"
        if fields["run_name"] is None:
            fields["run_name"] = _run_name(trainer)
        resuming = trainer.ckpt_path is not None or self._pending_state is not None
        follow_trainer(fields, self._explicit, resuming=resuming, trainer="Lightning Trainer")
        self._scaler = getattr(trainer.precision_plugin, "scaler", None) or loss_scaler(optimizer)
        monitor_args = {"scaler": self._scaler, **self._monitor_args}
        self.monitor = Monitor(
            unwrap_model(pl_module), unwrap_optimizer(optimizer), config=MonitorConfig(**fields), **monitor_args
        )
        self._open = True
        self._final_state = None
        if self._pending_state is not None:
            self.monitor.load_state_dict(self._pending_state)
            self._pending_state = None

    def on_before_backward(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", loss: torch.Tensor) -> None:
        if not self._open:
            return
        value = loss.detach()
        if pl_module.automatic_optimization:
            value = value * trainer.accumulate_grad_batches  # Lightning's normalisation for accumulation
        scale = getattr(self._scaler, "_scale", None)
        if scale is not None and self._scaler.is_enabled():
            value = value / scale.to(value.device)  # the loss scale, a device tensor: read without a sync
        self.monitor.observe_loss(value)

    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        # Before the strategy's teardown, which may move the module (and its gradients) to the CPU.
        self._close()

    def on_exception(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", exception: BaseException) -> None:
        self._close()

    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        self._close()

    def state_dict(self) -> dict[str, Any]:
        if self._open:
            return {"monitor": self.monitor.state_dict()}
        state = self._final_state if self._final_state is not None else self._pending_state
        return {"monitor": state} if state is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = state_dict.get("monitor")
        if state is None:
            return
        if self._open:  # strategies that restore checkpoints after setup
            self.monitor.load_state_dict(state)
        else:
            self._pending_state = state

    # ------------------------------------------------------------------ internals

    def _close(self) -> None:
        if not self._open:
            return
        self._open = False
        self.monitor.close()
        # A checkpoint saved after training (a last save) still carries the monitor's state.
        self._final_state = self.monitor.state_dict()


def _run_name(trainer: "pl.Trainer") -> str | None:
    """The run's name as the Trainer's logger shows it (``lightning_logs/version_3``), or None without a logger."""
    logger = trainer.logger
    if logger is None:
        return None
    name, version = getattr(logger, "name", None), getattr(logger, "version", None)
    if not isinstance(name, str) or not name:
        return None
    if isinstance(version, int):
        version = f"version_{version}"
    return f"{name}/{version}" if isinstance(version, str) and version else name
