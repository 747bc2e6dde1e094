"""Denominator memory: how large the gradient events are and how long they keep the denominator inflated
(``*/memory_*``)."""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

from heavytail.estimators import memory
from heavytail.families.base import Family, HostViews, Record, Slot, StepView
from heavytail.families.ratio import has_ratio
from heavytail.families.shadow import shadow_tag

FIELDS = ("started", "ended", "ended_steps")
ADAM, SHADOW = 0, 1
"""Rows of the state: the optimizer's own denominator, the first shadow denominator."""


class MemoryFamilyState(NamedTuple):
    adam: memory.MemoryState  # (L, S) each: pre-event v_hat, steps since the event, open episode
    shadow: memory.MemoryState
    sums: torch.Tensor  # (2, L, 3): episodes started, ended, and the ended ones' lengths
    event_r: torch.Tensor  # (2, L, 2): sum and max of r over the events (episodes started) of the interval


class Memory(Family):
    """Per tensor, for the real denominator (``adam/``) and the first shadow (``shadow999/`` by default), on the
    sampled coordinates (``estimators.memory``): ``memory_events`` (episodes started, a mean over the ranks
    sampling the tensor), ``memory_steps`` (mean length of the episodes that ended), ``memory_event_r`` and
    ``memory_event_r_max`` (mean and largest r = |g| / (sqrt(v_hat) + eps) at the events of the interval: the size
    of the gradients that opened the episodes)."""

    name = "memory"
    version = 2
    report_sections = ("sec-family-tables",)

    def init(self) -> MemoryFamilyState:
        L, S, dev = self.layout.num_layers, self.layout.sample_size, self.layout.device
        self._sizes = torch.zeros(2, L, S, device=dev, dtype=self.layout.dtype)  # update's work buffer
        return MemoryFamilyState(
            memory.init(L, S, dev, torch.float32),
            memory.init(L, S, dev, torch.float32),
            torch.zeros(2, L, len(FIELDS), device=dev, dtype=self.layout.dtype),
            torch.zeros(2, L, 2, device=dev, dtype=self.layout.dtype),
        )

    def update(self, view: StepView) -> None:
        """The size r of this step's events, from the event masks the sample group left in ``view.extra``.

        The real denominator's r is the gradient pass's ratio; the first shadow's is recomputed from the level its
        episode just stored (the pre-event v_hat): r = |g| / (sqrt(level) + 1e-8), the shadow's own formula.
        """
        events = (view.extra.get("events_adam"), view.extra.get("events_shadow"))
        rows = [row for row, mask in enumerate(events) if mask is not None]
        if not rows:
            return
        # Both denominators' sizes in one preallocated (2, L, S) buffer, written in place: this runs at every step,
        # and the temporaries of the out-of-place form (conversions, a stacked copy) cost more than the arithmetic.
        sizes = self._sizes
        if events[ADAM] is not None:
            sizes[ADAM].copy_(view.result.ratio_samples)
        if events[SHADOW] is not None:
            r = sizes[SHADOW]
            r.copy_(self.state.shadow.level).sqrt_().add_(1e-8)
            torch.div(view.grad_samples.abs(), r, out=r)  # NaN where a tensor had no gradient: zeroed below
        # r is finite at every event (a finite ratio over the cut); elsewhere it may be NaN: zero it first.
        torch.nan_to_num(sizes, nan=0.0, posinf=0.0, neginf=0.0, out=sizes)
        for row in rows:
            sizes[row].mul_(events[row])
        used = sizes if len(rows) == 2 else sizes[rows[0]][None]
        event_r = self.state.event_r if len(rows) == 2 else self.state.event_r[rows[0]][None]
        event_r[..., 0] += used.sum(dim=2)
        torch.maximum(event_r[..., 1], used.amax(dim=2), out=event_r[..., 1])

    def advance(self, row: int, ratio: torch.Tensor, v_hat: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """The torch reference: advance one denominator's episodes; returns this step's event mask ``(L, S)``."""
        field = ("adam", "shadow")[row]
        current = getattr(self.state, field)
        new, step = memory.update(
            current,
            ratio,
            v_hat,
            valid,
            threshold=self.config.spike_threshold,
            inflation=self.config.memory_inflation,
        )
        new = memory.MemoryState(*(value.to(old.dtype) for value, old in zip(new, current)))
        self.state = self.state._replace(**{field: new})
        self.state.sums[row] += torch.stack([step.started, step.ended, step.ended_steps], dim=1)
        return step.events

    def update_adam(self, view: StepView) -> torch.Tensor | None:
        """The torch reference for the real denominator: its event mask, or None without a denominator."""
        if view.denominators is None:
            return None
        res = view.result
        v_hat = res.denom_samples / view.denominators.bias_correction.to(res.denom_samples.dtype)[:, None]
        return self.advance(ADAM, res.ratio_samples, v_hat, view.ratio_ok)

    def readout(self, step: int) -> dict[str, Slot]:
        return {
            "sums": Slot(self.state.sums * self.layout.owner[None, :, None], "sum", units="sum", axis=1),
            # The ranks sampling each tensor: the episode counts are per rank.
            "ranks": Slot(self.layout.sampling, "sum"),
            "r_sum": Slot(self.state.event_r[..., 0] * self.layout.owner[None, :], "sum", units="sum", axis=1),
            "r_max": Slot(self.state.event_r[..., 1], "max", units="max", axis=1),
        }

    def reset(self) -> None:
        self.state.sums.zero_()
        self.state.event_r.zero_()

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = {"sums": self.state.sums, "event_r": self.state.event_r}
        for field in ("adam", "shadow"):
            out.update({f"{field}_{k}": v for k, v in getattr(self.state, field)._asdict().items()})
        return out

    def load_state_tensors(self, tensors) -> None:
        current = self.state_tensors()
        for key, value in tensors.items():
            if key not in current or current[key].shape != value.shape:
                raise ValueError(f"Monitor.load_state_dict: memory state {key!r} does not match this monitor")
        loaded = {k: v.to(current[k].device, current[k].dtype, copy=True) for k, v in tensors.items()}
        self.state = MemoryFamilyState(
            memory.MemoryState(*(loaded[f"adam_{k}"] for k in memory.MemoryState._fields)),
            memory.MemoryState(*(loaded[f"shadow_{k}"] for k in memory.MemoryState._fields)),
            loaded["sums"],
            loaded["event_r"],
        )

    def metrics(self, views: HostViews, record: Record) -> dict[str, float]:
        sums = views.get(self.name, "sums").copy()
        ranks = views.get(self.name, "ranks")
        # Mean r per event: the r sum over all ranks' events, before the event count becomes a mean over ranks.
        all_started = views.units(self.name, "sums")[:, :, 0]
        r_sum, r_max = views.units(self.name, "r_sum"), views.units(self.name, "r_max")
        with np.errstate(divide="ignore", invalid="ignore"):
            sums[:, :, 0] = np.where(ranks[None, :] > 0, sums[:, :, 0] / ranks[None, :], 0)
        sums = views.units(self.name, "sums", sums)
        out: dict[str, float] = {}
        betas = self.config.shadow_betas
        prefixes = (
            ("adam" if has_ratio(views, self.layout.optimizer) else None),
            shadow_tag(betas[0]) if betas else None,
        )
        for row, prefix in enumerate(prefixes):
            if prefix is None:
                continue
            for i, name in enumerate(self.layout.units):
                started, ended, ended_steps = sums[row, i]
                out[f"{prefix}/memory_steps/{name}"] = float(ended_steps / ended) if ended > 0 else math.nan
                out[f"{prefix}/memory_events/{name}"] = float(started)
                events = all_started[row, i]
                out[f"{prefix}/memory_event_r/{name}"] = float(r_sum[row, i] / events) if events > 0 else math.nan
                out[f"{prefix}/memory_event_r_max/{name}"] = float(r_max[row, i]) if events > 0 else math.nan
        return out
