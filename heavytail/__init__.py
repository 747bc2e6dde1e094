"""heavytail: per-layer heavy-tail statistics of gradients, optimizer denominators and spike alerts for PyTorch."""

from __future__ import annotations

__version__ = "0.1.0"

from heavytail.config import MonitorConfig  # noqa: E402
from heavytail.monitor import Monitor  # noqa: E402

__all__ = ["Monitor", "MonitorConfig", "__version__"]
