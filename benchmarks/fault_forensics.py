"""Fault forensics on the demo GPT: inject one fault per run and report which alert fires first, and where.

Faults, each from step N (one run each): the learning rate x10 from N on; one batch of shuffled tokens (the
batch's tokens permuted across positions); one batch of a single repeated token; NaN written into one layer's
gradient at N (and consumed by AdamW: nothing protects the run); one layer's gradient silently zeroed from N on. For each: the first alert at or after N (step,
rule, layer), the first loss alert, and the first per-layer alert (a layer's ``grad_spike``, ``hidden_spike``,
``nonfinite_grad``), so one reads whether the per-layer signals fire before the loss does. Steps are printed
as alert step - N: +1 is the fault's own step (an alert's step counts completed steps).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

import heavytail as ht
from heavytail.demo import warmup_steps
from heavytail.workload import build_demo

FAULTS = ("lr_x10", "shuffled_batch", "repeated_token_batch", "nan_layer", "zeroed_layer")
LAYER_RULES = ("grad_spike", "hidden_spike", "nonfinite_grad")


def run(workload, fault: str, steps: int, at: int, lr: float, log_dir: Path) -> list[dict]:
    """Train the demo GPT with ``fault`` injected from step ``at``; the alerts raised."""
    model = workload.new_model()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    warm = warmup_steps(steps)
    target = dict(model.named_parameters())[LAYER]
    gen = torch.Generator().manual_seed(2)
    alerts: list[dict] = []
    with ht.Monitor(model, opt, every=50, log_dir=log_dir, probe_every=0) as mon:
        mon.on_alert(alerts.append)
        for step in range(steps):
            x, y = workload.batches.get(step)
            if step == at and fault == "shuffled_batch":
                perm = torch.randperm(x.numel(), generator=gen)
                x, y = x.reshape(-1)[perm].reshape(x.shape), y.reshape(-1)[perm].reshape(y.shape)
            if step == at and fault == "repeated_token_batch":
                token = int(x[0, 0])
                x, y = torch.full_like(x, token), torch.full_like(y, token)
            # The demo's schedule (linear warm-up, then constant), times 10 from `at` on for the lr_x10 fault.
            boost = 10.0 if (fault == "lr_x10" and step >= at) else 1.0
            for group in opt.param_groups:
                group["lr"] = lr * min(1.0, (step + 1) / warm) * boost
            _, loss = model(x, y)
            loss.backward()
            if step == at and fault == "nan_layer":
                target.grad.view(-1)[:5] = float("nan")
            if step >= at and fault == "zeroed_layer":
                target.grad.zero_()
            mon.observe_loss(loss)
            opt.step()  # with the NaN: the layer's weights become NaN, as in a run nothing protects
            opt.zero_grad(set_to_none=True)
    return alerts


LAYER = "blocks.1.mlp.fc.weight"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size", default="tiny", help="demo model size (small: the demo's, a minute a run)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--at", type=int, default=200, help="the step N the fault starts at")
    ap.add_argument("--lr", type=float, default=3e-3)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    global LAYER
    workload = build_demo(seed=0, steps=args.steps, size=args.size)
    names = [n for n, _ in workload.model.named_parameters()]
    if LAYER not in names:  # the tiny model has one block
        LAYER = next(n for n in names if n.endswith("mlp.fc.weight"))
    n = args.at
    print(f"demo GPT ({args.size}), AdamW lr={args.lr:g}, {args.steps} steps, fault from step N={n}, layer {LAYER}")
    print(f"{'fault':22s} {'first alert (step-N, rule, layer)':48s} {'first loss alert':18s} {'first layer alert':40s}")
    earlier = 0
    with tempfile.TemporaryDirectory() as tmp:
        for fault in FAULTS:
            start = time.perf_counter()
            alerts = [a for a in run(workload, fault, args.steps, n, args.lr, Path(tmp) / fault) if a["step"] > n]
            first = alerts[0] if alerts else None
            loss = next((a for a in alerts if a["rule"] == "loss_spike"), None)
            layer = next((a for a in alerts if a["rule"] in LAYER_RULES and a["layer"]), None)

            def show(a, with_layer=True):
                if a is None:
                    return "none"
                where = f", {a['layer']}" if with_layer and a.get("layer") else ""
                return f"+{a['step'] - n} {a['rule']}{where}"

            if layer is not None and (loss is None or layer["step"] < loss["step"]):
                earlier += 1
            print(
                f"{fault:22s} {show(first):48s} {show(loss, False):18s} {show(layer):40s}"
                f" ({time.perf_counter() - start:.0f} s)"
            )
    print(f"faults_where_a_layer_alert_came_before_the_loss={earlier}/{len(FAULTS)}")


if __name__ == "__main__":
    main()
