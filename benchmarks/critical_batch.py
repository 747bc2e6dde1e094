"""The demo model's gradient noise scale (``gns/b_simple``) against the critical batch size of a batch-size sweep.

McCandlish et al. (2018, "An Empirical Model of Large-Batch Training", eq. 2.11): the steps S and examples E a
run needs to reach a given loss trade off as (S / S_min - 1)(E / E_min - 1) = 1, so S(B) = S_min (1 + B_crit / B)
with B_crit = E_min / S_min, and B_simple (tr(Sigma) / |G|^2) approximates B_crit. Here:

- a sweep: the ``small`` demo GPT trained with AdamW at the demo's learning rate (linear warm-up over the first 5%
  of the steps), one token budget (``--budget`` sequences of 64 tokens) at each of ``--batches`` batch sizes (in
  sequences), same seed and data stream;
- S(B): the first step at which the training loss, averaged over the last ``--window`` sequences, reaches the
  target: the highest such smoothed loss any run ends with, so every run reaches it;
- B_crit: least squares of S on 1/B (intercept S_min, slope S_min B_crit);
- B_simple: every run of batch 2 x ``--micro`` sequences or more is split into micro-batches of ``--micro``
  sequences under a monitor with ``batch_size=--micro``, so its ``gns/b_simple`` and ``gns/b_robust`` are in
  sequences (gradient accumulation: the optimizer sees the same gradient).

Prints a table and the fit; ``--svg PATH`` writes the loss curves (against sequences seen) and B_simple over the
run with B_crit marked.

    python benchmarks/critical_batch.py --svg docs/img/critical-batch.svg
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import heavytail
from heavytail.config import MonitorConfig
from heavytail.demo import make_optimizer, warmup_steps
from heavytail.workload import build_demo


def train(batch: int, budget: int, micro: int, log_dir: Path, seed: int = 0) -> dict:
    """One run of ``budget // batch`` steps at ``batch`` sequences; the per-step losses and the gns records."""
    steps = budget // batch
    workload = build_demo(seed=seed, steps=steps, size="small", batch_size=batch)
    model = workload.model
    optimizer = make_optimizer("adamw", model)
    warm = warmup_steps(steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warm))
    parts = batch // micro if batch >= 2 * micro else 1
    monitor = None
    if parts > 1:
        config = MonitorConfig(log_dir=str(log_dir), every=max(1, steps // 20), batch_size=micro, alerts=())
        monitor = heavytail.Monitor(model, optimizer, config=config)
    losses = np.zeros(steps)
    model.train()
    start = time.perf_counter()
    for step in range(steps):
        x, y = workload.batches.get(step)
        total = 0.0
        for xs, ys in zip(x.chunk(parts), y.chunk(parts)):
            _, loss = model(xs, ys)
            (loss / parts).backward()
            total += float(loss.detach()) / parts
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        losses[step] = total
    seconds = time.perf_counter() - start
    records = []
    if monitor is not None:
        monitor.close()
        records = [json.loads(line) for line in (log_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {"batch": batch, "steps": steps, "losses": losses, "records": records, "seconds": seconds}


def smoothed(losses: np.ndarray, batch: int, window: int) -> np.ndarray:
    """The training loss averaged over the last ``window`` sequences (``window // batch`` steps) at each step."""
    k = max(1, window // batch)
    c = np.cumsum(np.insert(losses, 0, 0.0))
    out = np.empty_like(losses)
    for t in range(len(losses)):
        lo = max(0, t + 1 - k)
        out[t] = (c[t + 1] - c[lo]) / (t + 1 - lo)
    return out


def gns_series(run: dict, key: str) -> tuple[np.ndarray, np.ndarray]:
    steps = np.array([r["step"] for r in run["records"]], dtype=float)
    values = np.array([np.nan if r["metrics"].get(key) is None else r["metrics"][key] for r in run["records"]])
    return steps, values


def write_svg(path: Path, runs: list[dict], window: int, target: float, b_crit: float) -> None:
    """Two panels: smoothed loss against sequences seen (one line per batch size, the target dashed), and each
    monitored run's B_simple over the fraction of its run (B_crit dashed)."""
    colours = ["#2f6db5", "#d1495b", "#3a9d5d", "#8e5cb5", "#c77c14", "#5a6b8c"]
    W, H, pad = 560, 300, 50
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {2 * W} {H + 40}" font-family="sans-serif">']
    out.append(f'<rect width="{2 * W}" height="{H + 40}" fill="white"/>')

    def panel(x0, title, xlabel, ylabel, lines, hline, log_y=False):
        xs = np.concatenate([x for x, _, _, _ in lines])
        ys = np.concatenate([y for _, y, _, _ in lines] + [np.array([hline])])
        ys = ys[np.isfinite(ys) & ((ys > 0) if log_y else True)]
        xmin, xmax = float(xs.min()), float(xs.max())
        tf = np.log10 if log_y else (lambda v: v)
        ymin, ymax = float(tf(ys.min())), float(tf(ys.max()))
        ymin, ymax = ymin - 0.05 * (ymax - ymin), ymax + 0.05 * (ymax - ymin)

        def sx(v):
            return x0 + pad + (v - xmin) / (xmax - xmin or 1) * (W - 1.5 * pad)

        def sy(v):
            return 20 + (1 - (tf(v) - ymin) / (ymax - ymin or 1)) * (H - pad)

        out.append(f'<text x="{x0 + W / 2}" y="14" font-size="13" text-anchor="middle">{title}</text>')
        out.append(
            f'<rect x="{x0 + pad}" y="20" width="{W - 1.5 * pad}" height="{H - pad}" fill="none" stroke="#8a93a5"/>'
        )
        for i in range(5):
            v = ymin + i / 4 * (ymax - ymin)
            label = f"{10**v:.3g}" if log_y else f"{v:.3g}"
            y = 20 + (1 - i / 4) * (H - pad)
            out.append(f'<text x="{x0 + pad - 4}" y="{y + 4:.1f}" font-size="10" text-anchor="end">{label}</text>')
            xv = xmin + i / 4 * (xmax - xmin)
            out.append(
                f'<text x="{sx(xv):.1f}" y="{H - pad + 34}" font-size="10" text-anchor="middle">{xv:,.3g}</text>'
            )
        out.append(f'<text x="{x0 + W / 2}" y="{H + 20}" font-size="11" text-anchor="middle">{xlabel}</text>')
        out.append(
            f'<text transform="translate({x0 + 12} {H / 2}) rotate(-90)" font-size="11" '
            f'text-anchor="middle">{ylabel}</text>'
        )
        y = sy(hline)
        out.append(
            f'<line x1="{x0 + pad}" x2="{x0 + W - pad / 2}" y1="{y:.1f}" y2="{y:.1f}" stroke="#1c2230" '
            'stroke-dasharray="4 3"/>'
        )
        for j, (x, yv, colour, label) in enumerate(lines):
            ok = np.isfinite(yv) & ((yv > 0) if log_y else True)
            pts = " ".join(f"{sx(a):.1f},{sy(b):.1f}" for a, b in zip(x[ok], yv[ok]))
            out.append(f'<polyline points="{pts}" fill="none" stroke="{colour}" stroke-width="1.5"/>')
            out.append(
                f'<text x="{x0 + W - pad / 2 - 4}" y="{34 + 14 * j}" font-size="11" fill="{colour}" '
                f'text-anchor="end">{label}</text>'
            )

    loss_lines = []
    for i, run in enumerate(runs):
        seqs = (np.arange(run["steps"]) + 1) * run["batch"]
        loss_lines.append((seqs, smoothed(run["losses"], run["batch"], window), colours[i], f"B = {run['batch']}"))
    panel(0, "Training loss (smoothed) vs sequences seen", "sequences seen", "loss", loss_lines, target)
    gns_lines = []
    for i, run in enumerate(runs):
        if run["records"]:
            steps, values = gns_series(run, "gns/b_simple")
            gns_lines.append((steps / run["steps"], values, colours[i], f"B_simple at B = {run['batch']}"))
    if gns_lines:
        panel(
            W,
            "B_simple (sequences) over the run; B_crit dashed",
            "fraction of the run",
            "B_simple",
            gns_lines,
            b_crit,
            log_y=True,
        )
    out.append("</svg>")
    path.write_text("\n".join(out))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", default="4,8,16,32", help="batch sizes in sequences, comma-separated")
    parser.add_argument("--budget", type=int, default=6400, help="sequences per run")
    parser.add_argument("--micro", type=int, default=4, help="sequences per micro-batch of the monitored runs")
    parser.add_argument("--window", type=int, default=512, help="sequences the training loss is averaged over")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--svg", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    batches = sorted(int(b) for b in args.batches.split(","))
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for batch in batches:
            run = train(batch, args.budget, args.micro, Path(tmp) / f"b{batch}")
            runs.append(run)
            print(f"B = {batch}: {run['steps']} steps in {run['seconds']:.0f} s", flush=True)
    target = max(float(smoothed(r["losses"], r["batch"], args.window)[-1]) for r in runs)
    reach = []
    for run in runs:
        s = smoothed(run["losses"], run["batch"], args.window)
        reach.append(int(np.flatnonzero(s <= target)[0]) + 1)
    inv = np.array([1.0 / r["batch"] for r in runs])
    slope, intercept = np.polyfit(inv, np.array(reach, dtype=float), 1)
    b_crit = slope / intercept if intercept > 0 else math.inf
    print(f"\ntarget loss {target:.4f} (the highest final loss, averaged over the last {args.window} sequences)")
    print(f"{'B':>4} {'steps to target':>16} {'sequences':>10} {'B_simple (mid, end)':>22} {'robust (end)':>13}")
    out = {"target": target, "b_crit": b_crit, "s_min": intercept, "runs": []}
    for run, steps in zip(runs, reach):
        mid = end = robust = math.nan
        if run["records"]:
            _, bs = gns_series(run, "gns/b_simple")
            _, br = gns_series(run, "gns/b_robust")
            mid, end, robust = bs[len(bs) // 2], bs[-1], br[-1]
        print(f"{run['batch']:>4} {steps:>16} {steps * run['batch']:>10} {mid:>10.3g} {end:>10.3g} {robust:>13.3g}")
        out["runs"].append({"batch": run["batch"], "steps": steps, "b_simple_mid": mid, "b_simple_end": end})
    print(f"fit S = S_min (1 + B_crit / B): S_min {intercept:.1f} steps, B_crit {b_crit:.3g} sequences")
    if args.svg is not None:
        write_svg(args.svg, runs, args.window, target, b_crit)
        print(f"wrote {args.svg}")
    return out


if __name__ == "__main__":
    main()
