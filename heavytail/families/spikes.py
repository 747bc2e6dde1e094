"""Spike detectors on the loss, the global gradient norm and each layer's norm; their flags reach the alert rules
one step later, with no wait."""

from __future__ import annotations

import collections
import math
from typing import Any, Mapping

import torch

from heavytail.estimators import spike
from heavytail.estimators.gradient_pass import COUNT, NONFINITE, RATIO_MAX, RATIO_SPIKES
from heavytail.families.base import Family, HostViews, Record, Slot, StepView
from heavytail.hooks.skip import NoSkip


class Spikes(Family):
    """One calibrated detector per stream (``estimators.spike.detect``): [loss, global norm, each layer's norm],
    each flagging a value over the threshold its own score tail gives for ``false_alarm_rate``, or a slow
    divergence. Each step's flags, scores, thresholds and the figures the per-step alert rules read (non-finite
    entries, hidden-spike fraction, largest ratio) are packed into one vector (``alerts.pack_step_flags``) and
    copied to the host asynchronously; the rules read it at the next step, or at the checkpoint, never waiting
    for the device between checkpoints. With ``skip_spikes`` a spike on the loss or the global norm undoes the
    step's update on the device (``hooks.skip.SkipStep``) and ``spikes/skipped_steps`` counts them; otherwise no
    record keys: its output is alerts."""

    name = "spikes"
    # v1 held a SpikeState; v2 the DetectorState of the calibrated detector; v3 adds its threshold; v4 the drift
    # rule's slow level; v5 the previous value (a drift flag needs two values over the gate)
    version = 5
    loads_versions = (4,)  # a v4 state resumes with no previous value: the next step cannot flag a drift
    report_sections = ("sec-alerts",)
    alert_rules = ("loss_spike", "grad_spike", "nonfinite_grad", "hidden_spike")

    def __init__(self, layout) -> None:
        super().__init__(layout)
        self.alerts: Any = None  # the monitor's AlertEngine (bind_alerts)
        self.pending: collections.deque = collections.deque()
        self.skip: Any = NoSkip()  # the monitor's SkipStep with skip_spikes (bind_skip)

    def init(self) -> spike.DetectorState:
        return spike.detector_init(
            2 + self.layout.num_layers, device=self.layout.device, config=self.layout.spike_config
        )

    def bind_alerts(self, engine: Any) -> None:
        self.alerts = engine

    def bind_skip(self, skip: Any) -> None:
        self.skip = skip

    def update(self, view: StepView) -> None:
        stats = view.stats
        gnorm = view.grad_norm
        streams = torch.cat(
            [view.loss.reshape(1), torch.where(torch.isfinite(gnorm), gnorm, math.nan).reshape(1), view.layer_norm]
        ).to(torch.float32)
        config = self.layout.spike_config
        prior = self.state  # the state this step is scored against: the alerts' forecast comes from it
        # The tails are refitted every REFIT_EVERY steps (by the step number, so a resumed run refits at the
        # same steps); in between each step is compared with the last fit's threshold.
        self.state, found = spike.detect(prior, streams, config, refit=view.step % spike.REFIT_EVERY == 0)
        # A spike (not a drift) on the loss or the global norm, past warm-up, undoes this step's update.
        self.skip.decide(spike.skip_factor(found.spike, prior.count, config.warmup))
        if not self.layout.dist.writer:
            return
        ok = view.ratio_ok
        # NaN (no hidden_spike) until the ratio counts (ratio_warmup), as in the record's adam/spike_frac.
        packed = self.alerts.pack_flags(
            flags=found.flags,
            scores=found.score,
            values=streams,
            thresholds=found.threshold,
            drift=found.drift & ~found.spike,  # a slow divergence only: a spike flag is a spike
            detector=prior.forecast,
            nonfinite=stats[:, NONFINITE],
            spike_frac=torch.where(ok, stats[:, RATIO_SPIKES] / stats[:, COUNT].clamp_min(1), math.nan),
            ratio_max=torch.where(ok, stats[:, RATIO_MAX], math.nan),
        )
        self._queue(packed, view.step + 1)

    def readout(self, step: int) -> dict[str, Slot]:
        skipped = self.skip.skipped()
        return {} if skipped is None else {"skipped": Slot(skipped.reshape(1), "max")}

    def reset(self) -> None:
        skipped = self.skip.skipped()
        if skipped is not None:
            skipped.zero_()

    def metrics(self, views: HostViews, record: Record) -> dict[str, float]:
        if not views.has(self.name, "skipped"):
            return {}
        return {"spikes/skipped_steps": float(views.get(self.name, "skipped")[0])}

    def _queue(self, packed: torch.Tensor, step: int) -> None:
        """Start the copy of this step's flags to the host; they are read at the next step (no waiting)."""
        if packed.device.type == "cuda":
            host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
            host.copy_(packed, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self.pending.append((host, event, step))
        else:
            self.pending.append((packed, None, step))

    def read_flags(self, wait: bool, before_step: int) -> None:
        """Run the alert rules on queued flag vectors of steps before ``before_step`` whose copy has landed."""
        pending = self.pending
        while pending:
            host, event, step = pending[0]
            if step >= before_step:
                return  # this step's own flags: read one step later
            if event is not None and not event.query():
                if not wait:
                    return
                event.synchronize()  # sync point: only at checkpoints and close
            pending.popleft()
            values = host.numpy()  # sync point: none, host memory already copied asynchronously
            self.alerts.process_step_flags(step, values, self.layout.names, self.layout.spike_config)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return dict(self.state._asdict())

    def load_state_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        tensors = dict(tensors)
        if "drift_previous" not in tensors:  # a version-4 state
            tensors["drift_previous"] = torch.full_like(tensors["drift_level"], math.nan)
        self.state = type(self.state)(**{k: v.to(self.layout.device) for k, v in tensors.items()})
