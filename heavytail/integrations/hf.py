"""Hugging Face ``transformers.Trainer``: a callback that attaches a monitor for the run and feeds it the loss."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from heavytail.config import MonitorConfig
from heavytail.integrations import (
    explicit_run_dir_choice,
    follow_trainer,
    loss_scaler,
    unwrap_model,
    unwrap_optimizer,
)
from heavytail.monitor import Monitor

if not hasattr(TrainerCallback, "on_pre_optimizer_step"):  # pragma: no cover - old transformers
    raise ImportError(
        "heavytail.integrations.hf needs a transformers release whose TrainerCallback has "
        "on_pre_optimizer_step (the event between gradient clipping and optimizer.step())"
    )

STATE_FILE = "heavytail_monitor.pt"
"""The monitor's ``state_dict`` in each Trainer checkpoint folder (``heavytail_monitor_rank<r>.pt`` on rank r > 0)."""

# Keyword arguments of Monitor that are not MonitorConfig fields.
_MONITOR_ARGS = ("scaler", "process_group")


class HeavyTailCallback(TrainerCallback):
    """Attach a :class:`heavytail.Monitor` to a ``transformers.Trainer`` run; nothing else in the script changes::

        trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[HeavyTailCallback(every=50)])
        trainer.train()   # records in <args.output_dir>/heavytail/metrics.jsonl

    ``monitor_kwargs`` are :class:`heavytail.MonitorConfig` fields (or ``config=``, ``scaler=``,
    ``process_group=``); they are validated here, when the callback is built. ``log_dir`` defaults to
    ``<args.output_dir>/heavytail`` and ``run_name`` to the Trainer's ``args.run_name``. A resumed ``train()``
    (``resume_from_checkpoint``) continues the records there (``resume=True``); a new ``train()`` into an output
    directory that holds an earlier run replaces its records, as the Trainer replaces its own checkpoints, with
    a warning (``overwrite=True``). Pass ``resume`` or ``overwrite`` to decide yourself.

    Events used:

    - ``on_train_begin``: builds the monitor on the Trainer's model (inside DDP / ``torch.compile`` wrappers, so
      keys carry the model's own parameter names) and on the ``torch.optim.Optimizer`` inside Accelerate's
      ``AcceleratedOptimizer`` (whose ``GradScaler``, under fp16, is passed on). Steps are counted by that
      optimizer's step hooks, which fire once per ``Trainer`` update: the monitor's step count is
      ``state.global_step``. On a resumed run it loads the monitor state saved in the checkpoint.
    - the loss: a forward hook on the model reads ``outputs.loss`` of every training micro-batch (a tensor, no
      host sync; evaluation passes, in eval mode or without grad, are skipped). ``on_pre_optimizer_step`` (after
      clipping, before ``optimizer.step()``) combines the step's micro-batches the way the Trainer does: their
      sum when the model normalised each by the step's token count (``num_items_in_batch``), their mean
      otherwise. On one process the monitor's ``loss`` is then the Trainer's logged ``loss``. When the loss is
      computed outside the model (label smoothing, ``compute_loss_func``, an overridden ``compute_loss``), call
      :meth:`observe_loss` from your ``compute_loss``.
    - ``on_save``: writes the monitor's ``state_dict`` into the checkpoint folder (:data:`STATE_FILE`).
    - ``on_train_end``: flushes and closes the monitor and removes every hook (the monitor stays readable in
      :attr:`monitor`).

    Gradients seen: the step hook reads the accumulated, all-reduced gradient after the Trainer's clipping
    (``max_grad_norm``) and unscaling; ``grad/norm_preclip`` is measured at the end of each backward, before both.
    """

    def __init__(self, **monitor_kwargs: Any) -> None:
        self._monitor_args = {k: monitor_kwargs.pop(k) for k in _MONITOR_ARGS if k in monitor_kwargs}
        self._explicit = explicit_run_dir_choice(monitor_kwargs)
        self.config = MonitorConfig.from_arguments(monitor_kwargs.pop("config", None), **monitor_kwargs)
        self.monitor: Monitor | None = None
        self._forward_handle: Any = None
        self._user_loss = False
        self._warned_no_loss = False
        self._reset_loss()

    # ------------------------------------------------------------------ Trainer events

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self._close()  # a train() that raised left its monitor attached
        if model is None or optimizer is None:
            raise RuntimeError("HeavyTailCallback: the Trainer passed no model or optimizer to on_train_begin")
        import transformers

        extra = {
            "trainer": "transformers.Trainer",
            "transformers_version": transformers.__version__,
            "gradient_accumulation_steps": args.gradient_accumulation_steps,
            "max_grad_norm": args.max_grad_norm,
            "learning_rate": args.learning_rate,
            "world_size": args.world_size,
        }
        fields = self.config.to_init_dict()
        fields["extra"] = {**extra, **fields["extra"]}
        if fields["log_dir"] is None:
            fields["log_dir"] = Path(args.output_dir) / "heavytail"
        if fields["run_name"] is None and isinstance(getattr(args, "run_name", None), str) and args.run_name:
            fields["run_name"] = args.run_name
        follow_trainer(fields, self._explicit, resuming=state.global_step > 0, trainer="Trainer")
        monitor_args = {"scaler": loss_scaler(optimizer), **self._monitor_args}
        self.monitor = Monitor(
            unwrap_model(model), unwrap_optimizer(optimizer), config=MonitorConfig(**fields), **monitor_args
        )
        if state.global_step > 0:
            self._resume(args, state)
        # On the model the Trainer calls (inside DDP it is called by the wrapper), so every micro-batch is seen.
        self._forward_handle = model.register_forward_hook(self._on_forward, with_kwargs=True)
        self._reset_loss()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.monitor is None or self._user_loss:
            return
        total, parts, shares = self._loss_total, self._loss_parts, self._loss_shares
        self._reset_loss()
        if total is None:
            if not self._warned_no_loss:
                self._warned_no_loss = True
                warnings.warn(
                    "heavytail: the model returned no loss in its training forward passes, so the `loss` "
                    "metric and loss-spike alerts are off; call HeavyTailCallback.observe_loss(loss) from "
                    "your compute_loss",
                    RuntimeWarning,
                    stacklevel=2,
                )
            return
        if shares:
            loss = total
            if getattr(args, "average_tokens_across_devices", False) and args.world_size > 1:
                # The token count was summed over ranks; the Trainer multiplies by the rank count likewise.
                loss = loss * args.world_size
        else:
            loss = total / parts
        self.monitor.observe_loss(loss)

    def on_save(self, args, state, control, **kwargs):
        if self.monitor is None:
            return
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if folder.is_dir():  # a hyper-parameter search saves elsewhere; its trials are not resumed
            torch.save(self.monitor.state_dict(), folder / _state_file(args))

    def on_train_end(self, args, state, control, **kwargs):
        self._close()

    # ------------------------------------------------------------------ public

    def observe_loss(self, loss: torch.Tensor | float) -> None:
        """Feed the monitor one micro-batch's loss (its mean over the micro-batch, as a tensor: no host sync).

        For losses computed outside the model; from the first call on, the model's ``outputs.loss`` is ignored.
        """
        self._user_loss = True
        if self.monitor is not None:
            self.monitor.observe_loss(loss)

    # ------------------------------------------------------------------ internals

    def _reset_loss(self) -> None:
        self._loss_total: torch.Tensor | None = None
        self._loss_parts = 0
        self._loss_shares = False

    def _on_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if self._user_loss or not (module.training and torch.is_grad_enabled()):
            return  # evaluation and generation: no training loss
        loss = _output_loss(output, has_labels="labels" in kwargs)
        if loss is None:
            return
        part = loss.detach().float().reshape(())
        self._loss_total = part if self._loss_total is None else self._loss_total + part
        self._loss_parts += 1
        # Normalised by the step's token count: each micro-batch's loss is a share of the step's, summed.
        self._loss_shares = kwargs.get("num_items_in_batch") is not None

    def _resume(self, args, state) -> None:
        candidates = []
        if isinstance(args.resume_from_checkpoint, str):
            candidates.append(Path(args.resume_from_checkpoint))
        candidates.append(Path(args.output_dir) / f"checkpoint-{state.global_step}")
        for folder in candidates:
            path = folder / _state_file(args)
            if path.is_file():
                self.monitor.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
                return
        warnings.warn(
            f"heavytail: resuming at step {state.global_step} without a saved monitor state "
            f"({STATE_FILE} in the checkpoint); the monitor counts steps from 0 and its detectors re-warm",
            RuntimeWarning,
            stacklevel=2,
        )

    def _close(self) -> None:
        if self._forward_handle is not None:
            self._forward_handle.remove()
            self._forward_handle = None
        if self.monitor is not None:
            self.monitor.close()
        self._reset_loss()


def _output_loss(output: Any, has_labels: bool) -> torch.Tensor | None:
    """The scalar loss in a model's output: ``outputs.loss`` / ``outputs["loss"]``, or a tuple's first element when
    the model was given labels (``return_dict=False``)."""
    if isinstance(output, Mapping):
        loss = output.get("loss")
    elif isinstance(output, (tuple, list)) and output and has_labels:
        loss = output[0]
    else:
        loss = getattr(output, "loss", None)
    if isinstance(loss, torch.Tensor) and loss.numel() == 1:
        return loss
    return None


def _state_file(args: Any) -> str:
    return STATE_FILE if args.process_index == 0 else f"heavytail_monitor_rank{args.process_index}.pt"
