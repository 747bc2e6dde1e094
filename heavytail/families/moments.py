"""Moments of each tensor's gradient entries: norm, largest magnitude, kurtosis, non-finite entries (``grad/``)."""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

from heavytail.estimators.gradient_pass import ABSMAX, COUNT, NONFINITE, S1, S2, S3, S4
from heavytail.estimators.kurtosis import gaussian_kurtosis_quantile
from heavytail.families.base import Family, HostViews, Record, Slot, StepView

SUMS = ("count", "s1", "s2", "s3", "s4", "nonfinite", "entries")
MAXES = ("absmax", "steps", "bad_steps")
SUM_COLUMN = {name: i for i, name in enumerate(SUMS)}
assert SUMS[: S4 + 1] == ("count", "s1", "s2", "s3", "s4") and (COUNT, S1, S2, S3) == (0, 1, 2, 3)
MAX_COLUMN = {name: i for i, name in enumerate(MAXES)}


class MomentsState(NamedTuple):
    sums: torch.Tensor  # (L, len(SUMS)): power sums of the valid steps' entries; every entry seen
    maxes: torch.Tensor  # (L, len(MAXES)): largest |g|, valid steps, steps with a non-finite entry


class Moments(Family):
    """Per tensor over the interval: ``grad/norm`` (RMS over steps of the step's norm), ``grad/max``,
    ``grad/kurtosis`` (excess kurtosis of the entries pooled over steps, from float64 power sums) with
    ``grad/kurtosis_gauss`` (its 99% quantile under Gaussian entries), ``grad/nonfinite_frac``; globally
    ``grad/norm`` and ``grad/bad_steps``. A step with a non-finite entry counts only in the non-finite figures."""

    name = "moments"
    report_sections = ("sec-kurtosis", "sec-heaviest")
    alert_rules = ("nonfinite_grad",)

    def init(self) -> MomentsState:
        L, dev, dt = self.layout.num_layers, self.layout.device, self.layout.dtype
        return MomentsState(
            torch.zeros(L, len(SUMS), device=dev, dtype=dt), torch.zeros(L, len(MAXES), device=dev, dtype=dt)
        )

    def update(self, view: StepView) -> None:
        stats, clean, valid = view.stats, view.clean, view.valid
        s = self.state
        # The pass's count and power sums are adjacent columns, like the state's: one add for the five.
        s.sums[:, : S4 + 1] += clean[:, COUNT : S4 + 1]
        s.sums[:, SUM_COLUMN["nonfinite"]] += stats[:, NONFINITE]
        s.sums[:, SUM_COLUMN["entries"]] += view.entries
        s.maxes[:, MAX_COLUMN["absmax"]] = torch.maximum(s.maxes[:, MAX_COLUMN["absmax"]], clean[:, ABSMAX])
        s.maxes[:, MAX_COLUMN["steps"]] += valid.to(stats.dtype)
        s.maxes[:, MAX_COLUMN["bad_steps"]] += ((view.entries > 0) & ~valid).to(stats.dtype)

    def readout(self, step: int) -> dict[str, Slot]:
        owner = self.layout.owner[:, None]
        return {
            "sums": Slot(self.state.sums * owner, "sum", units="sum"),
            "maxes": Slot(self.state.maxes, "max", units="max"),
        }

    def reset(self) -> None:
        self.state.sums.zero_()
        self.state.maxes.zero_()

    def metrics(self, views: HostViews, record: Record) -> dict[str, float]:
        sums, maxes = views.units(self.name, "sums"), views.units(self.name, "maxes")
        column = lambda name: sums[:, SUM_COLUMN[name]]  # noqa: E731
        steps = maxes[:, MAX_COLUMN["steps"]]
        count = column("count")
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            norm = np.sqrt(column("s2") / steps)
            mean = column("s1") / count
            m2 = column("s2") / count - mean**2
            m4 = (
                column("s4") / count
                - 4 * mean * column("s3") / count
                + 6 * mean**2 * column("s2") / count
                - 3 * mean**4
            )
            # Raw power sums cancel catastrophically when |mean| >> std: the kurtosis error is about
            # eps * (mean^2 / m2)^2 * sqrt(count) (rounding of count terms of size mean^4 each, seen 4.5e-3 at
            # mean/std = 1e3 over 1,000 entries), so past 0.01 (far below the figure's own sampling noise,
            # sqrt(24 / count)) it is reported as NaN rather than as a number (-15 or 5e8 at mean/std = 1e4, 1e6).
            conditioned = np.finfo(np.float64).eps * (mean**2 / m2) ** 2 * np.sqrt(count) < 1e-2
            kurt = np.where((count >= 4) & conditioned, m4 / (m2 * m2) - 3.0, np.nan)
            per_step = np.maximum(count / np.maximum(steps, 1), 4)
            gauss = np.asarray(gaussian_kurtosis_quantile(torch.as_tensor(per_step), 0.99), dtype=np.float64)
            entries = column("entries")
            nonfinite_frac = column("nonfinite") / entries
        nan = math.nan
        out: dict[str, float] = {}
        for i, name in enumerate(self.layout.units):
            present = steps[i] > 0
            out[f"grad/norm/{name}"] = float(norm[i]) if present else nan
            out[f"grad/max/{name}"] = float(maxes[i, MAX_COLUMN["absmax"]]) if present else nan
            out[f"grad/kurtosis/{name}"] = float(kurt[i]) if present else nan
            out[f"grad/kurtosis_gauss/{name}"] = float(gauss[i]) if present else nan
            out[f"grad/nonfinite_frac/{name}"] = float(nonfinite_frac[i]) if entries[i] > 0 else nan
        total_steps = record.total_steps
        out["grad/norm"] = float(math.sqrt(column("s2").sum() / total_steps)) if total_steps > 0 else nan
        out["grad/bad_steps"] = float(maxes[:, MAX_COLUMN["bad_steps"]].max())
        for kind, skipped in record.skips.items():
            if skipped:
                out[f"grad/skipped_{kind}"] = float(skipped)
        return out
