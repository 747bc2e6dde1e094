"""Where the monitor's time goes inside a real training step: process CPU time per part, per step.

Trains a benchmark model (``_models.py``) with the monitor at its default configuration and times, with
``time.process_time``, the monitor's step view (the gradient pass: the C kernel on the CPU, Triton on CUDA, or
the torch pass; the optimizer-state reads) and each statistic family's hooks (``<family>.update`` before the
optimizer step, ``<family>.after_update`` after it, ``<family>.readout``/``metrics`` at checkpoints; the sample
kernel runs inside ``samples.update``), and the checkpoint. Parts nest (``_checkpoint`` contains the readouts);
``hooks`` is the whole of the monitor's own work, as ``benchmarks/overhead.py`` reports it. A breakdown, not a
figure against a goal: ``overhead.py`` measures the step-time overhead.

    python benchmarks/step_parts.py --threads 1                  # tiny GPT, 200 steps, every=100
    python benchmarks/step_parts.py --threads 1 --sample-code torch   # the sample estimators' torch code
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _models import MODELS, train_step, workload  # noqa: E402
from overhead import TimedMonitor  # noqa: E402

from heavytail import monitor as monitor_module  # noqa: E402

METHODS = ("_step_view", "_checkpoint")
FAMILY_HOOKS = ("on_backward", "on_gradients_final", "update", "after_update", "readout", "metrics")
HELPERS = ("denominators",)


def _timed(totals: dict[str, float], name: str, fn: Callable) -> Callable:
    def call(*args, **kwargs):
        start = time.process_time()
        try:
            return fn(*args, **kwargs)
        finally:
            totals[name] = totals.get(name, 0.0) + time.process_time() - start

    return call


class _OpCounter(TorchDispatchMode):
    """Counts the aten operations dispatched inside the functions it wraps."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0
        self.views = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        self.views += bool(func.is_view)
        return func(*args, **(kwargs or {}))

    def wrap(self, fn: Callable) -> Callable:
        def call(*args, **kwargs):
            with self:
                return fn(*args, **kwargs)

        return call


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--model", default="tiny", choices=MODELS)
    parser.add_argument("--steps", type=int, default=200, help="timed steps")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--sample-code",
        default="kernel",
        choices=("kernel", "torch"),
        help="the sample estimators as one kernel call (the default) or as their torch reference code",
    )
    args = parser.parse_args(argv)
    if args.steps < 1 or args.every < 1 or args.warmup < 0:
        parser.error("--steps and --every must be positive, --warmup non-negative")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")

    wl = workload(args.model, torch.device(args.device))
    model = wl.model(seed=0)
    opt = wl.optimizer(model)
    batches = wl.batches(count=8, seed=0)
    totals: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as log_dir:
        mon = TimedMonitor(model, opt, every=args.every, log_dir=log_dir)
        kernels = mon._kernels
        kernel = "torch pass" if kernels.gradient_pass is None else kernels.gradient_pass.__module__.rsplit(".", 1)[-1]
        if args.sample_code == "torch":
            kernels.samples = None
        samples = "torch code" if kernels.samples is None else kernels.samples.__name__.rsplit(".", 1)[-1]
        for name in METHODS:
            setattr(mon, name, _timed(totals, name, getattr(mon, name)))
        for family_name, family in mon.families.items():
            for hook in FAMILY_HOOKS:
                setattr(family, hook, _timed(totals, f"{family_name}.{hook}", getattr(family, hook)))
        originals = {name: getattr(monitor_module, name) for name in HELPERS}
        try:
            for name, fn in originals.items():
                setattr(monitor_module, name, _timed(totals, name, fn))
            for i in range(args.warmup):
                train_step(wl, model, opt, batches[i % len(batches)], on_loss=mon.observe_loss)
            totals.clear()
            mon.hook_seconds = 0.0
            cpu0 = time.process_time()
            for i in range(args.warmup, args.warmup + args.steps):
                train_step(wl, model, opt, batches[i % len(batches)], on_loss=mon.observe_loss)
            step_seconds = (time.process_time() - cpu0) / args.steps
            # One more step, untimed: how many torch operations the monitor's per-step work (before and after
            # optimizer.step()) dispatches, each one a kernel launch on CUDA except the views.
            counter = _OpCounter()
            mon._step_view = counter.wrap(mon._step_view)
            for family in mon.families.values():
                family.update, family.after_update = counter.wrap(family.update), counter.wrap(family.after_update)
            train_step(wl, model, opt, batches[0], on_loss=mon.observe_loss)
        finally:
            for name, fn in originals.items():
                setattr(monitor_module, name, fn)
        hooks = mon.hook_seconds / args.steps
        mon.close()

    print(
        f"model {args.model} on {args.device}, {torch.get_num_threads()} torch threads; gradient pass: {kernel}; "
        f"sample estimators: {samples}; {args.steps} steps, every={args.every}"
    )
    print(f"monitored step {step_seconds * 1e3:.2f} ms of CPU; monitor hooks {hooks * 1e3:.2f} ms")
    print(f"{'part':<28} {'ms/step':>9}")
    for name, seconds in sorted(totals.items(), key=lambda item: -item[1]):
        print(f"{name:<28} {seconds / args.steps * 1e3:>9.3f}")
    figures = {name: seconds / args.steps * 1e3 for name, seconds in totals.items()}
    figures["hooks"] = hooks * 1e3
    figures["ops"] = counter.ops
    print(
        f"torch operations dispatched per step (the step view, the families' updates): {counter.ops} "
        f"({counter.views} of them views)"
    )
    print(f"hooks_ms={hooks * 1e3:.2f} pass_ms={figures.get('_step_view', float('nan')):.2f} ops={counter.ops}")
    return figures


if __name__ == "__main__":
    main()
