"""Step-time overhead of heavytail against an unmonitored run, a one-read floor, a naive monitor and histograms.

Five variants of the same training step run in one process, interleaved round by round so that drift in the
machine's speed (other processes, thermal state, a GPU's clocks) hits every variant alike:

- ``baseline``: forward, backward, ``optimizer.step()``, ``zero_grad``.
- ``monitored``: the same under ``heavytail.Monitor(model, opt, every=EVERY)`` at its default configuration
  (every estimator streaming every step), ``observe_loss`` every step, records written to a temporary directory.
  Checkpoint steps are inside the timed steps: ``--steps`` must be a multiple of ``--every`` so each round holds
  the same number of checkpoints, and their cost is amortised exactly as in a run.
- ``floor``: one read of every gradient per step (``torch._foreach_norm``), nothing else: what any monitor that
  looks at every gradient entry must at least pay.
- ``naive``: a per-parameter Python loop with ``.item()``: norm and kurtosis from central moments, Hill's tail
  index from ``topk`` of each gradient.
- ``histogram``: what ``wandb.watch(model, log="gradients", log_freq=1)`` does per parameter and step: clone,
  finite checks, min/max ``.item()``, a 64-bin ``torch.histc``, the counts and edges to Python lists (no wandb).

Opt-in (``--variants ...,control``): ``control``, a second unmonitored copy; its difference from the baseline is
what two identical runs differ by on this machine, the resolution of the figures above. The monitored variant
also reports the CPU time spent inside the monitor's own hooks per step (``hooks_pct``), a direct measurement
of the same cost that the machine's drift disturbs less.

Each variant has its own copy of the model and optimizer, built from the same seed, and sees the same batches.
Per round each variant runs ``--steps`` steps after the warm-up; the figure of a round is its wall time per step
(CUDA: ``torch.cuda.synchronize`` and events around the round). Reported: the median over rounds, the overhead
against the baseline in %, and a last line ``overhead_pct=X floor_pct=Y naive_pct=Z histogram_pct=W``.

    python benchmarks/overhead.py                                    # CPU, tiny GPT (docs/performance.md)
    python benchmarks/overhead.py --device cuda --model gpt2-small   # GPT-2 124M, bf16 autocast, fused AdamW
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
from typing import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _models import MODELS, Workload, clone_model, train_step, workload  # noqa: E402

import heavytail  # noqa: E402

VARIANTS = ("baseline", "monitored", "floor", "naive", "histogram")
EXTRA_VARIANTS = ("control",)  # opt-in: a second unmonitored copy, whose "overhead" is the method's own noise


# ---------------------------------------------------------------- what each variant does after backward


def floor_read(params: list[torch.Tensor]) -> Callable[[], None]:
    """One read of every gradient entry, batched (one multi-tensor kernel on CUDA), no host sync."""

    def read() -> None:
        grads = [p.grad for p in params if p.grad is not None]
        torch._foreach_norm(grads)

    return read


def naive_monitor(named: list[tuple[str, torch.Tensor]]) -> Callable[[], None]:
    """What a monitor written without care does: a Python loop over parameters, numbers pulled to the host."""
    log: dict[str, float] = {}

    def measure() -> None:
        for name, p in named:
            g = p.grad.detach().float().reshape(-1)
            n = g.numel()
            log[f"norm/{name}"] = g.norm().item()
            centred = g - g.mean()
            m2 = centred.pow(2).mean()
            log[f"kurtosis/{name}"] = (centred.pow(4).mean() / (m2 * m2) - 3.0).item()
            if n >= 100:
                k = max(10, int(math.sqrt(n)))
                top = g.abs().topk(k + 1).values
                log[f"hill/{name}"] = (1.0 / torch.log(top[:k] / top[k]).mean()).item()

    return measure


def histogram_monitor(named: list[tuple[str, torch.Tensor]], bins: int = 64) -> Callable[[], None]:
    """``wandb.watch``'s per-parameter gradient histogram (wandb_torch.log_tensor_stats), without wandb."""
    log: dict[str, tuple[list, list]] = {}

    def measure() -> None:
        for name, p in named:
            flat = p.grad.detach().clone().reshape(-1)
            if flat.dtype not in (torch.float32, torch.float64):
                flat = flat.float()
            finite = torch.isfinite(flat)
            if not finite.any().item():
                continue
            if not finite.all().item():
                flat = flat[finite]
            tmin, tmax = flat.min().item(), flat.max().item()
            if tmin == tmax:
                log[name] = ([flat.numel()], [tmin, tmax])
                continue
            counts = flat.histc(bins=bins, min=tmin, max=tmax).cpu()
            edges = torch.linspace(tmin, tmax, steps=bins + 1)
            log[name] = (counts.tolist(), edges.tolist())

    return measure


class TimedMonitor(heavytail.Monitor):
    """The monitor with the time spent inside its own hooks measured (process CPU time; CPU runs only).

    The difference of step times is the figure that counts, but on a shared machine its noise (the floor variant
    swings by several percent between rounds) can exceed the overhead itself. Everything the monitor does runs
    inside these hooks, so their time per step is a second, direct measurement of the same cost, from the same
    process and the same steps; it misses only what the monitor does to the step around it (caches).
    """

    def __init__(self, *args, **kwargs) -> None:
        self.hook_seconds = 0.0
        super().__init__(*args, **kwargs)

    def _timed(self, fn, *args) -> None:
        start = time.process_time()
        try:
            fn(*args)
        finally:
            self.hook_seconds += time.process_time() - start

    def _on_backward_end(self) -> None:
        self._timed(super()._on_backward_end)

    def _before_step(self) -> None:
        self._timed(super()._before_step)

    def _after_step(self) -> None:
        self._timed(super()._after_step)

    def observe_loss(self, loss) -> None:
        self._timed(super().observe_loss, loss)


# ---------------------------------------------------------------- the benchmark


class Variant:
    """One variant: its own model and optimizer, and what runs after backward."""

    def __init__(
        self, name: str, wl: Workload, model: torch.nn.Module, log_dir: str, every: int, accumulate: int = 1
    ) -> None:
        self.name = name
        self.accumulate = accumulate
        self.wl = wl
        self.model = model
        self.opt = wl.optimizer(model)
        self.monitor = None
        self.after_backward: Callable[[], None] | None = None
        self.on_loss: Callable | None = None
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if name == "monitored":
            self.monitor = TimedMonitor(model, self.opt, every=every, log_dir=os.path.join(log_dir, "run"))
            self.on_loss = self.monitor.observe_loss
        elif name == "floor":
            self.after_backward = floor_read([p for _, p in named])
        elif name == "naive":
            self.after_backward = naive_monitor(named)
        elif name == "histogram":
            self.after_backward = histogram_monitor(named)
        elif name not in ("baseline", "control"):
            raise ValueError(f"unknown variant {name!r}")

    def run(self, batches: list, steps: int, start: int) -> None:
        for i in range(start, start + steps):
            train_step(
                self.wl,
                self.model,
                self.opt,
                batches[i % len(batches)],
                after_backward=self.after_backward,
                on_loss=self.on_loss,
                accumulate=self.accumulate,
            )

    def close(self) -> None:
        if self.monitor is not None:
            self.monitor.close()


def time_round(variant: Variant, batches: list, steps: int, start: int, device: torch.device) -> tuple[float, float]:
    """(wall seconds per step, process CPU seconds per step) of ``steps`` steps of ``variant``."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        cpu0 = time.process_time()
        begin.record()
        variant.run(batches, steps, start)
        end.record()
        torch.cuda.synchronize(device)
        return begin.elapsed_time(end) / 1e3 / steps, (time.process_time() - cpu0) / steps
    wall0, cpu0 = time.perf_counter(), time.process_time()
    variant.run(batches, steps, start)
    return (time.perf_counter() - wall0) / steps, (time.process_time() - cpu0) / steps


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--model", default="tiny", choices=MODELS)
    parser.add_argument("--steps", type=int, default=100, help="timed steps per variant and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per variant before the first round")
    parser.add_argument("--every", type=int, default=100, help="the monitor's checkpoint interval")
    parser.add_argument(
        "--accumulate",
        type=int,
        default=1,
        help="micro-batches per step (gradient accumulation: the batch split, each backward on loss / N); "
        "the monitor then reads the micro-batch noise sources (noise/microbatch_*, gns/)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument(
        "--clock",
        default="wall",
        choices=("wall", "cpu"),
        help="which time the last line reports: wall (default) or this process's CPU time, which "
        "other processes on a shared machine disturb less (CPU only: on CUDA the GPU sets "
        "the pace)",
    )
    parser.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help="comma-separated subset of " + ", ".join(VARIANTS) + " (baseline is always run), "
        "or 'control': an identical unmonitored copy, whose difference from the baseline "
        "shows how far two equal runs drift apart on this machine",
    )
    parser.add_argument(
        "--allow-cpu-gpt2",
        action="store_true",
        help="run gpt2-small on the CPU (batch 1 x 128: a smoke run, not a figure)",
    )
    args = parser.parse_args(argv)

    if args.accumulate < 1 or args.accumulate > 8:
        parser.error("--accumulate must be 1 to 8 (the CPU batch has 8 sequences)")
    if args.steps < 1 or args.rounds < 1 or args.every < 1 or args.warmup < 0:
        parser.error("--steps, --rounds and --every must be positive, --warmup non-negative")
    if args.steps % args.every:
        parser.error(
            f"--steps ({args.steps}) must be a multiple of --every ({args.every}) so every round holds "
            "the same number of checkpoints"
        )
    if args.clock == "cpu" and args.device == "cuda":
        parser.error("--clock cpu: on CUDA the step time is the GPU's; use the wall clock (CUDA events)")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if args.model == "gpt2-small" and args.device == "cpu" and not args.allow_cpu_gpt2:
        parser.error(
            "gpt2-small on the CPU takes minutes per step at batch 8 x 1024; run it with --device cuda, "
            "or pass --allow-cpu-gpt2 for a batch 1 x 128 smoke run"
        )
    if args.threads:
        torch.set_num_threads(args.threads)
    names = ["baseline"] + [v for v in args.variants.split(",") if v and v != "baseline"]
    for name in names:
        if name not in VARIANTS + EXTRA_VARIANTS:
            parser.error(f"unknown variant {name!r}")

    device = torch.device(args.device)
    wl = workload(args.model, device)
    torch.manual_seed(0)
    reference = wl.model(seed=0)
    batches = wl.batches(count=8, seed=0)
    num_params = wl.num_parameters(reference)
    num_tensors = sum(1 for p in reference.parameters() if p.requires_grad)
    describe = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU, {torch.get_num_threads()} torch threads, {os.cpu_count()} cores"
    )
    print(
        f"model {args.model}: {num_params / 1e6:.2f} M parameters in {num_tensors} tensors, batch "
        f"{wl.batch_size} x {wl.seq_len}, {'bf16 autocast, fused AdamW' if device.type == 'cuda' else 'AdamW'}; "
        f"{describe}; torch {torch.__version__}"
    )
    print(
        f"{args.rounds} rounds x {args.steps} steps per variant after {args.warmup} warm-up steps; "
        f"monitor every={args.every}" + (f"; {args.accumulate} micro-batches a step" if args.accumulate > 1 else "")
    )

    with tempfile.TemporaryDirectory() as log_dir:
        variants = []
        for name in names:
            model = clone_model(reference) if name != names[-1] else reference
            variants.append(Variant(name, wl, model, os.path.join(log_dir, name), args.every, args.accumulate))
        for v in variants:
            v.run(batches, args.warmup, 0)
        wall: dict[str, list[float]] = {v.name: [] for v in variants}
        cpu: dict[str, list[float]] = {v.name: [] for v in variants}
        hooks: list[float] = []  # CPU seconds per step inside the monitor's hooks, per round
        for r in range(args.rounds):
            start = args.warmup + r * args.steps
            order = variants if r % 2 == 0 else variants[::-1]  # alternate the order: no variant always goes first
            for v in order:
                before = v.monitor.hook_seconds if v.monitor is not None else 0.0
                w, c = time_round(v, batches, args.steps, start, device)
                wall[v.name].append(w)
                cpu[v.name].append(c)
                if v.monitor is not None:
                    hooks.append((v.monitor.hook_seconds - before) / args.steps)
            print(
                f"round {r + 1}: " + "  ".join(f"{v.name} {wall[v.name][-1] * 1e3:.1f} ms" for v in variants),
                flush=True,
            )
        checkpoints = variants[names.index("monitored")].monitor.step_count // args.every if "monitored" in names else 0
        for v in variants:
            v.close()

    base = statistics.median(wall["baseline"])
    base_cpu = statistics.median(cpu["baseline"])
    pct: dict[str, float] = {}
    print()
    print(f"{'variant':<11} {'ms/step':>10} {'overhead':>10} {'CPU ms/step':>12} {'CPU overhead':>13}")
    for name in names:
        med, med_cpu = statistics.median(wall[name]), statistics.median(cpu[name])
        pct[name] = 100.0 * (med - base) / base
        cpu_pct = 100.0 * (med_cpu - base_cpu) / base_cpu
        print(f"{name:<11} {med * 1e3:>10.2f} {pct[name]:>9.2f}% {med_cpu * 1e3:>12.2f} {cpu_pct:>12.2f}%")
    if "monitored" in names:
        print(f"(monitored: {checkpoints} checkpoints in all, one every {args.every} steps, inside the timed steps)")
        if device.type == "cpu":
            # Direct figure: CPU time inside the monitor's hooks over the baseline's CPU time per step.
            hook_ms = statistics.median(hooks) * 1e3
            print(
                f"monitor hooks: {hook_ms:.2f} ms of CPU per step, {100.0 * hook_ms / 1e3 / base_cpu:.2f}% of the "
                f"baseline step (median over rounds)"
            )
            print(f"hooks_pct={100.0 * hook_ms / 1e3 / base_cpu:.2f}")
    if args.clock == "cpu":
        pct = {name: 100.0 * (statistics.median(cpu[name]) - base_cpu) / base_cpu for name in names}
    figures = {f"{k}_pct": pct.get(k, math.nan) for k in ("monitored", "floor", "naive", "histogram")}
    print(
        f"overhead_pct={figures['monitored_pct']:.2f} floor_pct={figures['floor_pct']:.2f} "
        f"naive_pct={figures['naive_pct']:.2f} histogram_pct={figures['histogram_pct']:.2f}"
    )
    return figures


if __name__ == "__main__":
    main()
