"""Denominator memory: how long a large-gradient event keeps the denominator inflated (``*/memory_*``)."""

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


class Memory(Family):
    """Per tensor, for the real denominator (``adam/``) and the first shadow (``shadow999/`` by default), on the
    sampled coordinates (``estimators.memory``): ``memory_events`` (episodes started, a mean over the ranks
    sampling the tensor) and ``memory_steps`` (mean length of the episodes that ended)."""

    name = "memory"
    report_sections = ("sec-family-tables",)

    def init(self) -> MemoryFamilyState:
        L, S, dev = self.layout.num_layers, self.layout.sample_size, self.layout.device
        return MemoryFamilyState(
            memory.init(L, S, dev, torch.float32),
            memory.init(L, S, dev, torch.float32),
            torch.zeros(2, L, len(FIELDS), device=dev, dtype=self.layout.dtype),
        )

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
        }

    def reset(self) -> None:
        self.state.sums.zero_()

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = {"sums": self.state.sums}
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
        )

    def metrics(self, views: HostViews, record: Record) -> dict[str, float]:
        sums = views.get(self.name, "sums").copy()
        ranks = views.get(self.name, "ranks")
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
        return out
