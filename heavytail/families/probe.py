"""The noise probe: the gradient noise of many mini-batches of a held batch, at checkpoints (``probe/``)."""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable

import torch
from torch import nn

from heavytail.families.base import Family, HostViews, Record, Slot
from heavytail.probe import noise_probe, split_batch


class Probe(Family):
    """Per unit, at every ``MonitorConfig.probe_every``-th checkpoint once :meth:`heavytail.Monitor.set_probe`
    gave it a batch: ``probe/<figure>/<name>`` (see :func:`heavytail.probe.noise_probe` and docs/probe.md). Its
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

    def configure(self, model: nn.Module, loss_fn: Callable, batch: Any, micro_batches: int) -> None:
        """Validate and keep what :meth:`heavytail.Monitor.set_probe` was given."""
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
            )
        finally:
            self.probing = False
        self.figures, values = result.packed()
        return {"figures": Slot(values, "none")}

    def metrics(self, views: HostViews, record: Record) -> dict[str, float]:
        if not views.has(self.name, "figures"):
            return {}
        values = views.get(self.name, "figures").reshape(len(self.layout.units), len(self.figures))
        return {
            f"probe/{figure}/{name}": float(values[i, j])
            for i, name in enumerate(self.layout.units)
            for j, figure in enumerate(self.figures)
        }
