"""The monitor: wires the taps to the estimators, streams statistics on the device, and writes checkpoint records."""

from __future__ import annotations

import collections
import json
import logging
import math
import os
import time
import warnings
import weakref
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch import nn

from heavytail import __version__
from heavytail.alerts import AlertEngine
from heavytail.backends import backend_factory, is_backend
from heavytail.config import MonitorConfig
from heavytail.estimators import spike
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
    GradientPass,
)
from heavytail.estimators.hill import default_top_count, hill_from_top, top_magnitudes
from heavytail.estimators.kurtosis import gaussian_kurtosis_quantile, kurtosis_from_power_sums
from heavytail.hooks.gradients import BackwardTap
from heavytail.hooks.optimizer import OptimizerTap, check_owns, denominators
from heavytail.hooks.selection import select_parameters

logger = logging.getLogger("heavytail")

# Models a monitor is attached to: attaching twice would double-count every statistic.
_ATTACHED: "weakref.WeakKeyDictionary[nn.Module, Monitor]" = weakref.WeakKeyDictionary()

STATE_VERSION = 1


class _SafeBackend:
    """Isolates a backend: its first failure is reported once, later ones are counted, training goes on."""

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
                    f"heavytail: backend {self.name!r} failed in {method}() and is isolated from now on: "
                    f"{type(exc).__name__}: {exc}",
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
    Without an optimizer, call :meth:`step` after each update.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        config: MonitorConfig | None = None,
        scaler: Any = None,
        **kwargs: Any,
    ) -> None:
        if config is None:
            config = MonitorConfig(**kwargs)
        elif kwargs:
            config = MonitorConfig(**{**config.to_init_dict(), **kwargs})
        self.config = config
        if not isinstance(model, nn.Module):
            raise TypeError(f"Monitor: model must be a torch.nn.Module, got {type(model).__name__}")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"Monitor: optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if model in _ATTACHED:
            raise RuntimeError(
                f"Monitor: a heavytail monitor is already attached to this {type(model).__name__}; close() it first"
            )
        watched = select_parameters(model, config.include, config.exclude)
        self.names = [n for n, _ in watched]
        self.params = [p for _, p in watched]
        if optimizer is not None:
            check_owns(optimizer, self.params, self.names)
        self.model = model
        self.optimizer = optimizer
        self.scaler = scaler
        self.device = self.params[0].device
        self.numels = [p.numel() for p in self.params]
        num_layers = len(self.params)

        self.log_dir = Path(config.log_dir) if config.log_dir is not None else _default_log_dir()
        self.run_name = config.run_name or self.log_dir.name
        self._backends = self._open_backends()
        self._alert_callbacks: list[Callable[[dict], None]] = []

        # The coordinate sample: fixed at attach so the temporal noise of each coordinate can be followed.
        generator = torch.Generator().manual_seed(config.seed)
        sample_rows = []
        for n in self.numels:
            if n >= config.sample_size:
                sample_rows.append(torch.randperm(n, generator=generator)[: config.sample_size])
            else:  # fewer entries than samples: take every entry, repeating (documented in docs/metrics.md)
                sample_rows.append(torch.arange(config.sample_size) % max(n, 1))
        self._sample_index = torch.stack(sample_rows)
        self._pass = GradientPass(self.numels, self._sample_index, chunk_numel=config.chunk_numel,
                                  dtype=config.stats_dtype)
        self._spike_config = self._make_spike_config()
        self.alerts = AlertEngine(config, self.log_dir, self._emit_alert, warmup=self._spike_config.warmup)
        self.step_count = 0
        self._interval_start = 0
        self._loss_sum: torch.Tensor | None = None
        self._loss_n = 0
        self._tails: torch.Tensor | None = None
        self._pending_flags: collections.deque = collections.deque()
        self._pending_flight: list[tuple[dict, torch.Tensor]] = []
        self._skips = {"sparse": 0, "complex": 0}
        self._microbatches = 0
        self._closed = False
        self._state = self._init_state(num_layers)
        self._state["acc_global"][2] = -math.inf  # running max of the loss

        self._optimizer_tap = OptimizerTap(optimizer, self._before_step, self._after_step) if optimizer else None
        self._backward_tap = BackwardTap(self.params, self._on_backward_end)
        _ATTACHED[model] = self
        self._write_meta()

    # ------------------------------------------------------------------ set-up

    def _open_backends(self) -> list[_SafeBackend]:
        specs = list(self.config.backends)
        if "jsonl" not in specs:
            specs.insert(0, "jsonl")
        opened: list[_SafeBackend] = []
        for spec in specs:
            if isinstance(spec, str):
                factory = backend_factory(spec)  # raises ValueError for an unknown name, before anything opens
                opened.append((spec, factory))  # type: ignore[arg-type]
            elif is_backend(spec):
                opened.append((type(spec).__name__, spec))  # type: ignore[arg-type]
            else:
                raise TypeError(f"Monitor: backend {spec!r} is neither a known name nor an object with log() and "
                                "close()")
        backends = []
        for name, item in opened:  # type: ignore[misc]
            if isinstance(item, type) or callable(item) and not is_backend(item):
                item = item(log_dir=self.log_dir, config=self.config)
            backends.append(_SafeBackend(name, item))
        return backends

    def _make_spike_config(self) -> spike.SpikeConfig:
        overrides = {}
        if self.config.spike_z is not None:
            overrides["threshold"] = float(self.config.spike_z)
        if self.config.spike_warmup is not None:
            overrides["warmup"] = int(self.config.spike_warmup)
        return spike.SpikeConfig(**overrides)

    def _init_state(self, num_layers: int) -> dict[str, Any]:
        cfg, dev, dt = self.config, self.device, self.config.stats_dtype
        z = lambda *shape, dtype=dt: torch.zeros(*shape, device=dev, dtype=dtype)  # noqa: E731
        state: dict[str, Any] = {
            # Interval accumulators (additive or max-reducible, so distributed ranks merge them exactly).
            "acc": z(num_layers, 9),
            "acc_steps": z(num_layers),  # steps in which the tensor had a finite gradient
            "acc_bad_steps": z(num_layers),  # steps excluded for non-finite entries
            "acc_preclip_s2": z(num_layers),
            "acc_ratio_steps": z(num_layers),
            "acc_ratio_p99": z(num_layers),
            "acc_spike_frac": z(num_layers),
            "acc_shadow": z(len(cfg.shadow_betas), num_layers, 3),  # ratio max, spike-frac sum, steps
            "acc_global": z(6),  # loss sum, loss count, loss max, grad s2 sum, grad norm max, steps
            # Noise: per-coordinate EMA of the sampled gradient, and a ring of deviations from it.
            "noise_mean": z(num_layers, cfg.sample_size),
            "noise_seen": z(num_layers),
            "noise_ring": z(num_layers, cfg.sample_size, cfg.noise_window, dtype=torch.float32),
            "noise_valid": z(num_layers, cfg.noise_window, dtype=torch.bool),
            "shadow_v": z(len(cfg.shadow_betas), num_layers, cfg.sample_size),
            "shadow_t": z(len(cfg.shadow_betas), num_layers),
            "preclip_s2": z(num_layers),
            # Flight recorder: compact per-layer statistics of the last steps (norm, max |g|, kurtosis) + loss.
            "flight": torch.full((cfg.flight_steps, num_layers, 3), math.nan, device=dev, dtype=torch.float32),
            "flight_loss": torch.full((cfg.flight_steps,), math.nan, device=dev, dtype=torch.float32),
            "spike": spike.init(2 + num_layers, device=dev, config=self._spike_config),
        }
        return state

    def _write_meta(self) -> None:
        meta = {
            "heavytail_version": __version__,
            "run_name": self.run_name,
            "started": time.time(),
            "torch_version": torch.__version__,
            "device": str(self.device),
            "model": type(self.model).__name__,
            "optimizer": type(self.optimizer).__name__ if self.optimizer is not None else None,
            "every": self.config.every,
            "params": [
                {"name": n, "shape": list(p.shape), "numel": p.numel(), "dtype": str(p.dtype).replace("torch.", "")}
                for n, p in zip(self.names, self.params)
            ],
            "config": self.config.to_dict(),
            "extra": self.config.extra,
        }
        if self.optimizer is not None:
            meta["optimizer_hparams"] = [
                {k: v for k, v in g.items() if k != "params" and isinstance(v, (int, float, str, bool, tuple, list))}
                for g in self.optimizer.param_groups
            ]
        try:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            tmp = self.log_dir / "meta.json.tmp"
            tmp.write_text(json.dumps(meta, indent=2, default=str))
            os.replace(tmp, self.log_dir / "meta.json")
        except OSError as exc:
            warnings.warn(f"heavytail: could not write meta.json: {exc}", RuntimeWarning, stacklevel=2)

    # ------------------------------------------------------------------ public API

    def observe_loss(self, loss: torch.Tensor | float) -> None:
        """Record this step's loss for the ``loss`` metrics and the loss-spike detector (no synchronization).

        Call it once per micro-batch (the step's loss is the mean) before ``optimizer.step()``.
        """
        if self._closed:
            return
        if isinstance(loss, torch.Tensor):
            value = loss.detach().reshape(-1)[0].to(self.device, self.config.stats_dtype, non_blocking=True)
        else:
            value = torch.tensor(float(loss), device=self.device, dtype=self.config.stats_dtype)
        self._loss_sum = value if self._loss_sum is None else self._loss_sum + value
        self._loss_n += 1

    def step(self) -> None:
        """Count one optimizer update; only needed when the monitor was built without an optimizer."""
        if self._optimizer_tap is not None:
            raise RuntimeError("Monitor.step(): steps are counted by the optimizer's hooks; do not call step()")
        self._before_step()
        self._after_step()

    def on_alert(self, fn: Callable[[dict], None]) -> Callable[[dict], None]:
        """Register ``fn(alert_record)`` to be called for every alert; returns ``fn`` (usable as a decorator)."""
        self._alert_callbacks.append(fn)
        return fn

    def flush(self) -> None:
        """Write a checkpoint record now for the steps since the last one (nothing if there were none)."""
        if self._closed or self.step_count == self._interval_start:
            self._drain_alerts()
            return
        if self._tails is None:
            self._tails = self._tail_indices()
        self._checkpoint()

    def close(self) -> None:
        """Flush, remove every hook and close the backends. Safe to call more than once."""
        if self._closed:
            return
        try:
            self.flush()
        finally:
            self._closed = True
            if self._optimizer_tap is not None:
                self._optimizer_tap.remove()
            self._backward_tap.remove()
            for backend in self._backends:
                backend.close()
            if _ATTACHED.get(self.model) is self:
                del _ATTACHED[self.model]

    detach = close

    def __enter__(self) -> "Monitor":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ step path (no host-device sync)

    def _gradients(self) -> list[torch.Tensor | None]:
        grads: list[torch.Tensor | None] = []
        for p in self.params:
            g = p.grad
            if g is not None and (g.is_sparse or g.layout != torch.strided):
                self._skips["sparse"] += 1
                g = None
            elif g is not None and g.is_complex():
                self._skips["complex"] += 1
                g = None
            elif g is not None and hasattr(g, "to_local"):  # a DTensor under FSDP2: this rank's shard
                g = g.to_local()
            grads.append(g)
        return grads

    def _on_backward_end(self) -> None:
        if self._closed or not self.config.track_preclip:
            return
        self._microbatches += 1
        grads = [p.grad for p in self.params]
        rows = [i for i, g in enumerate(grads) if g is not None and g.layout == torch.strided and not g.is_complex()]
        if not rows:
            return
        tensors = [grads[i] for i in rows]
        tensors = [g.to_local() if hasattr(g, "to_local") else g for g in tensors]
        norms = torch.stack(torch._foreach_norm(tensors)).to(self.config.stats_dtype)
        if self.scaler is not None and getattr(self.scaler, "_scale", None) is not None and self.scaler.is_enabled():
            # Hooks see gradients multiplied by the loss scale; divide on the device, never read the scale.
            norms = norms / self.scaler._scale.to(norms.dtype)
        s2 = torch.zeros_like(self._state["preclip_s2"])
        s2[torch.tensor(rows, device=self.device)] = norms * norms
        self._state["preclip_s2"] = s2

    def _before_step(self) -> None:
        if self._closed:
            return
        with torch.no_grad():
            self._stream_step()
            if (self.step_count + 1) % self.config.every == 0:
                self._tails = self._tail_indices()

    def _stream_step(self) -> None:
        cfg, st = self.config, self._state
        grads = self._gradients()
        den = denominators(self.optimizer, self.params, self.device)
        res = self._pass(grads, den, spike_threshold=cfg.spike_threshold)
        stats = res.stats
        entries = stats[:, COUNT] + stats[:, NONFINITE]
        valid = (entries > 0) & (stats[:, NONFINITE] == 0)
        validf = valid.to(stats.dtype)
        clean = torch.where(valid[:, None], stats, torch.zeros_like(stats))

        acc = st["acc"]
        acc[:, COUNT : S4 + 1] += clean[:, COUNT : S4 + 1]
        acc[:, NONFINITE] += stats[:, NONFINITE]
        acc[:, ABSMAX] = torch.maximum(acc[:, ABSMAX], clean[:, ABSMAX])
        st["acc_steps"] += validf
        st["acc_bad_steps"] += ((entries > 0) & ~valid).to(stats.dtype)
        st["acc_preclip_s2"] += torch.where(valid, st["preclip_s2"], 0.0)

        # Denominator ratios: real (AdamW's own v) where the optimizer has one.
        ratio_ok = valid & torch.isfinite(stats[:, RATIO_MAX])
        acc[:, RATIO_MAX] = torch.maximum(acc[:, RATIO_MAX], torch.where(ratio_ok, stats[:, RATIO_MAX], 0.0))
        spike_frac = stats[:, RATIO_SPIKES] / stats[:, COUNT].clamp_min(1)
        acc[:, RATIO_SPIKES] += torch.where(ratio_ok, stats[:, RATIO_SPIKES], 0.0)
        st["acc_ratio_steps"] += ratio_ok.to(stats.dtype)
        st["acc_spike_frac"] += torch.where(ratio_ok, spike_frac, 0.0)
        p99 = torch.nanquantile(res.ratio_samples, 0.99, dim=1)
        st["acc_ratio_p99"] += torch.where(ratio_ok & torch.isfinite(p99), p99, 0.0)

        g = res.grad_samples
        self._stream_shadow(g, valid)
        self._stream_noise(g, valid)

        # Global figures and the loss.
        s2 = clean[:, S2]
        gnorm = s2.sum().sqrt()
        glob = st["acc_global"]
        if self._loss_sum is not None:
            loss = self._loss_sum / self._loss_n
            glob[0] += torch.where(torch.isfinite(loss), loss, 0.0)
            glob[1] += torch.isfinite(loss).to(glob.dtype)
            glob[2] = torch.where(torch.isfinite(loss), torch.maximum(glob[2], loss), glob[2])
        else:
            loss = torch.full((), math.nan, device=self.device, dtype=stats.dtype)
        glob[3] += s2.sum()
        glob[4] = torch.maximum(glob[4], gnorm)
        glob[5] += 1
        self._loss_sum, self._loss_n = None, 0

        # Spike detectors on the loss, the global norm and each layer's norm; flags go to the host asynchronously.
        layer_norm = torch.where(valid, s2.sqrt(), math.nan)
        streams = torch.cat([loss.reshape(1), torch.where(torch.isfinite(gnorm), gnorm, math.nan).reshape(1),
                             layer_norm]).to(torch.float32)
        st["spike"], flags, scores = spike.update(st["spike"], streams, self._spike_config)
        kurt = kurtosis_from_power_sums(clean[:, COUNT], clean[:, S1], clean[:, S2], clean[:, S3], clean[:, S4])
        slot = self.step_count % self.config.flight_steps
        st["flight"][slot] = torch.stack([layer_norm, clean[:, ABSMAX], kurt], dim=1).to(torch.float32)
        st["flight_loss"][slot] = loss.to(torch.float32)
        packed = torch.cat([
            flags.to(torch.float32), scores.to(torch.float32), streams,
            stats[:, NONFINITE].to(torch.float32), spike_frac.to(torch.float32),
            torch.where(ratio_ok, stats[:, RATIO_MAX], math.nan).to(torch.float32),
        ])
        self._queue_flags(packed)

    def _stream_shadow(self, g: torch.Tensor, valid: torch.Tensor) -> None:
        """Shadow denominators: an EMA of g^2 on the sampled coordinates, one per beta2, as AdamW would keep."""
        cfg, st = self.config, self._state
        g = torch.nan_to_num(g, nan=0.0)
        betas = torch.tensor(cfg.shadow_betas, device=self.device, dtype=g.dtype)[:, None, None]
        v, t = st["shadow_v"], st["shadow_t"]
        bias = 1.0 - betas[:, :, 0] ** t  # (B, L); 0 before the first step
        denom = (v / bias.clamp_min(1e-30)[:, :, None]).sqrt() + 1e-8
        r = g.abs()[None] / denom
        ok = (valid[None] & (t > 0))  # (B, L)
        r_max = torch.where(ok, r.amax(dim=2), 0.0)
        frac = (r * r > cfg.spike_threshold).to(g.dtype).mean(dim=2)
        acc = st["acc_shadow"]
        acc[:, :, 0] = torch.maximum(acc[:, :, 0], r_max)
        acc[:, :, 1] += torch.where(ok, frac, 0.0)
        acc[:, :, 2] += ok.to(g.dtype)
        new_v = betas * v + (1 - betas) * (g * g)[None]
        st["shadow_v"] = torch.where(valid[None, :, None], new_v, v)
        st["shadow_t"] = t + valid.to(t.dtype)[None]

    def _stream_noise(self, g: torch.Tensor, valid: torch.Tensor) -> None:
        """Temporal noise: each sampled coordinate's deviation from its own EMA, kept in a ring buffer."""
        cfg, st = self.config, self._state
        mean, seen = st["noise_mean"], st["noise_seen"]
        deviation = g - mean
        write = valid & (seen > 0)
        slot = self.step_count % cfg.noise_window
        ring = st["noise_ring"]
        ring[:, :, slot] = torch.where(write[:, None], deviation, 0.0).to(ring.dtype)
        st["noise_valid"][:, slot] = write
        beta = torch.where(seen > 0, cfg.noise_beta, 0.0)[:, None]  # the first value initialises the EMA
        st["noise_mean"] = torch.where(valid[:, None], beta * mean + (1 - beta) * torch.nan_to_num(g), mean)
        st["noise_seen"] = seen + valid.to(seen.dtype)

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

    def _after_step(self) -> None:
        if self._closed:
            return
        self.step_count += 1
        # Read the flags copied during an earlier step, if the copy is done: never wait for the device.
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
            values = host.numpy()  # host memory, already copied: no device access
            self.alerts.process_step_flags(step, values, self.names, self._spike_config.threshold)

    # ------------------------------------------------------------------ checkpoint path

    def _tail_indices(self) -> torch.Tensor:
        """Hill tail index of each tensor's current gradient from its top order statistics, ``(L, 3)``.

        ``torch.topk`` per tensor (checkpoint steps only), then one batched ``hill_from_top`` per group of tensors
        that kept the same number of order statistics.
        """
        cfg = self.config
        num_layers = len(self.params)
        out = torch.full((num_layers, 3), math.nan, device=self.device, dtype=torch.float32)
        groups: dict[int, tuple[list[int], list[torch.Tensor], list[torch.Tensor]]] = {}
        with torch.no_grad():
            for i, g in enumerate(self._gradients()):
                n = self.numels[i]
                if g is None or n < cfg.min_tail_samples:
                    continue
                m = int(min(default_top_count(n), cfg.tail_top_max))
                # Zeros and non-finite entries are missing data for the tail (the estimator's rule).
                top, count = top_magnitudes(g.detach().reshape(-1), m)
                rows, tops, counts = groups.setdefault(top.shape[-1], ([], [], []))
                rows.append(i)
                tops.append(top)
                counts.append(count)
            for rows, tops, counts in groups.values():
                result = hill_from_top(torch.stack(tops), torch.stack(counts))
                out[torch.tensor(rows, device=self.device)] = torch.stack(
                    [result.alpha.float(), result.se.float(), result.k.float()], dim=1)
        return out

    def _noise_tails(self) -> torch.Tensor:
        """Hill alpha, its standard error and the excess kurtosis of each tensor's sampled noise, ``(L, 3)``."""
        st = self._state
        ring = st["noise_ring"].to(torch.float64)  # (L, S, W)
        valid = st["noise_valid"]  # (L, W)
        num_layers, num_samples, window = ring.shape
        out = torch.full((num_layers, 3), math.nan, device=self.device, dtype=torch.float32)
        counts = valid.sum(dim=1) * num_samples  # (L,)
        data = ring.reshape(num_layers, -1)
        mask = valid[:, None, :].expand(-1, num_samples, -1).reshape(num_layers, -1)
        # Kurtosis over the valid deviations only (masked central moments).
        nvalid = counts.to(torch.float64).clamp_min(1)
        mean = (data * mask).sum(1) / nvalid
        centred = (data - mean[:, None]) * mask
        m2 = (centred**2).sum(1) / nvalid
        m4 = (centred**4).sum(1) / nvalid
        kurt = m4 / (m2 * m2) - 3.0
        out[:, 2] = torch.where(counts >= self.config.min_tail_samples, kurt, math.nan).to(torch.float32)
        # Hill: slots not yet written read as 0, which the estimator treats as missing (zeros carry no tail).
        n_total = num_samples * window
        m = int(min(default_top_count(n_total), n_total))
        top = torch.topk((data * mask).abs(), m, dim=1).values
        result = hill_from_top(top, counts.clamp_min(1))
        enough = counts >= self.config.min_tail_samples
        out[:, 0] = torch.where(enough, result.alpha.float(), math.nan)
        out[:, 1] = torch.where(enough, result.se.float(), math.nan)
        return out

    def _checkpoint(self) -> None:
        st, cfg = self._state, self.config
        tails = self._tails if self._tails is not None else torch.full(
            (len(self.params), 3), math.nan, device=self.device)
        noise = self._noise_tails()
        parts = {
            "acc": st["acc"], "acc_steps": st["acc_steps"], "acc_bad_steps": st["acc_bad_steps"],
            "acc_preclip_s2": st["acc_preclip_s2"], "acc_ratio_steps": st["acc_ratio_steps"],
            "acc_ratio_p99": st["acc_ratio_p99"], "acc_spike_frac": st["acc_spike_frac"],
            "acc_shadow": st["acc_shadow"], "acc_global": st["acc_global"], "tails": tails, "noise": noise,
        }
        flat = torch.cat([t.reshape(-1).to(torch.float64) for t in parts.values()])
        host = flat.cpu().numpy()  # sync point: the one device->host copy of a checkpoint
        arrays, offset = {}, 0
        for name, t in parts.items():
            arrays[name] = host[offset : offset + t.numel()].reshape(tuple(t.shape))
            offset += t.numel()
        metrics = self._metrics_from(arrays)
        self._read_flags(wait=True, before_step=self.step_count + 1)
        for backend in self._backends:
            backend.log(metrics, self.step_count)
        self.alerts.process_record(self.step_count, metrics, self.names)
        self._write_flight_records()
        self._reset_interval()

    def _metrics_from(self, a: dict[str, np.ndarray]) -> dict[str, float]:
        cfg = self.config
        acc = a["acc"]
        steps = a["acc_steps"]
        count = acc[:, COUNT]
        metrics: dict[str, float] = {}
        with np.errstate(divide="ignore", invalid="ignore"):
            norm = np.sqrt(acc[:, S2] / steps)
            preclip = np.sqrt(a["acc_preclip_s2"] / steps)
            n = count
            mean = acc[:, S1] / n
            m2 = acc[:, S2] / n - mean**2
            m4 = (acc[:, S4] / n - 4 * mean * acc[:, S3] / n + 6 * mean**2 * acc[:, S2] / n - 3 * mean**4)
            kurt = m4 / (m2 * m2) - 3.0
            per_step_n = count / steps
            gauss = np.asarray(gaussian_kurtosis_quantile(torch.as_tensor(np.nan_to_num(count, nan=4.0)).clamp_min(4),
                                                          0.99), dtype=np.float64)
            entries = count + acc[:, NONFINITE]
            nonfinite_frac = acc[:, NONFINITE] / entries
            ratio_steps = a["acc_ratio_steps"]
            ratio_max = np.where(ratio_steps > 0, acc[:, RATIO_MAX], np.nan)
            spike_frac = a["acc_spike_frac"] / ratio_steps
            p99 = a["acc_ratio_p99"] / ratio_steps
        del per_step_n
        tails, noise = a["tails"], a["noise"]
        shadow = a["acc_shadow"]
        has_ratio = bool(np.any(ratio_steps > 0)) or _adam_like(self.optimizer)
        for i, name in enumerate(self.names):
            present = steps[i] > 0
            metrics[f"grad/norm/{name}"] = float(norm[i]) if present else math.nan
            if cfg.track_preclip:
                metrics[f"grad/norm_preclip/{name}"] = float(preclip[i]) if present else math.nan
            metrics[f"grad/max/{name}"] = float(acc[i, ABSMAX]) if present else math.nan
            metrics[f"grad/kurtosis/{name}"] = float(kurt[i]) if present and count[i] >= 4 else math.nan
            metrics[f"grad/kurtosis_gauss/{name}"] = float(gauss[i]) if present else math.nan
            metrics[f"grad/hill_alpha/{name}"] = float(tails[i, 0])
            metrics[f"grad/hill_alpha_se/{name}"] = float(tails[i, 1])
            metrics[f"grad/hill_k/{name}"] = float(tails[i, 2])
            metrics[f"grad/nonfinite_frac/{name}"] = float(nonfinite_frac[i]) if entries[i] > 0 else math.nan
            metrics[f"noise/hill_alpha/{name}"] = float(noise[i, 0])
            metrics[f"noise/hill_alpha_se/{name}"] = float(noise[i, 1])
            metrics[f"noise/kurtosis/{name}"] = float(noise[i, 2])
            if has_ratio:
                metrics[f"adam/ratio_max/{name}"] = float(ratio_max[i])
                metrics[f"adam/ratio_p99/{name}"] = float(p99[i])
                metrics[f"adam/spike_frac/{name}"] = float(spike_frac[i])
            for b, beta in enumerate(cfg.shadow_betas):
                tag = _shadow_tag(beta)
                ok = shadow[b, i, 2] > 0
                metrics[f"{tag}/ratio_max/{name}"] = float(shadow[b, i, 0]) if ok else math.nan
                metrics[f"{tag}/spike_frac/{name}"] = float(shadow[b, i, 1] / shadow[b, i, 2]) if ok else math.nan
        glob = a["acc_global"]
        total_steps = glob[5]
        metrics["grad/norm"] = float(math.sqrt(glob[3] / total_steps)) if total_steps > 0 else math.nan
        metrics["grad/norm_max"] = float(glob[4]) if total_steps > 0 else math.nan
        if cfg.track_preclip:
            metrics["grad/norm_preclip"] = float(math.sqrt(a["acc_preclip_s2"].sum() / total_steps)) \
                if total_steps > 0 else math.nan
        metrics["grad/bad_steps"] = float(a["acc_bad_steps"].max()) if len(self.names) else 0.0
        metrics["steps"] = float(total_steps)
        if glob[1] > 0:
            metrics["loss"] = float(glob[0] / glob[1])
            metrics["loss/max"] = float(glob[2])
        for kind, n_skipped in self._skips.items():
            if n_skipped:
                metrics[f"grad/skipped_{kind}"] = float(n_skipped)
        return metrics

    def _reset_interval(self) -> None:
        st = self._state
        for key in ("acc", "acc_steps", "acc_bad_steps", "acc_preclip_s2", "acc_ratio_steps", "acc_ratio_p99",
                    "acc_spike_frac", "acc_shadow", "acc_global"):
            st[key].zero_()
        st["acc_global"][2] = -math.inf
        self._tails = None
        self._interval_start = self.step_count
        self._skips = {k: 0 for k in self._skips}

    # ------------------------------------------------------------------ alerts

    def _emit_alert(self, alert: dict) -> None:
        """Send one alert everywhere: backends (jsonl writes alerts.jsonl), logging, callbacks; keep its flight."""
        # A device-side copy of the flight ring: written to disk at the next checkpoint, so no sync here.
        self._pending_flight.append((alert, (self._state["flight"].clone(), self._state["flight_loss"].clone(),
                                             self.step_count)))
        logger.warning("heavytail alert [%s] %s", alert["rule"], alert["message"])
        for backend in self._backends:
            backend.alert(alert)
        for fn in list(self._alert_callbacks):
            try:
                fn(dict(alert))
            except Exception as exc:  # a user callback must not break training either
                warnings.warn(f"heavytail: on_alert callback {fn!r} raised {type(exc).__name__}: {exc}",
                              RuntimeWarning, stacklevel=2)

    def _drain_alerts(self) -> None:
        self._read_flags(wait=True, before_step=self.step_count + 1)
        self._write_flight_records()

    def _write_flight_records(self) -> None:
        if not self._pending_flight:
            return
        window = self.config.flight_steps
        for alert, (flight, flight_loss, at_step) in self._pending_flight:
            flight_np = flight.cpu().numpy()  # sync point: alert flight records, written at checkpoints
            loss_np = flight_loss.cpu().numpy()  # sync point: same
            first = max(0, at_step - window)
            steps = list(range(first, at_step))
            slots = [s % window for s in steps]
            record = {
                "step": alert["step"],
                "rule": alert["rule"],
                "layers": self.names,
                "steps": [s + 1 for s in steps],
                "series": {
                    "grad/norm": [flight_np[k, :, 0].tolist() for k in slots],
                    "grad/max": [flight_np[k, :, 1].tolist() for k in slots],
                    "grad/kurtosis": [flight_np[k, :, 2].tolist() for k in slots],
                    "loss": [float(loss_np[k]) for k in slots],
                },
            }
            path = self.log_dir / alert["flight_record"]
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                from heavytail.backends.jsonl import dumps_record

                path.write_text(dumps_record(record))
            except OSError as exc:
                warnings.warn(f"heavytail: could not write flight record {path}: {exc}", RuntimeWarning, stacklevel=2)
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
        for key, value in state["tensors"].items():
            if key not in st or st[key].shape != value.shape:
                raise ValueError(f"Monitor.load_state_dict: tensor {key!r} does not match this monitor's configuration")
            st[key] = value.to(st[key].device, st[key].dtype)
        st["spike"] = type(st["spike"])(**{k: v.to(self.device) for k, v in state["spike"].items()})
        self.step_count = int(state["step_count"])
        self._interval_start = int(state["interval_start"])
        self.alerts.load_state_dict(state["alerts"])


def _shadow_tag(beta: float) -> str:
    return "shadow" + f"{beta:.6g}".split(".")[-1]


def _adam_like(optimizer: torch.optim.Optimizer | None) -> bool:
    """Whether some parameter group divides by an AdamW-style denominator (betas and a scalar eps)."""
    if optimizer is None:
        return False
    return any("betas" in g and isinstance(g.get("eps"), float) for g in optimizer.param_groups)
