"""The gradient-to-denominator ratio r = |g| / (sqrt(v_hat) + eps) of Adam-like optimizers (``adam/``)."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from heavytail.estimators.gradient_pass import COUNT, RATIO_MAX, RATIO_SPIKES
from heavytail.estimators.quantile import upper_quantile
from heavytail.families.base import Family, HostViews, Record, Slot, StepView
from heavytail.hooks.optimizer import optimizer_kind

SUMS = ("spikes", "p99", "entries")
MAXES = ("ratio_max", "steps")


class RatioState(NamedTuple):
    sums: torch.Tensor  # (L, 3): entries with r^2 over the hidden-spike cut, per-step 99th percentiles, entries
    maxes: torch.Tensor  # (L, 2): largest r, steps the ratio counted


class Ratio(Family):
    """Per tensor: ``adam/ratio_max`` (largest r of the interval), ``adam/ratio_p99`` (mean over steps of the
    sampled r's 99th percentile) and ``adam/spike_frac`` (fraction of entries with r^2 over
    ``MonitorConfig.spike_threshold``: gradients the denominator has not seen coming). Steps count once the
    denominator has averaged ``ratio_warmup`` gradients. Written when some parameter has an Adam-like denominator."""

    name = "ratio"
    report_sections = ("sec-ratio", "sec-layers")
    alert_rules = ("hidden_spike",)

    def init(self) -> RatioState:
        L, dev, dt = self.layout.num_layers, self.layout.device, self.layout.dtype
        return RatioState(
            torch.zeros(L, len(SUMS), device=dev, dtype=dt), torch.zeros(L, len(MAXES), device=dev, dtype=dt)
        )

    @staticmethod
    def quantile(view: StepView) -> torch.Tensor:
        """The torch reference of the sampled ratio's 99th percentile per tensor (the sample kernels compute it
        alongside the other sample families)."""
        return upper_quantile(view.result.ratio_samples, 0.99)

    def update(self, view: StepView) -> None:
        stats, ok = view.stats, view.ratio_ok
        p99 = view.extra["ratio_p99"]
        s = self.state
        s.sums.add_(
            torch.stack(
                [
                    torch.where(ok, stats[:, RATIO_SPIKES], 0.0),
                    torch.where(ok & torch.isfinite(p99), p99, 0.0),
                    torch.where(ok, stats[:, COUNT], 0.0),
                ],
                dim=1,
            )
        )
        s.maxes[:, 0] = torch.maximum(s.maxes[:, 0], torch.where(ok, stats[:, RATIO_MAX], 0.0))
        s.maxes[:, 1] += ok.to(stats.dtype)

    def readout(self, step: int) -> dict[str, Slot]:
        owner = self.layout.owner
        return {
            "sums": Slot(self.state.sums * owner[:, None], "sum", units="sum"),
            "maxes": Slot(self.state.maxes, "max", units="max"),
            # The steps each rank's percentiles count, summed over ranks: the percentile is a mean over them.
            "rank_steps": Slot(self.state.maxes[:, 1] * owner, "sum", units="sum"),
        }

    def reset(self) -> None:
        self.state.sums.zero_()
        self.state.maxes.zero_()

    def metrics(self, views: HostViews, record: Record) -> dict[str, float]:
        if not has_ratio(views, self.layout.optimizer):
            return {}
        sums, maxes = views.units(self.name, "sums"), views.units(self.name, "maxes")
        rank_steps = views.units(self.name, "rank_steps")
        steps = maxes[:, 1]
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio_max = np.where(steps > 0, maxes[:, 0], np.nan)
            spike_frac = sums[:, 0] / sums[:, 2]
            p99 = sums[:, 1] / rank_steps
        out: dict[str, float] = {}
        for i, name in enumerate(self.layout.units):
            out[f"adam/ratio_max/{name}"] = float(ratio_max[i])
            out[f"adam/ratio_p99/{name}"] = float(p99[i])
            out[f"adam/spike_frac/{name}"] = float(spike_frac[i])
        return out


def has_ratio(views: HostViews, optimizer: torch.optim.Optimizer | None) -> bool:
    """Whether the run writes ``adam/`` keys: some step counted a ratio, or some group is Adam-like."""
    steps = views.get("ratio", "maxes")[:, 1]
    return bool(np.any(steps > 0)) or _adam_like(optimizer)


def _adam_like(optimizer: torch.optim.Optimizer | None) -> bool:
    """Whether some parameter group divides by an adaptive denominator (Adam-like or Adafactor)."""
    if optimizer is None:
        return False
    return any(optimizer_kind(g) in ("adam", "adafactor") for g in optimizer.param_groups)
