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

    def owners(self, params: Sequence[torch.Tensor]) -> list[bool]:
        """Whether this rank's part of each tensor counts in the sums merged at checkpoints: one copy of every piece.

        Under FSDP2 each rank holds a distinct shard and every rank counts. On a 2-D mesh (FSDP2 with tensor
        parallelism, HSDP) some pieces are held by several ranks: a placement ``Replicate`` on a mesh dimension
        means the ranks along it hold equal copies, and a tensor whose mesh is a sub-mesh (FSDP's dimension only)
        is copied in every other sub-mesh. The copy counted is the one at coordinate 0 of each replicated
        dimension, in the sub-mesh that holds the group's rank 0. A plain tensor in a sharded run is a full copy
        on every rank: rank 0's counts. Without sharding (one process, DDP) nothing is summed across ranks.
        """
        if not self.sharded:
            return [True] * len(params)
        first = torch.distributed.get_global_rank(self.group, 0) if self.group is not None else 0
        out = []
        for p in params:
            if not _is_dtensor(p):
                out.append(self.rank == 0)
                continue
            coordinate = p.device_mesh.get_coordinate() or []
            replicated = [d for d, placement in enumerate(p.placements) if placement.is_replicate()]
            in_first = first in p.device_mesh.mesh.flatten().tolist()  # sync point: none, at attach (a CPU tensor)
            out.append(in_first and all(coordinate[d] == 0 for d in replicated))
        return out

    def gather_cat(self, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        """Every rank's ``tensor`` (same shape on all ranks), concatenated along ``dim`` in rank order."""
        if not self.active:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.world)]
        torch.distributed.all_gather(parts, tensor.contiguous(), group=self.group)
        return torch.cat(parts, dim=dim)


def _is_shard(placement: Any) -> bool:
    # FSDP2 over a tensor-parallel Shard(0) shards the same dimension again as a _StridedShard, which is not a
    # Shard subclass and answers is_shard() False; its local piece is still disjoint from the other ranks'.
    return placement.is_shard() or type(placement).__name__ == "_StridedShard"


def check_placements(names: Sequence[str], params: Sequence[torch.Tensor]) -> None:
    """Refuse at attach a DTensor placement whose local pieces do not add up to the tensor.

    Statistics are merged by summing each rank's power sums over its local piece (one copy of each piece, see
    :meth:`DistContext.owners`), which is exact for ``Shard`` (and FSDP2's ``_StridedShard``) and ``Replicate``.
    A ``Partial`` parameter holds summands of the tensor, not pieces of it: its gradient statistics would be
    those of the summands.
    """
    for name, p in zip(names, params):
        if not _is_dtensor(p):
            continue
        for placement in p.placements:
            if not (_is_shard(placement) or placement.is_replicate()):
                raise ValueError(
                    f"Monitor: parameter {name!r} is a DTensor with placement {placement!r} "
                    f"(placements {tuple(p.placements)!r}); heavytail merges Shard and Replicate placements "
                    "exactly and cannot read the gradient of this one"
                )


def check_one_device(names: Sequence[str], params: Sequence[torch.Tensor]) -> None:
    """Refuse at attach parameters spread over several devices in one process (pipeline stages, a model split by
    hand): a monitor keeps its statistics on one device and batches every tensor into one pass there."""
    first: dict[str, str] = {}
    for name, p in zip(names, params):
        first.setdefault(str(local(p).device), name)
    if len(first) > 1:
        where = ", ".join(f"{device} (first: {name})" for device, name in first.items())
        raise ValueError(
            f"Monitor: the watched parameters are on several devices: {where}. A monitor keeps its statistics on "
            "one device; watch the parameters of one device with include=/exclude= (for pipeline stages: one "
            "monitor per stage, each on its own module)"
        )


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a tensor: the local shard of a DTensor (FSDP2), the tensor itself otherwise."""
    if type(t) in _PLAIN:
        return t
    return t.to_local() if _is_dtensor(t) else t


def local_numel(p: torch.Tensor) -> int:
    """Entries of this rank's part of ``p`` (its shard under FSDP2)."""
    return p.to_local().numel() if _is_dtensor(p) else p.numel()
