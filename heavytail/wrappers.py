"""Seeing through framework wrappers: the user's module, the optimizer that really steps, its loss scaler."""

from __future__ import annotations

from typing import Any

from torch import nn


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's module inside ``DistributedDataParallel`` / ``DataParallel`` (``.module``) and ``torch.compile``
    (``._orig_mod``) wrappers, so metric keys carry the model's own parameter names (no ``module.`` prefix)."""
    for _ in range(8):  # wrappers nest (compile around DDP, ...); a bound keeps a cyclic attribute from looping
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model
    return model


def unwrap_optimizer(optimizer: Any) -> Any:
    """The ``torch.optim.Optimizer`` that really updates the parameters, inside framework wrappers.

    Accelerate's ``AcceleratedOptimizer``, Lightning's ``LightningOptimizer`` and DeepSpeed's wrappers keep it in
    ``.optimizer``. The step hooks must go on that one: ``AcceleratedOptimizer`` subclasses
    ``torch.optim.Optimizer`` without running its ``__init__`` (it has no hook registry), and while it accumulates
    gradients its ``step()`` returns without stepping, which is exactly the step the monitor must not count.
    """
    for _ in range(4):  # Accelerate around DeepSpeed around torch
        inner = getattr(optimizer, "optimizer", None)
        if inner is None or inner is optimizer or not hasattr(inner, "param_groups"):
            break
        optimizer = inner
    return optimizer


def loss_scaler(optimizer: Any) -> Any:
    """The ``GradScaler`` a wrapped optimizer steps through (Accelerate keeps it in ``.scaler``), or ``None``."""
    for _ in range(4):
        scaler = getattr(optimizer, "scaler", None)
        if scaler is not None:
            return scaler
        optimizer = getattr(optimizer, "optimizer", None)
        if optimizer is None:
            return None
    return None
