"""The embedded offline demo workload: a small GPT on the Python standard library's own source text."""

from __future__ import annotations

import os
import platform
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch

from heavytail.workload.corpus import DEFAULT_MAX_BYTES, load_corpus, stdlib_path
from heavytail.workload.data import HELD_OUT_FRACTION, Batches, held_out_batch, split_held_out, validation_windows
from heavytail.workload.model import GPT, GPTConfig, make_gpt
from heavytail.workload.tokenizer import WordTokenizer, split_tokens, zipf_slope

__all__ = [
    "SIZES",
    "Batches",
    "DemoWorkload",
    "GPT",
    "GPTConfig",
    "WordTokenizer",
    "build_demo",
    "held_out_batch",
    "load_corpus",
    "make_gpt",
    "split_held_out",
    "validation_windows",
    "zipf_slope",
]

SIZES: dict[str, dict[str, int]] = {
    # For tests and smoke runs: a step takes a few milliseconds.
    "tiny": dict(n_layer=1, n_head=2, d_model=32, block_size=32, batch_size=8),
    # The default: 4 blocks give the layer x step heatmaps some depth; a few hundred steps take well under a
    # minute per optimizer on two CPU cores, so `heavytail compare` (four optimizers) stays within minutes.
    "small": dict(n_layer=4, n_head=4, d_model=128, block_size=64, batch_size=16),
    # For a GPU, or a patient CPU.
    "medium": dict(n_layer=6, n_head=8, d_model=256, block_size=128, batch_size=32),
}
"""Model and batch shapes by name, for ``build_demo(size=...)``."""


@dataclass
class DemoWorkload:
    """Everything a demo or optimizer-comparison run needs; build it with :func:`build_demo`."""

    model: GPT
    """The model, initialised from ``seed`` and on ``device``."""
    tokenizer: WordTokenizer
    batches: Batches
    """Training batches: ``batches.get(step)`` or iterate; the same for every run with this seed."""
    held_out: tuple[torch.Tensor, torch.Tensor]
    """One fixed (inputs, targets) batch from the held-out tail of the corpus, for the gradient-noise probe."""
    model_config: GPTConfig
    steps: int
    """Optimizer steps the run is meant to take."""
    seed: int
    device: torch.device
    config: dict[str, Any] = field(default_factory=dict)
    """Flat description of the workload (shapes, corpus, token counts, Zipf slope) for the run record."""
    validation: tuple[torch.Tensor, torch.Tensor] | None = None
    """All the held-out tail as non-overlapping (inputs, targets) windows (:func:`validation_windows`), for the
    validation loss at the end of a run; disjoint from every training window. ``None`` when not built."""

    def new_model(self) -> GPT:
        """A fresh model with the same initial weights as ``model`` had: one per optimizer in a comparison."""
        return make_gpt(self.model_config, seed=self.seed, device=self.device)


def build_demo(
    seed: int = 0,
    text: str | os.PathLike[str] | None = None,
    steps: int = 300,
    device: torch.device | str = "cpu",
    size: str = "small",
    *,
    batch_size: int | None = None,
    vocab_size: int = 4096,
    max_bytes: int = DEFAULT_MAX_BYTES,
    held_out_size: int | None = None,
) -> DemoWorkload:
    """Build the demo: corpus, tokenizer, a GPT of preset ``size`` (see :data:`SIZES`), batches, a held-out batch.

    ``text`` is a path to a text file or a directory of ``.txt``/``.py``/``.md`` files (the CLI's ``--text``);
    by default the corpus is the Python standard library's source (see :func:`load_corpus`), so the demo runs
    offline with nothing to download. ``seed`` fixes the initial weights and the data order, which is what an
    optimizer comparison holds equal. The held-out batch has ``held_out_size`` sequences (default
    ``4 * batch_size``) from the last 5% of the tokens, which training never sees.
    """
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose one of {sorted(SIZES)}")
    if steps < 1:
        raise ValueError(f"steps must be positive, got {steps}")
    shape = dict(SIZES[size])
    batch_size = shape.pop("batch_size") if batch_size is None else batch_size
    shape.pop("batch_size", None)
    held_out_size = 4 * batch_size if held_out_size is None else held_out_size
    device = torch.device(device)

    corpus = load_corpus(text, max_bytes=max_bytes)
    pieces = split_tokens(corpus)  # split once: the tokenizer's counts and the encoding both use it
    counts = Counter(pieces)
    tokenizer = WordTokenizer.from_counts(counts, vocab_size)
    tokens = tokenizer.encode_pieces(pieces)
    train_tokens, held_tokens = split_held_out(tokens, HELD_OUT_FRACTION)

    model_config = GPTConfig(vocab_size=tokenizer.vocab_size, dropout=0.0, **shape)
    model = make_gpt(model_config, seed=seed, device=device)
    batches = Batches(train_tokens, batch_size, model_config.block_size, seed=seed, device=device)
    held_out = held_out_batch(
        tokens, held_out_size, model_config.block_size, seed=seed, fraction=HELD_OUT_FRACTION, device=device
    )
    validation = validation_windows(tokens, model_config.block_size, fraction=HELD_OUT_FRACTION, device=device)
    config = {
        "workload": "gpt-word-lm",
        "size": size,
        "seed": seed,
        "steps": steps,
        "batch_size": batch_size,
        "held_out_size": held_out_size,
        **model_config.to_dict(),
        "n_params": model.num_parameters(),
        "corpus": str(text) if text is not None else f"python-stdlib:{stdlib_path()}",
        "python_version": platform.python_version(),
        "corpus_chars": len(corpus),
        "n_tokens": len(tokens),
        "n_train_tokens": len(train_tokens),
        "n_held_out_tokens": len(held_tokens),
        "n_validation_sequences": len(validation[0]),
        "unk_fraction": float((tokens == tokenizer.unk_id).float().mean()) if len(tokens) else 0.0,
        # Over the ranks the vocabulary keeps: the hapax plateau beyond them bends the full-range fit steeper.
        "zipf_slope": zipf_slope(counts.values(), max_rank=vocab_size) if len(counts) > 1 else float("nan"),
        "device": str(device),
    }
    return DemoWorkload(
        model=model,
        tokenizer=tokenizer,
        batches=batches,
        held_out=held_out,
        model_config=model_config,
        steps=steps,
        seed=seed,
        device=device,
        config=config,
        validation=validation,
    )
