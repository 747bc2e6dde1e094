"""Thin adapters that attach a monitor to a framework's trainer (hf, lightning, accelerate), imported only when used.

``import heavytail.integrations`` imports no framework: each adapter lives in its own module
(``heavytail.integrations.hf``, ``.lightning``, ``.accelerate``) and imports its framework there. This package
only holds the helpers they share (unwrapping models, optimizers and loss scalers), which need only torch.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Mapping

from heavytail import runfiles
from heavytail.wrappers import loss_scaler, unwrap_model, unwrap_optimizer

__all__ = ["explicit_run_dir_choice", "follow_trainer", "loss_scaler", "unwrap_model", "unwrap_optimizer"]


def explicit_run_dir_choice(monitor_kwargs: Mapping[str, Any]) -> bool:
    """Whether the user chose what happens to an existing run directory (``resume`` or ``overwrite`` given, or a
    ``config`` with either set); then the integration leaves the choice alone."""
    config = monitor_kwargs.get("config")
    from_config = config is not None and (config.resume or config.overwrite)
    return "resume" in monitor_kwargs or "overwrite" in monitor_kwargs or bool(from_config)


def follow_trainer(fields: dict[str, Any], explicit: bool, *, resuming: bool, trainer: str) -> None:
    """Set ``resume``/``overwrite`` in a monitor's config ``fields`` the way the trainer treats its own output: a
    run resumed from a checkpoint continues the records; a new run replaces an earlier run's records (with a
    warning), as the trainer replaces its checkpoints. Nothing changes when the user chose (``explicit``)."""
    if explicit:
        return
    if resuming:
        fields["resume"], fields["overwrite"] = True, False
        return
    fields["resume"], fields["overwrite"] = False, True
    log_dir = Path(fields["log_dir"])
    if runfiles.existing_run(log_dir):
        warnings.warn(
            f"heavytail: a new {trainer} run in the same output directory: replacing the records of "
            f"{runfiles.describe_existing(log_dir)} in {log_dir}; pass resume=True to continue them or another "
            "log_dir to keep them",
            RuntimeWarning,
            stacklevel=3,
        )
