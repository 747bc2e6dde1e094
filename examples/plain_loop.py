"""A plain PyTorch training loop with heavytail attached: the smallest complete example.

    python examples/plain_loop.py --steps 300 --out runs/plain

Trains a small MLP on a synthetic regression task whose targets carry Student-t noise (heavy-tailed
gradients), with the monitor writing a record every 50 steps, then prints where the records are.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import heavytail as ht


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--out", default="runs/plain_loop")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    model = nn.Sequential(nn.Linear(32, 128), nn.GELU(), nn.Linear(128, 128), nn.GELU(), nn.Linear(128, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    teacher = torch.randn(32, 1)
    noise = torch.distributions.StudentT(df=2.5)

    with ht.Monitor(model, optimizer, every=args.every, log_dir=args.out) as monitor:
        for _ in range(args.steps):
            x = torch.randn(64, 32)
            y = x @ teacher + 0.3 * noise.sample((64, 1))
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            monitor.observe_loss(loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    print(f"heavytail records in {monitor.log_dir}/metrics.jsonl; report: heavytail report {monitor.log_dir}")
    return str(monitor.log_dir)


if __name__ == "__main__":
    main()
