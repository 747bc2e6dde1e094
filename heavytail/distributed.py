"""What the monitor needs from torch.distributed: who writes, and exact merges of statistics at checkpoints."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _is_dtensor(t: Any) -> bool:
    if type(t) in _PLAIN:  # the common case, on the step path once per tensor: one type lookup
        return False
    return hasattr(t, "to_local") and hasattr(t, "placements")


@dataclass
class DistContext:
    """The process group a monitor runs in.

    ``sharded`` is true under FSDP2 (parameters are DTensors, each rank holds a shard of every gradient): the
    per-tensor power sums, counts and maxima are then merged across ranks at checkpoints (sums all-reduced,
    maxima max-reduced, top order statistics gathered). Otherwise (single process, or DDP where every rank holds
    the same all-reduced gradient) the ranks already agree and only rank 0 writes. Collectives happen only at
    checkpoints: every rank must reach the same checkpoints (the step counter guarantees it) and call ``close``.
    """

    world: int = 1
    rank: int = 0
    sharded: bool = False
    group: Any = None

    @classmethod
    def detect(cls, params: Sequence[torch.Tensor], group: Any = None) -> "DistContext":
        sharded = any(_is_dtensor(p) for p in params)
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return cls(sharded=sharded)
        world = torch.distributed.get_world_size(group)
        rank = torch.distributed.get_rank(group)
        return cls(world=world, rank=rank, sharded=sharded and world > 1, group=group)

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def writer(self) -> bool:
        """Whether this rank writes records and alerts (rank 0)."""
        return self.rank == 0

    def all_reduce_(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        if self.active:
            reduce_op = {"sum": torch.distributed.ReduceOp.SUM, "max": torch.distributed.ReduceOp.MAX}[op]
            torch.distributed.all_reduce(tensor, op=reduce_op, group=self.group)
        return tensor

    def gather_cat(self, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        """Every rank's ``tensor`` (same shape on all ranks), concatenated along ``dim`` in rank order."""
        if not self.active:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.world)]
        torch.distributed.all_gather(parts, tensor.contiguous(), group=self.group)
        return torch.cat(parts, dim=dim)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a tensor: the local shard of a DTensor (FSDP2), the tensor itself otherwise."""
    if type(t) in _PLAIN:
        return t
    return t.to_local() if _is_dtensor(t) else t


def local_numel(p: torch.Tensor) -> int:
    """Entries of this rank's part of ``p`` (its shard under FSDP2)."""
    return p.to_local().numel() if _is_dtensor(p) else p.numel()
