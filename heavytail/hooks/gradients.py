"""Gradient taps: a callback at the end of every backward pass that reaches the watched parameters."""

from __future__ import annotations

from typing import Callable, Sequence

import torch


class BackwardTap:
    """Calls ``on_backward_end()`` once after each backward pass, when every gradient has been accumulated, and then
    ``on_gradients_final()`` once the gradients are the ones the optimizer will see.

    A post-accumulate-grad hook (``Tensor.register_post_accumulate_grad_hook``) on a few *sentinel* parameters
    queues one callback on the autograd engine, which runs after the whole backward pass. Hooking a bounded
    number of sentinels (spread over the model) instead of every parameter keeps the per-backward Python cost
    constant at 10,000 tensors. The hooks never read or change ``.grad``.

    The two calls differ under DDP: its reducer finalises the gradient all-reduce in a callback it queued during
    the backward pass, after the first sentinel queued ours, so ``on_backward_end`` still sees this rank's own
    gradients. ``on_gradients_final`` runs from a callback queued by that first one, which the engine runs after
    every callback queued during the backward pass (DDP's and FSDP2's among them): the gradients are then the
    reduced ones, on every rank. Without data parallelism both see the same gradients.
    """

    def __init__(
        self,
        params: Sequence[torch.Tensor],
        on_backward_end: Callable[[], None],
        on_gradients_final: Callable[[], None] | None = None,
        sentinels: int = 16,
    ):
        self._on_backward_end = on_backward_end
        self._on_gradients_final = on_gradients_final
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
        if self._on_gradients_final is not None:
            # Callbacks queued by a running callback run after all those already queued (the engine re-reads
            # its list), so this one follows the reducers' finalisation.
            torch.autograd.Variable._execution_engine.queue_callback(self._final)

    def _final(self) -> None:
        with torch.no_grad():
            self._on_gradients_final()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


class LocalSampleTap:
    """Copies each parameter's gradient at its sampled coordinates as soon as it is accumulated.

    Under DDP the post-accumulate-grad hook sees this rank's own gradient, before the bucketed all-reduce
    replaces it with the average, so ``buffer[i]`` holds rank-local samples for the rank-noise estimator.
    One small gather per parameter per backward pass: used only when data parallelism makes it worth it.
    """

    def __init__(self, params: Sequence[torch.Tensor], sample_index: torch.Tensor, buffer: torch.Tensor):
        self._index = sample_index
        self._buffer = buffer
        self._handles = [p.register_post_accumulate_grad_hook(self._make_hook(i)) for i, p in enumerate(params)]

    def _make_hook(self, row: int) -> Callable[[torch.Tensor], None]:
        def hook(param: torch.Tensor) -> None:
            grad = param.grad
            if grad is None or grad.layout != torch.strided or grad.is_complex() or grad.numel() == 0:
                return
            with torch.no_grad():
                self._buffer[row].copy_(grad.reshape(-1)[self._index[row]])

        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
