"""The worked example of docs/alerts.md: the demo GPT with a garbage batch and an inf gradient, the Monitor at its
defaults (the calibrated spike rule); prints every alert, one alert record and the reading of its flight record.

    PYTHONPATH=. python benchmarks/alert_example.py [--log-dir heavytail_runs/alert_example]

The demo workload (``build_demo``, size small: 4 blocks) trains with AdamW at the demo's learning rate and warm-up
for 300 steps; the batch of step 200 is replaced by uniformly random tokens, and at step 250 five gradient entries
of ``blocks.3.mlp.proj.weight`` are set to inf and the update is skipped, as a GradScaler would skip it (the
monitor sees the gradient, the optimizer does not). Steps are the alerts' (1-based: optimizer step number N).
Also printed: what the loss and global gradient norm detectors compared step 200 with, and the nulls of the
``nonfinite_grad`` flight record. Seeded; about a minute on one CPU thread.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import torch

import heavytail as ht
from heavytail.alerts import unpack_step_flags
from heavytail.demo import DEFAULT_LR, choose_threads, demo_loss, make_optimizer, warmup_steps
from heavytail.estimators import spike
from heavytail.runfiles import clear_run_dir
from heavytail.workload import build_demo

LAYER = "blocks.3.mlp.proj.weight"


def train(workload, steps: int, garbage_at: int, inf_at: int, log_dir: Path) -> tuple[list[float], list[tuple]]:
    """Train with the faults injected; returns the loss of every step and, for the garbage batch's step, the
    loss's and the global gradient norm's (observed, forecast, threshold, z, z threshold, noise scale) as the
    alert rules read them."""
    model = workload.model
    opt = make_optimizer("adamw", model)
    warm = warmup_steps(steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: min(1.0, (t + 1) / warm))
    vocab = workload.model_config.vocab_size
    gen = torch.Generator().manual_seed(1)
    target = dict(model.named_parameters())[LAYER]
    seen, losses = [], []
    log_dir.mkdir(parents=True, exist_ok=True)
    clear_run_dir(log_dir)  # a previous run's files, as the demo does
    with ht.Monitor(model, opt, log_dir=log_dir) as mon:
        rules = mon.alerts.process_step_flags

        def read(step, packed, names, config):  # the garbage step's flag vector, as the alert rules read it
            if step == garbage_at:
                f = unpack_step_flags(packed, len(names))
                s = spike.compute(f.detector, config, threshold=torch.from_numpy(f.thresholds.copy()))
                fields = (f.values, s.baseline, s.upper, f.scores, f.thresholds, s.scale)
                seen.extend(tuple(float(v[i]) for v in fields) for i in (0, 1))
            rules(step, packed, names, config)

        mon.alerts.process_step_flags = read
        for step in range(1, steps + 1):
            x, y = workload.batches.get(step - 1)
            if step == garbage_at:
                x = torch.randint(0, vocab, x.shape, generator=gen)
                y = torch.randint(0, vocab, y.shape, generator=gen)
            loss = demo_loss(model, (x, y))
            loss.backward()
            mon.observe_loss(loss)
            losses.append(loss.detach())
            skip = None
            if step == inf_at:
                target.grad.view(-1)[:5] = math.inf
                # Runs after the monitor's pre-hook (registered later): the monitor saw the gradient, AdamW sees none.
                skip = opt.register_step_pre_hook(lambda o, args, kwargs: o.zero_grad(set_to_none=True))
            opt.step()
            if skip is not None:
                skip.remove()
            opt.zero_grad(set_to_none=True)
            sched.step()
    return [float(v) for v in losses], seen


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--garbage-at", type=int, default=200, help="the step whose batch is random tokens")
    ap.add_argument("--inf-at", type=int, default=250, help="the step with inf gradient entries (skipped)")
    ap.add_argument("--log-dir", help="the run directory (default: a temporary one, removed)")
    args = ap.parse_args(argv)
    choose_threads(None, "small")
    workload = build_demo(seed=0, steps=args.steps, size="small")
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(args.log_dir or Path(tmp) / "alert_example")
        start = time.perf_counter()
        losses, seen = train(workload, args.steps, args.garbage_at, args.inf_at, run_dir)
        print(
            f"demo GPT (small, {workload.config['n_params']:,} parameters), AdamW lr={DEFAULT_LR['adamw']:g}, "
            f"{args.steps} steps, random tokens at step {args.garbage_at}, 5 inf entries in {LAYER} at step "
            f"{args.inf_at} (update skipped); Monitor defaults ({time.perf_counter() - start:.0f} s)"
        )
        alerts = [json.loads(line) for line in (run_dir / "alerts.jsonl").read_text().splitlines() if line.strip()]
        for a in alerts:
            print(f"step {a['step']:3d} {a['rule']:16s} {a['message']}")
        for name, (value, forecast, upper, z, z_th, scale) in zip(("loss", "global grad norm"), seen):
            print(
                f"step {args.garbage_at} {name}: observed {value:.4g}, forecast {forecast:.4g}, threshold "
                f"{upper:.4g}, z = {z:.1f} (fires above z = {z_th:.3g}), noise scale {scale:.1%} per step"
            )
        if not alerts:
            return
        chosen = next((a for a in alerts if a["rule"] == "loss_spike"), alerts[0])
        print(json.dumps(chosen))

        # The reading of docs/alerts.md: the loss around the step, the five layers whose norm moved most.
        rec = json.loads((run_dir / chosen["flight_record"]).read_text())
        k = rec["steps"].index(rec["step"])
        window = slice(k - 3, k + 2)
        loss = [round(v, 3) for v in rec["series"]["loss"][window]]
        print(f"{chosen['flight_record']} (steps {rec['steps'][0]}-{rec['steps'][-1]}):")
        print(f"  loss at steps {rec['steps'][window]}: {loss}")
        norms = rec["series"]["grad/norm"]
        moved = [j for j in range(len(rec["layers"])) if norms[k][j] and norms[k - 1][j]]
        for j in sorted(moved, key=lambda j: -norms[k][j] / norms[k - 1][j])[:5]:
            before, after = norms[k - 1][j], norms[k][j]
            print(f"  {rec['layers'][j]:28s} {before:.3g} -> {after:.3g} ({after / before:.1f}x)")

        g = args.garbage_at
        print(f"training loss, steps {g - 3}-{g + 3}: {[round(v, 3) for v in losses[g - 4 : g + 3]]}")
        for a in (a for a in alerts if a["rule"] == "nonfinite_grad"):  # which cells the bad step left null
            rec = json.loads((run_dir / a["flight_record"]).read_text())
            per_layer = {key: rows for key, rows in rec["series"].items() if key != "loss"}
            cells = [
                (step, layer, {key: rows[i][j] for key, rows in per_layer.items()})
                for i, step in enumerate(rec["steps"])
                for j, layer in enumerate(rec["layers"])
                if any(rows[i][j] is None for rows in per_layer.values())
            ]
            print(f"{a['flight_record']} (steps {rec['steps'][0]}-{rec['steps'][-1]}): cells with a null: {cells}")


if __name__ == "__main__":
    main()
