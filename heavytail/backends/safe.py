"""A backend isolated from the run: its failures are reported once and never reach training."""

from __future__ import annotations

import warnings
from typing import Any, Mapping


class SafeBackend:
    """Isolates a backend: its first failure is reported once, later ones are counted silently, training goes on.

    A failing backend keeps being called (a network blip may pass); the others, and the JSONL record, never
    depend on it.
    """

    def __init__(self, name: str, backend: Any) -> None:
        self.name = name
        self.backend = backend
        self.failures = 0

    def _call(self, method: str, *args: Any) -> None:
        fn = getattr(self.backend, method, None)
        if fn is None:
            return
        try:
            fn(*args)
        except Exception as exc:  # a backend must never break training
            self.failures += 1
            if self.failures == 1:
                warnings.warn(
                    f"heavytail: backend {self.name!r} failed in {method}(); training goes on and further failures "
                    f"of this backend are counted silently: {type(exc).__name__}: {exc}",
                    RuntimeWarning,
                    stacklevel=3,
                )

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        self._call("log", metrics, step)

    def alert(self, alert: Mapping[str, Any]) -> None:
        self._call("alert", alert)

    def close(self) -> None:
        self._call("close")
