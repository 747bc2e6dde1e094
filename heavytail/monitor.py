"""The monitor: attaches to a model and its optimizer, runs the statistic families at each step, writes records."""

from __future__ import annotations

import atexit
import logging
import time
import traceback
import warnings
import weakref
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from heavytail import families, runfiles
from heavytail.alerts import AlertEngine
from heavytail.backends import open_backends
from heavytail.config import MonitorConfig
from heavytail.distributed import DistContext, check_one_device, check_placements, local
from heavytail.estimators.gradient_pass import GradientPass
from heavytail.families.base import BackwardView, Family, HostViews, Record, StepView, measurable_gradients
from heavytail.families.loss import total_steps
from heavytail.families.packer import pack
from heavytail.families.step import step_view
from heavytail.hooks.gradients import BackwardTap, LocalSampleTap
from heavytail.hooks.optimizer import OptimizerTap, ScalerTap, check_owns, denominators, param_kinds
from heavytail.hooks.selection import select_parameters
from heavytail.hooks.skip import NoSkip, SkipStep
from heavytail.kernels import select
from heavytail.layout import Layout, effective_sample_size  # noqa: F401  (effective_sample_size: public here)
from heavytail.wrappers import unwrap_model, unwrap_optimizer

logger = logging.getLogger("heavytail")

# Models a monitor is attached to: attaching twice would double-count every statistic.
_ATTACHED: "weakref.WeakKeyDictionary[nn.Module, Monitor]" = weakref.WeakKeyDictionary()

STATE_VERSION = 3
"""``state_dict`` layout: ``{family: {"version", "tensors", "host"}}`` (version 2 was one flat tensor dict)."""

_NO_STEP_BACKWARDS = 200
"""Backward passes without an optimizer step after which the monitor warns (far above any accumulation)."""


class Monitor:
    """Watches a model's gradients (and its optimizer's denominators) and writes heavy-tail statistics.

    Attach it around a training loop; nothing in the loop changes::

        with heavytail.Monitor(model, optimizer, every=100, log_dir="runs/exp1") as mon:
            for batch in loader:
                loss = model(batch); loss.backward()
                mon.observe_loss(loss)        # optional; takes the tensor, never synchronizes
                optimizer.step(); optimizer.zero_grad()

    Steps are counted by the optimizer's step hooks. Between checkpoints every statistic is a tensor on the
    gradients' device, kept by the statistic families (``heavytail.families``); every ``every`` steps their
    figures are merged, copied to the host once and written as one record. Without an optimizer, call
    :meth:`step` after each update. ``scaler``: the ``torch.amp.GradScaler`` in use, so norms and samples measured
    before ``unscale_`` are divided by the loss scale on the device, and the backward passes of an iteration whose
    step it skips are forgotten at its ``update()`` (not taken for micro-batches of the next step).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        config: MonitorConfig | None = None,
        scaler: Any = None,
        process_group: Any = None,
        **kwargs: Any,
    ) -> None:
        config = MonitorConfig.from_arguments(config, **kwargs)
        if not isinstance(model, nn.Module):
            raise TypeError(f"Monitor: model must be a torch.nn.Module, got {type(model).__name__}")
        optimizer = unwrap_optimizer(optimizer)
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"Monitor: optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        inner = unwrap_model(model)
        if inner in _ATTACHED:
            raise RuntimeError(
                f"Monitor: a heavytail monitor is already attached to this {type(inner).__name__}; close() it first"
            )
        watched = select_parameters(inner, config.include, config.exclude)
        names, params = [n for n, _ in watched], [p for _, p in watched]
        check_one_device(names, params)
        check_placements(names, params)
        if optimizer is not None:
            check_owns(optimizer, params, names)
        self.model, self.optimizer, self.scaler = inner, optimizer, scaler
        self.names, self.params = names, params
        self.dist = DistContext.detect(params, process_group)
        if config.skip_spikes and optimizer is None:
            raise ValueError("Monitor: skip_spikes=True needs the optimizer, whose step it undoes")
        if config.skip_spikes and self.dist.active:
            # Each rank's detector sees its own loss: the ranks could disagree on a skip and diverge.
            raise ValueError("Monitor: skip_spikes=True is not supported under torch.distributed yet")
        self.kinds = param_kinds(optimizer, params)
        self.log_dir = Path(config.log_dir) if config.log_dir is not None else runfiles.default_log_dir()
        if config.run_name is None:
            config.run_name = self.log_dir.name
        self.config, self.run_name = config, config.run_name
        layout = self.layout = Layout.build(config, names, params, self.kinds, optimizer, self.dist)
        self.units, self.device, self.sample_size = layout.units, layout.device, layout.sample_size
        self._sample_index = layout.sample_index
        layout.scaler = scaler
        layout.kernels = self._kernels = select(config, layout.device)
        # The torch gradient pass: the reference, and the fallback of the fused kernels.
        self._pass = GradientPass(
            layout.numels, layout.sample_index, chunk_numel=config.chunk_numel, dtype=config.stats_dtype
        )
        # The step of the run continued in log_dir (resume=True), or 0; checked before any backend opens a file.
        resumed_at = (
            runfiles.prepare(self.log_dir, resume=config.resume, overwrite=config.overwrite) if self.dist.writer else 0
        )
        self._backends = open_backends(config.backends, self.log_dir, config, self.dist.writer)
        self._alert_callbacks: list[Callable[[dict], None]] = []
        self._failed_callbacks: set[int] = set()  # user callbacks that raised (reported once each)
        self.families = families.build(layout)
        # The families with work after each backward pass (most have none: the pass is not read for them).
        self._backward_families = [f for f in self.families.values() if type(f).on_backward is not Family.on_backward]
        # Under gradient accumulation every pass is read; a family may ask for every pass in any case.
        self._every_backward = any(f.every_backward for f in self._backward_families)
        self._final_families = [
            f for f in self.families.values() if type(f).on_gradients_final is not Family.on_gradients_final
        ]
        self._rows = {id(p): i for i, p in enumerate(params)}
        self.alerts = AlertEngine(config, self.log_dir, self._emit_alert, warmup=layout.spike_config.warmup)
        self.families["spikes"].bind_alerts(self.alerts)
        self._skip = SkipStep(optimizer, layout.device) if config.skip_spikes else NoSkip()
        self.families["spikes"].bind_skip(self._skip)
        self.step_count = self._interval_start = resumed_at
        self._loss_sum: torch.Tensor | None = None
        self._loss_n = 0
        self._skips = {"sparse": 0, "complex": 0}
        self._closed = False
        # Backward passes of the current step (two or more: gradient accumulation), and since the last counted
        # step (a monitor whose optimizer never steps records nothing: warned about once).
        self._backwards, self._accumulating = 0, False
        self._pass_view: BackwardView | None = None  # the last backward pass's view, for its final-gradient hooks
        self._unstepped_backwards, self._warned_no_step = 0, False
        self._failure: BaseException | None = None  # the first exception inside the monitor's own hooks
        guard = self._guarded
        self._optimizer_tap = (
            OptimizerTap(optimizer, guard(self._before_step), guard(self._after_step)) if optimizer else None
        )
        self._backward_tap = BackwardTap(params, guard(self._on_backward_end), guard(self._on_gradients_final))
        # A GradScaler's skipped step is seen where its update() closes the iteration.
        self._scaler_tap = ScalerTap(scaler, guard(self._after_scaler_update)) if hasattr(scaler, "update") else None
        rank_local = self.families["noise"].rank_local
        self._local_tap = (
            LocalSampleTap(params, layout.sample_index_dev, rank_local) if rank_local is not None else None
        )
        _ATTACHED[inner] = self
        if self.dist.writer:
            runfiles.write_meta(self.log_dir, runfiles.run_meta(self), resumed_at=resumed_at, resume=config.resume)
        _OPEN_MONITORS.add(self)  # the last partial interval is written at exit if close() is never called

    # ------------------------------------------------------------------ public API

    def observe_loss(self, loss: torch.Tensor | float) -> None:
        """Record this step's loss for the ``loss`` metrics and the loss-spike detector (no synchronization).

        Call it once per micro-batch (the step's loss is their mean) before ``optimizer.step()``.
        """
        if self._closed:
            return
        if isinstance(loss, torch.Tensor):
            if loss.numel() != 1:
                raise ValueError(
                    f"Monitor.observe_loss: expected the scalar loss of the step (or micro-batch), got a tensor of "
                    f"shape {tuple(loss.shape)}; pass the loss you back-propagate, e.g. loss.mean()"
                )
            value = loss.detach().reshape(()).to(self.device, self.config.stats_dtype, non_blocking=True)
        else:
            value = torch.full((), float(loss), device=self.device, dtype=self.config.stats_dtype)
        self._loss_sum = value if self._loss_sum is None else self._loss_sum + value
        self._loss_n += 1

    def step(self) -> None:
        """Count one optimizer update; only needed when the monitor was built without an optimizer."""
        if self._optimizer_tap is not None:
            raise RuntimeError("Monitor.step(): steps are counted by the optimizer's hooks; do not call step()")
        self._guarded(self._before_step)()
        self._guarded(self._after_step)()

    def set_probe(
        self,
        loss_fn: Callable[[nn.Module, Any], torch.Tensor],
        batch: Any,
        *,
        micro_batches: int | None = None,
        batch_size: int | None = None,
    ) -> None:
        """Give the noise probe a held batch: at every ``config.probe_every``-th checkpoint it splits ``batch``
        into mini-batches and runs :func:`heavytail.probe.noise_probe`.

        The probe's noise is that of a gradient over one mini-batch, so its reading depends on the mini-batch's
        size (below alpha 2 it does not; above, larger batches read lighter): give ``batch_size``, the training
        micro-batch size in rows, to measure the noise the optimizer sees (the batch is cut into
        ``len(batch) // batch_size`` mini-batches of exactly that many rows; at least 32 of them give the tail
        verdict its footing), or ``micro_batches`` (default 32) to cut it into that many. Records state what was
        used: ``probe/batch_size`` (rows per mini-batch) and ``probe/micro_batches``.

        ``loss_fn(model, mini_batch)`` returns the scalar loss to back-propagate (apply autocast inside it if
        training uses it). The probe saves and restores every ``.grad``, the RNG states, the modules' modes and
        the buffers, so training is unchanged; its backward passes are not counted as micro-batches. Cost per
        probe: one forward+backward pass per mini-batch. Records get ``probe/<figure>/<name>`` keys (see
        docs/probe.md). Not run under torch.distributed (each rank would probe its own copy); a warning says so
        once.
        """
        self.families["probe"].configure(self.model, loss_fn, batch, micro_batches, batch_size)

    def on_alert(self, fn: Callable[[dict], None]) -> Callable[[dict], None]:
        """Register ``fn(alert_record)`` to be called for every alert; returns ``fn`` (usable as a decorator)."""
        self._alert_callbacks.append(fn)
        return fn

    def flush(self) -> None:
        """Write a checkpoint record now for the steps since the last one (nothing if there were none).

        Under torch.distributed, every rank must call it (it merges statistics across ranks).
        """
        if self._closed or self._failure is not None:
            return
        if self.step_count == self._interval_start:
            if self.dist.writer:
                self.families["spikes"].read_flags(wait=True, before_step=self.step_count + 1)
                self.families["flight"].write(self.log_dir)
            return
        self._checkpoint()

    def close(self) -> None:
        """Flush, remove every hook and close the backends. Safe to call more than once."""
        if self._closed:
            return
        _OPEN_MONITORS.discard(self)
        self._warn_no_step(at_close=True)
        try:
            self.flush()
        finally:
            self._closed = True
            if self.dist.writer and self._failure is None:
                runfiles.update_meta(self.log_dir, finished=time.time(), final_step=self.step_count)
            for tap in (self._optimizer_tap, self._backward_tap, self._local_tap, self._scaler_tap):
                if tap is not None:
                    tap.remove()
            for backend in self._backends:
                backend.close()
            if _ATTACHED.get(self.model) is self:
                del _ATTACHED[self.model]

    detach = close

    def __enter__(self) -> "Monitor":
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        if exc_type is None:
            self.close()
            return
        try:
            self.close()
        except Exception as err:  # the training loop's own exception is the one to see, not ours on top of it
            warnings.warn(
                f"heavytail: close() failed while the training loop was raising: {type(err).__name__}: {err}",
                RuntimeWarning,
                stacklevel=2,
            )

    def state_dict(self) -> dict[str, Any]:
        """The monitor's state: tensors, numbers, strings, lists and dicts only (loads with ``weights_only=True``)."""
        return {
            "version": STATE_VERSION,
            "names": list(self.names),
            "step_count": self.step_count,
            "interval_start": self._interval_start,
            "families": {
                name: {
                    "version": family.version,
                    "tensors": {k: v.detach().cpu().clone() for k, v in family.state_tensors().items()},  # sync point
                    "host": family.host_state(),
                }
                for name, family in self.families.items()
            },
            "alerts": self.alerts.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output, so detectors continue warm and the step counter goes on."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"Monitor.load_state_dict: unsupported state version {state.get('version')!r}")
        if list(state["names"]) != self.names:
            raise ValueError("Monitor.load_state_dict: the saved state watches different parameters than this monitor")
        saved = state["families"]
        for name, family in self.families.items():
            if name not in saved or saved[name].get("version") not in (family.version, *family.loads_versions):
                raise ValueError(
                    f"Monitor.load_state_dict: the saved state has no {name} state of version {family.version}"
                )
        for name, family in self.families.items():
            family.load_state_tensors(saved[name]["tensors"])
            family.load_host_state(saved[name]["host"])
        self.step_count = int(state["step_count"])
        self._interval_start = int(state["interval_start"])
        self.alerts.load_state_dict(state["alerts"])

    # ------------------------------------------------------------------ hooks and the step schedule

    def _guarded(self, hook: Callable[[], None]) -> Callable[[], None]:
        """``hook`` as the taps call it: an exception inside the monitor never reaches the training loop.

        The first one is reported once, with its traceback, and the monitor stops measuring (its state may be half
        updated); training goes on and ``close()`` still removes the hooks. Under torch.distributed it is raised:
        a rank that stopped would leave the others waiting in the next checkpoint's collectives for ever.
        """

        def call() -> None:
            if self._failure is not None:
                return
            try:
                hook()
            except Exception as exc:
                if self.dist.active:
                    raise
                self._failure = exc
                warnings.warn(
                    f"heavytail: the monitor failed and stops measuring; training goes on. Please report "
                    f"this: {type(exc).__name__}: {exc}\n{traceback.format_exc()}",
                    RuntimeWarning,
                    stacklevel=2,
                )

        return call

    def _backward_view(self) -> BackwardView | None:
        """This rank's gradients (local shards under FSDP2) and the rows whose gradient can be measured."""
        grads = [local(p.grad) if p.grad is not None else None for p in self.params]
        rows = [
            i
            for i, g in enumerate(grads)
            if g is not None and g.layout == torch.strided and not g.is_complex() and g.numel() > 0
        ]
        return BackwardView(grads, rows, self._accumulating) if rows else None

    def _on_backward_end(self) -> None:
        """After each backward pass, before DDP's reducer finalises the all-reduce (``BackwardTap``): count it,
        and let the families see this rank's own accumulated gradient (micro-batch samples)."""
        self._pass_view = None
        if self._closed or self.families["probe"].probing:
            return
        self._backwards += 1
        self._unstepped_backwards += 1
        if self._unstepped_backwards == _NO_STEP_BACKWARDS:
            self._warn_no_step(at_close=False)
        if not self._backward_families or not (self._accumulating or self._every_backward):
            return
        view = self._pass_view = self._backward_view()
        for family in self._backward_families if view is not None else ():
            family.on_backward(view)

    def _on_gradients_final(self) -> None:
        """Once a backward pass's gradients are those ``optimizer.step()`` would see, before any clipping (after
        every callback queued during the backward pass: DDP's all-reduce, FSDP2's reduce-scatter)."""
        if self._closed or self.families["probe"].probing or not self._final_families:
            return
        # One process: no callback reduced the gradients in between, so the pass's view is still theirs.
        view = self._pass_view if self._pass_view is not None and not self.layout.dist.active else self._backward_view()
        self._pass_view = None
        for family in self._final_families if view is not None else ():
            family.on_gradients_final(view)

    def _before_step(self) -> None:
        if self._closed:
            return
        with torch.no_grad():
            view = self._step_view()
            for family in self.families.values():
                family.update(view)
        self._accumulating = self._backwards > 1
        self._backwards = 0

    def _after_step(self) -> None:
        if self._closed:
            return
        self._unstepped_backwards = 0
        self._skip.restore()  # before any family reads the parameters after the step
        with torch.no_grad():
            for family in self.families.values():
                family.after_update()
        self.step_count += 1
        # Read the flags copied during earlier steps, if their copy is done: never wait for the device.
        self.families["spikes"].read_flags(wait=False, before_step=self.step_count)
        if self.step_count % self.config.every == 0:
            self._checkpoint()

    def _after_scaler_update(self) -> None:
        """After ``GradScaler.update()``: backward passes since the last step mean the scaler skipped this
        iteration's step. They are not micro-batches of the next step: every family forgets them."""
        if self._closed or self._backwards == 0:
            return
        self._backwards = 0
        for family in self._backward_families:
            family.drop_step()

    def _step_view(self) -> StepView:
        """The fused gradient pass over every gradient (one read), and what every family agrees on."""
        grads, skipped = measurable_gradients(self.params)
        for kind, count in skipped.items():
            self._skips[kind] += count
        denoms = denominators(self.optimizer, self.params, self.device, self._rows)
        loss = self._loss_sum / self._loss_n if self._loss_sum is not None else None
        self._loss_sum, self._loss_n = None, 0
        return step_view(self.layout, self._pass, grads, denoms, loss, self.step_count, self._interval_start)

    def _warn_no_step(self, at_close: bool) -> None:
        """Warn once when backward passes run and no optimizer step is counted: nothing would ever be recorded."""
        if self._warned_no_step or self._unstepped_backwards == 0 or (at_close and self.step_count > 0):
            return
        self._warned_no_step = True
        if self._optimizer_tap is None:
            how = (
                "the monitor was built without an optimizer: pass it, Monitor(model, optimizer), or call "
                "mon.step() after each optimizer.step()"
            )
        else:
            how = (
                "the optimizer given to the monitor never stepped: is it the one the training loop steps? "
                "(a trainer or a wrapper may have built another)"
            )
        warnings.warn(
            f"heavytail: {self._unstepped_backwards} backward passes and no optimizer step counted "
            f"{'in this run' if at_close else 'since the last one'}; {how}. Nothing is recorded until steps are "
            "counted.",
            RuntimeWarning,
            stacklevel=3,
        )

    # ------------------------------------------------------------------ checkpoint

    def _checkpoint(self) -> None:
        """Every family's slots merged across ranks and copied to the host at once, then one record."""
        slots = {name: family.readout(self.step_count) for name, family in self.families.items()}
        views = HostViews(self.layout, slots, pack(slots, self.dist, self.config.stats_dtype))
        if self.dist.writer:
            record = Record(
                views, self.step_count - self._interval_start, total_steps(views), self._skips, self.log_dir
            )
            metrics: dict[str, float] = {}
            for family in self.families.values():
                metrics.update(family.metrics(views, record))
            self.families["spikes"].read_flags(wait=True, before_step=self.step_count + 1)
            for backend in self._backends:
                backend.log(metrics, self.step_count)
            self.alerts.process_record(self.step_count, metrics, self.units)
            self.families["flight"].write(self.log_dir)
        for family in self.families.values():
            family.reset()
        self._interval_start = self.step_count
        self._skips = dict.fromkeys(self._skips, 0)

    def _emit_alert(self, alert: dict) -> None:
        """Send one alert everywhere: backends (jsonl writes alerts.jsonl), logging, callbacks; keep its flight."""
        self.families["flight"].snapshot(alert, self.step_count)
        logger.warning("heavytail alert [%s] %s", alert["rule"], alert["message"])
        for backend in self._backends:
            backend.alert(alert)
        for fn in list(self._alert_callbacks):
            try:
                fn(dict(alert))
            except Exception as exc:  # a user callback must not break training either
                if id(fn) not in self._failed_callbacks:
                    self._failed_callbacks.add(id(fn))
                    warnings.warn(
                        f"heavytail: on_alert callback {fn!r} raised {type(exc).__name__}: {exc}; it is "
                        "still called for later alerts, and further failures are not reported",
                        RuntimeWarning,
                        stacklevel=2,
                    )


# Monitors not yet closed: at interpreter exit each writes its last partial interval (close() was forgotten).
_OPEN_MONITORS: "weakref.WeakSet[Monitor]" = weakref.WeakSet()


@atexit.register
def _close_at_exit() -> None:
    for monitor in list(_OPEN_MONITORS):
        if monitor.dist.active:
            continue  # the other ranks may be gone: the checkpoint's collectives would wait for ever
        try:
            monitor.close()
        except Exception as exc:  # the interpreter is exiting: report, never raise
            warnings.warn(
                f"heavytail: closing the monitor at exit failed: {type(exc).__name__}: {exc}",
                RuntimeWarning,
                stacklevel=1,
            )
