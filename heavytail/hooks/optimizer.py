"""Optimizer taps: step hooks that bracket every update, and reads of the optimizer's denominator state."""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from heavytail.estimators.gradient_pass import Denominators


class OptimizerTap:
    """Calls ``before()`` just before and ``after()`` just after every ``optimizer.step()``.

    Uses ``Optimizer.register_step_pre_hook`` / ``register_step_post_hook``, so the training loop does not change
    and steps that never reach the optimizer (``GradScaler`` skips a step with inf/NaN gradients) are not counted.
    ``remove()`` takes both hooks off; calling it twice is harmless.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, before: Callable[[], None], after: Callable[[], None]):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"Monitor: optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self._handles = [
            optimizer.register_step_pre_hook(lambda opt, args, kwargs: before()),
            optimizer.register_step_post_hook(lambda opt, args, kwargs: after()),
        ]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def check_owns(optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor], names: Sequence[str]) -> None:
    """Raise ``ValueError`` when a watched parameter is not in any of ``optimizer``'s param groups."""
    owned = {id(p) for group in optimizer.param_groups for p in group["params"]}
    missing = [n for n, p in zip(names, params) if id(p) not in owned]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ValueError(
            f"Monitor: the optimizer does not own the watched parameter {missing[0]!r}{more}; pass the optimizer "
            "that trains this model, or exclude those parameters"
        )


def _group_of(optimizer: torch.optim.Optimizer) -> dict[int, dict]:
    return {id(p): group for group in optimizer.param_groups for p in group["params"]}


def denominators(
    optimizer: torch.optim.Optimizer | None, params: Sequence[torch.Tensor], device: torch.device
) -> Denominators | None:
    """AdamW's denominator for each watched parameter, as the *next* ``step()`` will divide by it.

    For optimizers that keep ``exp_avg_sq`` with ``betas`` and ``eps`` in their group (Adam, AdamW, NAdam,
    RAdam and their fused/foreach forms, and the AdamW half of Muon+AdamW): v_{t-1}, its bias correction
    1 - beta2^(t-1) from the optimizer's own step counter, and eps (``max_exp_avg_sq`` under AMSGrad). ``None``
    entries mark parameters without one (first step, or an optimizer with no denominator: Lion, Muon, SGD);
    the shadow denominators cover those. Reads tensors only: no host-device synchronization.
    """
    if optimizer is None:
        return None
    groups = _group_of(optimizer)
    vs: list[torch.Tensor | None] = []
    steps: list[torch.Tensor] = []
    beta2s: list[float] = []
    epss: list[float] = []
    found = False
    one = torch.ones(())
    for p in params:
        state = optimizer.state.get(p)
        group = groups.get(id(p))
        if not state or group is None or "exp_avg_sq" not in state or "betas" not in group:
            vs.append(None)
            steps.append(one)
            beta2s.append(0.0)
            epss.append(0.0)
            continue
        found = True
        v = state["max_exp_avg_sq"] if group.get("amsgrad") and "max_exp_avg_sq" in state else state["exp_avg_sq"]
        vs.append(v)
        step = state.get("step", one)
        steps.append(step if isinstance(step, torch.Tensor) else torch.tensor(float(step)))
        beta2s.append(float(group["betas"][1]))
        epss.append(float(group["eps"]))
    if not found:
        return None
    # Steps live on the host (default) or on the device (capturable/fused): stack per device, then move.
    try:
        step_vec = torch.stack([s.reshape(()) for s in steps]).to(device, torch.float64, non_blocking=True)
    except RuntimeError:  # step counters on several devices
        step_vec = torch.stack([s.to(device, torch.float64, non_blocking=True).reshape(()) for s in steps])
    beta2 = torch.tensor(beta2s, dtype=torch.float64).to(device, non_blocking=True)
    bias_correction = 1.0 - beta2**step_vec
    return Denominators(vs, bias_correction, torch.tensor(epss, dtype=torch.float64).to(device, non_blocking=True))
