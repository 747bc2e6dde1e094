"""Worker processes for tests/test_distributed.py: the same training under DDP, FSDP2, FSDP2 + tensor parallelism
and one process, on the same global batches.

Besides the run directory each rank writes ``<log_dir>.rank<r>.json``: what the test checks independently of the
monitor's records (the gradients the optimizer would see before clipping, computed here with plain torch; under
``rank_noise`` every rank's own gradient at the sampled coordinates) and the monitor's own per-rank figures.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys

import torch
import torch.distributed as dist
from torch import nn

import heavytail as ht
from heavytail.optim import Lion, muon_with_adamw
from tests.conftest import TinyNet, newton_schulz_float32

GLOBAL_BATCH = 16
DEFAULTS = {"steps": 5, "every": 2, "accumulate": 1, "clip": None, "optimizer": "adamw", "rank_noise": False}


def global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(500 + step)
    idx = torch.randint(0, 50, (GLOBAL_BATCH, 8), generator=gen)
    y = torch.randn(GLOBAL_BATCH, 1, generator=gen)
    return idx, y


def _local_sq(t: torch.Tensor) -> float:
    t = t.to_local() if hasattr(t, "to_local") else t
    return float(t.double().square().sum())


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _build(mode: str, rank: int, world: int):
    """The model as trained, the module whose parameter names the monitor reports, and (data rank, data ranks)."""
    torch.manual_seed(0)
    model = TinyNet()
    if mode == "single":
        return model, model, 0, 1
    if mode == "ddp":
        return nn.parallel.DistributedDataParallel(model), model, rank, world
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if mode == "fsdp":
        mesh = init_device_mesh("cpu", (world,))
        for layer in (model.embed, model.fc1, model.fc2, model.head):
            fully_shard(layer, mesh=mesh)
        return fully_shard(model, mesh=mesh), model, rank, world
    # fsdp_tp: a 2 x 2 mesh, FSDP2 over "dp", the MLP pair column- then row-wise over "tp" (its bias replicated).
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    mesh = init_device_mesh("cpu", (world // 2, 2), mesh_dim_names=("dp", "tp"))
    parallelize_module(model, mesh["tp"], {"fc1": ColwiseParallel(), "fc2": RowwiseParallel()})
    for layer in (model.embed, model.fc1, model.fc2, model.head):
        fully_shard(layer, mesh=mesh["dp"])
    return fully_shard(model, mesh=mesh["dp"]), model, mesh["dp"].get_local_rank(), world // 2


def _optimizer(kind: str, model: nn.Module, inner: nn.Module):
    if kind == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=1e-3)
    if kind == "lion":
        return Lion(model.parameters(), lr=1e-4)
    # float32 Newton-Schulz: bfloat16 matmuls see the DDP and one-process runs' ulp-level differences as 1e-3
    torch.optim._muon._zeropower_via_newtonschulz = newton_schulz_float32
    return muon_with_adamw(inner, lr=0.02, adamw_lr=1e-3)


_STATE = ("ratio.sums", "ratio.maxes", "shadow.spike_sum", "shadow.maxes", "memory.sums", "updates.sums")
_STATE += ("noise.temporal", "noise.temporal_valid", "noise.mean")


def _partial_refusal(model: nn.Module, log_dir: str) -> str | None:
    """The error a monitor gives at attach for a parameter with a Partial placement (None if it attached)."""
    from torch.distributed.tensor import DTensor, Partial

    holder = nn.Module()
    mesh = next(model.parameters()).device_mesh
    holder.summands = nn.Parameter(DTensor.from_local(torch.zeros(4), mesh, [Partial()] * mesh.ndim))
    try:
        ht.Monitor(holder, log_dir=log_dir).close()
    except ValueError as exc:
        return str(exc)
    return None


def run(rank: int, world: int, mode: str, port: int, log_dir: str, options: dict | None = None) -> None:
    opts = {**DEFAULTS, **(options or {})}
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    if mode != "single":
        dist.init_process_group("gloo", rank=rank, world_size=world)
    model, inner, data_rank, data_world = _build(mode, rank, world)
    refused = _partial_refusal(model, f"{log_dir}.partial{rank}") if mode == "fsdp_tp" else None
    optimizer = _optimizer(opts["optimizer"], model, inner)
    monitor = ht.Monitor(model, optimizer, every=opts["every"], log_dir=log_dir, alerts=(), ratio_warmup=0)
    names = list(monitor.names)
    params = dict(inner.named_parameters())
    micro = opts["accumulate"]
    per_micro = GLOBAL_BATCH // micro
    part = per_micro // data_world
    full_sq, local_sq, rank_samples, first_sq = [], [], [], []
    for step in range(opts["steps"]):
        idx, y = global_batch(step)
        for m in range(micro):
            lo = m * per_micro + data_rank * part
            x, t = idx[lo : lo + part], y[lo : lo + part]
            if opts["rank_noise"]:
                # This rank's own gradient of the step, from the unwrapped module: what DDP then averages.
                own = torch.autograd.grad(nn.functional.mse_loss(inner(x), t), [params[n] for n in names])
                rank_samples.append([g.reshape(-1)[i].tolist() for g, i in zip(own, monitor._sample_index.tolist())])
            if m == 0 and mode in ("ddp", "single"):
                # This rank's first micro-batch gradient as its backward pass leaves it (the loss divided by the
                # micro-batches), from the unwrapped module: the gns family's small batch.
                first = torch.autograd.grad(nn.functional.mse_loss(inner(x), t) / micro, [params[n] for n in names])
                first_sq.append([float(g.double().square().sum()) for g in first])
            last = m == micro - 1
            sync = contextlib.nullcontext()
            if mode == "ddp" and not last:
                sync = model.no_sync()
            elif mode.startswith("fsdp"):
                model.set_requires_gradient_sync(last)
            with sync:
                loss = nn.functional.mse_loss(model(x), t) / micro
                loss.backward()
            monitor.observe_loss(loss * micro)
        # What optimizer.step() would see before clipping: the whole tensor's squares, and this rank's piece's.
        full_sq.append([float(_full(params[n].grad).double().square().sum()) for n in names])
        local_sq.append([_local_sq(params[n].grad) for n in names])
        if opts["clip"] is not None:
            # clip_grad_norm_'s formula, on the whole tensors' norms: its own cannot stack the norms of DTensors on
            # different meshes (FSDP2 + TP: the TP layers on the 2-D mesh, the others on the "dp" sub-mesh).
            coef = min(1.0, opts["clip"] / (sum(full_sq[-1]) ** 0.5 + 1e-6))
            for n in names:
                params[n].grad.mul_(coef)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    states = {f"{n}.{k}": v for n, fam in monitor.families.items() for k, v in fam.state_tensors().items()}
    dump = {
        "names": names,
        "full_sq": full_sq,
        "local_sq": local_sq,
        "first_sq": first_sq,
        # The monitor's own per-rank sums of the steps since the last record (the last, partial interval).
        "preclip_s2": monitor.families["preclip"].state.sums.tolist(),
        "sample_index": monitor._sample_index.tolist(),
        # This rank's interval state and noise ring, for the merges' own check.
        "state": {k: states[k].tolist() for k in _STATE},
        "sampling": monitor.layout.sampling.tolist(),
        "noise_pushes": monitor.families["noise"].slots["temporal"],
        "refused": refused,
    }
    if opts["rank_noise"]:
        everyone = [None] * world
        dist.all_gather_object(everyone, rank_samples)
        dump["rank_samples"] = everyone
    if rank == 0 or mode != "single":
        with open(f"{log_dir}.rank{rank}.json", "w") as f:
            json.dump(dump, f)
    monitor.close()
    if mode != "single":
        dist.destroy_process_group()
        # Leave without running interpreter teardown: gloo's threads occasionally abort the process at exit
        # ("terminate called without an active exception", with or without a monitor), after all work is done.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
