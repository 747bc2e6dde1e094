"""The sample families' step in one kernel call: denominator memory, shadow denominators, temporal noise, the
ratio's percentile."""

from __future__ import annotations

from typing import Mapping

from heavytail.families.base import Family, StepView
from heavytail.kernels import UNAVAILABLE


class SampleGroup(Family):
    """Runs the per-step updates of the families that read the sampled coordinates: ``memory``, ``shadow``, the
    temporal source of ``noise`` and the 99th percentile of ``ratio``.

    On the CPU (C) and CUDA (Triton) one ``sample_step`` kernel call does all of them, instead of about 250 small
    torch operations; without a kernel, or once it has failed, each member's own torch code runs, and that code
    stays the reference the kernels are tested against. Leaves ``ratio_p99`` (``(L,)``), ``events_adam`` and
    ``events_shadow`` (``(L, S)`` 0/1 masks of the denominator events, None when absent) in ``view.extra`` for
    the ``ratio`` and ``update`` families. No state and no record keys of its own.
    """

    name = "samples"

    def bind(self, families: Mapping[str, Family]) -> None:
        self.memory, self.shadow = families["memory"], families["shadow"]
        self.noise, self.ratio = families["noise"], families["ratio"]

    def update(self, view: StepView) -> None:
        kernels = self.layout.kernels
        out = (
            UNAVAILABLE if kernels.samples is None else kernels.call("samples", "sample_step", **self._arguments(view))
        )
        if out is not UNAVAILABLE:
            self.noise.slots["temporal"] += 1
            self.noise.pushed("temporal")
            view.extra.update(
                ratio_p99=out.quantile,
                events_adam=None if view.denominators is None else out.events[0],
                events_shadow=out.events[1],
            )
            return
        view.extra.update(
            ratio_p99=self.ratio.quantile(view),
            events_adam=self.memory.update_adam(view),
            events_shadow=self.shadow.advance(view.grad_samples, view.valid, self.memory),
        )
        self.noise.advance_temporal(view.grad_samples, view.valid)

    def _arguments(self, view: StepView) -> dict:
        res, den = view.result, view.denominators
        memory, shadow, noise = self.memory.state, self.shadow.state, self.noise.state
        return dict(
            g=res.grad_samples,
            valid=view.valid,
            ratio=None if den is None else res.ratio_samples,
            den=None if den is None else res.denom_samples,
            bias_correction=None if den is None else den.bias_correction,
            ratio_ok=view.ratio_ok,
            memory=[tuple(memory.adam), tuple(memory.shadow)],
            memory_sum=memory.sums,
            betas=self.shadow.betas,
            shadow_bias=self.shadow.bias(),
            shadow_v=shadow.v,
            shadow_t=shadow.t,
            shadow_sum=shadow.spike_sum,
            shadow_max=shadow.maxes,
            noise_mean=noise["mean"],
            noise_seen=noise["seen"],
            ring=noise["temporal"],
            ring_valid=noise["temporal_valid"],
            slot=self.noise.slots["temporal"],
            threshold=self.config.spike_threshold,
            inflation=self.config.memory_inflation,
            noise_beta=self.config.noise_beta,
            q=0.99,
            shadow_warmup=self.shadow.warmup,
        )
