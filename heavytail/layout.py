"""What a monitor watches: its tensors, their output units, the coordinate sample, and the run's ranks."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from heavytail.config import MonitorConfig
from heavytail.distributed import DistContext, local, local_numel
from heavytail.estimators import spike
from heavytail.hooks.optimizer import gather_samples

MIN_SAMPLE_SIZE = 8
"""The fewest coordinates a tensor keeps under ``MonitorConfig.sample_budget``."""

UNIT_MERGES: dict[str, Callable] = {"sum": np.add, "max": np.maximum, "fmax": np.fmax}
"""How a per-tensor figure becomes a per-unit one under ``group_by``: by name, as the families declare it."""


@dataclass
class Layout:
    """Everything a statistic family needs to size its state and name its records, fixed at attach.

    ``L`` tensors (``names``/``params``), ``S`` sampled coordinates each (``sample_index``), ``U`` output units
    (one per tensor, or groups under ``MonitorConfig.group_by``). ``owner`` marks the tensors whose local piece this
    rank adds into the sums merged across ranks (one copy of each piece, ``DistContext.owners``); ``sampling`` the
    owned, non-empty ones, whose samples this rank's sample-based figures count.
    """

    config: MonitorConfig
    names: list[str]
    params: list[torch.Tensor]
    kinds: list[str]
    optimizer: torch.optim.Optimizer | None
    dist: DistContext
    device: torch.device
    dtype: torch.dtype
    sample_size: int
    sample_index: torch.Tensor  # (L, S) int64 on the host
    sample_index_dev: torch.Tensor  # the same on the device
    units: list[str]
    unit_members: list[list[int]]
    owned: list[bool]
    owner: torch.Tensor  # (L,) 0/1 in stats dtype
    sampling: torch.Tensor  # (L,) 0/1
    norm_share: float
    spike_config: spike.SpikeConfig
    kernels: Any = None
    """The fused kernels in use (``heavytail.kernels.Kernels``), set by the monitor."""
    scaler: Any = None
    """The ``torch.amp.GradScaler`` in use, if any: hooks see gradients multiplied by its scale."""
    _plain_params: list | None = None

    @classmethod
    def build(
        cls,
        config: MonitorConfig,
        names: list[str],
        params: list[torch.Tensor],
        kinds: list[str],
        optimizer: torch.optim.Optimizer | None,
        dist: DistContext,
    ) -> "Layout":
        device = local(params[0]).device
        dtype = config.stats_dtype
        numels = [local_numel(p) for p in params]
        # The coordinate sample: fixed at attach so each coordinate's noise can be followed over steps. Under FSDP2
        # each rank samples its own shard.
        generator = torch.Generator().manual_seed(config.seed + (dist.rank if dist.sharded else 0))
        size = effective_sample_size(config, len(params))
        index = torch.stack([sample_coordinates(n, size, generator) for n in numels])
        units, members = resolve_units(names, config.group_by)
        owned = dist.owners(params)
        sampling = [o and n > 0 for o, n in zip(owned, numels)]
        # Each step's squared global norm is summed over ranks at checkpoints: one copy of each piece under
        # sharding (the owner weights), rank 0's alone under DDP (every rank holds the same reduced gradient).
        ddp_follower = dist.active and not dist.sharded and not dist.writer
        overrides: dict[str, Any] = {
            "warmup": spike.CALIBRATED_WARMUP,
            "false_alarm_rate": float(config.false_alarm_rate),
            "drift_streams": 1,  # the slow-divergence rule watches the loss
        }
        if config.spike_z is not None:
            overrides["threshold"] = float(config.spike_z)
            overrides["calibrated"] = False
        if config.spike_warmup is not None:
            overrides["warmup"] = int(config.spike_warmup)
        return cls(
            config=config,
            names=names,
            params=params,
            kinds=kinds,
            optimizer=optimizer,
            dist=dist,
            device=device,
            dtype=dtype,
            sample_size=size,
            sample_index=index,
            sample_index_dev=index.to(device),
            units=units,
            unit_members=members,
            owned=owned,
            owner=torch.tensor(owned, dtype=dtype).to(device),
            sampling=torch.tensor(sampling, dtype=dtype).to(device),
            norm_share=0.0 if ddp_follower else 1.0,
            spike_config=spike.SpikeConfig(**overrides),
        )

    @property
    def num_layers(self) -> int:
        return len(self.params)

    @property
    def grouped(self) -> bool:
        return len(self.units) != len(self.names)

    @property
    def numels(self) -> list[int]:
        return [local_numel(p) for p in self.params]

    def unit_index(self) -> np.ndarray:
        index = np.zeros(len(self.names), dtype=np.int64)
        for u, members in enumerate(self.unit_members):
            index[members] = u
        return index

    def by_unit(self, values: np.ndarray, merge: str, axis: int = 0) -> np.ndarray:
        """Per-tensor rows (along ``axis``) merged into per-unit rows by ``merge`` (``UNIT_MERGES``); unchanged
        when every tensor is its own unit."""
        if not self.grouped:
            return values
        op = UNIT_MERGES[merge]
        moved = np.moveaxis(values, axis, 0)
        initial = {np.add: 0.0, np.maximum: -np.inf, np.fmax: np.nan}[op]
        out = np.full((len(self.units), *moved.shape[1:]), initial, dtype=np.float64)
        op.at(out, self.unit_index(), moved)
        return np.moveaxis(out, 0, axis)

    def param_samples(self, dtype: torch.dtype) -> torch.Tensor:
        """The parameters' values at the sampled coordinates, ``(L, S)``."""
        if self._plain_params is None:
            plain = all(local(p) is p for p in self.params)
            # The list as the gathers read it (complex ones have no real samples), unless DTensors must be
            # localised at each read.
            self._plain_params = [None if p.is_complex() else p for p in self.params] if plain else []
        if not self._plain_params:  # DTensors: their local shards, taken at every call
            return gather_samples(self.params, self.sample_index_dev, dtype)
        return gather_samples(self._plain_params, self.sample_index_dev, dtype, prepared=True)


def effective_sample_size(config: MonitorConfig, num_layers: int) -> int:
    """Coordinates sampled per tensor for ``num_layers`` tensors: ``config.sample_size`` while the total stays
    within ``config.sample_budget``, else the budget shared out (at least ``MIN_SAMPLE_SIZE``, at most
    ``sample_size``)."""
    size = config.sample_size
    if config.sample_budget is None or num_layers * size <= config.sample_budget:
        return size
    return max(min(size, MIN_SAMPLE_SIZE), config.sample_budget // max(num_layers, 1))


def sample_coordinates(n: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """``size`` distinct coordinates of a tensor of ``n`` entries, sorted (every entry, repeated, when n < size).

    Drawn without materialising a permutation of n (a 500M-entry layer would need 4 GB for it): random draws,
    duplicates removed, topped up until there are enough.
    """
    if n < size:  # fewer entries than samples: every entry, repeated (docs/metrics.md)
        return torch.arange(size) % max(n, 1)
    if n <= 4 * size:
        return torch.randperm(n, generator=generator)[:size].sort().values
    chosen = torch.empty(0, dtype=torch.long)
    while chosen.numel() < size:
        draws = torch.randint(0, n, (size + size // 4 + 8,), generator=generator)
        chosen = torch.unique(torch.cat([chosen, draws]))
    keep = torch.randperm(chosen.numel(), generator=generator)[:size]
    return chosen[keep].sort().values


def resolve_units(names: list[str], group_by: Any) -> tuple[list[str], list[list[int]]]:
    """Output units: each tensor on its own, or groups of tensors named by ``group_by``.

    ``group_by`` is a callable from parameter name to group name, or a regex whose first match in a name is the
    group (``r"blocks\\.\\d+"`` makes one unit per transformer block); names it does not match stay on their own.
    """
    if group_by is None:
        return list(names), [[i] for i in range(len(names))]
    if callable(group_by):
        key = group_by
    else:
        pattern = re.compile(group_by)

        def key(name: str) -> str:
            found = pattern.search(name)
            return found.group(0) if found else name

    units: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        units.setdefault(str(key(name)), []).append(i)
    return list(units), list(units.values())
