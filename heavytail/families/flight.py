"""The flight recorder: each layer's norm, largest |g| and kurtosis, and the loss, over the last steps."""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import NamedTuple

import torch

from heavytail.backends.jsonl import dumps_record
from heavytail.estimators.gradient_pass import ABSMAX, COUNT, S1, S2, S3, S4
from heavytail.estimators.kurtosis import kurtosis_from_power_sums
from heavytail.families.base import Family, StepView


class FlightState(NamedTuple):
    layers: torch.Tensor  # (F, L, 3) float32 ring: norm, largest |g|, kurtosis per step
    loss: torch.Tensor  # (F,) float32 ring


class Flight(Family):
    """A ring of the last ``MonitorConfig.flight_steps`` steps on the device. At an alert a device-side copy is
    kept (no sync at alert time) and written at the next checkpoint as ``flight/<step>_<rule>.json`` next to the
    alert: what every layer did in the steps before it. No record keys."""

    name = "flight"

    def __init__(self, layout) -> None:
        super().__init__(layout)
        self.pending: list[tuple[dict, tuple[torch.Tensor, torch.Tensor, int]]] = []
        self.failures = 0

    def init(self) -> FlightState:
        F, L, dev = self.config.flight_steps, self.layout.num_layers, self.layout.device
        return FlightState(
            torch.full((F, L, 3), math.nan, device=dev, dtype=torch.float32),
            torch.full((F,), math.nan, device=dev, dtype=torch.float32),
        )

    def update(self, view: StepView) -> None:
        clean = view.clean
        kurt = kurtosis_from_power_sums(clean[:, COUNT], clean[:, S1], clean[:, S2], clean[:, S3], clean[:, S4])
        slot = view.step % self.config.flight_steps
        self.state.layers[slot] = torch.stack([view.layer_norm, clean[:, ABSMAX], kurt], dim=1).to(torch.float32)
        self.state.loss[slot] = view.loss.to(torch.float32)

    def snapshot(self, alert: dict, step: int) -> None:
        """Keep a device-side copy of the ring for ``alert``, raised at ``step`` (steps counted so far)."""
        self.pending.append((alert, (self.state.layers.clone(), self.state.loss.clone(), step)))

    def write(self, log_dir: Path) -> None:
        """Write the flight records of the alerts raised since the last call (checkpoints and close only)."""
        window = self.config.flight_steps
        for alert, (layers, loss, at_step) in self.pending:
            layers_np = layers.cpu().numpy()  # sync point: flight records are written at checkpoints
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
