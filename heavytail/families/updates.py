"""What the optimizer did with the gradient: update RMS over gradient RMS, and the update at denominator events."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch

from heavytail.estimators.masks import float_mask
from heavytail.families.base import Family, HostViews, Record, Slot, StepView
from heavytail.families.ratio import has_ratio
from heavytail.families.shadow import shadow_tag
from heavytail.kernels import UNAVAILABLE

FIELDS = ("rms_ratio", "rms_steps", "event_ratio_adam", "events_adam", "event_ratio_shadow", "events_shadow")
COLUMN = {name: i for i, name in enumerate(FIELDS)}


class UpdateState(NamedTuple):
    sums: torch.Tensor  # (L, 6): the FIELDS, summed over the interval's steps


class Updates(Family):
    """Per tensor, on the sampled coordinates: ``update/rms_ratio`` (RMS of the parameter update over RMS of the
    gradient, mean over steps: how far the optimizer moves per unit of gradient) and ``<denominator>/
    event_update_ratio`` (mean |update| / |g| at the coordinates where a denominator event started, for the real
    denominator and the first shadow: how much of a large gradient reached the parameters)."""

    name = "updates"

    def __init__(self, layout) -> None:
        super().__init__(layout)
        self._before: dict[str, Any] = {}

    def init(self) -> UpdateState:
        L = self.layout.num_layers
        return UpdateState(torch.zeros(L, len(FIELDS), device=self.layout.device, dtype=self.layout.dtype))

    def update(self, view: StepView) -> None:
        if self.layout.optimizer is None:
            return
        # Parameter samples before the update; after_update compares them with the samples after it.
        self._before = {
            "params": self.layout.param_samples(self.layout.dtype),
            "g": view.grad_samples,
            "valid": view.valid,
            "events": [view.extra.get("events_adam"), view.extra.get("events_shadow")],
        }

    def after_update(self) -> None:
        before, self._before = self._before, {}
        if not before:
            return
        after = self.layout.param_samples(self.layout.dtype)
        sums = self.state.sums
        kernels = self.layout.kernels
        if kernels.samples is not None:
            args = (before["params"], after, before["g"], before["valid"], before["events"], sums, range(len(FIELDS)))
            if kernels.call("samples", "update_step", *args) is not UNAVAILABLE:
                return
        delta = (after - before["params"]).abs()
        g = before["g"].abs()
        g_rms = (g * g).mean(dim=1).sqrt()
        ratio = (delta * delta).mean(dim=1).sqrt() / g_rms
        ok = before["valid"] & (g_rms > 0) & torch.isfinite(ratio)
        sums[:, COLUMN["rms_ratio"]] += torch.where(ok, ratio, 0.0)
        sums[:, COLUMN["rms_steps"]] += ok.to(sums.dtype)
        # Coordinates with a gradient and a finite update (a 0/1 mask, estimators.masks), and |update| / |g| there.
        usable = float_mask(torch.gt, g, 0.0, g.dtype) * float_mask(torch.eq, delta * 0, 0.0, g.dtype)
        # g is NaN where a tensor had no gradient: never a usable coordinate, and its ratio must not be NaN
        # (0 * NaN would poison the sum)
        update_ratio = torch.nan_to_num(delta, nan=0.0, posinf=0.0, neginf=0.0) / torch.nan_to_num(
            g, nan=0.0
        ).clamp_min(1e-30)
        for family, events in zip(("adam", "shadow"), before["events"]):
            if events is None:
                continue
            hit = events * usable
            sums[:, COLUMN[f"event_ratio_{family}"]] += (hit * update_ratio).sum(dim=1)
            sums[:, COLUMN[f"events_{family}"]] += hit.sum(dim=1).to(sums.dtype)

    def readout(self, step: int) -> dict[str, Slot]:
        return {"sums": Slot(self.state.sums * self.layout.owner[:, None], "sum", units="sum")}

    def reset(self) -> None:
        self.state.sums.zero_()

    def metrics(self, views: HostViews, record: Record) -> dict[str, float]:
        sums = views.units(self.name, "sums")
        betas = self.config.shadow_betas
        prefixes = {"adam": "adam" if has_ratio(views, self.layout.optimizer) else None}
        prefixes["shadow"] = shadow_tag(betas[0]) if betas else None
        out: dict[str, float] = {}
        nan = math.nan
        for i, name in enumerate(self.layout.units):
            for family, prefix in prefixes.items():
                if prefix is None:
                    continue
                events = sums[i, COLUMN[f"events_{family}"]]
                ratio = sums[i, COLUMN[f"event_ratio_{family}"]]
                out[f"{prefix}/event_update_ratio/{name}"] = float(ratio / events) if events > 0 else nan
            if self.layout.optimizer is not None:
                steps = sums[i, COLUMN["rms_steps"]]
                out[f"update/rms_ratio/{name}"] = float(sums[i, COLUMN["rms_ratio"]] / steps) if steps > 0 else nan
        return out
