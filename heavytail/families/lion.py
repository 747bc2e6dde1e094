"""Lion's sign flips: how often the current gradient reverses the update direction (``lion/``)."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from heavytail.distributed import local
from heavytail.families.base import Family, HostViews, Record, Slot, StepView
from heavytail.hooks.optimizer import gather_samples


class LionState(NamedTuple):
    sums: torch.Tensor  # (L, 2): flipped fraction summed over steps, steps counted


class Lion(Family):
    """``lion/sign_flip_frac/<p>``: the fraction of sampled coordinates whose update sign the current gradient
    flipped, i.e. where sign(beta1 m_{t-1} + (1 - beta1) g_t) differs from sign(m_{t-1}) (Chen et al. 2023's
    update direction), mean over steps; for tensors Lion updates."""

    name = "lion"

    @classmethod
    def wanted(cls, layout) -> bool:
        return "lion" in layout.kinds

    def __init__(self, layout) -> None:
        super().__init__(layout)
        self.rows = [i for i, kind in enumerate(layout.kinds) if kind == "lion"]

    def init(self) -> LionState:
        return LionState(torch.zeros(self.layout.num_layers, 2, device=self.layout.device, dtype=self.layout.dtype))

    def update(self, view: StepView) -> None:
        layout, g = self.layout, view.grad_samples
        optimizer, params = layout.optimizer, layout.params
        groups = {id(q): grp for grp in optimizer.param_groups for q in grp["params"]}
        momenta: list[torch.Tensor | None] = [None] * len(params)
        beta1 = torch.zeros(len(params), 1, device=layout.device, dtype=g.dtype)
        for i in self.rows:
            state = optimizer.state.get(params[i])
            if state and "exp_avg" in state:
                momenta[i] = local(state["exp_avg"])
                beta1[i] = float(groups[id(params[i])]["betas"][0])
        m = gather_samples(momenta, layout.sample_index_dev, g.dtype)
        c = beta1 * m + (1 - beta1) * g
        live = torch.isfinite(m) & (m != 0)
        flipped = ((torch.sign(c) != torch.sign(m)) & live).sum(dim=1)
        ok = view.valid & (live.sum(dim=1) > 0)
        frac = flipped / live.sum(dim=1).clamp_min(1)
        sums = self.state.sums
        sums[:, 0] += torch.where(ok, frac, 0.0)
        sums[:, 1] += ok.to(sums.dtype)

    def readout(self, step: int) -> dict[str, Slot]:
        return {"sums": Slot(self.state.sums * self.layout.owner[:, None], "sum", units="sum")}

    def reset(self) -> None:
        self.state.sums.zero_()

    def metrics(self, views: HostViews, record: Record) -> dict[str, float]:
        sums = views.units(self.name, "sums")
        kinds = [self.layout.kinds[members[0]] for members in self.layout.unit_members]
        return {
            f"lion/sign_flip_frac/{name}": float(sums[i, 0] / sums[i, 1]) if sums[i, 1] > 0 else math.nan
            for i, name in enumerate(self.layout.units)
            if kinds[i] == "lion"
        }
