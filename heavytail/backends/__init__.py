"""Logging backends: a registry from name to factory, resolved lazily so optional dependencies stay optional."""

from __future__ import annotations

import importlib
from typing import Any, Callable

from heavytail.backends.base import Backend, NullBackend

# name -> "module:Class". Each factory is called as Factory(log_dir=Path, config=MonitorConfig, **kwargs).
REGISTRY: dict[str, str] = {
    "jsonl": "heavytail.backends.jsonl:JsonlBackend",
    "tensorboard": "heavytail.backends.tensorboard:TensorBoardBackend",
    "wandb": "heavytail.backends.wandb:WandbBackend",
    "console": "heavytail.backends.console:ConsoleBackend",
}


def backend_factory(name: str) -> Callable[..., Backend]:
    """The factory registered under ``name``; raises ValueError naming the known names."""
    if name not in REGISTRY:
        known = ", ".join(sorted(REGISTRY))
        raise ValueError(f"backends: unknown backend {name!r}; known backends are {known}")
    module_name, _, attr = REGISTRY[name].partition(":")
    return getattr(importlib.import_module(module_name), attr)


def is_backend(obj: Any) -> bool:
    """Whether ``obj`` can serve as a backend as it is (a user object with ``log`` and ``close``)."""
    return callable(getattr(obj, "log", None)) and callable(getattr(obj, "close", None))


__all__ = ["Backend", "NullBackend", "REGISTRY", "backend_factory", "is_backend"]
