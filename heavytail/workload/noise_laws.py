"""Known-truth noise for calibration: a "model" whose gradient is a drawn noise vector, run through the Monitor.

The model is one parameter vector ``P`` of ``dim`` coordinates and its loss is ``(P * xi_t).sum()``, so the
gradient is exactly the draw ``xi_t``; SGD with ``lr = 0`` keeps ``P`` fixed, so the draws are i.i.d. over steps.
Coordinate ``j`` draws ``scale_j * X`` with ``X`` from one law (:data:`LAWS`) and the scales from
:data:`SCALES`. Each law states its truth: ``light`` (no power-law tail), ``sparse`` (most draws zero) or the
tail index alpha. Used by ``benchmarks/calibration.py`` and the calibration tests.
"""

from __future__ import annotations

import inspect
import math
import os
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

SOURCES = ("temporal", "microbatch", "probe")
"""The noise sources a single process can calibrate; ``run_source(..., "rank")`` runs the rank source too, in two
processes on the CPU (torch.distributed, gloo), each drawing its own noise."""


@dataclass(frozen=True)
class Law:
    name: str
    truth: str  # "light", "sparse" or "power"
    alpha: float = math.inf  # the tail index of a power law

    def draw(self, rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
        kind, _, arg = self.name.partition("(")
        arg = arg.rstrip(")")
        if kind == "gauss":
            return rng.standard_normal(shape)
        if kind == "laplace":
            return rng.laplace(size=shape)
        if kind == "t":
            return rng.standard_t(float(arg), size=shape)
        if kind == "stable":
            return symmetric_stable(rng, float(arg), shape)
        if kind == "bernoulli":
            return (rng.random(shape) < float(arg)).astype(np.float64)
        if kind == "raretoken":  # Poisson(0.1) tokens, each with a N(1, 0.3) gradient
            counts = rng.poisson(0.1, size=shape)
            return counts + 0.3 * np.sqrt(counts) * rng.standard_normal(shape)
        raise ValueError(f"unknown law {self.name!r}")


def symmetric_stable(rng: np.random.Generator, alpha: float, shape: tuple[int, ...]) -> np.ndarray:
    """Symmetric alpha-stable draws (Chambers, Mallows & Stuck 1976)."""
    v = rng.uniform(-math.pi / 2, math.pi / 2, size=shape)
    w = rng.exponential(size=shape)
    return np.sin(alpha * v) / np.cos(v) ** (1 / alpha) * (np.cos((1 - alpha) * v) / w) ** ((1 - alpha) / alpha)


LAWS: dict[str, Law] = {
    law.name: law
    for law in (
        Law("gauss", "light"),
        Law("laplace", "light"),
        Law("bernoulli(0.05)", "sparse"),
        Law("raretoken", "sparse"),
        Law("t(1.5)", "power", 1.5),
        Law("t(2.5)", "power", 2.5),
        Law("t(3)", "power", 3.0),
        Law("stable(1.5)", "power", 1.5),
        Law("stable(1.8)", "power", 1.8),
    )
}

SCALES = ("equal", "lognormal", "zipf")
"""Coordinate scales: all 1; lognormal with sd of log 1; Zipf, ``1 / rank`` (as token rows are)."""


def coordinate_scales(kind: str, dim: int, rng: np.random.Generator) -> np.ndarray:
    if kind == "equal":
        return np.ones(dim)
    if kind == "lognormal":
        return np.exp(rng.standard_normal(dim))
    if kind == "zipf":
        return 1.0 / rng.permutation(np.arange(1, dim + 1))
    raise ValueError(f"unknown coordinate scales {kind!r}")


class NoiseModel(nn.Module):
    """``loss(xi) = (P * xi).sum()``: the gradient with respect to ``P`` is ``xi``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.P = nn.Parameter(torch.zeros(dim))

    def forward(self, xi: torch.Tensor) -> torch.Tensor:
        return (self.P * xi).sum()


class _Collect:
    """A monitor backend that keeps the records."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self.records.append(dict(metrics))

    def close(self) -> None:
        pass


def run_source(
    law: str,
    scales: str,
    source: str,
    seed: int,
    *,
    dim: int = 256,
    micro_batches: int = 4,
    probe_draws: int = 32,
    log_dir: str | None = None,
    **config: Any,
) -> dict[str, Any]:
    """One run through the public Monitor API; returns the last record's metrics.

    ``temporal``: one checkpoint interval (``every``, the monitor's default 100 steps unless given) of one draw
    each: the reading pools the six full windows of 16 it folds. ``microbatch``: the same steps of
    ``micro_batches`` accumulated draws each (24 windows). ``probe``: one step, with a probe over
    ``probe_draws`` mini-batches of one draw each (the training micro-batch: one draw is one gradient).
    """
    import tempfile

    from heavytail import Monitor, MonitorConfig

    if source == "rank":
        return _run_ranks(law, scales, seed, dim=dim, log_dir=log_dir, **config)
    rng = np.random.default_rng(seed)
    spec = LAWS[law]
    scale = torch.tensor(coordinate_scales(scales, dim, rng), dtype=torch.float32)

    def draws(n: int) -> torch.Tensor:
        return torch.tensor(spec.draw(rng, (n, dim)), dtype=torch.float32) * scale

    torch.manual_seed(seed)
    model = NoiseModel(dim)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    every = config.pop("every", MonitorConfig.every)
    if source == "temporal":
        steps, per_step = every, 1
    elif source == "microbatch":
        steps, per_step = every, micro_batches
    elif source == "probe":
        steps, per_step = 1, 1
    else:
        raise ValueError(f"unknown source {source!r}")
    collect = _Collect()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = dict(
            every=steps,
            log_dir=log_dir or tmp,
            overwrite=True,
            backends=("jsonl", collect),
            probe_every=1 if source == "probe" else 0,
            seed=seed,
        )
        cfg.update(config)
        with Monitor(model, opt, **cfg) as mon:
            if source == "probe":
                held = draws(probe_draws)
                loss_fn = lambda m, batch: m(batch.mean(dim=0))  # noqa: E731
                if "batch_size" in inspect.signature(mon.set_probe).parameters:
                    mon.set_probe(loss_fn, held, batch_size=1)
                else:  # a monitor from before set_probe(batch_size=...): the same mini-batches of one draw
                    mon.set_probe(loss_fn, held, micro_batches=probe_draws)
            for _ in range(steps):
                for xi in draws(per_step):
                    model(xi).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
    return collect.records[-1]


def _run_ranks(law: str, scales: str, seed: int, *, dim: int, log_dir: str | None, world: int = 2, **config: Any):
    """The rank source: ``world`` processes under DDP (gloo), each drawing its own i.i.d. noise with the same
    coordinate scales, one checkpoint interval (``every``, by default the monitor's 100 steps) of one draw each;
    rank 0's last record.

    Rank r's deviation is its own gradient minus the all-reduced mean, ``(xi_r - mean of the others) (W - 1) / W``:
    a difference of independent draws of the law, which keeps its truth (light stays light, a power law keeps its
    alpha, a sparse law stays mostly zero).
    """
    import tempfile

    import torch.multiprocessing as mp

    from heavytail import MonitorConfig

    steps = config.pop("every", MonitorConfig.every)
    with tempfile.TemporaryDirectory() as tmp:
        out = log_dir or tmp
        # A file rendezvous: no TCP port that another process on the machine could take in between.
        store = f"file://{tmp}/rendezvous"
        mp.spawn(_rank_worker, args=(world, store, law, scales, seed, dim, steps, out, config), nprocs=world)
        import json
        from pathlib import Path

        lines = (Path(out) / "metrics.jsonl").read_text().splitlines()
        return json.loads(lines[-1])["metrics"]


def _rank_worker(
    rank: int, world: int, store: str, law: str, scales: str, seed: int, dim: int, steps: int, out: str, config
) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from heavytail import Monitor

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=store, rank=rank, world_size=world)
    try:
        spec = LAWS[law]
        scale = torch.tensor(coordinate_scales(scales, dim, np.random.default_rng(seed)), dtype=torch.float32)
        rng = np.random.default_rng([seed, rank])  # the same scales on every rank, its own draws
        torch.manual_seed(seed)
        model = DistributedDataParallel(NoiseModel(dim))
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        cfg = dict(every=steps, log_dir=out, overwrite=True, probe_every=0, seed=seed)
        cfg.update(config)
        with Monitor(model, opt, **cfg):
            for _ in range(steps):
                xi = torch.tensor(spec.draw(rng, (dim,)), dtype=torch.float32) * scale
                model(xi).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
        dist.barrier()  # both ranks done before either tears gloo down
    finally:
        dist.destroy_process_group()
    # Leave without the interpreter's teardown, where gloo's threads occasionally abort the process after all the
    # work is done ("terminate called without an active exception"), which mp.spawn reports as a failed rank.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
