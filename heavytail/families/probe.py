"""The noise probe: the gradient noise of many mini-batches of a held batch, at checkpoints (``probe/``)."""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable

import torch
from torch import nn

from heavytail.families.base import Family, HostViews, Record, Slot
from heavytail.probe import batch_rows, head_rows, noise_probe, noise_scale, split_batch

GNS_FIELDS = {"b_simple": "b_simple", "b_robust": "robust", "trace_sigma": "trace_sigma", "grad_sq": "grad_sq"}
"""The probe's noise-scale keys (``gns/probe_<key>``) and the :class:`heavytail.estimators.gns.GnsResult` field of
each: the streaming ``gns/`` family's figures, from the held batch at the checkpoint."""

DEFAULT_MICRO_BATCHES = 32
"""Mini-batches per probe when neither ``micro_batches`` nor ``batch_size`` is given: 32 draws per coordinate, with
the default 256 coordinates enough for the tail verdict (Gaussian noise reads light)."""


class Probe(Family):
    """Per unit, at every ``MonitorConfig.probe_every``-th checkpoint once :meth:`heavytail.Monitor.set_probe`
    gave it a batch: ``probe/<figure>/<name>`` (see :func:`heavytail.probe.noise_probe` and docs/probe.md), and
    the held batch's gradient noise scale, ``gns/probe_<figure>[/<name>]`` with ``gns/probe_small_batch`` and
    ``gns/probe_big_batch`` (:func:`heavytail.probe.noise_scale`; docs/metrics.md). Its
    backward passes are not the run's: the monitor ignores them while ``probing`` is set. Not run under
    torch.distributed (each rank would probe its own copy); a warning says so once."""

    name = "probe"
    report_sections = ("sec-noise-probe", "sec-noise-sources")

    def __init__(self, layout) -> None:
        super().__init__(layout)
        self.batch: tuple[Callable[[nn.Module, Any], torch.Tensor], Any, int] | None = None
        self.model: nn.Module | None = None
        self.probing = False
        self.figures: list[str] = []
        self._warned = False

    def configure(
        self, model: nn.Module, loss_fn: Callable, batch: Any, micro_batches: int | None, batch_size: int | None
    ) -> None:
        """Validate and keep what :meth:`heavytail.Monitor.set_probe` was given."""
        if batch_size is not None:
            if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
                raise ValueError(f"Monitor.set_probe: batch_size must be a positive integer, got {batch_size!r}")
            if micro_batches is not None:
                raise ValueError("Monitor.set_probe: give micro_batches or batch_size, not both")
            micro_batches = batch_rows(batch) // batch_size
            if micro_batches < 2:
                raise ValueError(
                    f"Monitor.set_probe: the held batch has {batch_rows(batch)} rows, fewer than two mini-batches "
                    f"of batch_size = {batch_size}; give a larger batch"
                )
        elif micro_batches is None:
            micro_batches = DEFAULT_MICRO_BATCHES
        if isinstance(micro_batches, bool) or not isinstance(micro_batches, int) or micro_batches < 2:
            raise ValueError(f"Monitor.set_probe: micro_batches must be an integer >= 2, got {micro_batches!r}")
        if not callable(loss_fn):
            raise TypeError(f"Monitor.set_probe: loss_fn must be callable, got {type(loss_fn).__name__}")
        if batch_size is not None:  # exactly micro_batches x batch_size rows, so every mini-batch has batch_size
            batch = head_rows(batch, micro_batches * batch_size)
        split_batch(batch, micro_batches)  # a batch that cannot be split fails here, not at a checkpoint
        if self.config.probe_every == 0:
            warnings.warn(
                "heavytail: set_probe() with MonitorConfig.probe_every = 0: the probe will not run; set "
                "probe_every to run it every that many checkpoints",
                RuntimeWarning,
                stacklevel=3,
            )
        self.model, self.batch = model, (loss_fn, batch, micro_batches)

    def readout(self, step: int) -> dict[str, Slot]:
        """Checkpoint n (counted from the step, so a resumed run probes at the same checkpoints) probes when
        ``n % probe_every == 0``."""
        cfg = self.config
        if self.batch is None or cfg.probe_every == 0 or math.ceil(step / cfg.every) % cfg.probe_every:
            return {}
        if self.layout.dist.active:
            if not self._warned:
                self._warned = True
                warnings.warn(
                    "heavytail: the noise probe does not run under torch.distributed", RuntimeWarning, stacklevel=3
                )
            return {}
        loss_fn, batch, micro_batches = self.batch
        layout = self.layout
        self.probing = True
        try:
            result = noise_probe(
                self.model,
                layout.params,
                loss_fn,
                batch,
                micro_batches=micro_batches,
                sample_index=layout.sample_index_dev,
                groups=layout.unit_members if layout.grouped else None,
                min_count=cfg.min_tail_samples,
            )
        finally:
            self.probing = False
        self.figures, values = result.packed()
        scale = noise_scale(result)
        columns = [getattr(scale, field) for field in GNS_FIELDS.values()]
        columns += [scale.small_batch, scale.big_batch]
        return {"figures": Slot(values, "none"), "gns": Slot(torch.stack(columns, dim=1), "none")}

    def metrics(self, views: HostViews, record: Record) -> dict[str, float]:
        if not views.has(self.name, "figures"):
            return {}
        values = views.get(self.name, "figures").reshape(len(self.layout.units), len(self.figures))
        out = {
            f"probe/{figure}/{name}": float(values[i, j])
            for i, name in enumerate(self.layout.units)
            for j, figure in enumerate(self.figures)
        }
        # The gradient noise scale of the held batch: gns/probe_<figure>[/<name>], the last row the whole model.
        scale = views.get(self.name, "gns").reshape(len(self.layout.units) + 1, len(GNS_FIELDS) + 2)
        for j, key in enumerate(GNS_FIELDS):
            for name, value in zip([*self.layout.units, None], scale[:, j].tolist()):
                out[f"gns/probe_{key}" if name is None else f"gns/probe_{key}/{name}"] = value
        out["gns/probe_small_batch"] = float(scale[-1, -2])
        out["gns/probe_big_batch"] = float(scale[-1, -1])
        return out
