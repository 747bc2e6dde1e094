"""The step view: the fused gradient pass over every gradient, and the masks every family agrees on."""

from __future__ import annotations

import math
from typing import Callable

import torch

from heavytail.estimators.gradient_pass import COUNT, NONFINITE, RATIO_MAX, S2, Denominators
from heavytail.families.base import StepView
from heavytail.kernels import UNAVAILABLE
from heavytail.layout import Layout


def step_view(
    layout: Layout,
    torch_pass: Callable,
    grads: list[torch.Tensor | None],
    denominators: Denominators | None,
    loss: torch.Tensor | None,
    step: int,
    interval_start: int,
) -> StepView:
    """One read of every gradient (the fused kernel, or ``torch_pass``, its reference) and the step's view.

    ``valid``: the tensor had entries, all finite; ``ratio_ok``: its denominator ratio counts (finite, and the
    denominator has averaged ``ratio_warmup`` gradients: before that every ratio is large); ``loss``: the step's
    mean observed loss, or None (NaN in the view).
    """
    cfg = layout.config
    res = layout.kernels.call(
        "gradient_pass", None, grads, layout.sample_index_dev, denominators, spike_threshold=cfg.spike_threshold
    )
    if res is UNAVAILABLE:
        res = torch_pass(grads, denominators, spike_threshold=cfg.spike_threshold)
    elif res.stats.dtype != cfg.stats_dtype:
        res = type(res)(*(t.to(cfg.stats_dtype) for t in res))
    stats = res.stats
    entries = stats[:, COUNT] + stats[:, NONFINITE]
    valid = (entries > 0) & (stats[:, NONFINITE] == 0)
    clean = torch.where(valid[:, None], stats, torch.zeros_like(stats))
    ratio_ok = valid & torch.isfinite(stats[:, RATIO_MAX])
    if denominators is not None and denominators.steps is not None and cfg.ratio_warmup > 1:
        ratio_ok = ratio_ok & (denominators.steps >= cfg.ratio_warmup)
    if loss is None:
        loss = torch.full((), math.nan, device=layout.device, dtype=stats.dtype)
    s2 = clean[:, S2]
    return StepView(
        step=step,
        row=step - interval_start,
        checkpoint_next=(step + 1) % cfg.every == 0,
        grads=grads,
        denominators=denominators,
        result=res,
        valid=valid,
        clean=clean,
        ratio_ok=ratio_ok,
        entries=entries,
        loss=loss,
        layer_norm=torch.where(valid, s2.sqrt(), math.nan),
        grad_norm=s2.sum().sqrt(),
    )
