"""Shadow denominators: the ratio AdamW would see, for any optimizer, on the sampled coordinates (``shadow*/``)."""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

from heavytail.estimators.masks import float_mask
from heavytail.families.base import Family, HostViews, Record, Slot


class ShadowState(NamedTuple):
    v: torch.Tensor  # (B, L, S) float32: an EMA of g^2 per beta2
    t: torch.Tensor  # (B, L): gradients each has averaged
    spike_sum: torch.Tensor  # (B, L): sum over steps of the fraction of coordinates with r^2 over the cut
    maxes: torch.Tensor  # (B, L, 2): largest r, steps counted


class Shadow(Family):
    """Per beta2 in ``MonitorConfig.shadow_betas`` and tensor: ``shadow<beta>/ratio_max`` and
    ``shadow<beta>/spike_frac``, the ``adam/`` figures of an AdamW denominator kept on the sampled coordinates
    (r = |g_t| / (sqrt(v_{t-1} / (1 - beta2^(t-1))) + 1e-8), before v is updated with g_t), so every optimizer
    gets figures comparable with AdamW's. Counted from the ``ratio_warmup``-th gradient on, as the real one."""

    name = "shadow"
    report_sections = ("sec-shadow-ratio",)

    def __init__(self, layout) -> None:
        super().__init__(layout)
        self.betas = torch.tensor(self.config.shadow_betas, dtype=layout.dtype).to(layout.device)
        self.warmup = float(max(1, self.config.ratio_warmup))

    def init(self) -> ShadowState:
        B, L, S = len(self.config.shadow_betas), self.layout.num_layers, self.layout.sample_size
        dev, dt = self.layout.device, self.layout.dtype
        return ShadowState(
            # Per-sample state is float32: it is (L, S)-sized, the largest state after the noise ring.
            torch.zeros(B, L, S, device=dev, dtype=torch.float32),
            torch.zeros(B, L, device=dev, dtype=dt),
            torch.zeros(B, L, device=dev, dtype=dt),
            torch.zeros(B, L, 2, device=dev, dtype=dt),
        )

    def bias(self) -> torch.Tensor:
        """``(B, L)`` bias corrections 1 - beta2^t (clamped away from 0), as the sample kernels take them."""
        return (1.0 - self.betas[:, None] ** self.state.t).clamp_min(1e-30)

    def advance(self, g: torch.Tensor, valid: torch.Tensor, memory) -> torch.Tensor:
        """The torch reference of one step; advances the first shadow's memory episodes (``memory`` family) and
        returns their event mask ``(L, S)``."""
        g = torch.nan_to_num(g, nan=0.0)
        betas = self.betas[:, None, None]
        v, t = self.state.v, self.state.t
        bias = 1.0 - betas[:, :, 0] ** t  # (B, L); 0 before the first step
        denom = (v / bias.clamp_min(1e-30)[:, :, None]).sqrt() + 1e-8
        # 0/1 float masks rather than booleans and torch.where (estimators.masks); v >= 0 and g is finite, so the
        # products below are exact selections.
        r = g.abs()[None] / denom * float_mask(torch.gt, v, 0.0, g.dtype)
        ok = valid[None] & (t >= self.warmup)  # (B, L): warm as the real denominator (ratio_warmup)
        frac = float_mask(torch.gt, r * r, self.config.spike_threshold, g.dtype).mean(dim=2)
        s = self.state
        s.spike_sum.add_(torch.where(ok, frac, 0.0))
        s.maxes[:, :, 0] = torch.maximum(s.maxes[:, :, 0], torch.where(ok, r.amax(dim=2), 0.0))
        s.maxes[:, :, 1] += ok.to(g.dtype)
        events = memory.advance(1, r[0], v[0] / bias[0].clamp_min(1e-30)[:, None], ok[0])
        new_v = betas * v + (1 - betas) * (g * g)[None]
        # lerp with a 0/1 weight returns either end exactly: the new EMA where the tensor had a gradient
        self.state = s._replace(
            v=torch.lerp(v, new_v.to(v.dtype), valid.to(v.dtype)[None, :, None]), t=t + valid.to(t.dtype)[None]
        )
        return events

    def readout(self, step: int) -> dict[str, Slot]:
        s, owner = self.state, self.layout.owner
        steps = s.maxes[:, :, 1]
        # Per beta and tensor, summed over ranks: the ranks' steps, the sum of the ranks' maxima and the ranks
        # with a step (the figures are means over the ranks sampling the tensor).
        ranks = torch.stack([steps * owner, s.maxes[:, :, 0] * owner, (steps > 0).to(steps.dtype) * owner], dim=2)
        return {
            "spike_sum": Slot(s.spike_sum * owner, "sum", units="sum", axis=1),
            "maxes": Slot(s.maxes, "max", units="max", axis=1),
            "ranks": Slot(ranks, "sum", units="sum", axis=1),
        }

    def reset(self) -> None:
        self.state.spike_sum.zero_()
        self.state.maxes.zero_()

    def metrics(self, views: HostViews, record: Record) -> dict[str, float]:
        ranks = views.get(self.name, "ranks")
        maxes = views.get(self.name, "maxes").copy()
        with np.errstate(divide="ignore", invalid="ignore"):
            maxes[:, :, 0] = np.where(ranks[:, :, 2] > 0, ranks[:, :, 1] / ranks[:, :, 2], 0)
        maxes = views.units(self.name, "maxes", maxes)
        spike_sum = views.units(self.name, "spike_sum")
        steps = views.units(self.name, "ranks")[:, :, 0]
        out: dict[str, float] = {}
        for i, name in enumerate(self.layout.units):
            for b, beta in enumerate(self.config.shadow_betas):
                tag, ok = shadow_tag(beta), steps[b, i] > 0
                out[f"{tag}/ratio_max/{name}"] = float(maxes[b, i, 0]) if ok else math.nan
                out[f"{tag}/spike_frac/{name}"] = float(spike_sum[b, i] / steps[b, i]) if ok else math.nan
        return out


def shadow_tag(beta: float) -> str:
    """The key prefix of the shadow denominator with this beta2: ``shadow999`` for 0.999."""
    return "shadow" + f"{beta:.6g}".split(".")[-1]
