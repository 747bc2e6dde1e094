"""The monitor's CPU cost per step, by statistic family: where the hooks' time goes on the overhead benchmark.

Trains the workload of ``benchmarks/overhead.py`` (the tiny GPT on the CPU, AdamW, ``every=100``, the default
configuration, ``observe_loss`` every step) and charges the process CPU time (``time.process_time_ns``) of every
call into the monitor to one line:

- ``<family>``: every hook of each family in ``heavytail.families.REGISTRY`` (``on_backward``,
  ``on_gradients_final``, ``update``, ``after_update``, ``readout``, ``metrics``, ``reset``), self time;
- ``spike detect``: the spike detectors' update (``estimators.spike.detect``, called by ``spikes``, whose line
  is the rest: packing the flag vector); ``alert rules``: the per-step rules on the flag vectors
  (``AlertEngine.process_step_flags``);
- ``step view``: the fused gradient pass and the masks of ``families.step.step_view``, less ``denominators``
  (reading the optimizer's state, its own line);
- ``packer``: the checkpoint's merge and one device-to-host copy (``families.packer.pack``);
- ``checkpoint``: the rest of the checkpoint (records, backends, alert rules, flight records), self time;
- ``monitor``: what is left of the hooks (schedule, ``observe_loss``, reading the flag vectors);
- ``hooks``: the whole of the monitor's hooks, as ``overhead.py`` reports it (``hooks_pct``).

Timings nest without double counting: each line is the time inside its calls less the time of the other lines'
calls inside them. Checkpoint work is amortised over ``--every`` steps. A breakdown for finding the cost, not a
figure against the goal (``overhead.py`` is that):

    python benchmarks/profile_families.py --threads 1                # 200 steps, every=100
    python benchmarks/profile_families.py --threads 1 --accumulate 2 # the gns and micro-batch noise sources on
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from typing import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _models import MODELS, train_step, workload  # noqa: E402
from overhead import TimedMonitor  # noqa: E402

from heavytail import families as families_module  # noqa: E402
from heavytail import monitor as monitor_module  # noqa: E402
from heavytail.estimators import spike as spike_module  # noqa: E402

FAMILY_HOOKS = ("on_backward", "on_gradients_final", "update", "after_update", "readout", "metrics", "reset")


class Profile:
    """Self CPU time per line: a stack of open lines, each call's time charged to its own line only."""

    def __init__(self) -> None:
        self.totals: dict[str, int] = {}
        self.calls: dict[str, int] = {}
        self._stack: list[list] = []  # [line, start, time of nested lines]

    def wrap(self, line: str, fn: Callable) -> Callable:
        def call(*args, **kwargs):
            frame = [line, time.process_time_ns(), 0]
            self._stack.append(frame)
            try:
                return fn(*args, **kwargs)
            finally:
                self._stack.pop()
                spent = time.process_time_ns() - frame[1]
                self.totals[line] = self.totals.get(line, 0) + spent - frame[2]
                self.calls[line] = self.calls.get(line, 0) + 1
                if self._stack:
                    self._stack[-1][2] += spent

        return call

    def clear(self) -> None:
        self.totals.clear()
        self.calls.clear()


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny", choices=MODELS)
    parser.add_argument("--steps", type=int, default=200, help="timed steps (a multiple of --every)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--accumulate", type=int, default=1, help="micro-batches a step (1 to 8)")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.every < 1 or args.warmup < 0 or args.steps % args.every:
        parser.error("--steps must be a positive multiple of --every, --warmup non-negative")
    if not 1 <= args.accumulate <= 8:
        parser.error("--accumulate must be 1 to 8 (the CPU batch has 8 sequences)")
    if args.threads:
        torch.set_num_threads(args.threads)

    wl = workload(args.model, torch.device("cpu"))
    model = wl.model(seed=0)
    opt = wl.optimizer(model)
    batches = wl.batches(count=8, seed=0)
    prof = Profile()
    patched = [
        (monitor_module, "denominators"),
        (monitor_module, "step_view"),
        (monitor_module, "pack"),
        (spike_module, "detect"),
    ]
    originals = [(module, name, getattr(module, name)) for module, name in patched]
    lines = {"denominators": "denominators", "step_view": "step view", "pack": "packer", "detect": "spike detect"}
    with tempfile.TemporaryDirectory() as log_dir:
        mon = TimedMonitor(model, opt, every=args.every, log_dir=log_dir)
        try:
            for module, name, fn in originals:
                setattr(module, name, prof.wrap(lines[name], fn))
            mon._checkpoint = prof.wrap("checkpoint", mon._checkpoint)
            mon.alerts.process_step_flags = prof.wrap("alert rules", mon.alerts.process_step_flags)
            for family_name, family in mon.families.items():
                for hook in FAMILY_HOOKS:
                    setattr(family, hook, prof.wrap(family_name, getattr(family, hook)))
            for i in range(args.warmup):
                train_step(
                    wl, model, opt, batches[i % len(batches)], on_loss=mon.observe_loss, accumulate=args.accumulate
                )
            prof.clear()
            mon.hook_seconds = 0.0
            cpu0 = time.process_time()
            for i in range(args.warmup, args.warmup + args.steps):
                train_step(
                    wl, model, opt, batches[i % len(batches)], on_loss=mon.observe_loss, accumulate=args.accumulate
                )
            step_ms = (time.process_time() - cpu0) / args.steps * 1e3
            hooks_ms = mon.hook_seconds / args.steps * 1e3
        finally:
            for module, name, fn in originals:
                setattr(module, name, fn)
        mon.close()

    figures = {line: ns / args.steps / 1e6 for line, ns in prof.totals.items()}
    # The taps hold the hooks bound at attach, so the schedule's own time is the hooks' less every line.
    figures["monitor"] = hooks_ms - sum(figures.values())
    order = [
        *families_module.REGISTRY,
        "spike detect",
        "alert rules",
        "step view",
        "denominators",
        "packer",
        "checkpoint",
        "monitor",
    ]
    print(
        f"model {args.model} on the CPU, {torch.get_num_threads()} torch threads; {args.steps} steps, "
        f"every={args.every}"
        + (f", {args.accumulate} micro-batches a step" if args.accumulate > 1 else "")
        + f"; the monitored step {step_ms:.1f} ms of CPU"
    )
    print(f"{'part':<14} {'CPU ms/step':>12} {'% of hooks':>11}")
    for line in order:
        if line in figures:
            print(f"{line:<14} {figures[line]:>12.3f} {100 * figures[line] / hooks_ms:>10.1f}%")
    print(f"{'hooks':<14} {hooks_ms:>12.3f} {100 * hooks_ms / step_ms:>10.2f}% of the monitored step")
    figures["hooks"] = hooks_ms
    print("profile " + " ".join(f"{line.replace(' ', '_')}={figures.get(line, 0.0):.3f}" for line in order))
    return figures


if __name__ == "__main__":
    main()
