"""PyTorch Lightning with heavytail attached by one callback: a next-token model on Zipf-distributed tokens.

    python examples/lightning_module.py --steps 200 --out runs/lightning

A LightningModule (embedding, MLP, output layer) predicts the next token of a sequence whose tokens follow
Zipf's law, with gradient accumulation and clipping. The callback builds the monitor at ``on_fit_start`` on the
module and its optimizer, reads every micro-batch's loss in ``on_before_backward`` (before the update it feeds)
and closes at ``on_train_end``; its state travels in Lightning checkpoints. Records land in ``<out>/heavytail``.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

try:
    import lightning.pytorch as pl
except ImportError:
    import pytorch_lightning as pl

from heavytail.integrations.lightning import HeavyTailCallback


class NextToken(pl.LightningModule):
    def __init__(self, vocab: int = 512, width: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
        self.head = nn.Linear(width, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        return self.head(h + self.mlp(h))

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        logits = self(batch[:, :-1])
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def zipf_batches(count: int, batch: int, length: int, vocab: int, seed: int) -> torch.Tensor:
    weights = 1.0 / torch.arange(1, vocab + 1, dtype=torch.float64) ** 1.1
    gen = torch.Generator().manual_seed(seed)
    return torch.multinomial(weights, count * batch * length, replacement=True, generator=gen).view(
        count, batch, length
    )


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="optimizer updates (Trainer max_steps)")
    parser.add_argument("--every", type=int, default=20, help="updates per heavytail record")
    parser.add_argument("--accumulation", type=int, default=2, help="accumulate_grad_batches")
    parser.add_argument("--out", default="runs/lightning", help="default_root_dir; records in <out>/heavytail")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    pl.seed_everything(args.seed, verbose=False)
    batches = zipf_batches(args.steps * args.accumulation, batch=16, length=33, vocab=512, seed=args.seed)
    loader = torch.utils.data.DataLoader(batches, batch_size=None)  # one pre-built batch per item

    callback = HeavyTailCallback(every=args.every)
    trainer = pl.Trainer(
        max_steps=args.steps,
        accumulate_grad_batches=args.accumulation,
        gradient_clip_val=1.0,  # inside the step's closure: the monitor sees the clipped gradient
        default_root_dir=args.out,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        callbacks=[callback],
    )
    trainer.fit(NextToken(), loader)
    run_dir = callback.monitor.log_dir
    print(f"heavytail records in {run_dir}/metrics.jsonl; report: heavytail report {run_dir}")
    return str(run_dir)


if __name__ == "__main__":
    main()
