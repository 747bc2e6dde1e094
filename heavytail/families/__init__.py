"""Statistic families: one file each, named in ``REGISTRY`` in the order the monitor runs them.

A family keeps its state on the gradients' device, updates it at each step with no host read, declares the
tensors it hands to each checkpoint and how they merge (``Slot``), and turns their host values into record keys.
See ``base.Family`` for the protocol and docs/architecture.md for the path of one gradient through them.
"""

from __future__ import annotations

from heavytail.families.base import BackwardView, Family, HostViews, Record, Slot, StepView
from heavytail.families.flight import Flight
from heavytail.families.gns import Gns
from heavytail.families.lion import Lion
from heavytail.families.loss import Loss
from heavytail.families.memory import Memory
from heavytail.families.moments import Moments
from heavytail.families.muon import Muon
from heavytail.families.noise import Noise
from heavytail.families.preclip import Preclip
from heavytail.families.probe import Probe
from heavytail.families.ratio import Ratio
from heavytail.families.samples import SampleGroup
from heavytail.families.shadow import Shadow
from heavytail.families.spikes import Spikes
from heavytail.families.tails import Tails
from heavytail.families.updates import Updates

# The step order matters where a family reads what an earlier one left in the step view: the sample group
# leaves the ratio's percentile and the denominator events for ``ratio`` and ``updates``.
REGISTRY: dict[str, type[Family]] = {
    "moments": Moments,
    "preclip": Preclip,
    "samples": SampleGroup,
    "memory": Memory,
    "shadow": Shadow,
    # gns before noise: its first-pass read streams every gradient through the cache, so the noise family's
    # scattered reads of the same pass that follow are cache hits (a third of their cost on the CPU).
    "gns": Gns,
    "noise": Noise,
    "ratio": Ratio,
    "lion": Lion,
    "updates": Updates,
    "loss": Loss,
    "spikes": Spikes,
    "flight": Flight,
    "tails": Tails,
    "muon": Muon,
    "probe": Probe,
}


def build(layout) -> dict[str, Family]:
    """The families this run needs, in registry order, with the sample group bound to its members."""
    families = {name: cls(layout) for name, cls in REGISTRY.items() if cls.wanted(layout)}
    families["samples"].bind(families)
    return families


__all__ = ["REGISTRY", "BackwardView", "Family", "HostViews", "Record", "Slot", "StepView", "build"]
