"""The monitor: wires the taps to the estimators, streams statistics on the device, and writes checkpoint records."""

from __future__ import annotations

import atexit
import collections
import json
import logging
import math
import os
import re
import time
import traceback
import warnings
import weakref
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch import nn

from heavytail import __version__, runfiles
from heavytail.alerts import AlertEngine
from heavytail.backends import backend_factory, is_backend
from heavytail.backends.jsonl import dumps_record
from heavytail.config import MonitorConfig
from heavytail.distributed import DistContext, check_one_device, check_placements, local, local_numel
from heavytail.estimators import cpu_pass, memory, noise, spike
from heavytail.estimators.gradient_pass import (
    ABSMAX,
    COUNT,
    NONFINITE,
    RATIO_MAX,
    RATIO_SPIKES,
    S1,
    S2,
    S3,
    S4,
    Denominators,
    GradientPass,
    PassResult,
)
from heavytail.estimators.hill import default_top_count, hill_from_top, top_magnitudes
from heavytail.estimators.kurtosis import gaussian_kurtosis_quantile, kurtosis_from_power_sums
from heavytail.estimators.masks import float_mask
from heavytail.estimators.quantile import upper_quantile as _upper_quantile
from heavytail.hooks.gradients import BackwardTap, LocalSampleTap
from heavytail.hooks.optimizer import (
    OptimizerTap,
    check_owns,
    denominators,
    gather_samples,
    optimizer_kind,
    param_kinds,
    premomentum_matrix,
)
from heavytail.hooks.selection import select_parameters
from heavytail.probe import noise_probe, split_batch
from heavytail.transfer import to_device
from heavytail.wrappers import unwrap_model, unwrap_optimizer

logger = logging.getLogger("heavytail")

# Models a monitor is attached to: attaching twice would double-count every statistic.
_ATTACHED: "weakref.WeakKeyDictionary[nn.Module, Monitor]" = weakref.WeakKeyDictionary()

STATE_VERSION = 2

# Columns of the per-tensor interval accumulators. Sums merge across ranks by addition, the others by max, so a
# sharded (FSDP2) run is merged exactly at checkpoints with two all-reduces.
SUM_FIELDS = (
    "count",
    "s1",
    "s2",
    "s3",
    "s4",
    "nonfinite",
    "ratio_spikes",
    "preclip_s2",
    "ratio_p99",
    "ratio_entries",
    "entries",
    "preclip_steps",
)
MAX_FIELDS = ("absmax", "ratio_max", "steps", "bad_steps", "ratio_steps")
# Per-tensor sums of the optimizer-update figures (sample based): update RMS ratio and its steps, update/gradient
# ratio at denominator events (real, shadow) and their counts, Lion's flipped-sign fraction and its steps.
UPDATE_FIELDS = (
    "rms_ratio",
    "rms_steps",
    "event_ratio_adam",
    "events_adam",
    "event_ratio_shadow",
    "events_shadow",
    "sign_flip",
    "sign_steps",
)
MEMORY_FIELDS = ("started", "ended", "ended_steps")
_U = {name: i for i, name in enumerate(UPDATE_FIELDS)}
_UPDATE_COLUMNS = tuple(
    _U[k] for k in ("rms_ratio", "rms_steps", "event_ratio_adam", "events_adam", "event_ratio_shadow", "events_shadow")
)
_S = {name: i for i, name in enumerate(SUM_FIELDS)}
_M = {name: i for i, name in enumerate(MAX_FIELDS)}


class _SafeBackend:
    """Isolates a backend: its first failure is reported once, later ones are counted silently, training goes on.

    A failing backend keeps being called (a network blip may pass); the others, and the JSONL record, never
    depend on it.
    """

    def __init__(self, name: str, backend: Any) -> None:
        self.name = name
        self.backend = backend
        self.failures = 0

    def _call(self, method: str, *args: Any) -> None:
        fn = getattr(self.backend, method, None)
        if fn is None:
            return
        try:
            fn(*args)
        except Exception as exc:  # a backend must never break training
            self.failures += 1
            if self.failures == 1:
                warnings.warn(
                    f"heavytail: backend {self.name!r} failed in {method}(); training goes on and further failures "
                    f"of this backend are counted silently: {type(exc).__name__}: {exc}",
                    RuntimeWarning,
                    stacklevel=3,
                )

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        self._call("log", metrics, step)

    def alert(self, alert: Mapping[str, Any]) -> None:
        self._call("alert", alert)

    def close(self) -> None:
        self._call("close")


def _default_log_dir() -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path("heavytail_runs") / stamp
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{stamp}-{n}")
    return path


class Monitor:
    """Watches a model's gradients (and its optimizer's denominators) and writes heavy-tail statistics.

    Attach it around a training loop; nothing in the loop changes::

        with heavytail.Monitor(model, optimizer, every=100, log_dir="runs/exp1") as mon:
            for batch in loader:
                loss = model(batch); loss.backward()
                mon.observe_loss(loss)        # optional; takes the tensor, never synchronizes
                optimizer.step(); optimizer.zero_grad()

    Steps are counted by the optimizer's step hooks. Between checkpoints every statistic is a tensor on the
    gradients' device; every ``every`` steps one packed tensor is copied to the host and written as a record.
    Without an optimizer, call :meth:`step` after each update. ``scaler``: the ``torch.amp.GradScaler`` in use,
    so norms measured before ``unscale_`` are divided by the loss scale on the device.
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
        self.names = [n for n, _ in watched]
        self.params = [p for _, p in watched]
        check_one_device(self.names, self.params)
        check_placements(self.names, self.params)
        self._rows = {id(p): i for i, p in enumerate(self.params)}
        # The parameter list as the sample gathers read it (complex ones have no real samples), unless DTensors
        # must be localised at each read.
        self._plain_params = (
            None
            if any(local(p) is not p for p in self.params)
            else [None if p.is_complex() else p for p in self.params]
        )
        if optimizer is not None:
            check_owns(optimizer, self.params, self.names)
        self.model = inner
        self.optimizer = optimizer
        self.scaler = scaler
        self.dist = DistContext.detect(self.params, process_group)
        self.kinds = param_kinds(optimizer, self.params)
        # Output units: one per tensor, or one per group of tensors (``group_by``) for very large models.
        self.units, self._unit_members = _resolve_units(self.names, config.group_by)
        self._unit_index = np.zeros(len(self.names), dtype=np.int64)
        for u, members in enumerate(self._unit_members):
            self._unit_index[members] = u
        self._grouped = len(self.units) != len(self.names)
        self.device = local(self.params[0]).device
        self.numels = [local_numel(p) for p in self.params]
        num_layers = len(self.params)
        # Which tensors' local parts this rank adds into the checkpoint sums (one copy of each piece), and which of
        # those it samples (a non-empty piece): the sample-based figures are means over these ranks.
        owners = self._owned = self.dist.owners(self.params)
        self._owner = torch.tensor(owners, dtype=config.stats_dtype).to(self.device)
        sampling = [o and n > 0 for o, n in zip(owners, self.numels)]
        self._sampling = torch.tensor(sampling, dtype=config.stats_dtype).to(self.device)
        # Each step's squared global norm is summed over ranks at checkpoints: one copy of each piece under
        # sharding (the owner weights), rank 0's alone under DDP (every rank holds the same reduced gradient).
        ddp_follower = self.dist.active and not self.dist.sharded and not self.dist.writer
        self._norm_share = 0.0 if ddp_follower else 1.0

        self.log_dir = Path(config.log_dir) if config.log_dir is not None else _default_log_dir()
        if config.run_name is None:
            config.run_name = self.log_dir.name
        self.config = config
        self.run_name = config.run_name
        # The step of the run continued in log_dir (resume=True), or 0; checked before any backend opens a file.
        resumed_at = self._prepare_run_dir() if self.dist.writer else 0
        self._backends = self._open_backends()
        self._alert_callbacks: list[Callable[[dict], None]] = []
        # Failures outside the backends (a user callback, flight-record files) are reported once each, as backends.
        self._failed_callbacks: set[int] = set()
        self._flight_failures = 0

        # The coordinate sample: fixed at attach so each coordinate's noise can be followed over steps. Under
        # FSDP2 each rank samples its own shard.
        generator = torch.Generator().manual_seed(config.seed + (self.dist.rank if self.dist.sharded else 0))
        # Coordinates per tensor: config.sample_size, or fewer for many tensors (config.sample_budget).
        self.sample_size = effective_sample_size(config, num_layers)
        self._sample_index = torch.stack([_sample_coordinates(n, self.sample_size, generator) for n in self.numels])
        self._sample_index_dev = self._sample_index.to(self.device)
        self._pass = GradientPass(
            self.numels, self._sample_index, chunk_numel=config.chunk_numel, dtype=config.stats_dtype
        )
        self._fused = _fused_pass(config.kernel, self.device)
        # The sample estimators as one kernel a step (C on the CPU, Triton on CUDA): the same figures as the torch
        # code below, instead of about 250 small operations. kernel="torch" keeps the torch code everywhere.
        self._samples = _sample_kernels(config, self.device)
        self._shadow_betas = torch.tensor(config.shadow_betas, dtype=config.stats_dtype).to(self.device)
        # A shadow denominator's figures count from its ratio_warmup-th gradient on, as the real one's do.
        self._shadow_warmup = float(max(1, config.ratio_warmup))
        self._spike_config = self._make_spike_config()
        self.alerts = AlertEngine(config, self.log_dir, self._emit_alert, warmup=self._spike_config.warmup)
        self.step_count = resumed_at
        self._interval_start = resumed_at
        self._loss_sum: torch.Tensor | None = None
        self._loss_n = 0
        self._tails: torch.Tensor | None = None
        self._pending_flags: collections.deque = collections.deque()
        self._pending_flight: list[tuple[dict, tuple[torch.Tensor, torch.Tensor, int]]] = []
        self._skips = {"sparse": 0, "complex": 0}
        self._closed = False
        # Micro-batches (backward passes) per optimizer step: two or more means gradient accumulation, whose
        # micro-batch gradients are a noise source.
        self._backwards = 0
        # Pre-clip norms: what the last backward pass left (rows, tensors, versions), and whether the step has been
        # seen to consume exactly that (then the step pass's norm is the pre-clip norm; see _on_backward_end).
        # _preclip_untouched counts such steps; None once a change has been seen (then it is always measured).
        self._preclip_seen: tuple[list[int], list[torch.Tensor], list[int]] | None = None
        self._preclip_untouched: int | None = 0
        self._preclip_reuse = False
        self._accumulating = False
        self._micro_prev: torch.Tensor | None = None
        self._micro: list[torch.Tensor] = []
        self._noise_slots = {"temporal": 0, "microbatch": 0, "rank": 0}
        self._before: dict[str, Any] = {}
        self._muon_sv: torch.Tensor | None = None
        # The noise probe (set_probe): loss function, held batch, mini-batches; the packed column names of its
        # last result; and a flag that keeps the probe's own backward passes out of the step statistics.
        self._probe: tuple[Callable[[nn.Module, Any], torch.Tensor], Any, int] | None = None
        self._probe_names: list[str] = []
        self._probing = False
        self._state = self._init_state(num_layers)

        self._failure: BaseException | None = None  # the first exception inside the monitor's own hooks
        self._optimizer_tap = (
            OptimizerTap(optimizer, self._guarded(self._before_step), self._guarded(self._after_step))
            if optimizer
            else None
        )
        self._backward_tap = BackwardTap(
            self.params, self._guarded(self._on_backward_end), self._guarded(self._on_gradients_final)
        )
        self._local_tap = None
        if self.dist.active and not self.dist.sharded:
            # DDP: each rank's gradient before the all-reduce, sampled as it is accumulated (rank noise).
            self._state["rank_local"] = torch.zeros(
                num_layers, self.sample_size, device=self.device, dtype=config.stats_dtype
            )
            self._local_tap = LocalSampleTap(self.params, self._sample_index_dev, self._state["rank_local"])
        _ATTACHED[inner] = self
        if self.dist.writer:
            self._write_meta(resumed_at)
        # Backward passes since the last counted optimizer step, and whether that has been warned about.
        self._unstepped_backwards = 0
        self._warned_no_step = False
        # The last partial interval is written at interpreter exit if close() is never called.
        _OPEN_MONITORS.add(self)

    # ------------------------------------------------------------------ set-up

    def _open_backends(self) -> list[_SafeBackend]:
        specs = list(self.config.backends)
        if "jsonl" not in specs:
            specs.insert(0, "jsonl")
        resolved: list[tuple[str, Any]] = []
        for spec in specs:
            if isinstance(spec, str):
                resolved.append((spec, backend_factory(spec)))  # unknown names raise before anything opens
            elif is_backend(spec):
                resolved.append((type(spec).__name__, spec))
            else:
                raise TypeError(
                    f"Monitor: backend {spec!r} is neither a known name nor an object with log() and close()"
                )
        if not self.dist.writer:
            return []  # one metrics stream per run: rank 0 writes
        backends = []
        for name, item in resolved:
            if isinstance(item, type) or not is_backend(item):
                item = item(log_dir=self.log_dir, config=self.config)
            backends.append(_SafeBackend(name, item))
        return backends

    def _make_spike_config(self) -> spike.SpikeConfig:
        overrides: dict[str, Any] = {}
        if self.config.spike_z is not None:
            overrides["threshold"] = float(self.config.spike_z)
        if self.config.spike_warmup is not None:
            overrides["warmup"] = int(self.config.spike_warmup)
        return spike.SpikeConfig(**overrides)

    def _init_state(self, num_layers: int) -> dict[str, Any]:
        cfg, dev, dt = self.config, self.device, self.config.stats_dtype
        betas = len(cfg.shadow_betas)
        temporal = noise.init(num_layers, self.sample_size, cfg.noise_window, dev)
        state: dict[str, Any] = {
            "acc_sum": torch.zeros(num_layers, len(SUM_FIELDS), device=dev, dtype=dt),
            "acc_max": torch.zeros(num_layers, len(MAX_FIELDS), device=dev, dtype=dt),
            # loss sum, loss count, squared global norm sum | loss max, global norm max, steps
            "glob_sum": torch.zeros(3, device=dev, dtype=dt),
            "glob_max": torch.tensor([-math.inf, 0.0, 0.0], device=dev, dtype=dt),
            # Per step of the interval (its first STEP_ROWS steps): loss sum, loss count, squared global norm.
            # Summed over ranks at the checkpoint, so loss/max and grad/norm_max are of the global batch's loss and
            # gradient, as with one process (24 bytes a step).
            "step_sums": torch.zeros(min(cfg.every, STEP_ROWS), 3, device=dev, dtype=dt),
            # Shadow denominators on the sampled coordinates, and their interval figures.
            # Per-sample state is float32: it is (L, S)-sized, the largest state after the noise ring.
            "shadow_v": torch.zeros(betas, num_layers, self.sample_size, device=dev, dtype=torch.float32),
            "shadow_t": torch.zeros(betas, num_layers, device=dev, dtype=dt),
            "shadow_sum": torch.zeros(betas, num_layers, device=dev, dtype=dt),  # spike-fraction sum
            "shadow_max": torch.zeros(betas, num_layers, 2, device=dev, dtype=dt),  # ratio max, steps
            # Temporal noise: per-coordinate EMA of the sampled gradient and a ring of deviations from it.
            "noise_mean": torch.zeros(num_layers, self.sample_size, device=dev, dtype=torch.float32),
            "noise_seen": torch.zeros(num_layers, device=dev, dtype=dt),
            "noise_temporal": temporal.values,
            "noise_temporal_valid": temporal.valid,
            # NaN until a backward pass measures it (gradients set by hand have no pre-clip norm).
            "preclip_s2": torch.full((num_layers,), math.nan, device=dev, dtype=dt),
            # Denominator memory on the sampled coordinates (real denominator, first shadow) and update figures.
            "memory_sum": torch.zeros(2, num_layers, len(MEMORY_FIELDS), device=dev, dtype=dt),
            "update_sum": torch.zeros(num_layers, len(UPDATE_FIELDS), device=dev, dtype=dt),
            # Flight recorder: per-layer norm, max |g| and kurtosis, and the loss, of the last steps.
            "flight": torch.full((cfg.flight_steps, num_layers, 3), math.nan, device=dev, dtype=torch.float32),
            "flight_loss": torch.full((cfg.flight_steps,), math.nan, device=dev, dtype=torch.float32),
            "spike": spike.init(2 + num_layers, device=dev, config=self._spike_config),
        }
        for family in ("adam", "shadow"):
            mem = memory.init(num_layers, self.sample_size, dev, torch.float32)
            state[f"memory_{family}_level"], state[f"memory_{family}_age"] = mem.level, mem.age
            state[f"memory_{family}_active"] = mem.active
        if self.dist.active and not self.dist.sharded:
            rank = noise.init(num_layers, self.sample_size, cfg.noise_window, dev)
            state["noise_rank"], state["noise_rank_valid"] = rank.values, rank.valid
        return state

    def _ensure_microbatch_ring(self) -> None:
        if "noise_microbatch" not in self._state:
            cfg = self.config
            ring = noise.init(len(self.params), self.sample_size, cfg.noise_window, self.device)
            self._state["noise_microbatch"], self._state["noise_microbatch_valid"] = ring.values, ring.valid

    def _prepare_run_dir(self) -> int:
        """Refuse, continue or replace a run already in ``log_dir`` (config.resume / overwrite); returns the
        step a continued run goes on from (0 for a new run)."""
        existing = runfiles.existing_run(self.log_dir)
        if not existing:
            return 0
        if self.config.resume:
            return runfiles.last_record_step(self.log_dir)
        if self.config.overwrite:
            runfiles.clear_run_dir(self.log_dir)
            return 0
        raise FileExistsError(
            f"Monitor: log_dir {self.log_dir} already holds {runfiles.describe_existing(self.log_dir)}; pass "
            "resume=True to continue it, overwrite=True to replace it, or choose another log_dir"
        )

    def _write_meta(self, resumed_at: int = 0) -> None:
        if resumed_at or (self.config.resume and (self.log_dir / "meta.json").is_file()):
            # The run goes on: its meta.json stays (started, parameters); it is marked running again.
            try:
                previous = json.loads((self.log_dir / "meta.json").read_text())
            except (OSError, ValueError):
                previous = None
            if isinstance(previous, dict):
                resumes = [*previous.get("resumed", []), {"time": time.time(), "step": resumed_at}]
                previous.pop("finished", None)
                previous.pop("final_step", None)
                self._replace_meta({**previous, "resumed": resumes})
                return
        meta = {
            "heavytail_version": __version__,
            "run_name": self.run_name,
            "started": time.time(),
            "torch_version": torch.__version__,
            "device": str(self.device),
            "world_size": self.dist.world,
            "sharded": self.dist.sharded,
            "model": type(self.model).__name__,
            "optimizer": type(self.optimizer).__name__ if self.optimizer is not None else None,
            "every": self.config.every,
            "sample_size": self.sample_size,
            "params": [
                {"name": n, "shape": list(p.shape), "numel": p.numel(), "dtype": str(p.dtype).replace("torch.", "")}
                for n, p in zip(self.names, self.params)
            ],
            "groups": {u: [self.names[i] for i in members] for u, members in zip(self.units, self._unit_members)}
            if self._grouped
            else None,
            "config": self.config.to_dict(),
            "extra": self.config.extra,
        }
        if self.optimizer is not None:
            meta["optimizer_hparams"] = [
                {k: v for k, v in g.items() if k != "params" and isinstance(v, (int, float, str, bool, tuple, list))}
                for g in self.optimizer.param_groups
            ]
        self._replace_meta(meta)

    def _replace_meta(self, meta: dict[str, Any]) -> None:
        try:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            tmp = self.log_dir / "meta.json.tmp"
            tmp.write_text(json.dumps(meta, indent=2, default=str))
            os.replace(tmp, self.log_dir / "meta.json")
        except OSError as exc:
            warnings.warn(f"heavytail: could not write meta.json: {exc}", RuntimeWarning, stacklevel=3)

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
        self, loss_fn: Callable[[nn.Module, Any], torch.Tensor], batch: Any, *, micro_batches: int = 32
    ) -> None:
        """Give the noise probe a held batch: at every ``config.probe_every``-th checkpoint it splits ``batch``
        into ``micro_batches`` mini-batches and runs :func:`heavytail.probe.noise_probe`.

        ``loss_fn(model, mini_batch)`` returns the scalar loss to back-propagate (apply autocast inside it if
        training uses it). The probe saves and restores every ``.grad``, the RNG states, the modules' modes and
        the buffers, so training is unchanged; its backward passes are not counted as micro-batches. Cost per
        probe: ``micro_batches`` forward+backward passes over ``1/micro_batches`` of ``batch`` each. Records get
        ``probe/<figure>/<name>`` keys (``hill_alpha``, ``hill_alpha_se``, ``hill_alpha_gauss``,
        ``stable_alpha``, ``kurtosis``, ``moment_slope_p1``, ``moment_intercept_p1``, ``moment_slope_p1.5``,
        ``moment_intercept_p1.5``, ``resolved_frac``, ``grad_norm``; see docs/probe.md). Not run under
        torch.distributed (each rank would probe its own copy); a warning says so once.
        """
        if isinstance(micro_batches, bool) or not isinstance(micro_batches, int) or micro_batches < 2:
            raise ValueError(f"Monitor.set_probe: micro_batches must be an integer >= 2, got {micro_batches!r}")
        if not callable(loss_fn):
            raise TypeError(f"Monitor.set_probe: loss_fn must be callable, got {type(loss_fn).__name__}")
        split_batch(batch, micro_batches)  # a batch that cannot be split fails here, not at a checkpoint
        if self.config.probe_every == 0:
            warnings.warn(
                "heavytail: set_probe() with MonitorConfig.probe_every = 0: the probe will not run; set "
                "probe_every to run it every that many checkpoints",
                RuntimeWarning,
                stacklevel=2,
            )
        self._probe = (loss_fn, batch, micro_batches)

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
            self._drain_alerts()
            return
        if self._tails is None:
            self._tails = self._tail_indices()
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
            for tap in (self._optimizer_tap, self._backward_tap, self._local_tap):
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

    # ------------------------------------------------------------------ step path (no host-device sync)

    def _gradients(self, count_skips: bool = True) -> list[torch.Tensor | None]:
        # count_skips: the step pass counts each skipped (tensor, step) once; the checkpoint's tail pass, which
        # reads the same gradients again, must not count them a second time.
        grads: list[torch.Tensor | None] = []
        for p in self.params:
            g = p.grad
            if g is not None:
                g = local(g)
                if g.layout != torch.strided:
                    self._skips["sparse"] += count_skips
                    g = None
                elif g.is_complex():
                    self._skips["complex"] += count_skips
                    g = None
            grads.append(g)
        return grads

    def _on_backward_end(self) -> None:
        """After each backward pass: count it, and take micro-batch samples under gradient accumulation.

        Runs before DDP's reducer finalises the all-reduce (hooks.gradients.BackwardTap), so under DDP the samples
        are this rank's own accumulated gradient and their successive differences its micro-batch gradients.
        """
        if self._closed or self._probing:
            return
        self._backwards += 1
        self._unstepped_backwards += 1
        if self._unstepped_backwards == _NO_STEP_BACKWARDS:
            self._warn_no_step(at_close=False)
        if not self._accumulating:
            return
        grads, rows = self._backward_gradients()
        if not rows:
            return
        # The accumulated gradient's samples; successive differences are the micro-batch gradients.
        keep = set(rows)
        samples = gather_samples(
            [g if i in keep else None for i, g in enumerate(grads)],
            self._sample_index_dev,
            self.config.stats_dtype,
            fill=0.0,
        )
        previous = self._micro_prev if self._micro_prev is not None else torch.zeros_like(samples)
        self._micro.append(samples - previous)
        self._micro_prev = samples

    def _backward_gradients(self) -> tuple[list[torch.Tensor | None], list[int]]:
        """This rank's gradients (local shards under FSDP2) and the rows whose gradient can be measured."""
        grads = [local(p.grad) if p.grad is not None else None for p in self.params]
        rows = [
            i
            for i, g in enumerate(grads)
            if g is not None and g.layout == torch.strided and not g.is_complex() and g.numel() > 0
        ]
        return grads, rows

    def _on_gradients_final(self) -> None:
        """Once a backward pass's gradients are those ``optimizer.step()`` would see, before any clipping: the
        pre-clip norms.

        BackwardTap calls this after every callback queued during the backward pass, so the gradients are the
        reduced ones on every rank: DDP's all-reduce has been finalised (on the last micro-batch under
        ``no_sync``; earlier micro-batches are measured too, and replaced by the next one), FSDP2's reduce-scatter
        has produced this rank's shard of the reduced gradient (its squares are summed over ranks at checkpoints).
        """
        if self._closed or self._probing or not self.config.track_preclip:
            return
        grads, rows = self._backward_gradients()
        if not rows:
            return
        tensors = [grads[i] for i in rows]
        # The step pass sees these very tensors again unless something changes them in place before
        # optimizer.step() (clipping and GradScaler.unscale_ bump ._version). Once two steps have shown nothing
        # does, the pre-clip norm is the step's own norm and this extra read of every gradient is skipped
        # (_check_preclip); a change seen later switches the measurement back on for good.
        self._preclip_seen = (rows, tensors, [g._version for g in tensors])
        if self._preclip_reuse:
            return
        dtype = self.config.stats_dtype
        squares = None
        if self._fused is not None and self.device.type == "cpu":
            try:  # one C call over every tensor, float64 sums (the C pass's library)
                squares = cpu_pass.sums_of_squares(tensors).to(dtype)
            except (RuntimeError, MemoryError, OSError):  # no kernel here: torch's norms give the same figure
                squares = None
        if squares is None:
            norms = torch.stack(torch._foreach_norm(tensors)).to(dtype)
            squares = norms * norms
        if self.scaler is not None and getattr(self.scaler, "_scale", None) is not None and self.scaler.is_enabled():
            # Hooks see gradients multiplied by the loss scale: divide on the device, never read the scale.
            scale = self.scaler._scale.to(squares.dtype)
            squares = squares / (scale * scale)
        s2 = torch.full_like(self._state["preclip_s2"], math.nan)
        s2[to_device(rows, self.device, torch.int64)] = squares
        self._state["preclip_s2"] = s2

    def _before_step(self) -> None:
        if self._closed:
            return
        with torch.no_grad():
            self._stream_step()
            if (self.step_count + 1) % self.config.every == 0:
                self._tails = self._tail_indices()
                self._muon_sv = self._muon_spread()
        self._accumulating = self._backwards > 1
        self._backwards = 0
        self._micro, self._micro_prev = [], None

    def _stream_step(self) -> None:
        cfg, st = self.config, self._state
        grads = self._gradients()
        den = denominators(self.optimizer, self.params, self.device, self._rows)
        res = None
        if self._fused is not None:
            try:
                res = self._fused(grads, self._sample_index_dev, den, spike_threshold=cfg.spike_threshold)
            except Exception as exc:  # a kernel build or launch failure: the torch pass gives the same numbers
                self._fused = None
                warnings.warn(
                    f"heavytail: the fused gradient pass failed ({type(exc).__name__}: {exc}); using the "
                    "torch pass from now on",
                    RuntimeWarning,
                    stacklevel=2,
                )
            else:
                if res.stats.dtype != cfg.stats_dtype:
                    res = type(res)(*(t.to(cfg.stats_dtype) for t in res))
        if res is None:
            res = self._pass(grads, den, spike_threshold=cfg.spike_threshold)
        stats = res.stats
        if cfg.track_preclip:
            self._check_preclip(grads, stats)
        entries = stats[:, COUNT] + stats[:, NONFINITE]
        valid = (entries > 0) & (stats[:, NONFINITE] == 0)
        clean = torch.where(valid[:, None], stats, torch.zeros_like(stats))
        ratio_ok = valid & torch.isfinite(stats[:, RATIO_MAX])
        if den is not None and den.steps is not None and cfg.ratio_warmup > 1:
            # A denominator that has averaged only a few gradients makes every ratio large (config.ratio_warmup).
            ratio_ok = ratio_ok & (den.steps >= cfg.ratio_warmup)
        g = res.grad_samples
        events_adam, events_shadow, p99 = self._stream_samples(res, den, valid, ratio_ok)

        add = torch.stack(
            [
                clean[:, COUNT],
                clean[:, S1],
                clean[:, S2],
                clean[:, S3],
                clean[:, S4],
                stats[:, NONFINITE],
                torch.where(ratio_ok, stats[:, RATIO_SPIKES], 0.0),
                torch.where(valid & torch.isfinite(st["preclip_s2"]), st["preclip_s2"], 0.0),
                torch.where(ratio_ok & torch.isfinite(p99), p99, 0.0),
                torch.where(ratio_ok, stats[:, COUNT], 0.0),
                entries,  # every entry seen, bad steps included: the denominator of the non-finite fraction
                (valid & torch.isfinite(st["preclip_s2"])).to(stats.dtype),
            ],
            dim=1,
        )
        st["preclip_s2"] = torch.full_like(st["preclip_s2"], math.nan)  # measured again at the next backward
        st["acc_sum"] += add
        acc_max = st["acc_max"]
        acc_max[:, _M["absmax"]] = torch.maximum(acc_max[:, _M["absmax"]], clean[:, ABSMAX])
        acc_max[:, _M["ratio_max"]] = torch.maximum(
            acc_max[:, _M["ratio_max"]], torch.where(ratio_ok, stats[:, RATIO_MAX], 0.0)
        )
        acc_max[:, _M["steps"]] += valid.to(stats.dtype)
        acc_max[:, _M["bad_steps"]] += ((entries > 0) & ~valid).to(stats.dtype)
        acc_max[:, _M["ratio_steps"]] += ratio_ok.to(stats.dtype)

        if self.optimizer is not None:
            self._stream_sign_flips(g, valid)
            # Parameter samples before the update; _stream_updates compares them with the samples after it.
            self._before = {
                "params": self._gather_params(cfg.stats_dtype),
                "g": g,
                "valid": valid,
                "events_adam": events_adam,
                "events_shadow": events_shadow,
            }

        # Global figures and the loss.
        s2 = clean[:, S2]
        gnorm = s2.sum().sqrt()
        if self._loss_sum is not None:
            loss = self._loss_sum / self._loss_n
        else:
            loss = torch.full((), math.nan, device=self.device, dtype=stats.dtype)
        finite_loss = torch.isfinite(loss)
        loss_parts = torch.stack([torch.where(finite_loss, loss, 0.0), finite_loss.to(stats.dtype)])
        # glob_sum keeps its (loss sum, loss count, squared norm) layout for saved states; grad/norm comes from
        # the tensors' own sums, so only the loss parts are added.
        st["glob_sum"][:2] += loss_parts
        # This rank's maxima: the figures themselves with one process, and for the steps of an interval past
        # STEP_ROWS under torch.distributed (each rank's own loss; under FSDP2 its shard's norm).
        glob_max = st["glob_max"]
        glob_max[0] = torch.where(finite_loss, torch.maximum(glob_max[0], loss), glob_max[0])
        glob_max[1] = torch.maximum(glob_max[1], gnorm)
        glob_max[2] += 1
        at = self.step_count - self._interval_start  # this step's row of the interval (a host count)
        if at < st["step_sums"].shape[0]:
            st["step_sums"][at] = torch.cat([loss_parts, ((s2 * self._owner).sum() * self._norm_share).reshape(1)])
        self._loss_sum, self._loss_n = None, 0

        # Spike detectors on the loss, the global norm and each layer's norm; flags go to the host asynchronously.
        layer_norm = torch.where(valid, s2.sqrt(), math.nan)
        streams = torch.cat(
            [loss.reshape(1), torch.where(torch.isfinite(gnorm), gnorm, math.nan).reshape(1), layer_norm]
        ).to(torch.float32)
        prior = st["spike"]  # the state this step is scored against: the alerts' forecast comes from it
        st["spike"], flags, scores = spike.update(prior, streams, self._spike_config)
        kurt = kurtosis_from_power_sums(clean[:, COUNT], clean[:, S1], clean[:, S2], clean[:, S3], clean[:, S4])
        slot = self.step_count % cfg.flight_steps
        st["flight"][slot] = torch.stack([layer_norm, clean[:, ABSMAX], kurt], dim=1).to(torch.float32)
        st["flight_loss"][slot] = loss.to(torch.float32)
        if self.dist.writer:
            # NaN (no hidden_spike) until the ratio counts (ratio_warmup), as in the record's adam/spike_frac.
            spike_frac = torch.where(ratio_ok, stats[:, RATIO_SPIKES] / stats[:, COUNT].clamp_min(1), math.nan)
            packed = self.alerts.pack_flags(
                flags=flags,
                scores=scores,
                values=streams,
                detector=prior,
                nonfinite=stats[:, NONFINITE],
                spike_frac=spike_frac,
                ratio_max=torch.where(ratio_ok, stats[:, RATIO_MAX], math.nan),
            )
            self._queue_flags(packed)

    def _stream_samples(
        self, res: PassResult, den: Denominators | None, valid: torch.Tensor, ratio_ok: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """The sample estimators of one step: denominator memory, shadow denominators, noise and the ratio's
        99th percentile. Returns the real denominator's and the first shadow's event masks and the percentile."""
        g = res.grad_samples
        if self._samples is not None:
            try:
                out = self._stream_samples_kernel(res, den, valid, ratio_ok)
            except Exception as exc:  # a build, launch or layout failure: nothing written, the torch code takes over
                self._sample_kernel_failed(exc)
            else:
                self._stream_noise(g, valid, temporal=False)
                return out
        p99 = _upper_quantile(res.ratio_samples, 0.99)
        events_adam = None
        if den is not None:
            v_hat = res.denom_samples / den.bias_correction.to(res.denom_samples.dtype)[:, None]
            events_adam = self._stream_memory(0, "adam", res.ratio_samples, v_hat, ratio_ok)
        events_shadow = self._stream_shadow(g, valid)
        self._stream_noise(g, valid)
        return events_adam, events_shadow, p99

    def _sample_kernel_failed(self, exc: Exception) -> None:
        self._samples = None
        warnings.warn(
            f"heavytail: the sample estimators' kernel failed ({type(exc).__name__}: {exc}); using the "
            "torch code from now on",
            RuntimeWarning,
            stacklevel=4,
        )

    def _stream_samples_kernel(
        self, res: PassResult, den: Denominators | None, valid: torch.Tensor, ratio_ok: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """:meth:`_stream_samples` (the temporal noise source) in one kernel call: ``cpu_pass.sample_step`` or
        ``triton_samples.sample_step``. Either writes nothing when it fails before its kernel runs."""
        cfg, st = self.config, self._state
        t = st["shadow_t"]
        bias = (1.0 - self._shadow_betas[:, None] ** t).clamp_min(1e-30)
        memory_states = [
            tuple(st[f"memory_{family}_{k}"] for k in ("level", "age", "active")) for family in ("adam", "shadow")
        ]
        slot = self._noise_slots["temporal"]
        out = self._samples.sample_step(
            g=res.grad_samples,
            valid=valid,
            ratio=None if den is None else res.ratio_samples,
            den=None if den is None else res.denom_samples,
            bias_correction=None if den is None else den.bias_correction,
            ratio_ok=ratio_ok,
            memory=memory_states,
            memory_sum=st["memory_sum"],
            betas=self._shadow_betas,
            shadow_bias=bias,
            shadow_v=st["shadow_v"],
            shadow_t=t,
            shadow_sum=st["shadow_sum"],
            shadow_max=st["shadow_max"],
            noise_mean=st["noise_mean"],
            noise_seen=st["noise_seen"],
            ring=st["noise_temporal"],
            ring_valid=st["noise_temporal_valid"],
            slot=slot,
            threshold=cfg.spike_threshold,
            inflation=cfg.memory_inflation,
            noise_beta=cfg.noise_beta,
            q=0.99,
            shadow_warmup=self._shadow_warmup,
        )
        self._noise_slots["temporal"] = slot + 1
        return (None if den is None else out.events[0]), out.events[1], out.quantile

    def _check_preclip(self, grads: list[torch.Tensor | None], stats: torch.Tensor) -> None:
        """Whether the step sees the gradients the last backward pass left, untouched; sets the pre-clip norm from
        the step's own power sums when it does and the backward hook no longer measures it."""
        seen, self._preclip_seen = self._preclip_seen, None
        if seen is None:
            return
        rows, tensors, versions = seen
        # In-place ops on a DTensor (clipping under FSDP2) change its local tensor without bumping that tensor's
        # version counter: with DTensors nothing proves the gradients untouched, so they are always measured.
        untouched = (
            self._plain_params is not None
            and sum(g is not None for g in grads) == len(rows)
            and all(grads[i] is g and g._version == v for i, g, v in zip(rows, tensors, versions))
        )
        if self._preclip_reuse and untouched:
            self._state["preclip_s2"] = stats[:, S2]
        elif self._preclip_reuse:  # changed after all: this step's pre-clip norm is lost, and it is measured again
            self._preclip_reuse, self._preclip_untouched = False, None
        elif self._preclip_untouched is not None:
            self._preclip_untouched = self._preclip_untouched + 1 if untouched else None
            self._preclip_reuse = self._preclip_untouched is not None and self._preclip_untouched >= 2

    def _stream_memory(
        self, index: int, family: str, ratio: torch.Tensor, v_hat: torch.Tensor, valid: torch.Tensor
    ) -> torch.Tensor:
        """Advance the denominator-memory episodes of one family; returns this step's event mask ``(L, S)``."""
        st = self._state
        keys = (f"memory_{family}_level", f"memory_{family}_age", f"memory_{family}_active")
        state, step = memory.update(
            memory.MemoryState(*(st[k] for k in keys)),
            ratio,
            v_hat,
            valid,
            threshold=self.config.spike_threshold,
            inflation=self.config.memory_inflation,
        )
        for key, value in zip(keys, state):
            st[key] = value.to(st[key].dtype)
        st["memory_sum"][index] += torch.stack([step.started, step.ended, step.ended_steps], dim=1)
        return step.events

    def _stream_sign_flips(self, g: torch.Tensor, valid: torch.Tensor) -> None:
        """Lion: the fraction of sampled coordinates whose update sign the current gradient flipped, i.e. where
        sign(beta1 m_{t-1} + (1 - beta1) g_t) differs from sign(m_{t-1}) (Chen et al. 2023's update direction)."""
        rows = [i for i, kind in enumerate(self.kinds) if kind == "lion"]
        if not rows:
            return
        groups = {id(q): grp for grp in self.optimizer.param_groups for q in grp["params"]}
        momenta: list[torch.Tensor | None] = [None] * len(self.params)
        beta1 = torch.zeros(len(self.params), 1, device=self.device, dtype=g.dtype)
        for i in rows:
            state = self.optimizer.state.get(self.params[i])
            if state and "exp_avg" in state:
                momenta[i] = local(state["exp_avg"])
                beta1[i] = float(groups[id(self.params[i])]["betas"][0])
        m = gather_samples(momenta, self._sample_index_dev, g.dtype)
        c = beta1 * m + (1 - beta1) * g
        live = torch.isfinite(m) & (m != 0)
        flipped = ((torch.sign(c) != torch.sign(m)) & live).sum(dim=1)
        ok = valid & (live.sum(dim=1) > 0)
        frac = flipped / live.sum(dim=1).clamp_min(1)
        upd = self._state["update_sum"]
        upd[:, _U["sign_flip"]] += torch.where(ok, frac, 0.0)
        upd[:, _U["sign_steps"]] += ok.to(upd.dtype)

    def _gather_params(self, dtype: torch.dtype) -> torch.Tensor:
        """The parameters' values at the sampled coordinates, ``(L, S)``."""
        if self._plain_params is None:  # DTensors: their local shards, taken at every call
            return gather_samples(self.params, self._sample_index_dev, dtype)
        return gather_samples(self._plain_params, self._sample_index_dev, dtype, prepared=True)

    def _stream_updates(self) -> None:
        """After the optimizer step: update RMS over gradient RMS, and |update| / |g| at denominator events."""
        before = self._before
        self._before = {}
        if not before:
            return
        after = self._gather_params(self.config.stats_dtype)
        upd = self._state["update_sum"]
        if self._samples is not None:
            try:
                self._samples.update_step(
                    before["params"],
                    after,
                    before["g"],
                    before["valid"],
                    [before["events_adam"], before["events_shadow"]],
                    upd,
                    _UPDATE_COLUMNS,
                )
                return
            except Exception as exc:  # nothing written: the torch code takes over
                self._sample_kernel_failed(exc)
        delta = (after - before["params"]).abs()
        g = before["g"].abs()
        g_rms = (g * g).mean(dim=1).sqrt()
        ratio = (delta * delta).mean(dim=1).sqrt() / g_rms
        ok = before["valid"] & (g_rms > 0) & torch.isfinite(ratio)
        upd[:, _U["rms_ratio"]] += torch.where(ok, ratio, 0.0)
        upd[:, _U["rms_steps"]] += ok.to(upd.dtype)
        # Coordinates with a gradient and a finite update (a 0/1 mask, estimators.masks), and |update| / |g| there.
        usable = float_mask(torch.gt, g, 0.0, g.dtype) * float_mask(torch.eq, delta * 0, 0.0, g.dtype)
        # g is NaN where a tensor had no gradient: never a usable coordinate, and its ratio must not be NaN
        # (0 * NaN would poison the sum)
        update_ratio = torch.nan_to_num(delta, nan=0.0, posinf=0.0, neginf=0.0) / torch.nan_to_num(
            g, nan=0.0
        ).clamp_min(1e-30)
        for family in ("adam", "shadow"):
            events = before[f"events_{family}"]
            if events is None:
                continue
            hit = events * usable
            upd[:, _U[f"event_ratio_{family}"]] += (hit * update_ratio).sum(dim=1)
            upd[:, _U[f"events_{family}"]] += hit.sum(dim=1).to(upd.dtype)

    def _muon_spread(self) -> torch.Tensor | None:
        """Muon: singular values of the matrix it is about to orthogonalise, per 2-D tensor, at checkpoints only:
        sigma_max / sigma_min and sigma_max / median sigma (how unequal the directions Muon will equalise are)."""
        rows = [i for i, kind in enumerate(self.kinds) if kind == "muon" and self.params[i].dim() == 2]
        if not rows or self.dist.sharded:
            return None
        out = torch.full((len(self.params), 2), math.nan, device=self.device, dtype=torch.float32)
        groups = {id(q): group for group in self.optimizer.param_groups for q in group["params"]}
        for i in rows:
            matrix = premomentum_matrix(self.optimizer, self.params[i], groups.get(id(self.params[i])))
            if matrix is None:
                continue
            sv = torch.linalg.svdvals(matrix.detach().float())
            top = sv[0]
            out[i, 0] = top / sv[-1]
            out[i, 1] = top / sv.median()
        return out

    def _stream_shadow(self, g: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Shadow denominators: an EMA of g^2 on the sampled coordinates, one per beta2, as AdamW would keep.

        r = |g_t| / (sqrt(v_{t-1} / (1 - beta2^(t-1))) + 1e-8), before v is updated with g_t, exactly like the
        real ``adam/`` ratio, so every optimizer gets figures comparable with AdamW's.
        """
        cfg, st = self.config, self._state
        g = torch.nan_to_num(g, nan=0.0)
        betas = self._shadow_betas[:, None, None]
        v, t = st["shadow_v"], st["shadow_t"]
        bias = 1.0 - betas[:, :, 0] ** t  # (B, L); 0 before the first step
        denom = (v / bias.clamp_min(1e-30)[:, :, None]).sqrt() + 1e-8
        # 0/1 float masks rather than booleans and torch.where (estimators.masks); v >= 0 and g is finite, so the
        # products below are exact selections.
        r = g.abs()[None] / denom * float_mask(torch.gt, v, 0.0, g.dtype)
        ok = valid[None] & (t >= self._shadow_warmup)  # (B, L): warm as the real denominator (ratio_warmup)
        frac = float_mask(torch.gt, r * r, cfg.spike_threshold, g.dtype).mean(dim=2)
        st["shadow_sum"] += torch.where(ok, frac, 0.0)
        shadow_max = st["shadow_max"]
        shadow_max[:, :, 0] = torch.maximum(shadow_max[:, :, 0], torch.where(ok, r.amax(dim=2), 0.0))
        shadow_max[:, :, 1] += ok.to(g.dtype)
        events = self._stream_memory(1, "shadow", r[0], v[0] / bias[0].clamp_min(1e-30)[:, None], ok[0])
        new_v = betas * v + (1 - betas) * (g * g)[None]
        # lerp with a 0/1 weight returns either end exactly: the new EMA where the tensor had a gradient
        st["shadow_v"] = torch.lerp(v, new_v.to(v.dtype), valid.to(v.dtype)[None, :, None])
        st["shadow_t"] = t + valid.to(t.dtype)[None]
        return events

    def _push_noise(self, source: str, deviation: torch.Tensor, valid: torch.Tensor) -> None:
        ring = noise.NoiseRing(self._state[f"noise_{source}"], self._state[f"noise_{source}_valid"])
        noise.push(ring, self._noise_slots[source], deviation, valid)
        self._noise_slots[source] += 1

    def _stream_noise(self, g: torch.Tensor, valid: torch.Tensor, temporal: bool = True) -> None:
        """Noise deviations on the sampled coordinates: temporal (unless the sample kernel did it), micro-batch
        and per-rank sources."""
        cfg, st = self.config, self._state
        if temporal:
            mean, seen = st["noise_mean"], st["noise_seen"]
            self._push_noise("temporal", g - mean, valid & (seen > 0))
            beta = torch.where(seen > 0, cfg.noise_beta, 0.0)[:, None]  # the first value initialises the EMA
            st["noise_mean"] = torch.lerp(
                mean, (beta * mean + (1 - beta) * torch.nan_to_num(g)).to(mean.dtype), valid.to(mean.dtype)[:, None]
            )
            st["noise_seen"] = seen + valid.to(seen.dtype)
        if len(self._micro) >= 2:
            self._ensure_microbatch_ring()
            micro = torch.stack(self._micro)  # (M, L, S)
            centre = micro.mean(dim=0)
            for sample in micro:
                self._push_noise("microbatch", sample - centre, valid)
        if "rank_local" in st:
            self._push_noise("rank", st["rank_local"] - g, valid)

    def _queue_flags(self, packed: torch.Tensor) -> None:
        """Start the copy of this step's flags to the host; they are read at the next step (no waiting)."""
        if packed.device.type == "cuda":
            host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
            host.copy_(packed, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._pending_flags.append((host, event, self.step_count + 1))
        else:
            self._pending_flags.append((packed, None, self.step_count + 1))

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

    def _after_step(self) -> None:
        if self._closed:
            return
        self._unstepped_backwards = 0
        with torch.no_grad():
            self._stream_updates()
        self.step_count += 1
        # Read the flags copied during earlier steps, if their copy is done: never wait for the device.
        self._read_flags(wait=False, before_step=self.step_count)
        if self.step_count % self.config.every == 0:
            if self._tails is None:
                self._tails = self._tail_indices()
            self._checkpoint()

    def _read_flags(self, wait: bool, before_step: int) -> None:
        """Run the alert rules on queued flag vectors of steps before ``before_step`` whose copy has landed."""
        pending = self._pending_flags
        while pending:
            host, event, step = pending[0]
            if step >= before_step:
                return  # this step's own flags: read one step later
            if event is not None and not event.query():
                if not wait:
                    return
                event.synchronize()  # sync point: only at checkpoints and close
            pending.popleft()
            values = host.numpy()  # sync point: none, host memory already copied asynchronously
            self.alerts.process_step_flags(step, values, self.names, self._spike_config)

    # ------------------------------------------------------------------ checkpoint path

    def _tail_indices(self) -> torch.Tensor:
        """Hill tail index of each unit's current gradient from its top order statistics, ``(U, 3)``.

        ``torch.topk`` per tensor (checkpoint steps only), then one batched ``hill_from_top`` per group of units
        that keep the same number of order statistics. A unit of several tensors (``group_by``) merges its
        members' tops; under FSDP2 each rank's tops are gathered and merged. Either way the unit's global top k
        lies inside the union of the parts' tops, so the merge is exact.
        """
        cfg = self.config
        out = torch.full((len(self.units), 3), math.nan, device=self.device, dtype=torch.float32)
        groups: dict[int, tuple[list[int], list[torch.Tensor], list[torch.Tensor]]] = {}
        grads = self._gradients(count_skips=False)
        with torch.no_grad():
            wanted: list[tuple[int, int, list[int]]] = []  # (unit, m, members with a gradient)
            for u, members in enumerate(self._unit_members):
                n = sum(self.params[i].numel() for i in members)  # the whole unit's size, the same on every rank
                if n < cfg.min_tail_samples:
                    continue
                m = int(min(default_top_count(n), cfg.tail_top_max))
                # One copy of each piece (DistContext.owners): a replica's tops would tie the order statistics.
                present = [i for i in members if grads[i] is not None and grads[i].numel() > 0 and self._owned[i]]
                wanted.append((u, m, present))
            # Zeros and non-finite entries are missing data for the tail (the estimator's rule).
            if self.device.type == "cpu" and cpu_pass.available():  # every tensor's top in one C call
                flat = [(i, m) for _, m, present in wanted for i in present]
                found = cpu_pass.top_magnitudes([grads[i] for i, _ in flat], [m for _, m in flat])
                member_tops = dict(zip(flat, found))
            else:
                member_tops = {
                    (i, m): top_magnitudes(grads[i].detach().reshape(-1), m)
                    for _, m, present in wanted
                    for i in present
                }
            for u, m, present in wanted:
                tops, counts = [], []
                for i in present:
                    top, count = member_tops[(i, m)]
                    tops.append(top.float())
                    counts.append(count)
                if not tops:
                    top = torch.zeros(m, device=self.device)
                    count = torch.zeros((), dtype=torch.int64, device=self.device)
                else:
                    top = torch.cat(tops)
                    top = torch.topk(top, m).values if top.shape[-1] > m else top
                    top = torch.nn.functional.pad(top, (0, m - top.shape[-1]))
                    count = torch.stack(counts).sum()
                rows, unit_tops, unit_counts = groups.setdefault(m, ([], [], []))
                rows.append(u)
                unit_tops.append(top)
                unit_counts.append(count)
            for rows, unit_tops, unit_counts in groups.values():
                top, count = torch.stack(unit_tops), torch.stack(unit_counts)
                if self.dist.sharded:
                    top = self.dist.gather_cat(top, dim=1)
                    count = self.dist.all_reduce_(count.clone(), "sum")
                result = hill_from_top(top, count)
                out[torch.tensor(rows, device=self.device)] = torch.stack(
                    [result.alpha.float(), result.se.float(), result.k.float()], dim=1
                )
        return out

    def _noise_tails(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Hill alpha, standard error and kurtosis of each noise source's deviations, ``(U, 3)`` per source.

        Returns ``(tails, rank_sums)``. Rank noise (DDP) pools every rank's deviations (gathered here). Sources
        that differ between ranks are estimated on each rank from its own deviations, exactly as one process
        estimates them, and the record reads the mean over ranks: under sharding the temporal and micro-batch
        sources (each rank samples its own piece), under DDP the micro-batch source (each rank's micro-batches are
        its own). Those come back in ``rank_sums`` as summable ``(U, 5)`` rows (see :func:`_rank_tail_sums`),
        merged by the checkpoint's sum all-reduce and turned back by :func:`_rank_mean_tails`.
        """
        tails, rank_sums = {}, {}
        for source in ("temporal", "microbatch", "rank"):
            key = f"noise_{source}"
            if key not in self._state:
                continue
            values, mask = noise.flatten(noise.NoiseRing(self._state[key], self._state[f"{key}_valid"]))
            # With two ranks each rank's deviation is exactly minus the other's (they sum to zero): gathering would
            # only duplicate every magnitude, which ties the order statistics, so rank 0's alone are used.
            if source == "rank" and self.dist.world > 2:
                values = self.dist.gather_cat(values, dim=1)
                mask = self.dist.gather_cat(mask.to(values.dtype), dim=1) > 0
            per_rank = source != "rank" and self.dist.sharded or (source == "microbatch" and self.dist.active)
            if per_rank:
                mask = mask & (self._owner > 0)[:, None]  # one copy of each piece (DistContext.owners)
            if not self._grouped:
                out = noise.noise_tail(values, mask, self.config.min_tail_samples)
            else:
                # A group pools its members' deviations (checkpoint only: one estimate per group).
                out = torch.cat(
                    [
                        noise.noise_tail(
                            values[members].reshape(1, -1),
                            mask[members].reshape(1, -1),
                            self.config.min_tail_samples,
                        )
                        for members in self._unit_members
                    ]
                )
            if per_rank:
                rank_sums[source] = _rank_tail_sums(out)
            else:
                tails[source] = out
        return tails, rank_sums

    def _checkpoint(self) -> None:
        st = self._state
        tails = (
            self._tails if self._tails is not None else torch.full((len(self.units), 3), math.nan, device=self.device)
        )
        noise_tails, noise_sums = self._noise_tails()
        dt = self.config.stats_dtype
        owner = self._owner
        shadow_steps = st["shadow_max"][:, :, 1]
        # Per tensor, summed over ranks: the ranks sampling it, and the steps each ranks' sample-based figures
        # count; per shadow denominator the ranks' steps, the sum of the ranks' maxima and the ranks with a step.
        # With one process these are 1 (or 0) and the step counts themselves.
        ranks = torch.stack([self._sampling, st["acc_max"][:, _M["ratio_steps"]] * owner], dim=1)
        shadow_ranks = torch.stack(
            [shadow_steps * owner, st["shadow_max"][:, :, 0] * owner, (shadow_steps > 0).to(dt) * owner], dim=2
        )
        per_tensor = torch.cat(
            [
                (st["acc_sum"] * owner[:, None]).reshape(-1),
                st["glob_sum"],
                (st["shadow_sum"] * owner).reshape(-1),
                (st["memory_sum"] * owner[None, :, None]).reshape(-1),
                (st["update_sum"] * owner[:, None]).reshape(-1),
                ranks.reshape(-1),
                shadow_ranks.reshape(-1),
            ]
        )
        sums = torch.cat(
            [per_tensor, *(v.reshape(-1).to(dt) for v in noise_sums.values()), st["step_sums"].reshape(-1)]
        )
        # The pre-clip steps are max-merged: every rank holding a piece measures the same steps.
        preclip_steps = st["acc_sum"][:, _S["preclip_steps"]]
        maxes = torch.cat([st["acc_max"].reshape(-1), st["glob_max"], st["shadow_max"].reshape(-1), preclip_steps])
        if self.dist.sharded:  # exact merge of the pieces' interval statistics: one collective per merge kind
            sums = self.dist.all_reduce_(sums.clone(), "sum")
            maxes = self.dist.all_reduce_(maxes.clone(), "max")
        elif self.dist.active:
            # DDP: the gradients already agree across ranks; the losses (glob_sum's and each step's, in step_sums)
            # and the micro-batch noise estimates do not (each rank sees its own batch): one sum all-reduce.
            num_sum, num_local = st["acc_sum"].numel(), per_tensor.numel()
            sums, maxes = sums.clone(), maxes.clone()
            shared = self.dist.all_reduce_(torch.cat([sums[num_sum : num_sum + 2], sums[num_local:]]), "sum")
            sums[num_sum : num_sum + 2], sums[num_local:] = shared[:2], shared[2:]
            num_max = st["acc_max"].numel()
            maxes[num_max : num_max + 1] = self.dist.all_reduce_(maxes[num_max : num_max + 1].clone(), "max")
        offset = per_tensor.numel()
        for source, local_sums in noise_sums.items():
            merged = sums[offset : offset + local_sums.numel()].reshape(local_sums.shape)
            noise_tails[source] = _rank_mean_tails(merged)
            offset += local_sums.numel()
        step_sums = sums[offset:]
        sums = sums[: per_tensor.numel()]
        noise_tails = {k: noise_tails[k] for k in ("temporal", "microbatch", "rank") if k in noise_tails}
        parts = {"sums": sums, "maxes": maxes, "tails": tails, "step_sums": step_sums}
        if self._muon_sv is not None:
            parts["muon_sv"] = self._muon_sv
        probe = self._run_probe()
        if probe is not None:
            parts["probe"] = probe
        parts.update({f"noise_{k}": v for k, v in noise_tails.items()})
        flat = torch.cat([t.reshape(-1).to(torch.float64) for t in parts.values()])
        host = flat.cpu().numpy()  # sync point: the one device->host copy of a checkpoint
        arrays, offset = {}, 0
        for name, t in parts.items():
            arrays[name] = host[offset : offset + t.numel()]
            offset += t.numel()
        if self.dist.writer:
            metrics = self._metrics_from(arrays)
            self._read_flags(wait=True, before_step=self.step_count + 1)
            for backend in self._backends:
                backend.log(metrics, self.step_count)
            self.alerts.process_record(self.step_count, metrics, self.units)
            self._write_flight_records()
        self._reset_interval()

    def _metrics_from(self, a: dict[str, np.ndarray]) -> dict[str, float]:
        cfg = self.config
        num_layers, num_betas = len(self.names), len(cfg.shadow_betas)
        sums, maxes = a["sums"], a["maxes"]
        acc_sum = sums[: num_layers * len(SUM_FIELDS)].reshape(num_layers, len(SUM_FIELDS))
        glob_sum = sums[num_layers * len(SUM_FIELDS) : num_layers * len(SUM_FIELDS) + 3]
        offset = num_layers * len(SUM_FIELDS) + 3
        shadow_sum = sums[offset : offset + num_betas * num_layers].reshape(num_betas, num_layers)
        offset += num_betas * num_layers
        memory_sum = sums[offset : offset + 2 * num_layers * len(MEMORY_FIELDS)].reshape(2, num_layers, -1)
        offset += 2 * num_layers * len(MEMORY_FIELDS)
        update_sum = sums[offset : offset + num_layers * len(UPDATE_FIELDS)].reshape(num_layers, len(UPDATE_FIELDS))
        offset += num_layers * len(UPDATE_FIELDS)
        ranks = sums[offset : offset + 2 * num_layers].reshape(num_layers, 2)
        shadow_ranks = sums[offset + 2 * num_layers :].reshape(num_betas, num_layers, 3)
        muon_sv = a["muon_sv"].reshape(num_layers, 2) if "muon_sv" in a else None
        acc_max = maxes[: num_layers * len(MAX_FIELDS)].reshape(num_layers, len(MAX_FIELDS))
        glob_max = maxes[num_layers * len(MAX_FIELDS) : num_layers * len(MAX_FIELDS) + 3]
        offset = num_layers * len(MAX_FIELDS) + 3
        shadow_max = maxes[offset : offset + num_betas * num_layers * 2].reshape(num_betas, num_layers, 2).copy()
        preclip_steps = maxes[offset + num_betas * num_layers * 2 :]
        # Sample-based figures are means over the ranks sampling a tensor (one, without sharding: DistContext.owners)
        # and their steps, so that they read the same at any world size: per-step means divide by the ranks' steps,
        # maxima are the mean of the ranks' maxima, episode counts are per rank.
        ratio_steps_sum = ranks[:, 1]
        shadow_steps_sum = shadow_ranks[:, :, 0]
        with np.errstate(divide="ignore", invalid="ignore"):
            shadow_max[:, :, 0] = np.where(shadow_ranks[:, :, 2] > 0, shadow_ranks[:, :, 1] / shadow_ranks[:, :, 2], 0)
            memory_sum = memory_sum.copy()
            memory_sum[:, :, 0] = np.where(ranks[None, :, 0] > 0, memory_sum[:, :, 0] / ranks[None, :, 0], 0)
        if self._grouped:
            unit = self._unit_index
            acc_sum, update_sum = _by_unit(acc_sum, unit, np.add), _by_unit(update_sum, unit, np.add)
            acc_max = _by_unit(acc_max, unit, np.maximum)
            preclip_steps = _by_unit(preclip_steps, unit, np.maximum)
            ratio_steps_sum = _by_unit(ratio_steps_sum, unit, np.add)
            shadow_sum = _by_unit(shadow_sum, unit, np.add, axis=1)
            shadow_steps_sum = _by_unit(shadow_steps_sum, unit, np.add, axis=1)
            shadow_max = _by_unit(shadow_max, unit, np.maximum, axis=1)
            memory_sum = _by_unit(memory_sum, unit, np.add, axis=1)
            muon_sv = _by_unit(muon_sv, unit, np.fmax) if muon_sv is not None else None
        num_units = len(self.units)
        tails = a["tails"].reshape(num_units, 3)

        col = lambda name: acc_sum[:, _S[name]]  # noqa: E731
        steps = acc_max[:, _M["steps"]]
        count = col("count")
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            norm = np.sqrt(col("s2") / steps)
            preclip = np.sqrt(col("preclip_s2") / preclip_steps)
            mean = col("s1") / count
            m2 = col("s2") / count - mean**2
            m4 = col("s4") / count - 4 * mean * col("s3") / count + 6 * mean**2 * col("s2") / count - 3 * mean**4
            # Raw power sums cancel catastrophically when |mean| >> std: the kurtosis error is about
            # eps * (mean^2 / m2)^2 * sqrt(count) (rounding of count terms of size mean^4 each, seen 4.5e-3 at
            # mean/std = 1e3 over 1,000 entries), so past 0.01 (far below the figure's own sampling noise,
            # sqrt(24 / count)) it is reported as NaN rather than as a number (-15 or 5e8 at mean/std = 1e4, 1e6).
            conditioned = np.finfo(np.float64).eps * (mean**2 / m2) ** 2 * np.sqrt(count) < 1e-2
            kurt = np.where((count >= 4) & conditioned, m4 / (m2 * m2) - 3.0, np.nan)
            per_step = np.maximum(count / np.maximum(steps, 1), 4)
            gauss = np.asarray(gaussian_kurtosis_quantile(torch.as_tensor(per_step), 0.99), dtype=np.float64)
            entries = col("entries")
            nonfinite_frac = col("nonfinite") / entries
            ratio_steps = acc_max[:, _M["ratio_steps"]]
            ratio_max = np.where(ratio_steps > 0, acc_max[:, _M["ratio_max"]], np.nan)
            spike_frac = col("ratio_spikes") / col("ratio_entries")
            p99 = col("ratio_p99") / ratio_steps_sum
        has_ratio = bool(np.any(ratio_steps > 0)) or _adam_like(self.optimizer)
        noise_sources = {k[len("noise_") :]: v.reshape(num_units, 3) for k, v in a.items() if k.startswith("noise_")}
        first_shadow = _shadow_tag(cfg.shadow_betas[0]) if cfg.shadow_betas else None
        upd = lambda i, name: update_sum[i, _U[name]]  # noqa: E731
        metrics: dict[str, float] = {}
        nan = math.nan
        kinds = [self.kinds[members[0]] for members in self._unit_members]
        matrices = [any(self.params[j].dim() == 2 for j in members) for members in self._unit_members]
        for i, name in enumerate(self.units):
            present = steps[i] > 0
            metrics[f"grad/norm/{name}"] = float(norm[i]) if present else nan
            if cfg.track_preclip:
                metrics[f"grad/norm_preclip/{name}"] = float(preclip[i]) if preclip_steps[i] > 0 else nan
            metrics[f"grad/max/{name}"] = float(acc_max[i, _M["absmax"]]) if present else nan
            metrics[f"grad/kurtosis/{name}"] = float(kurt[i]) if present else nan
            metrics[f"grad/kurtosis_gauss/{name}"] = float(gauss[i]) if present else nan
            metrics[f"grad/hill_alpha/{name}"] = float(tails[i, 0])
            metrics[f"grad/hill_alpha_se/{name}"] = float(tails[i, 1])
            metrics[f"grad/hill_k/{name}"] = float(tails[i, 2])
            metrics[f"grad/nonfinite_frac/{name}"] = float(nonfinite_frac[i]) if entries[i] > 0 else nan
            for source, values in noise_sources.items():
                prefix = "noise" if source == "temporal" else f"noise/{source}"
                metrics[
                    f"{prefix}/hill_alpha/{name}" if source == "temporal" else f"noise/{source}_hill_alpha/{name}"
                ] = float(values[i, 0])
                metrics[
                    f"noise/hill_alpha_se/{name}" if source == "temporal" else f"noise/{source}_hill_alpha_se/{name}"
                ] = float(values[i, 1])
                metrics[f"noise/kurtosis/{name}" if source == "temporal" else f"noise/{source}_kurtosis/{name}"] = (
                    float(values[i, 2])
                )
            if has_ratio:
                metrics[f"adam/ratio_max/{name}"] = float(ratio_max[i])
                metrics[f"adam/ratio_p99/{name}"] = float(p99[i])
                metrics[f"adam/spike_frac/{name}"] = float(spike_frac[i])
            for index, prefix, events in ((0, "adam", "events_adam"), (1, first_shadow, "events_shadow")):
                if prefix is None or (index == 0 and not has_ratio):
                    continue
                started, ended, ended_steps = memory_sum[index, i]
                metrics[f"{prefix}/memory_steps/{name}"] = float(ended_steps / ended) if ended > 0 else nan
                metrics[f"{prefix}/memory_events/{name}"] = float(started)
                n_events = upd(i, events)
                metrics[f"{prefix}/event_update_ratio/{name}"] = (
                    float(upd(i, f"event_ratio_{events[len('events_') :]}") / n_events) if n_events > 0 else nan
                )
            if self.optimizer is not None:
                steps_u = upd(i, "rms_steps")
                metrics[f"update/rms_ratio/{name}"] = float(upd(i, "rms_ratio") / steps_u) if steps_u > 0 else nan
            if kinds[i] == "lion":
                flips = upd(i, "sign_steps")
                metrics[f"lion/sign_flip_frac/{name}"] = float(upd(i, "sign_flip") / flips) if flips > 0 else nan
            if muon_sv is not None and kinds[i] == "muon" and matrices[i]:
                metrics[f"muon/sv_cond/{name}"] = float(muon_sv[i, 0])
                metrics[f"muon/sv_max_median/{name}"] = float(muon_sv[i, 1])
            for b, beta in enumerate(cfg.shadow_betas):
                tag = _shadow_tag(beta)
                shadow_steps = shadow_steps_sum[b, i]
                ok = shadow_steps > 0
                metrics[f"{tag}/ratio_max/{name}"] = float(shadow_max[b, i, 0]) if ok else nan
                metrics[f"{tag}/spike_frac/{name}"] = float(shadow_sum[b, i] / shadow_steps) if ok else nan
        total_steps = glob_max[2]
        # From the tensors' sums rather than glob_sum's own (the same figure): those count one copy of each piece.
        metrics["grad/norm"] = float(math.sqrt(col("s2").sum() / total_steps)) if total_steps > 0 else nan
        step_sums = a["step_sums"].reshape(-1, 3)
        # Past STEP_ROWS steps in one interval the later steps count through this rank's own maxima (glob_max).
        overflow = self.step_count - self._interval_start > step_sums.shape[0]
        norm_max = math.sqrt(step_sums[:, 2].max())
        metrics["grad/norm_max"] = (
            float(max(norm_max, glob_max[1]) if overflow else norm_max) if total_steps > 0 else nan
        )
        if cfg.track_preclip:
            most = preclip_steps.max() if len(self.units) else 0.0
            metrics["grad/norm_preclip"] = float(math.sqrt(col("preclip_s2").sum() / most)) if most > 0 else nan
        metrics["grad/bad_steps"] = float(acc_max[:, _M["bad_steps"]].max())
        metrics["steps"] = float(total_steps)
        if glob_sum[1] > 0:
            metrics["loss"] = float(glob_sum[0] / glob_sum[1])
            counted = step_sums[:, 1] > 0
            loss_max = float((step_sums[counted, 0] / step_sums[counted, 1]).max()) if counted.any() else -math.inf
            metrics["loss/max"] = float(max(loss_max, glob_max[0]) if overflow else loss_max)
        for kind, skipped in self._skips.items():
            if skipped:
                metrics[f"grad/skipped_{kind}"] = float(skipped)
        if "probe" in a:
            probe = a["probe"].reshape(num_units, len(self._probe_names))
            for i, name in enumerate(self.units):
                for j, figure in enumerate(self._probe_names):
                    metrics[f"probe/{figure}/{name}"] = float(probe[i, j])
        return metrics

    def _run_probe(self) -> torch.Tensor | None:
        """The noise probe's packed figures ``(U, K)`` when this checkpoint is a probe checkpoint, else None.

        Checkpoint n (counted from the step, so a resumed run probes at the same checkpoints) probes when
        ``n % probe_every == 0``.
        """
        cfg = self.config
        if self._probe is None or cfg.probe_every == 0:
            return None
        if math.ceil(self.step_count / cfg.every) % cfg.probe_every:
            return None
        if self.dist.active:
            if not getattr(self, "_probe_warned", False):
                self._probe_warned = True
                warnings.warn(
                    "heavytail: the noise probe does not run under torch.distributed", RuntimeWarning, stacklevel=3
                )
            return None
        loss_fn, batch, micro_batches = self._probe
        self._probing = True
        try:
            result = noise_probe(
                self.model,
                self.params,
                loss_fn,
                batch,
                micro_batches=micro_batches,
                sample_index=self._sample_index_dev,
                groups=self._unit_members if self._grouped else None,
            )
        finally:
            self._probing = False
        self._probe_names, values = result.packed()
        return values

    def _reset_interval(self) -> None:
        st = self._state
        self._muon_sv = None
        for key in (
            "acc_sum",
            "acc_max",
            "glob_sum",
            "shadow_sum",
            "shadow_max",
            "memory_sum",
            "update_sum",
            "step_sums",
        ):
            st[key].zero_()
        st["glob_max"].zero_()
        st["glob_max"][0] = -math.inf  # a fill on the device, not a host-to-device copy
        self._tails = None
        self._interval_start = self.step_count
        self._skips = {k: 0 for k in self._skips}

    # ------------------------------------------------------------------ alerts

    def _emit_alert(self, alert: dict) -> None:
        """Send one alert everywhere: backends (jsonl writes alerts.jsonl), logging, callbacks; keep its flight."""
        # A device-side copy of the flight ring, written at the next checkpoint: no sync at alert time.
        st = self._state
        self._pending_flight.append((alert, (st["flight"].clone(), st["flight_loss"].clone(), self.step_count)))
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

    def _drain_alerts(self) -> None:
        if self.dist.writer:
            self._read_flags(wait=True, before_step=self.step_count + 1)
            self._write_flight_records()

    def _write_flight_records(self) -> None:
        window = self.config.flight_steps
        for alert, (flight, flight_loss, at_step) in self._pending_flight:
            flight_np = flight.cpu().numpy()  # sync point: flight records are written at checkpoints
            loss_np = flight_loss.cpu().numpy()  # sync point: same
            steps = list(range(max(0, at_step - window), at_step))
            slots = [s % window for s in steps]
            record = {
                "step": alert["step"],
                "rule": alert["rule"],
                "layers": self.names,
                "steps": [s + 1 for s in steps],
                "series": {
                    # Host numpy arrays (copied above), so these tolist() calls read no device memory.
                    "grad/norm": [flight_np[k, :, 0].tolist() for k in slots],  # sync point: host data
                    "grad/max": [flight_np[k, :, 1].tolist() for k in slots],  # sync point: host data
                    "grad/kurtosis": [flight_np[k, :, 2].tolist() for k in slots],  # sync point: host data
                    "loss": [float(loss_np[k]) for k in slots],
                },
            }
            path = self.log_dir / alert["flight_record"]
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(path.name + ".tmp")  # whole or absent, even if the run dies mid-write
                tmp.write_text(dumps_record(record))
                os.replace(tmp, path)
            except OSError as exc:
                self._flight_failures += 1
                if self._flight_failures == 1:
                    warnings.warn(
                        f"heavytail: could not write flight record {path}: {exc}; further failures are not reported",
                        RuntimeWarning,
                        stacklevel=2,
                    )
        self._pending_flight = []

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """The monitor's state: tensors, numbers, strings, lists and dicts only (loads with ``weights_only=True``)."""
        st = self._state
        tensors = {k: v.detach().cpu().clone() for k, v in st.items() if isinstance(v, torch.Tensor)}  # sync point
        return {
            "version": STATE_VERSION,
            "names": list(self.names),
            "step_count": self.step_count,
            "interval_start": self._interval_start,
            "noise_slots": dict(self._noise_slots),
            # What the pre-clip measurement has learnt of the loop (a resumed run goes on without re-learning it).
            "preclip": {"untouched": self._preclip_untouched, "reuse": self._preclip_reuse},
            "tensors": tensors,
            "spike": {k: v.detach().cpu().clone() for k, v in st["spike"]._asdict().items()},  # sync point
            "alerts": self.alerts.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output, so detectors continue warm and the step counter goes on."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"Monitor.load_state_dict: unsupported state version {state.get('version')!r}")
        if list(state["names"]) != self.names:
            raise ValueError("Monitor.load_state_dict: the saved state watches different parameters than this monitor")
        st = self._state
        if "noise_microbatch" in state["tensors"]:
            self._ensure_microbatch_ring()
        for key, value in state["tensors"].items():
            if key not in st or st[key].shape != value.shape:
                raise ValueError(f"Monitor.load_state_dict: tensor {key!r} does not match this monitor's configuration")
            if key == "rank_local":
                continue  # filled by the hooks at every backward pass
            # a copy: the kernels update the states in place, and the caller's dict must not change with them
            st[key] = value.to(st[key].device, st[key].dtype, copy=True)
        st["spike"] = type(st["spike"])(**{k: v.to(self.device) for k, v in state["spike"].items()})
        self.step_count = int(state["step_count"])
        self._interval_start = int(state["interval_start"])
        self._noise_slots.update({k: int(v) for k, v in state.get("noise_slots", {}).items()})
        preclip = state.get("preclip", {})
        untouched = preclip.get("untouched", 0)
        self._preclip_untouched = None if untouched is None else int(untouched)
        self._preclip_reuse = bool(preclip.get("reuse", False))
        self.alerts.load_state_dict(state["alerts"])


STEP_ROWS = 4096
"""Steps of an interval whose loss and global norm are kept one by one for loss/max and grad/norm_max (98 KiB)."""

_NO_STEP_BACKWARDS = 200
"""Backward passes without an optimizer step after which the monitor warns (far above any accumulation)."""

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


MIN_SAMPLE_SIZE = 8
"""The fewest coordinates a tensor keeps under ``MonitorConfig.sample_budget``."""


def effective_sample_size(config: MonitorConfig, num_layers: int) -> int:
    """Coordinates sampled per tensor for ``num_layers`` tensors: ``config.sample_size`` while the total stays
    within ``config.sample_budget``, else the budget shared out (at least ``MIN_SAMPLE_SIZE``, at most
    ``sample_size``)."""
    size = config.sample_size
    if config.sample_budget is None or num_layers * size <= config.sample_budget:
        return size
    return max(min(size, MIN_SAMPLE_SIZE), config.sample_budget // max(num_layers, 1))


def _sample_coordinates(n: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """``size`` distinct coordinates of a tensor of ``n`` entries, sorted (every entry, repeated, when n < size).

    Drawn without materialising a permutation of n (a 500M-entry layer would need 4 GB for it): random draws,
    duplicates removed, topped up until there are enough.
    """
    if n < size:  # fewer entries than samples: every entry, repeated (docs/metrics.md)
        return torch.arange(size) % max(n, 1)
    if n <= 4 * size:
        return torch.randperm(n, generator=generator)[:size].sort().values
    chosen = torch.empty(0, dtype=torch.long)
    while chosen.numel() < size:
        draws = torch.randint(0, n, (size + size // 4 + 8,), generator=generator)
        chosen = torch.unique(torch.cat([chosen, draws]))
    keep = torch.randperm(chosen.numel(), generator=generator)[:size]
    return chosen[keep].sort().values


def _fused_pass(kernel: str, device: torch.device) -> Callable | None:
    """The fused gradient pass the configuration and the machine call for (Triton on CUDA, C on the CPU), else
    None: the torch path."""
    if kernel == "torch":
        return None
    if device.type == "cpu" and kernel in ("auto", "cpu"):
        from heavytail.estimators import cpu_pass

        if cpu_pass.available():
            return cpu_pass.cpu_gradient_pass
        if kernel == "cpu":
            raise ValueError(
                f"MonitorConfig.kernel='cpu': the CPU kernels are unavailable ({cpu_pass.unavailable_reason()})"
            )
        return None
    if kernel == "cpu":
        raise ValueError(f"MonitorConfig.kernel='cpu' needs CPU tensors; the parameters are on {device}")
    from heavytail.estimators import triton_pass

    if triton_pass.available(device) and (device.type == "cuda" or kernel == "triton"):
        return triton_pass.triton_gradient_pass
    if kernel == "triton":
        raise ValueError("MonitorConfig.kernel='triton' needs Triton and a CUDA device (or TRITON_INTERPRET=1)")
    return None


def _sample_kernels(config: MonitorConfig, device: torch.device) -> Any:
    """The module whose ``sample_step``/``update_step`` run the sample estimators here (``cpu_pass`` on the CPU,
    ``triton_samples`` on CUDA), or None: the torch code. Both take float64 samples (``stats_dtype``)."""
    if config.kernel == "torch" or config.stats_dtype != torch.float64:
        return None
    if device.type == "cpu":
        return cpu_pass if config.kernel in ("auto", "cpu") and cpu_pass.available() else None
    if device.type == "cuda" and config.kernel in ("auto", "triton"):
        from heavytail.estimators import triton_pass, triton_samples

        return triton_samples if triton_pass.available(device) else None
    return None


def _resolve_units(names: list[str], group_by: Any) -> tuple[list[str], list[list[int]]]:
    """Output units: each tensor on its own, or groups of tensors named by ``group_by``.

    ``group_by`` is a callable from parameter name to group name, or a regex whose first match in a name is the
    group (``r"blocks\\.\\d+"`` makes one unit per transformer block); names it does not match stay on their own.
    """
    if group_by is None:
        return list(names), [[i] for i in range(len(names))]
    if callable(group_by):
        key = group_by
    else:
        pattern = re.compile(group_by)

        def key(name: str) -> str:
            found = pattern.search(name)
            return found.group(0) if found else name

    units: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        units.setdefault(str(key(name)), []).append(i)
    return list(units), list(units.values())


def _by_unit(values: np.ndarray, unit: np.ndarray, op: Any, axis: int = 0) -> np.ndarray:
    """Merge per-tensor rows (along ``axis``) into per-unit rows with ``op`` (``np.add``, ``np.maximum``, ...)."""
    moved = np.moveaxis(values, axis, 0)
    initial = {np.add: 0.0, np.maximum: -np.inf, np.fmax: np.nan}[op]
    out = np.full((int(unit.max()) + 1, *moved.shape[1:]), initial, dtype=np.float64)
    op.at(out, unit, moved)
    return np.moveaxis(out, 0, axis)


def _shadow_tag(beta: float) -> str:
    return "shadow" + f"{beta:.6g}".split(".")[-1]


def _rank_tail_sums(tails: torch.Tensor) -> torch.Tensor:
    """One rank's noise-tail estimates ``(U, 3)`` (alpha, se, kurtosis) as summable rows ``(U, 5)``: Hill's
    gamma = 1/alpha and its squared standard error (delta method: se / alpha^2) where the rank has an estimate,
    that count, the kurtosis where it has one, that count. A light tail (alpha = inf) is gamma = 0."""
    t = tails.to(torch.float64)
    alpha, se, kurt = t[:, 0], t[:, 1], t[:, 2]
    has_alpha = ~torch.isnan(alpha)
    light = torch.isinf(alpha)
    gamma = torch.where(has_alpha & ~light, 1.0 / alpha, 0.0)
    se_gamma = torch.where(has_alpha & ~light, se / (alpha * alpha), 0.0)
    has_kurt = torch.isfinite(kurt)
    return torch.stack(
        [gamma, se_gamma * se_gamma, has_alpha.to(t.dtype), torch.where(has_kurt, kurt, 0.0), has_kurt.to(t.dtype)],
        dim=1,
    )


def _rank_mean_tails(sums: torch.Tensor) -> torch.Tensor:
    """The ranks' estimates merged from :func:`_rank_tail_sums` rows summed over ranks: alpha = 1 / (mean gamma),
    the harmonic mean of the ranks' alphas (Hill's estimator is a mean of log-spacings, an estimate of gamma, so
    the mean of independent estimates is one of the same gamma), its standard error sqrt(sum se_gamma^2) / n /
    gamma^2, and the mean kurtosis; NaN where no rank has an estimate."""
    gamma_sum, se_sq, n_alpha, kurt_sum, n_kurt = sums.unbind(dim=1)
    gamma = gamma_sum / n_alpha
    alpha = torch.where(n_alpha > 0, 1.0 / gamma, math.nan)  # gamma = 0 (every rank light): inf, as one process
    se = torch.where(gamma > 0, se_sq.sqrt() / n_alpha / (gamma * gamma), math.inf)  # inf with alpha, as Hill's
    se = torch.where(n_alpha > 0, se, math.nan)
    kurt = torch.where(n_kurt > 0, kurt_sum / n_kurt, math.nan)
    return torch.stack([alpha, se, kurt], dim=1).to(torch.float32)


def _adam_like(optimizer: torch.optim.Optimizer | None) -> bool:
    """Whether some parameter group divides by an adaptive denominator (Adam-like or Adafactor)."""
    if optimizer is None:
        return False
    return any(optimizer_kind(g) in ("adam", "adafactor") for g in optimizer.param_groups)
