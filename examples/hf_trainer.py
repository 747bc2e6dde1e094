"""Hugging Face Trainer with heavytail attached by one callback: a tiny GPT-2 on Zipf-distributed tokens.

    python examples/hf_trainer.py --steps 200 --out runs/hf_trainer

The model is built from a config (no download) and trained with gradient accumulation and clipping; token
frequencies follow Zipf's law, as in natural text, so the embedding's gradient is heavy-tailed. The callback
builds the monitor at ``on_train_begin``, reads each micro-batch's loss from the model output, counts the
Trainer's updates (``global_step``) and closes at ``on_train_end``. Records land in ``<out>/heavytail``.
"""

from __future__ import annotations

import argparse

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from heavytail.integrations.hf import HeavyTailCallback


class ZipfTokens(torch.utils.data.Dataset):
    """Token sequences drawn with probability proportional to 1 / rank^1.1; each sequence is its own label."""

    def __init__(self, count: int, length: int, vocab: int, seed: int) -> None:
        weights = 1.0 / torch.arange(1, vocab + 1, dtype=torch.float64) ** 1.1
        gen = torch.Generator().manual_seed(seed)
        self.ids = torch.multinomial(weights, count * length, replacement=True, generator=gen).view(count, length)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="optimizer updates (Trainer max_steps)")
    parser.add_argument("--every", type=int, default=20, help="updates per heavytail record")
    parser.add_argument("--accumulation", type=int, default=2, help="gradient_accumulation_steps")
    parser.add_argument("--out", default="runs/hf_trainer", help="Trainer output_dir; records in <out>/heavytail")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    vocab, length, batch = 512, 32, 8
    config = GPT2Config(
        n_layer=2, n_embd=64, n_head=4, vocab_size=vocab, n_positions=length, bos_token_id=0, eos_token_id=0
    )
    model = GPT2LMHeadModel(config)
    dataset = ZipfTokens(args.steps * args.accumulation * batch, length, vocab, args.seed)

    callback = HeavyTailCallback(every=args.every)  # or include=["*attn.c_attn.weight"] to watch attention only
    training_args = TrainingArguments(
        output_dir=args.out,
        max_steps=args.steps,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=args.accumulation,
        learning_rate=1e-3,
        max_grad_norm=1.0,  # the monitor's grad/ metrics are after this clipping; grad/norm_preclip before it
        logging_steps=args.every,
        save_strategy="no",
        report_to=[],
        seed=args.seed,
        use_cpu=not torch.cuda.is_available(),
    )
    trainer = Trainer(model=model, args=training_args, train_dataset=dataset, callbacks=[callback])
    trainer.train()
    run_dir = callback.monitor.log_dir
    print(f"heavytail records in {run_dir}/metrics.jsonl; report: heavytail report {run_dir}")
    return str(run_dir)


if __name__ == "__main__":
    main()
