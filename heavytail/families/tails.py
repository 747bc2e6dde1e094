"""The coordinate tail index of each unit's gradient at checkpoints (``grad/hill_alpha``)."""

from __future__ import annotations

import math

import torch

from heavytail.estimators.hill import default_top_count, hill_from_top, top_magnitudes
from heavytail.families.base import Family, HostViews, Record, Slot, StepView, measurable_gradients


class Tails(Family):
    """Per unit: ``grad/hill_alpha`` (Hill's tail index of |g| over the entries of the step before the
    checkpoint), ``grad/hill_alpha_se`` and ``grad/hill_k`` (the order statistics used). Units under
    ``MonitorConfig.min_tail_samples`` entries are not estimated (NaN)."""

    name = "tails"
    report_sections = ("sec-tail-index", "sec-layers", "sec-heaviest")
    alert_rules = ("tail_index_drop",)

    def __init__(self, layout) -> None:
        super().__init__(layout)
        self.tails: torch.Tensor | None = None

    def update(self, view: StepView) -> None:
        if view.checkpoint_next:
            self.tails = self.tail_indices(view.grads)

    def readout(self, step: int) -> dict[str, Slot]:
        if self.tails is None:  # a checkpoint not preceded by a counted step (flush, a restored state)
            self.tails = self.tail_indices(measurable_gradients(self.layout.params)[0])
        return {"tails": Slot(self.tails, "none")}

    def reset(self) -> None:
        self.tails = None

    def metrics(self, views: HostViews, record: Record) -> dict[str, float]:
        tails, out = views.get(self.name, "tails"), {}
        for i, name in enumerate(self.layout.units):
            out[f"grad/hill_alpha/{name}"] = float(tails[i, 0])
            out[f"grad/hill_alpha_se/{name}"] = float(tails[i, 1])
            out[f"grad/hill_k/{name}"] = float(tails[i, 2])
        return out

    def tail_indices(self, grads: list[torch.Tensor | None]) -> torch.Tensor:
        """Hill tail index of each unit's gradient from its top order statistics, ``(U, 3)``.

        The top k per tensor (one C call on the CPU, ``torch.topk`` elsewhere), then one batched
        ``hill_from_top`` per group of units that keep the same number of order statistics. A unit of several
        tensors (``group_by``) merges its members' tops; under FSDP2 each rank's tops are gathered and merged.
        Either way the unit's global top k lies inside the union of the parts' tops, so the merge is exact.
        """
        layout, cfg = self.layout, self.config
        out = torch.full((len(layout.units), 3), math.nan, device=layout.device, dtype=torch.float32)
        groups: dict[int, tuple[list[int], list[torch.Tensor], list[torch.Tensor]]] = {}
        with torch.no_grad():
            wanted: list[tuple[int, int, list[int]]] = []  # (unit, m, members with a gradient)
            for u, members in enumerate(layout.unit_members):
                n = sum(layout.params[i].numel() for i in members)  # the whole unit's size, the same on every rank
                if n < cfg.min_tail_samples:
                    continue
                m = int(min(default_top_count(n), cfg.tail_top_max))
                # One copy of each piece (DistContext.owners): a replica's tops would tie the order statistics.
                present = [i for i in members if grads[i] is not None and grads[i].numel() > 0 and layout.owned[i]]
                wanted.append((u, m, present))
            # Zeros and non-finite entries are missing data for the tail (the estimator's rule).
            flat = [(i, m) for _, m, present in wanted for i in present]
            found = layout.kernels.top_magnitudes([grads[i] for i, _ in flat], [m for _, m in flat])
            if found is not None:
                member_tops = dict(zip(flat, found))
            else:
                member_tops = {(i, m): top_magnitudes(grads[i].detach().reshape(-1), m) for i, m in flat}
            for u, m, present in wanted:
                tops, counts = [], []
                for i in present:
                    top, count = member_tops[(i, m)]
                    tops.append(top.float())
                    counts.append(count)
                if not tops:
                    top = torch.zeros(m, device=layout.device)
                    count = torch.zeros((), dtype=torch.int64, device=layout.device)
                else:
                    top = torch.cat(tops)
                    top = torch.topk(top, m).values if top.shape[-1] > m else top
                    top = torch.nn.functional.pad(top, (0, m - top.shape[-1]))
                    count = torch.stack(counts).sum()
                rows, unit_tops, unit_counts = groups.setdefault(m, ([], [], []))
                rows.append(u)
                unit_tops.append(top)
                unit_counts.append(count)
            for rows, unit_tops, unit_counts in groups.values():
                top, count = torch.stack(unit_tops), torch.stack(unit_counts)
                if layout.dist.sharded:
                    top = layout.dist.gather_cat(top, dim=1)
                    count = layout.dist.all_reduce_(count.clone(), "sum")
                result = hill_from_top(top, count)
                out[torch.tensor(rows, device=layout.device)] = torch.stack(
                    [result.alpha.float(), result.se.float(), result.k.float()], dim=1
                )
        return out
