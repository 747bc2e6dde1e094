"""The backend contract: where checkpoint records and alerts go."""

from __future__ import annotations

from typing import Any, Mapping, Protocol, runtime_checkable


@runtime_checkable
class Backend(Protocol):
    """A destination for metrics and alerts.

    ``log`` receives one checkpoint record: a flat mapping from metric key (``grad/hill_alpha/<param>``) to a
    Python float (NaN and Inf allowed; each backend writes them as it can), and the optimizer step it belongs to.
    ``alert`` receives one alert record (a dict, see ``docs/run-directory.md``). ``close`` flushes and releases
    resources; it is called once. Backends never see tensors: the monitor has already copied the record to the
    host in one packed transfer.
    """

    def log(self, metrics: Mapping[str, float], step: int) -> None: ...

    def alert(self, alert: Mapping[str, Any]) -> None: ...

    def close(self) -> None: ...


class NullBackend:
    """A backend that drops everything: what a disabled destination is."""

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        pass

    def alert(self, alert: Mapping[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass
