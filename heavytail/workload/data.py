"""Seeded random windows of a token stream: the same data order for every optimizer that a comparison runs."""

from __future__ import annotations

from collections.abc import Iterator

import torch

__all__ = ["Batches", "held_out_batch", "split_held_out", "validation_windows"]

HELD_OUT_FRACTION = 0.05


def split_held_out(tokens: torch.Tensor, fraction: float = HELD_OUT_FRACTION) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a 1-D token stream into (train, held-out): the held-out part is the last ``fraction`` of it.

    A contiguous tail, not a random subset, so no training window overlaps a held-out one.
    """
    if tokens.ndim != 1:
        raise ValueError(f"tokens must be a 1-D tensor, got shape {tuple(tokens.shape)}")
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    cut = len(tokens) - max(1, int(len(tokens) * fraction))
    return tokens[:cut], tokens[cut:]


_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    # Steele, Lea & Flood 2014: a bijective 64-bit mixer, so nearby inputs give unrelated outputs.
    z = (x + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def _step_seed(seed: int, step: int) -> int:
    # torch's CPU generator (mt19937) keeps only the low 32 bits of its seed, so packing (seed, step) into one
    # integer side by side would make every seed draw the same batches. Hash both into 32 bits instead.
    return _splitmix64(_splitmix64(seed & _MASK64) ^ (step & _MASK64)) >> 32


def _windows(
    tokens: torch.Tensor, batch_size: int, block_size: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    starts = torch.randint(0, len(tokens) - block_size, (batch_size,), generator=generator)
    chunk = tokens[starts[:, None] + torch.arange(block_size + 1)]
    return chunk[:, :-1], chunk[:, 1:]


def _check(tokens: torch.Tensor, batch_size: int, block_size: int, what: str) -> None:
    if batch_size < 1 or block_size < 1:
        raise ValueError(f"batch_size and block_size must be positive, got {batch_size} and {block_size}")
    if tokens.ndim != 1:
        raise ValueError(f"tokens must be a 1-D tensor, got shape {tuple(tokens.shape)}")
    if len(tokens) < block_size + 1:
        raise ValueError(
            f"{what} has {len(tokens)} tokens, fewer than block_size + 1 = {block_size + 1}; use a larger corpus"
        )


class Batches:
    """Batches of ``batch_size`` random windows of ``block_size + 1`` tokens from ``tokens``: inputs and targets.

    Batch ``step`` is drawn from a ``torch.Generator`` seeded with (``seed``, ``step``) alone, so ``get(step)``
    is random access, two runs with the same seed see identical batches in identical order whatever happens
    between steps (another optimizer, a monitor, a restart at step k), and the global RNG is never touched.
    Windows are drawn on the CPU and moved to ``device``.

    Iterating yields ``get(0), get(1), ...`` without end.
    """

    def __init__(
        self,
        tokens: torch.Tensor,
        batch_size: int,
        block_size: int,
        seed: int = 0,
        device: torch.device | str = "cpu",
    ) -> None:
        _check(tokens, batch_size, block_size, "the training token stream")
        self.tokens = tokens.to("cpu", torch.long)
        self.batch_size = batch_size
        self.block_size = block_size
        self.seed = seed
        self.device = torch.device(device)

    def get(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and next-token targets, both (batch_size, block_size) ``long``, for optimizer step ``step``."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        generator = torch.Generator().manual_seed(_step_seed(self.seed, step))
        x, y = _windows(self.tokens, self.batch_size, self.block_size, generator)
        return x.to(self.device), y.to(self.device)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        step = 0
        while True:
            yield self.get(step)
            step += 1

    def __repr__(self) -> str:
        return (
            f"Batches(tokens={len(self.tokens)}, batch_size={self.batch_size}, block_size={self.block_size}, "
            f"seed={self.seed})"
        )


def held_out_batch(
    tokens: torch.Tensor,
    batch_size: int,
    block_size: int,
    seed: int = 0,
    fraction: float = HELD_OUT_FRACTION,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """One fixed batch (inputs, targets) of random windows from the held-out tail (last ``fraction``) of ``tokens``.

    For the gradient-noise probe (Simsekli et al. 2019): the probe computes mini-batch gradients on parts of this
    batch at checkpoints, and noise = a mini-batch gradient minus their mean. Drawing it from text the model never
    trains on keeps the probe from measuring memorisation. Pass the whole token stream; train on
    ``split_held_out(tokens, fraction)[0]``.
    """
    _, tail = split_held_out(tokens, fraction)
    _check(tail, batch_size, block_size, "the held-out tail")
    generator = torch.Generator().manual_seed(seed)
    x, y = _windows(tail.to("cpu", torch.long), batch_size, block_size, generator)
    return x.to(device), y.to(device)


def validation_windows(
    tokens: torch.Tensor,
    block_size: int,
    fraction: float = HELD_OUT_FRACTION,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every non-overlapping window of ``block_size + 1`` tokens of the held-out tail (last ``fraction``) of ``tokens``.

    Window ``i`` starts at token ``i * block_size`` of the tail, so each held-out token is predicted exactly once
    (the last partial window is dropped). The validation loss is the mean next-token loss over them: all the
    held-out text, the same windows for every seed and optimizer, none of it in any training window (training
    draws from ``split_held_out(tokens, fraction)[0]`` only). Pass the whole token stream.
    """
    _, tail = split_held_out(tokens, fraction)
    _check(tail, 1, block_size, "the held-out tail")
    tail = tail.to("cpu", torch.long)
    count = (len(tail) - 1) // block_size
    chunk = tail[torch.arange(count)[:, None] * block_size + torch.arange(block_size + 1)]
    return chunk[:, :-1].to(device), chunk[:, 1:].to(device)
