"""Gradient taps: a callback at the end of every backward pass that reaches the watched parameters."""

from __future__ import annotations

from typing import Callable, Sequence

import torch


class BackwardTap:
    """Calls ``on_backward_end()`` once after each backward pass, when every gradient has been accumulated.

    A post-accumulate-grad hook (``Tensor.register_post_accumulate_grad_hook``) on a few *sentinel* parameters
    queues one callback on the autograd engine, which runs after the whole backward pass. Hooking a bounded
    number of sentinels (spread over the model) instead of every parameter keeps the per-backward Python cost
    constant at 10,000 tensors. The hooks never read or change ``.grad``.
    """

    def __init__(self, params: Sequence[torch.Tensor], on_backward_end: Callable[[], None], sentinels: int = 16):
        self._on_backward_end = on_backward_end
        self._queued = False
        stride = max(1, len(params) // sentinels)
        chosen = list(params)[::stride][:sentinels]
        self._handles = [p.register_post_accumulate_grad_hook(self._hook) for p in chosen]

    def _hook(self, _param: torch.Tensor) -> None:
        if not self._queued:
            self._queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._end)

    def _end(self) -> None:
        self._queued = False
        with torch.no_grad():
            self._on_backward_end()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
