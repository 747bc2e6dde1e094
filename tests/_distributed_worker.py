"""Worker processes for tests/test_distributed.py: the same training under DDP, FSDP2 and one process."""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from torch import nn

import heavytail as ht
from tests.conftest import TinyNet

GLOBAL_BATCH = 16
STEPS = 4


def global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(500 + step)
    idx = torch.randint(0, 50, (GLOBAL_BATCH, 8), generator=gen)
    y = torch.randn(GLOBAL_BATCH, 1, generator=gen)
    return idx, y


def train(model: nn.Module, optimizer, monitor, rank: int, world: int) -> None:
    per_rank = GLOBAL_BATCH // world
    for step in range(STEPS):
        idx, y = global_batch(step)
        idx, y = idx[rank * per_rank : (rank + 1) * per_rank], y[rank * per_rank : (rank + 1) * per_rank]
        loss = nn.functional.mse_loss(model(idx), y)
        loss.backward()
        monitor.observe_loss(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def run(rank: int, world: int, mode: str, port: int, log_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    if mode != "single":
        dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = TinyNet()
    if mode == "ddp":
        wrapped = nn.parallel.DistributedDataParallel(model)
    elif mode == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for layer in (model.embed, model.fc1, model.fc2, model.head):
            fully_shard(layer, mesh=mesh)
        wrapped = fully_shard(model, mesh=mesh)
    else:
        wrapped = model
    optimizer = torch.optim.AdamW(wrapped.parameters(), lr=1e-3)
    monitor = ht.Monitor(wrapped, optimizer, every=2, log_dir=log_dir, alerts=())
    train(wrapped, optimizer, monitor, rank if mode != "single" else 0, world if mode != "single" else 1)
    monitor.close()
    if mode != "single":
        dist.destroy_process_group()
        # Leave without running interpreter teardown: gloo's threads occasionally abort the process at exit
        # ("terminate called without an active exception", with or without a monitor), after all work is done.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
