"""Muon's spread: how unequal the directions of the matrix Muon orthogonalises are (``muon/``)."""

from __future__ import annotations

import math

import torch

from heavytail.families.base import Family, HostViews, Record, Slot, StepView
from heavytail.hooks.optimizer import premomentum_matrix


class Muon(Family):
    """Per 2-D tensor Muon updates, at the step before each checkpoint: ``muon/sv_cond`` (sigma_max / sigma_min)
    and ``muon/sv_max_median`` (sigma_max / median sigma) of the matrix it is about to orthogonalise, i.e. how
    unequal the directions Muon will equalise are; each is inf (null in JSON) where its sigma (the smallest, or
    the median) is at or under sigma_max x max(m, n) x float32 eps (numpy.linalg.matrix_rank's cut): rounding,
    not a direction, as in a gradient of fewer examples than the matrix's smaller side. One SVD per matrix per
    checkpoint; not under sharding."""

    name = "muon"

    @classmethod
    def wanted(cls, layout) -> bool:
        return "muon" in layout.kinds

    def __init__(self, layout) -> None:
        super().__init__(layout)
        self.rows = [i for i, kind in enumerate(layout.kinds) if kind == "muon" and layout.params[i].dim() == 2]
        self.spread: torch.Tensor | None = None

    def update(self, view: StepView) -> None:
        if not view.checkpoint_next or not self.rows or self.layout.dist.sharded:
            return
        layout = self.layout
        out = torch.full((layout.num_layers, 2), math.nan, device=layout.device, dtype=torch.float32)
        groups = {id(q): group for group in layout.optimizer.param_groups for q in group["params"]}
        for i in self.rows:
            matrix = premomentum_matrix(layout.optimizer, layout.params[i], groups.get(id(layout.params[i])))
            if matrix is None:
                continue
            sv = torch.linalg.svdvals(matrix.detach().float())  # descending
            top, n = sv[0], sv.numel()
            # The median of an even count is the mean of the two middle values (torch.median takes the lower one).
            median = sv[(n - 1) // 2 : n // 2 + 1].mean()
            # numpy.linalg.matrix_rank's cut: a sigma at or under it is rounding, not a direction, and the ratio inf.
            cut = top * max(matrix.shape) * torch.finfo(sv.dtype).eps
            out[i, 0] = torch.where(sv[-1] > cut, top / sv[-1], math.inf)
            out[i, 1] = torch.where(median > cut, top / median, math.inf)
        self.spread = out

    def readout(self, step: int) -> dict[str, Slot]:
        return {} if self.spread is None else {"spread": Slot(self.spread, "none", units="fmax")}

    def reset(self) -> None:
        self.spread = None

    def metrics(self, views: HostViews, record: Record) -> dict[str, float]:
        if not views.has(self.name, "spread"):
            return {}
        spread = views.units(self.name, "spread")
        layout, out = self.layout, {}
        for i, (name, members) in enumerate(zip(layout.units, layout.unit_members)):
            if layout.kinds[members[0]] == "muon" and any(layout.params[j].dim() == 2 for j in members):
                out[f"muon/sv_cond/{name}"] = float(spread[i, 0])
                out[f"muon/sv_max_median/{name}"] = float(spread[i, 1])
        return out
