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


def open_backends(specs: Any, log_dir: Any, config: Any, writer: bool) -> list:
    """The run's backends, each isolated (``SafeBackend``): ``specs`` are names or objects; ``jsonl`` is always
    added first. Unknown names and unusable objects raise before anything opens. None on a rank that does not
    write (``writer`` false): one metrics stream per run, rank 0's."""
    from heavytail.backends.safe import SafeBackend

    specs = list(specs)
    if "jsonl" not in specs:
        specs.insert(0, "jsonl")
    resolved: list[tuple[str, Any]] = []
    for spec in specs:
        if isinstance(spec, str):
            resolved.append((spec, backend_factory(spec)))
        elif is_backend(spec):
            resolved.append((type(spec).__name__, spec))
        else:
            raise TypeError(f"Monitor: backend {spec!r} is neither a known name nor an object with log() and close()")
    if not writer:
        return []
    return [
        SafeBackend(
            name, item(log_dir=log_dir, config=config) if isinstance(item, type) or not is_backend(item) else item
        )
        for name, item in resolved
    ]


__all__ = ["Backend", "NullBackend", "REGISTRY", "backend_factory", "is_backend", "open_backends"]
