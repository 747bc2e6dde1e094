"""The loss and the global gradient norm, step by step (``loss``, ``loss/max``, ``grad/norm_max``, ``steps``)."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from heavytail.estimators.gradient_pass import S2
from heavytail.families.base import Family, HostViews, Record, Slot, StepView

STEP_ROWS = 4096
"""Steps of an interval whose loss and global norm are kept one by one for loss/max and grad/norm_max (98 KiB)."""


class LossState(NamedTuple):
    sums: torch.Tensor  # (2,): loss sum, steps with a finite loss
    maxes: torch.Tensor  # (3,): this rank's largest loss, largest global norm, steps
    step_sums: torch.Tensor  # (min(every, STEP_ROWS), 3): per step, loss sum, loss count, squared global norm


class Loss(Family):
    """``loss`` (mean over the interval's steps of the observed loss), ``loss/max`` (the largest step loss),
    ``grad/norm_max`` (the largest step's global gradient norm) and ``steps``.

    Each step's loss and squared global norm are kept per step (the interval's first ``STEP_ROWS``) and summed
    over ranks at the checkpoint, so the maxima are of the global batch's loss and gradient, as with one process.
    Past ``STEP_ROWS`` steps in one interval the later steps count through each rank's own maxima.
    """

    name = "loss"
    report_sections = ("sec-loss",)
    alert_rules = ("loss_spike", "grad_spike")

    def init(self) -> LossState:
        dev, dt = self.layout.device, self.layout.dtype
        return LossState(
            torch.zeros(2, device=dev, dtype=dt),
            torch.tensor([-math.inf, 0.0, 0.0], device=dev, dtype=dt),
            torch.zeros(min(self.config.every, STEP_ROWS), 3, device=dev, dtype=dt),
        )

    def update(self, view: StepView) -> None:
        s, loss = self.state, view.loss
        finite = torch.isfinite(loss)
        parts = torch.stack([torch.where(finite, loss, 0.0), finite.to(loss.dtype)])
        s.sums.add_(parts)
        # This rank's maxima: the figures themselves with one process, and for the steps of an interval past
        # STEP_ROWS under torch.distributed (each rank's own loss; under FSDP2 its shard's norm).
        s.maxes[0] = torch.where(finite, torch.maximum(s.maxes[0], loss), s.maxes[0])
        s.maxes[1] = torch.maximum(s.maxes[1], view.grad_norm)
        s.maxes[2] += 1
        if view.row < s.step_sums.shape[0]:
            squares = (view.clean[:, S2] * self.layout.owner).sum() * self.layout.norm_share
            s.step_sums[view.row] = torch.cat([parts, squares.reshape(1)])

    def readout(self, step: int) -> dict[str, Slot]:
        s = self.state
        return {
            "sums": Slot(s.sums, "sum", varies_by_rank=True),  # each rank's own batch's loss
            "loss_max": Slot(s.maxes[:1], "max", varies_by_rank=True),
            "maxes": Slot(s.maxes, "max"),
            "step_sums": Slot(s.step_sums, "sum", varies_by_rank=True),
        }

    def reset(self) -> None:
        s = self.state
        s.sums.zero_()
        s.step_sums.zero_()
        s.maxes.zero_()
        s.maxes[0] = -math.inf  # a fill on the device, not a host-to-device copy

    def metrics(self, views: HostViews, record: Record) -> dict[str, float]:
        sums, maxes = views.get(self.name, "sums"), views.get(self.name, "maxes")
        loss_max = views.get(self.name, "loss_max")[0]
        step_sums = views.get(self.name, "step_sums")
        total_steps = maxes[2]
        overflow = record.steps_in_interval > step_sums.shape[0]
        norm_max = math.sqrt(step_sums[:, 2].max())
        out = {
            "grad/norm_max": float(max(norm_max, maxes[1]) if overflow else norm_max) if total_steps > 0 else math.nan,
            "steps": float(total_steps),
        }
        if sums[1] > 0:
            out["loss"] = float(sums[0] / sums[1])
            counted = step_sums[:, 1] > 0
            step_max = float((step_sums[counted, 0] / step_sums[counted, 1]).max()) if counted.any() else -math.inf
            out["loss/max"] = float(max(step_max, loss_max) if overflow else step_max)
        return out


def total_steps(views: HostViews) -> float:
    """The steps the checkpoint's figures count."""
    return float(views.get("loss", "maxes")[2])
