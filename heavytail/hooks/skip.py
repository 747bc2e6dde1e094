"""Skipping an optimizer step on the device: the update is undone when the spike detectors fire, with no sync."""

from __future__ import annotations

import torch

__all__ = ["NoSkip", "SkipStep"]


class NoSkip:
    """``skip_spikes=False``: nothing is copied, nothing is undone."""

    def decide(self, factor: torch.Tensor) -> None:
        pass

    def restore(self) -> None:
        pass

    def skipped(self) -> torch.Tensor | None:
        return None


class SkipStep:
    """Undo one optimizer step when a 0-d device ``factor`` is 0, keep it when 1, without reading it on the host.

    Before the step (``decide``) every parameter and every floating optimizer-state tensor on the parameters'
    device (AdamW's ``exp_avg`` and ``exp_avg_sq``, momentum buffers, ...) is copied into a buffer; after the step
    (``restore``) each tensor becomes ``lerp(tensor, saved, 1 - factor)``, which is exactly the tensor after the
    step when factor is 1 and exactly the saved one when it is 0 (torch.lerp is exact at both ends). So a skipped
    step leaves the parameters and the optimizer's moments as they were, as OLMo-core's skip-step optimizers
    do; the optimizer's own step counter (a host or CPU number in most torch optimizers) still advances, which
    only shifts Adam's bias correction by one step. Cost: one copy of the parameters and of the optimizer
    state in memory, and a ``_foreach_copy_`` and a ``_foreach_lerp_`` per step; the user asks for it.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, device: torch.device) -> None:
        self.optimizer = optimizer
        self.device = device
        self._tensors: list[torch.Tensor] = []
        self._saved: list[torch.Tensor] = []
        self._known = -1  # optimizer state entries when the tensor list was built
        self._factor: torch.Tensor | None = None
        self.count = torch.zeros((), device=device, dtype=torch.float32)  # steps skipped since the last reset

    def _watched(self) -> list[torch.Tensor]:
        # Built again only when the optimizer's state gains parameters (its first step creates them); otherwise the
        # step path runs no Python loop over parameters.
        entries = len(self.optimizer.state)
        if entries != self._known:
            self._known = entries
            tensors = [p for group in self.optimizer.param_groups for p in group["params"]]
            for state in self.optimizer.state.values():
                tensors.extend(
                    v for v in state.values() if isinstance(v, torch.Tensor) and v.is_floating_point() and v.dim() > 0
                )
            self._tensors = [t for t in tensors if t.device == self.device]
            self._saved = [torch.empty_like(t) for t in self._tensors]
        return self._tensors

    def decide(self, factor: torch.Tensor) -> None:
        """Before ``optimizer.step()``: save the tensors the step changes; ``factor`` (0-d, 0 or 1) is read after."""
        tensors = self._watched()
        with torch.no_grad():
            torch._foreach_copy_(self._saved, tensors)
        self._factor = factor.to(self.device, torch.float32)
        self.count += 1.0 - self._factor

    def restore(self) -> None:
        """After ``optimizer.step()``: undo it where the factor was 0 (no host read of the factor)."""
        if self._factor is None:
            return
        weight = 1.0 - self._factor
        with torch.no_grad():
            # Only the tensors saved before this step: state the step itself created has nothing to return to.
            torch._foreach_lerp_(self._tensors, self._saved, [weight] * len(self._tensors))
        self._factor = None

    def skipped(self) -> torch.Tensor:
        """Steps skipped since the counter was last reset (a 0-d device tensor)."""
        return self.count
