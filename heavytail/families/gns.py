"""Gradient noise scale per tensor and for the whole model, from a small and a big batch of each step (``gns/``)."""

from __future__ import annotations

import math

import numpy as np
import torch

from heavytail.estimators import gns
from heavytail.estimators.gradient_pass import S2
from heavytail.families.base import BackwardView, Family, HostViews, Record, Slot, StepView
from heavytail.transfer import to_device


class Gns(Family):
    """``gns/b_simple/<p>`` and ``gns/b_simple`` (McCandlish et al. 2018's B_simple = tr(Sigma) / |G|^2), with
    ``gns/trace_sigma``, ``gns/grad_sq``, the robust counterpart ``gns/b_robust`` and ``gns/variance_flag`` (the
    noise tail index says B_simple means nothing), per tensor and global; ``estimators.gns`` holds the maths.

    The two batches of a step, in units of one backward pass on one rank (a *micro-batch*; in examples when
    ``MonitorConfig.batch_size`` says how many a micro-batch holds):

    - small, b = 1: this rank's first backward pass of the step, read at the end of that pass (before DDP's
      all-reduce) in one extra read of its gradients. The gradients accumulate over the passes, so the first pass
      left c g_1, with c whatever the loss was scaled by (``1 / accumulate`` in the usual loop); multiplied by the
      M passes of the step it is on the scale of the step's gradient c sum_i g_i, the mean over micro-batches
      when c = 1 / M. The GradScaler's scale is divided out on the device.
    - big, B = M x world: the gradient the optimizer steps with (reduced across ranks), before clipping and
      unscaling (the ``preclip`` family's measurement, else the step pass's own squared norms).

    Sources: ``microbatch`` (M > 1: gradient accumulation, any world size) and ``rank`` (M = 1 under DDP); one
    process without accumulation has none and records no ``gns/`` key. FSDP2 has none either (a shard's first
    pass is already reduce-scattered). The records name the source by its counts: ``gns/micro_batches`` (M) and
    ``gns/ranks`` (world), with ``gns/small_batch`` and ``gns/big_batch`` (b and B).

    State: ``estimators.gns.GnsState`` with one row per output unit and a last row for the whole model (a unit's
    squared norms are its tensors' sums); each rank's EMAs use its own small batch and are averaged over ranks at
    the checkpoint (a sum all-reduce divided by the world size), which is the EMA of the ranks' mean estimate.
    """

    name = "gns"
    report_sections = ("sec-noise-scale", "sec-gns-heatmap")

    @classmethod
    def wanted(cls, layout) -> bool:
        return bool(layout.config.track_gns) and not layout.dist.sharded

    FOLD_STEPS = 32
    """Steps whose squared norms wait in a buffer before one ``estimators.gns.update_many`` folds them into the
    EMAs (and at every checkpoint and ``state_dict``): a step then costs six copies instead of some 60 small ops."""

    def __init__(self, layout) -> None:
        super().__init__(layout)
        # Under DDP every backward pass's local gradient is a small batch, accumulation or not.
        self.every_backward = layout.dist.active
        self._passes = 0  # backward passes seen since the last step (a host count)
        self._first = False  # whether this step's first pass is in the buffer's next row
        L, dev, dt = layout.num_layers, layout.device, layout.dtype
        # Per buffered step: the first pass's squared norms (NaN where none), the step's own, preclip's (NaN where
        # it has none), and the step's valid mask; the host keeps each row's passes and the rows' common B.
        self._buffer = torch.full((self.FOLD_STEPS, 4, L), math.nan, device=dev, dtype=dt)
        self._first_row = torch.full((L,), math.nan, device=dev, dtype=dt)  # this step's first pass, until update
        self._rows: list[int] = []  # passes of each buffered step
        self._all_rows = list(range(L))
        unit_index = layout.unit_index() if layout.grouped else np.arange(layout.num_layers)
        self._unit_index = to_device(unit_index.tolist(), layout.device, torch.int64)

    def init(self) -> gns.GnsState:
        return gns.init(len(self.layout.units), self.layout.device, self.layout.dtype)

    def on_backward(self, view: BackwardView) -> None:
        """The first backward pass of each step: its squared norms (one read of this rank's gradients)."""
        self._passes += 1
        if self._passes > 1:
            return
        squares = view.squared_norms(self.layout, with_samples=view.accumulating)  # noise's micro-batch samples
        row = self._first_row
        if view.rows == self._all_rows:
            row.copy_(squares)
        else:
            row.fill_(math.nan)
            row[to_device(view.rows, self.layout.device, torch.int64)] = squares
        self._first = True

    def drop_step(self) -> None:
        self._passes, self._first = 0, False

    def update(self, view: StepView) -> None:
        passes, first = self._passes, self._first
        self._passes, self._first = 0, False
        if not first or passes * self.layout.dist.world < 2:
            return
        if self._rows and self._rows[0] != passes:  # the EMAs' fold takes one B at a time
            self._fold()
        row = self._buffer[len(self._rows)]
        row[0].copy_(self._first_row)
        row[1].copy_(view.stats[:, S2])
        # The big batch before clipping: what preclip measured this step, else the step's own gradient.
        big = view.extra.get("preclip_sq")
        if big is None:
            row[2].fill_(math.nan)
        else:
            row[2].copy_(big)
        row[3].copy_(view.valid)
        self._rows.append(passes)
        if len(self._rows) == self.FOLD_STEPS:
            self._fold()

    def _fold(self) -> None:
        """Fold the buffered steps into the EMAs (``estimators.gns.update_many``)."""
        if not self._rows:
            return
        passes = self._rows[0]
        rows = self._buffer[: len(self._rows)]
        self._rows = []
        first, stats_sq, big, valid = rows.unbind(dim=1)
        big = torch.where(torch.isnan(big), stats_sq, big)
        small = first * float(passes * passes)
        valid = (valid > 0) & torch.isfinite(small) & torch.isfinite(big)
        small, big, valid = self._by_unit(small, big, valid)
        per_pass = float(self.config.batch_size or 1)
        big_batch = passes * self.layout.dist.world
        self.state = gns.update_many(
            self.state, small, big, per_pass, per_pass * big_batch, valid, beta=self.config.gns_beta
        )

    def _by_unit(self, small: torch.Tensor, big: torch.Tensor, valid: torch.Tensor):
        """``(T, L)`` per-tensor squared norms summed into ``(T, U)`` output units (a unit counts when all its
        tensors do)."""
        if not self.layout.grouped:
            return small, big, valid
        zero = small.new_zeros(small.shape[0], len(self.layout.units))
        small_u = zero.index_add(1, self._unit_index, torch.where(valid, small, 0.0))
        big_u = zero.index_add(1, self._unit_index, torch.where(valid, big, 0.0))
        missing = zero.index_add(1, self._unit_index, (~valid).to(small.dtype))
        return small_u, big_u, missing == 0

    def state_tensors(self) -> dict[str, torch.Tensor]:
        self._fold()
        return super().state_tensors()

    def load_state_tensors(self, tensors) -> None:
        self._rows = []  # steps of the replaced trajectory
        super().load_state_tensors(tensors)

    def readout(self, step: int) -> dict[str, Slot]:
        # Every rank's EMAs differ (each its own small batch): summed, then divided by the world size.
        self._fold()
        s = self.state
        slots = {
            name: Slot(getattr(s, name), "sum", varies_by_rank=True) for name in ("grad_sq", "trace_sigma", "log_ratio")
        }
        for name in ("count", "small_batch", "big_batch"):
            slots[name] = Slot(getattr(s, name), "max", varies_by_rank=True)
        return slots

    def metrics(self, views: HostViews, record: Record) -> dict[str, float]:
        count = views.get(self.name, "count")
        if not len(count) or count[-1] <= 0:
            return {}  # no source yet: the keys are absent
        world = float(self.layout.dist.world)
        fields = {
            name: torch.from_numpy(np.asarray(views.get(self.name, name), dtype=np.float64))
            for name in gns.GnsState._fields
        }
        for name in ("grad_sq", "trace_sigma", "log_ratio"):
            fields[name] = fields[name] / world
        result = gns.compute(gns.GnsState(**fields))
        alpha = self._noise_alpha(views)
        flag = gns.variance_flag(torch.from_numpy(alpha), self.config.tail_alpha_threshold).numpy()
        out: dict[str, float] = {}
        columns = {
            "b_simple": result.b_simple,
            "b_robust": result.robust,
            "trace_sigma": result.trace_sigma,
            "grad_sq": result.grad_sq,
        }
        names = [*self.layout.units, None]
        for key, values in columns.items():
            for name, value in zip(names, values.tolist()):
                out[f"gns/{key}" if name is None else f"gns/{key}/{name}"] = value
        for name, value in zip(names, flag.tolist()):
            if not math.isnan(value):
                out["gns/variance_flag" if name is None else f"gns/variance_flag/{name}"] = value
        out["gns/small_batch"] = float(result.small_batch[-1])
        out["gns/big_batch"] = float(result.big_batch[-1])
        per_pass = float(self.config.batch_size or 1)
        out["gns/micro_batches"] = out["gns/big_batch"] / per_pass / world
        out["gns/ranks"] = world
        return out

    def _noise_alpha(self, views: HostViews) -> np.ndarray:
        """Each unit's noise tail index (``noise/hill_alpha``, the temporal source), NaN where not recorded."""
        if views.has("noise", "temporal"):
            return np.asarray(views.get("noise", "temporal"), dtype=np.float64)[:, 0]
        if views.has("noise", "temporal_rank_sums"):
            from heavytail.families.noise import rank_mean_tails

            sums = torch.from_numpy(views.get("noise", "temporal_rank_sums"))
            return rank_mean_tails(sums).double().numpy()[:, 0]
        return np.full(len(self.layout.units), math.nan)
