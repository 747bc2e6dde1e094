"""The injected-spike demo with and without ``Monitor(..., skip_spikes=True)``: the loss after a garbage batch."""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

import heavytail as ht
from heavytail.demo import demo_loss, warmup_steps
from heavytail.workload import build_demo


def train(workload, steps: int, spike_at: int, skip: bool, log_dir: Path, lr: float, scale: float):
    """AdamW on the demo GPT; batch ``spike_at`` is replaced by uniformly random tokens (a garbage batch) whose
    loss is multiplied by ``scale`` (1: as it comes). Returns per-step losses, held-out losses at each step after
    the spike (every 10), the alerts and the skipped-step counts of the records."""
    model = workload.new_model()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    warm = warmup_steps(steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: min(1.0, (t + 1) / warm))
    vocab = workload.model_config.vocab_size
    gen = torch.Generator().manual_seed(1)
    losses, held, alerts = [], {}, []
    with ht.Monitor(model, opt, every=50, log_dir=log_dir, skip_spikes=skip, probe_every=0) as mon:
        mon.on_alert(alerts.append)
        for step in range(steps):
            x, y = workload.batches.get(step)
            if step == spike_at:
                x = torch.randint(0, vocab, x.shape, generator=gen)
                y = torch.randint(0, vocab, y.shape, generator=gen)
            _, loss = model(x, y)
            if step == spike_at:
                loss = loss * scale
            loss.backward()
            mon.observe_loss(loss)
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
            losses.append(float(loss.detach()))
            if step >= spike_at - 1 and (step - spike_at) % 10 == 0:
                with torch.no_grad():
                    held[step] = float(demo_loss(model, workload.held_out))
    records = [r for r in (log_dir / "metrics.jsonl").read_text().splitlines() if r.strip()]
    skipped = sum(json.loads(r)["metrics"].get("spikes/skipped_steps", 0.0) or 0.0 for r in records)
    return losses, held, alerts, skipped


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size", default="small", help="demo model size (tiny for a smoke run)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--spike-at", type=int, default=200)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--scale", type=float, default=1.0, help="multiply the garbage batch's loss by this")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    workload = build_demo(seed=0, steps=args.steps, size=args.size)
    s = args.spike_at
    print(
        f"demo GPT ({args.size}), AdamW lr={args.lr:g}, {args.steps} steps, a batch of random tokens at step {s}"
        f" (its loss x{args.scale:g})"
    )
    print(
        f"{'skip_spikes':>11s} {'loss@s-1':>9s} {'loss@s':>8s} {'train+50':>9s} "
        + " ".join(f"{'held@+' + str(k):>9s}" for k in (0, 10, 50))
        + "  skipped  spike alerts"
    )
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for skip in (False, True):
            start = time.perf_counter()
            losses, held, alerts, skipped = train(
                workload, args.steps, s, skip, Path(tmp) / f"skip_{skip}", args.lr, args.scale
            )
            spikes = [
                (a["step"], a["rule"], int(a.get("skipped_step", 0)))
                for a in alerts
                if a["rule"] in ("loss_spike", "grad_spike")
            ]
            train50 = sum(losses[s + 45 : s + 56]) / len(losses[s + 45 : s + 56])
            print(
                f"{str(skip):>11s} {losses[s - 1]:9.4f} {losses[s]:8.3f} {train50:9.4f} "
                + " ".join(f"{held.get(s + k, float('nan')):9.4f}" for k in (0, 10, 50))
                + f"  {int(skipped):7d}  {spikes}  ({time.perf_counter() - start:.0f} s)"
            )
            out[skip] = held.get(s + 50, float("nan"))
    print(f"held_out_loss_50_after: without={out[False]:.4f} with_skip={out[True]:.4f}")


if __name__ == "__main__":
    main()
