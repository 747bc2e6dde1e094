"""The checkpoint packer: every family's declared slots merged across ranks and copied to the host at once."""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch

from heavytail.distributed import DistContext
from heavytail.families.base import Slot

MERGES = ("sum", "max", "none")


def pack(slots: Mapping[str, Mapping[str, Slot]], dist: DistContext, dtype: torch.dtype) -> dict[str, np.ndarray]:
    """``{"family.slot": host array}`` for every slot, merged across ranks.

    Slots of one merge kind are concatenated into one buffer and merged with one collective: all of it under
    sharding (each rank holds a piece of every tensor), only its ``varies_by_rank`` part under DDP (every rank
    holds the same reduced gradient, so the rest already agrees); that part is laid out first so it is one
    contiguous range. Then every buffer goes to the host in one device-to-host copy, in float64.
    """
    order: list[tuple[str, Slot]] = []
    buffers: list[torch.Tensor] = []
    for merge in MERGES:
        chosen = [
            (f"{family}.{name}", slot)
            for varies in (True, False)
            for family, declared in slots.items()
            for name, slot in declared.items()
            if slot.merge == merge and slot.varies_by_rank == varies
        ]
        if not chosen:
            continue
        if merge == "none":
            buffers.extend(slot.value.reshape(-1).to(torch.float64) for _, slot in chosen)
        else:
            buffer = torch.cat([slot.value.reshape(-1).to(dtype) for _, slot in chosen])
            if dist.sharded:
                buffer = dist.all_reduce_(buffer, merge)
            elif dist.active:
                shared = sum(slot.value.numel() for _, slot in chosen if slot.varies_by_rank)
                if shared:
                    buffer[:shared] = dist.all_reduce_(buffer[:shared].clone(), merge)
            buffers.append(buffer.to(torch.float64))
        order.extend(chosen)
    if not order:
        return {}
    host = torch.cat(buffers).cpu().numpy()  # sync point: the one device->host copy of a checkpoint
    arrays, offset = {}, 0
    for key, slot in order:
        size = slot.value.numel()
        arrays[key] = host[offset : offset + size].reshape(tuple(slot.value.shape))
        offset += size
    return arrays
