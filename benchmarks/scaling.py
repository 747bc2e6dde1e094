"""How the monitor's per-step cost grows with the number of parameter tensors and with the parameter count.

The monitor's own step work is timed in isolation on fixed gradients: per step the three hooks a training step
triggers, ``_on_backward_end()`` (end of backward), ``_before_step()`` and ``_after_step()`` (around
``optimizer.step()``), on a model of N parameter tensors whose gradients are fixed Student-t(3) draws and whose
AdamW state (three real steps on earlier draws) gives every tensor a denominator, as in training: the step's
gradient is not the one the denominator was built from. Streaming steps and checkpoints are timed apart:
``stream`` is a step without a checkpoint, ``checkpoint`` one ``flush()`` (tail indices, the packed copy, the
record), and ``amortised`` = stream + checkpoint / EVERY is what a run at ``every=EVERY`` pays per step. For
scale, the table also gives the CPU time of the optimizer's own step on the same tensors (foreach AdamW).

Two sweeps: the same parameter count (``--total``, 4 M entries) split into 100, 1,000 and 10,000 tensors, and
100 tensors holding 1x, 4x and 16x ``--base`` (1 M) entries. The last line reads
``tensors_100_ms=... tensors_1000_ms=... tensors_10000_ms=... size_1x_ms=... size_4x_ms=... size_16x_ms=...``
(amortised ms per step). ``--profile N`` prints where the time goes at N tensors (cProfile, by own time).

    python benchmarks/scaling.py --threads 1
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _models import ManyTensors, heavy_tailed_like  # noqa: E402

import heavytail  # noqa: E402


def build(count: int, total: int, device: torch.device, log_dir: str) -> heavytail.Monitor:
    """A monitor over ``count`` tensors of ``total`` entries with fixed gradients and a stepped AdamW."""
    model = ManyTensors(count, total).to(device)
    gen = torch.Generator().manual_seed(1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    for _ in range(3):  # exp_avg_sq for every tensor (the denominator-ratio path runs), from earlier gradients
        for p in model.parameters():
            p.grad = heavy_tailed_like(p, gen)
        opt.step()
    for p in model.parameters():  # the step's own gradient, a new draw, as in training
        p.grad = heavy_tailed_like(p, gen)
    return heavytail.Monitor(model, opt, every=10**9, log_dir=log_dir)


def stream_step(mon: heavytail.Monitor) -> None:
    mon._on_backward_end()
    mon._before_step()
    mon._after_step()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(count: int, total: int, device: torch.device, steps: int, checkpoints: int) -> dict[str, float]:
    """Median seconds of a streaming step and of a checkpoint (wall; CPU time of this process alongside)."""
    with tempfile.TemporaryDirectory() as log_dir:
        mon = build(count, total, device, log_dir)
        for _ in range(3):
            stream_step(mon)
        wall, cpu = [], []
        for _ in range(steps):
            _sync(device)
            w0, c0 = time.perf_counter(), time.process_time()
            stream_step(mon)
            _sync(device)
            wall.append(time.perf_counter() - w0)
            cpu.append(time.process_time() - c0)
        # For scale: the optimizer's own step on the same tensors (foreach AdamW), what the run pays anyway.
        opt_cpu = []
        for _ in range(steps):
            c0 = time.process_time()
            mon.optimizer.step()
            _sync(device)
            opt_cpu.append(time.process_time() - c0)
        ckpt_wall, ckpt_cpu = [], []
        for _ in range(checkpoints):
            stream_step(mon)
            _sync(device)
            w0, c0 = time.perf_counter(), time.process_time()
            mon.flush()
            _sync(device)
            ckpt_wall.append(time.perf_counter() - w0)
            ckpt_cpu.append(time.process_time() - c0)
        mon.close()
    return {
        "stream": statistics.median(wall),
        "stream_cpu": statistics.median(cpu),
        "adamw_cpu": statistics.median(opt_cpu),
        "checkpoint": statistics.median(ckpt_wall),
        "checkpoint_cpu": statistics.median(ckpt_cpu),
    }


def profile(count: int, total: int, device: torch.device, steps: int, top: int = 25) -> str:
    """cProfile of ``steps`` streaming steps at ``count`` tensors, by own time."""
    with tempfile.TemporaryDirectory() as log_dir:
        mon = build(count, total, device, log_dir)
        stream_step(mon)
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(steps):
            stream_step(mon)
        prof.disable()
        mon.close()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(top)
    return out.getvalue()


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--total", type=int, default=4_000_000, help="entries in the tensor-count sweep")
    parser.add_argument("--counts", default="100,1000,10000", help="tensor counts of the first sweep")
    parser.add_argument("--base", type=int, default=1_000_000, help="entries of the 1x model in the size sweep")
    parser.add_argument("--size-count", type=int, default=100, help="tensors in the size sweep")
    parser.add_argument("--steps", type=int, default=10, help="timed streaming steps per configuration")
    parser.add_argument("--checkpoints", type=int, default=2, help="timed checkpoints per configuration")
    parser.add_argument("--every", type=int, default=100, help="checkpoint interval the amortised figure assumes")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--clock", default="wall", choices=("wall", "cpu"), help="time reported in the last line")
    parser.add_argument("--profile", type=int, default=0, metavar="N", help="also profile N tensors (cProfile)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    counts = [int(c) for c in args.counts.split(",")]
    print(
        f"{device}, {torch.get_num_threads()} torch threads, torch {torch.__version__}; default monitor "
        f"configuration; times are medians of {args.steps} steps / {args.checkpoints} checkpoints"
    )

    key = "" if args.clock == "wall" else "_cpu"
    rows = []
    for count in counts:
        rows.append(
            (f"tensors_{count}", count, args.total, measure(count, args.total, device, args.steps, args.checkpoints))
        )
    for factor in (1, 4, 16):
        total = args.base * factor
        rows.append(
            (
                f"size_{factor}x",
                args.size_count,
                total,
                measure(args.size_count, total, device, args.steps, args.checkpoints),
            )
        )

    print(
        f"{'case':<15} {'tensors':>8} {'entries':>11} {'stream ms':>10} {'CPU ms':>8} {'ckpt ms':>9} "
        f"{'amortised ms':>13} {'ns/entry':>9} {'AdamW CPU ms':>13}"
    )
    figures = {}
    for name, count, total, m in rows:
        amortised = m["stream" + key] + m["checkpoint" + key] / args.every
        figures[f"{name}_ms"] = amortised * 1e3
        print(
            f"{name:<15} {count:>8} {total:>11,} {m['stream'] * 1e3:>10.2f} {m['stream_cpu'] * 1e3:>8.2f} "
            f"{m['checkpoint'] * 1e3:>9.1f} {amortised * 1e3:>13.2f} {amortised / total * 1e9:>9.2f} "
            f"{m['adamw_cpu'] * 1e3:>13.2f}"
        )
    if args.profile:
        print(f"\nwhere a streaming step's time goes at {args.profile} tensors ({args.total:,} entries):")
        print(profile(args.profile, args.total, device, args.steps))
    print(" ".join(f"{k}={v:.2f}" for k, v in figures.items()))
    return figures


if __name__ == "__main__":
    main()
