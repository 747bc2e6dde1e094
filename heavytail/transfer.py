"""Host-to-device copies that never stall the host: small per-step tables go through pinned memory."""

from __future__ import annotations

from typing import Any

import torch


def to_device(values: Any, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``torch.tensor(values)`` on ``device`` without a synchronizing copy.

    ``torch.tensor(values, device="cuda")`` and a blocking ``.to("cuda")`` synchronize the host with the device
    (``torch.cuda.set_sync_debug_mode("error")`` rejects them), and a "non-blocking" copy from pageable memory
    stalls on a staging buffer. A pinned host tensor copied with ``non_blocking=True`` does neither; PyTorch's
    caching host allocator keeps the pinned block alive until the copy has run.
    """
    host = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    if dtype is not None and host.dtype != dtype:
        host = host.to(dtype)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)
