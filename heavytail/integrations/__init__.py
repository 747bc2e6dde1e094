"""Thin adapters that attach a monitor to a framework's trainer (hf, lightning, accelerate), imported only when used.

``import heavytail.integrations`` imports no framework: each adapter lives in its own module
(``heavytail.integrations.hf``, ``.lightning``, ``.accelerate``) and imports its framework there. This package
only holds the helpers they share (unwrapping models, optimizers and loss scalers), which need only torch.
"""

from __future__ import annotations

from heavytail.wrappers import loss_scaler, unwrap_model, unwrap_optimizer

__all__ = ["loss_scaler", "unwrap_model", "unwrap_optimizer"]
