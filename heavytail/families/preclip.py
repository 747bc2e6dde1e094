"""The gradient norm before clipping and loss-scale unscaling (``grad/norm_preclip``)."""

from __future__ import annotations

import enum
import math
from typing import Any, Mapping, NamedTuple

import numpy as np
import torch

from heavytail.distributed import local
from heavytail.estimators.gradient_pass import S2
from heavytail.families.base import BackwardView, Family, HostViews, Record, Slot, StepView
from heavytail.transfer import to_device


class Mode(enum.Enum):
    """How the pre-clip norm is measured.

    ``LEARNING``: measured after every backward pass while the monitor checks whether ``optimizer.step()`` sees
    those very gradients untouched (nothing clips or unscales them); ``REUSE``: two steps showed it does, so the
    step pass's own norm is the pre-clip norm and the extra read of every gradient is skipped; ``MEASURE``: a
    change was seen, so it is measured after every backward pass for good.
    """

    LEARNING = "learning"
    REUSE = "reuse"
    MEASURE = "measure"


UNTOUCHED_STEPS = 2
"""Steps seen with untouched gradients before the pre-clip measurement reuses the step pass's norm."""


class PreclipState(NamedTuple):
    measured: torch.Tensor  # (L,) squared norm the last backward pass left; NaN until measured
    sums: torch.Tensor  # (L,) sum over the interval's measured steps
    steps: torch.Tensor  # (L,) measured steps


class Preclip(Family):
    """``grad/norm_preclip/<p>``: RMS over steps of each tensor's gradient norm as the backward pass left it
    (reduced across ranks, divided by the loss scale), and ``grad/norm_preclip`` globally; read after every callback
    of the backward pass (``BackwardTap``), before anything clips. ``MonitorConfig.track_preclip`` turns it off."""

    name = "preclip"
    report_sections = ("sec-loss",)

    @classmethod
    def wanted(cls, layout) -> bool:
        return bool(layout.config.track_preclip)

    def __init__(self, layout) -> None:
        super().__init__(layout)
        self.mode = Mode.LEARNING
        self.untouched = 0
        # What the last backward pass left: rows, tensors and their versions (None once the step has read it).
        self._seen: tuple[list[int], list[torch.Tensor], list[int]] | None = None
        # In-place ops on a DTensor (clipping under FSDP2) change its local tensor without bumping that tensor's
        # version counter: with DTensors nothing proves the gradients untouched, so they are always measured.
        self._plain = all(local(p) is p for p in layout.params)

    def init(self) -> PreclipState:
        L, dev, dt = self.layout.num_layers, self.layout.device, self.layout.dtype
        return PreclipState(
            torch.full((L,), math.nan, device=dev, dtype=dt),
            torch.zeros(L, device=dev, dtype=dt),
            torch.zeros(L, device=dev, dtype=dt),
        )

    def on_gradients_final(self, view: BackwardView) -> None:
        """Measure the squared norms once a backward pass's gradients are those ``optimizer.step()`` would see:
        under DDP the all-reduce is finalised, under FSDP2 this rank's shard of the reduced gradient exists (its
        squares are summed over ranks at checkpoints)."""
        tensors = [view.grads[i] for i in view.rows]
        # The step pass sees these very tensors again unless something changes them in place before
        # optimizer.step() (clipping and GradScaler.unscale_ bump ._version).
        self._seen = (view.rows, tensors, [g._version for g in tensors])
        if self.mode is Mode.REUSE:
            return
        squares = view.squared_norms(self.layout)  # one process: the gns family's read of the same pass
        measured = torch.full_like(self.state.measured, math.nan)
        measured[to_device(view.rows, self.layout.device, torch.int64)] = squares
        self.state = self.state._replace(measured=measured)

    def _check(self, view: StepView) -> None:
        """Whether the step sees the gradients the last backward pass left, untouched; in ``REUSE`` mode the
        step's own power sums are then the pre-clip norm."""
        seen, self._seen = self._seen, None
        if seen is None:
            return
        rows, tensors, versions = seen
        grads = view.grads
        untouched = (
            self._plain
            and sum(g is not None for g in grads) == len(rows)
            and all(grads[i] is g and g._version == v for i, g, v in zip(rows, tensors, versions))
        )
        if self.mode is Mode.REUSE and untouched:
            self.state = self.state._replace(measured=view.stats[:, S2])
        elif self.mode is Mode.REUSE:  # changed after all: this step's pre-clip norm is lost, and it is measured again
            self.mode = Mode.MEASURE
        elif self.mode is Mode.LEARNING:
            self.untouched = self.untouched + 1 if untouched else 0
            if not untouched:
                self.mode = Mode.MEASURE
            elif self.untouched >= UNTOUCHED_STEPS:
                self.mode = Mode.REUSE

    def update(self, view: StepView) -> None:
        self._check(view)
        s = self.state
        counted = view.valid & torch.isfinite(s.measured)
        s.sums.add_(torch.where(counted, s.measured, 0.0))
        s.steps.add_(counted.to(s.steps.dtype))
        view.extra["preclip_sq"] = s.measured  # this step's pre-clip squared norms, for the gns family
        self.state = s._replace(measured=torch.full_like(s.measured, math.nan))  # measured again at the next backward

    def readout(self, step: int) -> dict[str, Slot]:
        # The steps are max-merged: every rank holding a piece measures the same steps.
        return {
            "sums": Slot(self.state.sums * self.layout.owner, "sum", units="sum"),
            "steps": Slot(self.state.steps, "max", units="max"),
        }

    def reset(self) -> None:
        self.state.sums.zero_()
        self.state.steps.zero_()

    def metrics(self, views: HostViews, record: Record) -> dict[str, float]:
        sums, steps = views.units(self.name, "sums"), views.units(self.name, "steps")
        with np.errstate(divide="ignore", invalid="ignore"):
            norm = np.sqrt(sums / steps)
        out = {
            f"grad/norm_preclip/{u}": float(norm[i]) if steps[i] > 0 else math.nan
            for i, u in enumerate(self.layout.units)
        }
        most = steps.max() if len(steps) else 0.0
        out["grad/norm_preclip"] = float(math.sqrt(sums.sum() / most)) if most > 0 else math.nan
        return out

    def host_state(self) -> dict[str, Any]:
        # What the measurement has learnt of the loop: a resumed run goes on without re-learning it.
        untouched = None if self.mode is Mode.MEASURE else self.untouched
        return {"untouched": untouched, "reuse": self.mode is Mode.REUSE}

    def load_host_state(self, state: Mapping[str, Any]) -> None:
        untouched = state.get("untouched", 0)
        if state.get("reuse", False):
            self.mode, self.untouched = Mode.REUSE, int(untouched or UNTOUCHED_STEPS)
        elif untouched is None:
            self.mode, self.untouched = Mode.MEASURE, 0
        else:
            self.mode, self.untouched = Mode.LEARNING, int(untouched)
