"""The statistic-family protocol: state on the device, a step update, declared checkpoint slots, record keys."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Mapping, NamedTuple

import numpy as np
import torch

from heavytail.estimators.gradient_pass import Denominators, PassResult
from heavytail.layout import Layout


class Slot(NamedTuple):
    """One tensor a family hands to the checkpoint, and how it is merged.

    ``merge``: ``"sum"`` or ``"max"`` (all-reduced across ranks, one collective per kind for every family's
    slots together), or ``"none"`` (already the run's figure: computed at the checkpoint, gathered there if
    needed). ``varies_by_rank``: the ranks of a data-parallel (DDP) run disagree on it (each rank's own loss or
    micro-batches), so it is reduced under DDP too; every slot is reduced under sharding (FSDP2), where each rank
    holds a piece. ``units``: how its per-tensor rows (``axis``) merge into ``group_by`` units (``"sum"``,
    ``"max"``, ``"fmax"``), or None when it is not per tensor.
    """

    value: torch.Tensor
    merge: str = "sum"
    varies_by_rank: bool = False
    units: str | None = None
    axis: int = 0


@dataclass
class BackwardView:
    """What one backward pass left: this rank's gradients (local shards under FSDP2) and the rows with one."""

    grads: list[torch.Tensor | None]
    rows: list[int]
    accumulating: bool
    """Whether the step this pass belongs to has several micro-batches (known from the previous step)."""
    _reads: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def _measured(self) -> list[torch.Tensor | None]:
        """The gradients with None outside ``rows`` (the rows are local, dense and real)."""
        if len(self.rows) == len(self.grads):
            return self.grads
        keep = set(self.rows)
        return [g if i in keep else None for i, g in enumerate(self.grads)]

    def samples(self, layout: Layout) -> torch.Tensor:
        """``(L, S)`` this pass's gradients at the sampled coordinates in ``layout.dtype`` (0 where a tensor has
        none), as the backward hooks see them (scaled by a GradScaler): one scattered read, shared by the
        families that ask."""
        if "samples" not in self._reads:
            from heavytail.hooks.optimizer import gather_samples

            self._reads["samples"] = gather_samples(
                self._measured(), layout.sample_index_dev, layout.dtype, fill=0.0, prepared=True
            )
        return self._reads["samples"]

    def squared_norms(self, layout: Layout, with_samples: bool = False) -> torch.Tensor:
        """``(len(rows),)`` the squared norms of the gradients in ``rows`` (``unscaled_squared_norms``), read
        once per pass whoever asks. ``with_samples``: a later family will ask for ``samples`` too, which the CPU
        kernel then gathers in the same call, right after the stream."""
        if "squares" not in self._reads:
            fused = None
            if with_samples and layout.kernels is not None and "samples" not in self._reads:
                fused = layout.kernels.sums_of_squares_and_gather(
                    self._measured(), layout.sample_index_dev, layout.dtype, 0.0
                )
            if fused is None:
                self._reads["squares"] = unscaled_squared_norms(layout, [self.grads[i] for i in self.rows])
            else:
                squares, self._reads["samples"] = fused
                if len(self.rows) < len(self.grads):
                    squares = squares[self.rows]
                self._reads["squares"] = unscaled_squares(layout, squares.to(layout.dtype))
        return self._reads["squares"]


@dataclass
class StepView:
    """One optimizer step as the families see it, built once before ``optimizer.step()``.

    The fused gradient pass's statistics and samples, the denominators, the step's loss, and the masks every
    family agrees on. Families may add what later families read (``extra``), e.g. the denominator events.
    """

    step: int
    """Steps counted before this one (the 0-based index of this step)."""
    row: int
    """This step's index inside the checkpoint interval."""
    checkpoint_next: bool
    """Whether this step ends an interval (a host-side count: the checkpoint-only work runs on it)."""
    grads: list[torch.Tensor | None]
    denominators: Denominators | None
    result: PassResult
    valid: torch.Tensor
    """``(L,)`` bool: the tensor had entries, all finite."""
    clean: torch.Tensor
    """The pass statistics with invalid rows zeroed."""
    ratio_ok: torch.Tensor
    """``(L,)`` bool: the denominator ratio counts this step (valid, finite, past ``ratio_warmup``)."""
    entries: torch.Tensor
    loss: torch.Tensor
    """The step's mean observed loss (NaN when none was observed)."""
    layer_norm: torch.Tensor
    """``(L,)`` each tensor's gradient norm (NaN where invalid)."""
    grad_norm: torch.Tensor
    """The global gradient norm of this rank's pieces."""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def stats(self) -> torch.Tensor:
        return self.result.stats

    @property
    def grad_samples(self) -> torch.Tensor:
        return self.result.grad_samples


class HostViews:
    """A checkpoint's slots on the host, merged across ranks, by family and slot name."""

    def __init__(self, layout: Layout, slots: Mapping[str, Mapping[str, Slot]], arrays: Mapping[str, np.ndarray]):
        self.layout = layout
        self._slots = slots
        self._arrays = arrays

    def has(self, family: str, name: str) -> bool:
        return f"{family}.{name}" in self._arrays

    def get(self, family: str, name: str) -> np.ndarray:
        """The slot's values (per tensor where it is per tensor), in the slot's shape."""
        return self._arrays[f"{family}.{name}"]

    def units(self, family: str, name: str, values: np.ndarray | None = None) -> np.ndarray:
        """The slot (or ``values`` shaped like it) merged into output units as the slot declares."""
        slot = self._slots[family][name]
        values = self.get(family, name) if values is None else values
        return values if slot.units is None else self.layout.by_unit(values, slot.units, slot.axis)


@dataclass
class Record:
    """The context of one checkpoint record: its interval and the other families' views."""

    views: HostViews
    steps_in_interval: int
    """Optimizer steps since the last record (a host count)."""
    total_steps: float
    """Steps the interval's merged figures count (the loss family's step counter)."""
    skips: Mapping[str, int]
    """Gradients skipped this interval by kind (``sparse``, ``complex``): (tensor, step) pairs."""
    log_dir: Path | None = None
    """The run directory, for a family that writes a file of its own next to the records (``tails``)."""


class Family:
    """A statistic family: state on the device, updated each step with no host read, read out at checkpoints.

    A family is one file under ``heavytail/families/`` and one line of ``REGISTRY``. The monitor calls, in the
    registry's order: ``on_backward`` after each backward pass, ``on_gradients_final`` once a backward pass's
    gradients are final (reduced), ``update`` before each optimizer step, ``after_update`` after it,
    ``readout`` at each checkpoint (its slots are merged across ranks and copied to the host with every other
    family's in one copy), ``metrics`` on the host views, then ``reset``. Every hook but ``metrics`` runs on
    device tensors only. ``state`` is a NamedTuple (or dict) of tensors; ``host_state`` the few host numbers
    that go with it in ``state_dict``.
    """

    name: ClassVar[str]
    version: ClassVar[int] = 1
    loads_versions: ClassVar[tuple[int, ...]] = ()
    """Earlier versions of this family's saved state that ``load_state_tensors`` upgrades (a resumed run then
    goes on from a checkpoint an earlier heavytail wrote); any other version is refused."""
    report_sections: ClassVar[tuple[str, ...]] = ()
    """The ids of the report sections (``heavytail.report.sections.SECTIONS``) that draw this family's keys."""
    alert_rules: ClassVar[tuple[str, ...]] = ()
    """The alert rules (``heavytail.alerts``) this family's figures feed."""
    every_backward: bool = False
    """Whether ``on_backward`` runs after every backward pass; else only under gradient accumulation (the
    monitor knows it from the previous step: the first accumulating step is not seen)."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self.config = layout.config
        self.state = self.init()

    @classmethod
    def wanted(cls, layout: Layout) -> bool:
        """Whether this run needs the family at all (a family that could never record anything is left out)."""
        return True

    def init(self) -> Any:
        return ()

    def on_backward(self, view: BackwardView) -> None:
        pass

    def on_gradients_final(self, view: BackwardView) -> None:
        pass

    def drop_step(self) -> None:
        """The backward passes since the last step ended in no update (a ``GradScaler`` skipped the step on
        inf/NaN gradients): forget what ``on_backward`` kept of them."""

    def update(self, view: StepView) -> None:
        pass

    def after_update(self) -> None:
        pass

    def readout(self, step: int) -> dict[str, Slot]:
        """The slots this checkpoint (after ``step`` steps) hands to the packer, by name."""
        return {}

    def metrics(self, views: HostViews, record: Record) -> dict[str, float]:
        return {}

    def reset(self) -> None:
        pass

    # state_dict: the state's tensors by field name, and host_state.

    def host_state(self) -> dict[str, Any]:
        return {}

    def load_host_state(self, state: Mapping[str, Any]) -> None:
        pass

    def state_tensors(self) -> dict[str, torch.Tensor]:
        state = self.state
        items = state._asdict() if hasattr(state, "_asdict") else dict(state) if isinstance(state, dict) else {}
        return {k: v for k, v in items.items() if isinstance(v, torch.Tensor)}

    def load_state_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        current = self.state_tensors()
        for key, value in tensors.items():
            if key not in current or current[key].shape != value.shape:
                raise ValueError(
                    f"Monitor.load_state_dict: {self.name} state {key!r} does not match this monitor's configuration"
                )
        # copies: the kernels update the states in place, and the caller's dict must not change with them
        loaded = {k: v.to(current[k].device, current[k].dtype, copy=True) for k, v in tensors.items()}
        if not loaded:
            return
        if hasattr(self.state, "_replace"):
            self.state = self.state._replace(**loaded)
        else:
            self.state.update(loaded)


def unscaled(layout: Layout, values: torch.Tensor) -> torch.Tensor:
    """``values`` read from gradients before the GradScaler unscaled them, divided by its scale on the device.

    Backward hooks (and DDP's local gradients) see the scaled gradients; the optimizer step sees them unscaled.
    Samples kept from the former next to the latter, or across steps whose scale changed (the scaler halves it at
    every skipped step and doubles it every ``growth_interval`` steps), must be unscaled first. The scale is
    never read on the host."""
    scaler = layout.scaler
    if scaler is not None and getattr(scaler, "_scale", None) is not None and scaler.is_enabled():
        return values / scaler._scale.to(values.dtype)
    return values


def unscaled_squared_norms(layout: Layout, tensors: list[torch.Tensor]) -> torch.Tensor:
    """Each tensor's squared norm in ``layout.dtype`` (the fused kernel where there is one, else torch), divided
    by the GradScaler's squared scale on the device (hooks see scaled gradients; the scale is never read)."""
    squares = layout.kernels.sums_of_squares(tensors) if layout.kernels is not None else None
    if squares is not None:
        squares = squares.to(layout.dtype)
    else:
        norms = torch.stack(torch._foreach_norm(tensors)).to(layout.dtype)
        squares = norms * norms
    return unscaled_squares(layout, squares)


def unscaled_squares(layout: Layout, squares: torch.Tensor) -> torch.Tensor:
    """Squared norms read from scaled gradients divided by the GradScaler's squared scale, on the device."""
    scaler = layout.scaler
    if scaler is not None and getattr(scaler, "_scale", None) is not None and scaler.is_enabled():
        scale = scaler._scale.to(squares.dtype)
        squares = squares / (scale * scale)
    return squares


def measurable_gradients(params: list[torch.Tensor]) -> tuple[list[torch.Tensor | None], dict[str, int]]:
    """Each parameter's gradient as the families read it (this rank's local piece), None where there is none or
    it cannot be measured, and how many were skipped by kind (sparse and complex gradients)."""
    from heavytail.distributed import local

    grads: list[torch.Tensor | None] = []
    skipped = {"sparse": 0, "complex": 0}
    for p in params:
        g = p.grad
        if g is not None:
            g = local(g)
            if g.layout != torch.strided:
                skipped["sparse"] += 1
                g = None
            elif g.is_complex():
                skipped["complex"] += 1
                g = None
        grads.append(g)
    return grads, skipped
