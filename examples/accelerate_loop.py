"""A Hugging Face Accelerate loop with heavytail attached: gradient accumulation on prepared objects.

    python examples/accelerate_loop.py --steps 200 --out runs/accelerate

The model, optimizer and data loader go through ``accelerator.prepare``; the loop uses
``accelerator.accumulate`` and ``accelerator.backward``. ``heavytail.integrations.accelerate.monitor`` attaches
the monitor to the optimizer inside the ``AcceleratedOptimizer``, so only real updates are counted (the wrapper
skips ``step()`` while accumulating). The same loop runs unchanged under ``accelerate launch`` on several GPUs.
"""

from __future__ import annotations

import argparse

import torch
from accelerate import Accelerator
from torch import nn

from heavytail.integrations.accelerate import monitor as heavytail_monitor


class Bigram(nn.Module):
    """Next-token logits from the current token: an embedding, a GELU MLP and an output layer."""

    def __init__(self, vocab: int = 512, width: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.hidden = nn.Linear(width, 4 * width)
        self.head = nn.Linear(4 * width, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(nn.functional.gelu(self.hidden(self.embed(tokens))))


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="optimizer updates")
    parser.add_argument("--every", type=int, default=20, help="updates per heavytail record")
    parser.add_argument("--accumulation", type=int, default=2, help="gradient_accumulation_steps")
    parser.add_argument("--out", default="runs/accelerate", help="run directory")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    accelerator = Accelerator(gradient_accumulation_steps=args.accumulation)
    vocab = 512
    model = Bigram(vocab)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    # Zipf-distributed (current, next) token pairs: a bigram model with heavy-tailed embedding gradients.
    weights = 1.0 / torch.arange(1, vocab + 1, dtype=torch.float64) ** 1.1
    gen = torch.Generator().manual_seed(args.seed)
    tokens = torch.multinomial(weights, args.steps * args.accumulation * 64 + 1, replacement=True, generator=gen)
    pairs = torch.utils.data.TensorDataset(tokens[:-1], tokens[1:])
    loader = torch.utils.data.DataLoader(pairs, batch_size=64)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)

    with heavytail_monitor(accelerator, model, optimizer, every=args.every, log_dir=args.out) as monitor:
        for current, following in loader:
            with accelerator.accumulate(model):
                loss = nn.functional.cross_entropy(model(current), following)
                accelerator.backward(loss)
                monitor.observe_loss(loss)  # the micro-batch loss; the record's loss is the mean per update
                accelerator.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()  # a no-op while accumulating: the monitor counts only real updates
                optimizer.zero_grad()
    if accelerator.is_main_process:
        print(
            f"heavytail records in {monitor.log_dir}/metrics.jsonl ({monitor.step_count} updates); "
            f"report: heavytail report {monitor.log_dir}"
        )
    return str(monitor.log_dir)


if __name__ == "__main__":
    main()
