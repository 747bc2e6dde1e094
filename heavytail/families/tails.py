"""The coordinate tail index of each unit's gradient at checkpoints (``grad/hill_alpha``), and the Hill plot of
one unit (``hill_plot.jsonl``)."""

from __future__ import annotations

import math
import os
import warnings

import numpy as np
import torch

from heavytail.backends.jsonl import dumps_record
from heavytail.estimators.hill import HILL_CURVE_POINTS, default_top_count, hill_curve, hill_from_top, top_magnitudes
from heavytail.families.base import Family, HostViews, Record, Slot, StepView, measurable_gradients

HILL_PLOT_FILE = "hill_plot.jsonl"
"""The Hill plots of a run, one JSON line per checkpoint (docs/run-directory.md)."""


class Tails(Family):
    """Per unit: ``grad/hill_alpha`` (Hill's tail index of |g| over the entries of the step before the
    checkpoint), ``grad/hill_alpha_se`` and ``grad/hill_k`` (the order statistics used). Units under
    ``MonitorConfig.min_tail_samples`` entries are not estimated (NaN).

    At each checkpoint it also writes the Hill plot of one unit (``MonitorConfig.hill_plot_unit``, else the one
    with the lowest alpha) to ``hill_plot.jsonl``: alpha against k at the default's candidate k
    (``estimators.hill.hill_curve``: Hill's and the default's), with the k and alpha the record reports. The
    curve is computed on the device for that one unit (the lowest alpha is found there), so the checkpoint's
    copy grows by ``2 + 3 * 64`` numbers."""

    name = "tails"
    report_sections = ("sec-tail-index", "sec-hill-plot", "sec-layers", "sec-heaviest")
    alert_rules = ("tail_index_drop",)

    def __init__(self, layout) -> None:
        super().__init__(layout)
        self.tails: torch.Tensor | None = None
        self.plot: torch.Tensor | None = None  # (2 + 3 * P,): unit, valid count, then k, Hill's and the default's
        self.step = 0
        self.failures = 0
        wanted = self.config.hill_plot_unit
        if wanted is not None and wanted not in layout.units:
            shown = ", ".join(layout.units[:8]) + (
                f" (and {len(layout.units) - 8} more)" if len(layout.units) > 8 else ""
            )
            raise ValueError(
                f"MonitorConfig.hill_plot_unit {wanted!r} is not a watched unit (a tensor's name, or a group_by "
                f"group); watched: {shown}"
            )
        self.plot_unit = None if wanted is None else layout.units.index(wanted)

    def update(self, view: StepView) -> None:
        if view.checkpoint_next:
            self.tails = self.tail_indices(view.grads)

    def readout(self, step: int) -> dict[str, Slot]:
        if self.tails is None:  # a checkpoint not preceded by a counted step (flush, a restored state)
            self.tails = self.tail_indices(measurable_gradients(self.layout.params)[0])
        self.step = step
        return {"tails": Slot(self.tails, "none"), "hill_plot": Slot(self.plot, "none")}

    def reset(self) -> None:
        self.tails = None
        self.plot = None

    def metrics(self, views: HostViews, record: Record) -> dict[str, float]:
        tails, out = views.get(self.name, "tails"), {}
        for i, name in enumerate(self.layout.units):
            out[f"grad/hill_alpha/{name}"] = float(tails[i, 0])
            out[f"grad/hill_alpha_se/{name}"] = float(tails[i, 1])
            out[f"grad/hill_k/{name}"] = float(tails[i, 2])
        if record.log_dir is not None:
            self.write_plot(record.log_dir, tails, views.get(self.name, "hill_plot"))
        return out

    def write_plot(self, log_dir, tails: np.ndarray, plot: np.ndarray) -> None:
        """Append this checkpoint's Hill plot to ``hill_plot.jsonl`` (nothing when no unit has a tail index)."""
        unit = int(plot[0])
        if not 0 <= unit < len(self.layout.units) or math.isnan(tails[unit, 0]):
            return
        k, hill, default = plot[2:].reshape(3, HILL_CURVE_POINTS)
        shown = np.isfinite(k)
        line = {
            "step": self.step,
            "unit": self.layout.units[unit],
            "selected": "configured" if self.plot_unit is not None else "lowest alpha",
            "n": int(plot[1]),
            "alpha": float(tails[unit, 0]),  # inf (no power-law tail) is written as null, with "light": true
            "light": bool(math.isinf(tails[unit, 0])),
            "se": float(tails[unit, 1]),
            "k": int(tails[unit, 2]),
            "curve": {
                "k": [int(v) for v in k[shown]],
                "hill_alpha": [float(v) for v in hill[shown]],
                "default_alpha": [float(v) for v in default[shown]],
            },
        }
        path = log_dir / HILL_PLOT_FILE
        try:
            with open(path, "a", encoding="utf-8") as f:
                f.write(dumps_record(line) + "\n")
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            self.failures += 1
            if self.failures == 1:
                warnings.warn(
                    f"heavytail: could not write {path}: {exc}; further failures are not reported",
                    RuntimeWarning,
                    stacklevel=2,
                )

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
            picks = []  # per group: (alpha, unit, valid count, curve) of the unit its plot would show
            for rows, unit_tops, unit_counts in groups.values():
                top, count = torch.stack(unit_tops), torch.stack(unit_counts)
                if layout.dist.sharded:
                    top = layout.dist.gather_cat(top, dim=1)
                    count = layout.dist.all_reduce_(count.clone(), "sum")
                result = hill_from_top(top, count)
                out[torch.tensor(rows, device=layout.device)] = torch.stack(
                    [result.alpha.float(), result.se.float(), result.k.float()], dim=1
                )
                if self.plot_unit is None:  # the group's lowest alpha, found on the device (NaN: not estimated)
                    at = _plot_order(result.alpha.float()).argmin()
                elif self.plot_unit in rows:
                    at = torch.tensor(rows.index(self.plot_unit), device=layout.device)
                else:
                    continue
                curve = hill_curve(top[at][None], count[at][None])
                unit = torch.tensor(rows, device=layout.device, dtype=torch.float32)[at]
                picks.append((result.alpha.float()[at], unit, count[at].float(), torch.cat(curve, dim=-1)[0]))
            self.plot = self._pick(picks)
        return out

    def _pick(self, picks: list) -> torch.Tensor:
        """The plot with the lowest alpha among the groups' picks, ``(2 + 3 * P,)``; unit -1 when there is none."""
        if not picks:
            empty = torch.full((2 + 3 * HILL_CURVE_POINTS,), math.nan, device=self.layout.device)
            empty[0] = -1
            return empty
        alpha = _plot_order(torch.stack([p[0] for p in picks]))
        rows = torch.stack([torch.cat([torch.stack([p[1], p[2]]), p[3].float()]) for p in picks])
        return rows[alpha.argmin()]


def _plot_order(alpha: torch.Tensor) -> torch.Tensor:
    """Alpha as the plot's choice ranks it: a finite alpha first, then no power-law tail (inf), then not computed
    (NaN), which has no plot."""
    return torch.nan_to_num(alpha, nan=math.inf, posinf=torch.finfo(alpha.dtype).max)
