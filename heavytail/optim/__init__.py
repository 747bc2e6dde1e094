"""Optimizers the comparison needs that torch lacks: Lion, and a Muon + AdamW hybrid built from one model."""

from heavytail.optim.lion import Lion
from heavytail.optim.muon import HEAD_NAMES, MuonWithAdamW, muon_with_adamw, split_params

__all__ = ["HEAD_NAMES", "Lion", "MuonWithAdamW", "muon_with_adamw", "split_params"]
