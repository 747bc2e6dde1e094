"""What the optimizer did with the gradient: update RMS over gradient RMS, the update at denominator events, and
the damping of the updates after them."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch

from heavytail.estimators import memory
from heavytail.estimators.masks import float_mask
from heavytail.families.base import Family, HostViews, Record, Slot, StepView
from heavytail.families.ratio import has_ratio
from heavytail.families.shadow import shadow_tag
from heavytail.kernels import UNAVAILABLE

FIELDS = ("rms_ratio", "rms_steps", "event_ratio_adam", "events_adam", "event_ratio_shadow", "events_shadow")
COLUMN = {name: i for i, name in enumerate(FIELDS)}


class UpdateState(NamedTuple):
    sums: torch.Tensor  # (L, 6): the FIELDS, summed over the interval's steps
    # The update-damping windows (estimators.memory.DampingState), flat so that state_dict sees each tensor:
    damping_ring: torch.Tensor  # (s, 2, L, S) |delta p| and |g| of the last s steps
    damping_window: torch.Tensor  # (3, L, S) float64: their running sums, and the usable steps among them
    damping_before: torch.Tensor  # (2, L, S) per denominator (real, first shadow): the reference ratio
    damping_after: torch.Tensor  # (2, 2, L, S) sum |delta p|, sum |g| since the event
    damping_age: torch.Tensor  # (2, L, S) usable steps since the event
    damping_active: torch.Tensor  # (2, L, S) 0/1 open window
    damping_sums: torch.Tensor  # (2, L, 2): windows closed in the interval, the sum of their damping ratios


class Updates(Family):
    """Per tensor, on the sampled coordinates: ``update/rms_ratio`` (RMS of the parameter update over RMS of the
    gradient, mean over steps: how far the optimizer moves per unit of gradient) and ``<denominator>/
    event_update_ratio`` (mean |update| / |g| at the coordinates where a denominator event started, for the real
    denominator and the first shadow: how much of a large gradient reached the parameters) and ``<denominator>/
    memory_damping`` (the update per unit of gradient in the ``memory_window`` steps after an event over the same
    in the steps before it, estimators.memory.damping_update: how much the inflated denominator damped the
    coordinate's later updates)."""

    name = "updates"
    version = 2

    def __init__(self, layout) -> None:
        super().__init__(layout)
        self._before: dict[str, Any] = {}
        self._damping_steps = 0  # steps written into the damping ring: its next slot is this modulo s

    def init(self) -> UpdateState:
        L, S, dev = self.layout.num_layers, self.layout.sample_size, self.layout.device
        # Per-sample state in float32, like the memory and shadow states.
        # The damping windows' rings only where they are on (memory_window > 0): 1.5% of GPT-2's parameter bytes.
        damping_samples = S if self.config.memory_window > 0 else 0
        damping = memory.damping_init(2, L, damping_samples, self.config.memory_window, dev, torch.float32)
        return UpdateState(
            torch.zeros(L, len(FIELDS), device=dev, dtype=self.layout.dtype),
            *damping,
            torch.zeros(2, L, 2, device=dev, dtype=self.layout.dtype),
        )

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
        self._damping(before, after)
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

    def _damping(self, before: dict[str, Any], after: torch.Tensor) -> None:
        """Advance the update-damping windows (estimators.memory.damping_update) with this step's |delta p|, |g|."""
        if all(e is None for e in before["events"]) or self.config.memory_window == 0:
            return  # no denominator and no shadow (nothing could ever open a window), or switched off
        delta = (after - before["params"]).abs()
        g = before["g"].abs()
        # A coordinate with a gradient (|g| > 0, so not NaN) and a finite update, in a tensor that had one.
        usable = (
            float_mask(torch.gt, g, 0.0, torch.float32)
            * float_mask(torch.eq, delta * 0, 0.0, torch.float32)
            * before["valid"].to(torch.float32)[:, None]
        )
        s = self.state
        state = memory.DampingState(
            s.damping_ring, s.damping_window, s.damping_before, s.damping_after, s.damping_age, s.damping_active
        )
        slot = self._damping_steps % self.config.memory_window
        _, step = memory.damping_update(state, delta, g, usable, before["events"], slot)  # in place
        self._damping_steps += 1
        s.damping_sums[:, :, 0] += step.closed.to(s.damping_sums.dtype)
        s.damping_sums[:, :, 1] += step.ratio_sum.to(s.damping_sums.dtype)

    def host_state(self) -> dict[str, Any]:
        return {"damping_steps": self._damping_steps}

    def load_host_state(self, state) -> None:
        self._damping_steps = int(state.get("damping_steps", 0))

    def readout(self, step: int) -> dict[str, Slot]:
        owner = self.layout.owner
        return {
            "sums": Slot(self.state.sums * owner[:, None], "sum", units="sum"),
            "damping": Slot(self.state.damping_sums * owner[None, :, None], "sum", units="sum", axis=1),
        }

    def reset(self) -> None:
        self.state.sums.zero_()
        self.state.damping_sums.zero_()

    def metrics(self, views: HostViews, record: Record) -> dict[str, float]:
        sums = views.units(self.name, "sums")
        damping = views.units(self.name, "damping")  # (2, U, 2): windows closed, sum of their ratios
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
                if self.config.memory_window > 0:
                    closed, total = damping[0 if family == "adam" else 1, i]
                    out[f"{prefix}/memory_damping/{name}"] = float(total / closed) if closed > 0 else nan
            if self.layout.optimizer is not None:
                steps = sums[i, COLUMN["rms_steps"]]
                out[f"update/rms_ratio/{name}"] = float(sums[i, COLUMN["rms_ratio"]] / steps) if steps > 0 else nan
        return out
