"""The flight recorder: each layer's norm, largest |g| and kurtosis, and the loss, over the last steps."""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import NamedTuple

import torch

from heavytail.backends.jsonl import dumps_record
from heavytail.estimators.gradient_pass import ABSMAX
from heavytail.estimators.kurtosis import kurtosis_from_power_sums
from heavytail.families.base import Family, StepView


class FlightState(NamedTuple):
    layers: torch.Tensor  # (F, L, 6) ring: the pass's count, power sums s1-s4 and largest |g| per step
    loss: torch.Tensor  # (F,) float32 ring


class Flight(Family):
    """A ring of the last ``MonitorConfig.flight_steps`` steps on the device. At an alert a device-side copy is
    kept (no sync at alert time) and written at the next checkpoint as ``flight/<step>_<rule>.json`` next to the
    alert: what every layer did in the steps before it. No record keys."""

    name = "flight"
    version = 2  # the ring keeps the pass's sums; norms and kurtosis are computed when a record is written

    def __init__(self, layout) -> None:
        super().__init__(layout)
        self.pending: list[tuple[dict, tuple[torch.Tensor, torch.Tensor, int]]] = []
        self.failures = 0

    def init(self) -> FlightState:
        F, L, dev = self.config.flight_steps, self.layout.num_layers, self.layout.device
        return FlightState(
            # The pass's own columns, in its dtype (float64 where the device has it: s4 of large gradients
            # overflows float32), copied as they are: one copy a step, the arithmetic left to the rare write.
            torch.full((F, L, ABSMAX + 1), math.nan, device=dev, dtype=self.config.stats_dtype),
            torch.full((F,), math.nan, device=dev, dtype=torch.float32),
        )

    def update(self, view: StepView) -> None:
        slot = view.step % self.config.flight_steps
        self.state.layers[slot] = view.clean[:, : ABSMAX + 1]  # invalid tensors' rows are zero (count 0)
        self.state.loss[slot] = view.loss

    def snapshot(self, alert: dict, step: int) -> None:
        """Keep a device-side copy of the ring for ``alert``, raised at ``step`` (steps counted so far)."""
        self.pending.append((alert, (self.state.layers.clone(), self.state.loss.clone(), step)))

    def write(self, log_dir: Path) -> None:
        """Write the flight records of the alerts raised since the last call (checkpoints and close only)."""
        window = self.config.flight_steps
        for alert, (layers, loss, at_step) in self.pending:
            layers_np = series(layers.cpu()).numpy()  # sync point: flight records are written at checkpoints
            loss_np = loss.cpu().numpy()  # sync point: same
            steps = list(range(max(0, at_step - window), at_step))
            slots = [s % window for s in steps]
            record = {
                "step": alert["step"],
                "rule": alert["rule"],
                "layers": self.layout.names,
                "steps": [s + 1 for s in steps],
                "series": {
                    # Host numpy arrays (copied above), so these tolist() calls read no device memory.
                    "grad/norm": [layers_np[k, :, 0].tolist() for k in slots],  # sync point: host data
                    "grad/max": [layers_np[k, :, 1].tolist() for k in slots],  # sync point: host data
                    "grad/kurtosis": [layers_np[k, :, 2].tolist() for k in slots],  # sync point: host data
                    "loss": [float(loss_np[k]) for k in slots],
                },
            }
            path = log_dir / alert["flight_record"]
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(path.name + ".tmp")  # whole or absent, even if the run dies mid-write
                tmp.write_text(dumps_record(record))
                os.replace(tmp, path)
            except OSError as exc:
                self.failures += 1
                if self.failures == 1:
                    warnings.warn(
                        f"heavytail: could not write flight record {path}: {exc}; further failures are not reported",
                        RuntimeWarning,
                        stacklevel=2,
                    )
        self.pending = []


def series(ring: torch.Tensor) -> torch.Tensor:
    """``(F, L, 3)`` float32 norm, largest |g| and excess kurtosis per step and tensor from the ring's pass columns
    ``(F, L, 6)``: NaN norm and kurtosis where a tensor had no valid gradient (count 0), as the step's
    ``layer_norm``."""
    count, s1, s2, s3, s4, absmax = ring.to(torch.float64).unbind(dim=-1)
    norm = torch.where(count > 0, s2.sqrt(), math.nan)
    kurt = kurtosis_from_power_sums(count, s1, s2, s3, s4)
    return torch.stack([norm, absmax, kurt], dim=-1).to(torch.float32)
