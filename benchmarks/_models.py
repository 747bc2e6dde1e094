"""Model, optimizer and data builders shared by the performance benchmarks (overhead, scaling, memory).

Two GPTs, both the nanoGPT layout of :mod:`heavytail.workload.model` (pre-LN blocks, fused qkv, GELU MLP):

- ``tiny``: the CPU benchmark model. vocab 4096, context 64, 4 blocks, width 256, 4 heads: 5.27 M parameters in
  53 tensors; batch 8 x 64 tokens. One AdamW step takes roughly 100-250 ms on two CPU cores, and the ratio of
  tokens to parameters is close to what a small CPU run has, so the monitor's per-parameter cost is seen against
  a realistic amount of compute.
- ``gpt2-small``: GPT-2 124M (12 blocks, width 768, 12 heads, vocab 50257, context 1024), the head tied to the
  token embedding as in GPT-2, built from scratch (no download): 124.4 M parameters in 148 tensors. On CUDA it
  trains in bf16 autocast with fused AdamW on batches of 8 x 1024 tokens. On a CPU one such step takes minutes,
  so the CPU form uses batch 1 x 128 and is meant for memory accounting and smoke runs, not for timings.
- ``smoke``: a toy GPT (vocab 64, one block of width 16) that only keeps the benchmark scripts' tests fast.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from heavytail.workload.model import GPT, GPTConfig, make_gpt

MODELS = ("tiny", "gpt2-small", "smoke")


@dataclass
class Workload:
    """One benchmark workload: a model factory, its batches and how a step is run."""

    name: str
    config: GPTConfig
    batch_size: int
    seq_len: int
    device: torch.device
    tied_head: bool

    @property
    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast on CUDA (GPT-2's training precision); nothing on the CPU."""
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def model(self, seed: int = 0) -> GPT:
        """A fresh model whose weights depend on ``seed`` only."""
        model = make_gpt(self.config, seed=seed, device="cpu")
        if self.tied_head:
            model.head.weight = model.embed.weight  # GPT-2 ties the output head to the token embedding
        return model.to(self.device)

    def optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        """AdamW as GPT-2 recipes run it: fused on CUDA, the default (single-tensor) kernels on the CPU."""
        kwargs = dict(lr=3e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
        if self.device.type == "cuda":
            kwargs["fused"] = True
        return torch.optim.AdamW(model.parameters(), **kwargs)

    def batches(self, count: int = 8, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``count`` fixed (input, target) batches of random token ids, drawn on the CPU from ``seed``."""
        gen = torch.Generator().manual_seed(seed)
        out = []
        for _ in range(count):
            idx = torch.randint(0, self.config.vocab_size, (self.batch_size, self.seq_len + 1), generator=gen)
            out.append((idx[:, :-1].to(self.device), idx[:, 1:].to(self.device)))
        return out

    def num_parameters(self, model: nn.Module) -> int:
        return sum(p.numel() for p in model.parameters())


def workload(name: str, device: str | torch.device = "cpu") -> Workload:
    """The named workload on ``device``."""
    device = torch.device(device)
    if name == "tiny":
        config = GPTConfig(vocab_size=4096, block_size=64, n_layer=4, n_head=4, d_model=256)
        return Workload(name, config, batch_size=8, seq_len=64, device=device, tied_head=False)
    if name == "gpt2-small":
        config = GPTConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, d_model=768)
        if device.type == "cuda":
            return Workload(name, config, batch_size=8, seq_len=1024, device=device, tied_head=True)
        return Workload(name, config, batch_size=1, seq_len=128, device=device, tied_head=True)
    if name == "smoke":
        config = GPTConfig(vocab_size=64, block_size=8, n_layer=1, n_head=2, d_model=16)
        return Workload(name, config, batch_size=2, seq_len=8, device=device, tied_head=False)
    raise ValueError(f"unknown model {name!r}; known: {', '.join(MODELS)}")


def train_step(
    wl: Workload,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    batch,
    after_backward: Callable | None = None,
    on_loss: Callable | None = None,
    accumulate: int = 1,
) -> None:
    """One training step: forward (autocast on CUDA), backward, optional hooks, ``opt.step()``, zero grads.

    ``accumulate`` > 1 splits the batch into that many micro-batches, each backward on its loss divided by their
    number (gradient accumulation: the optimizer sees the same mean gradient)."""
    idx, targets = batch
    for micro_idx, micro_targets in zip(idx.chunk(accumulate), targets.chunk(accumulate)):
        with wl.autocast:
            _, loss = model(micro_idx, micro_targets)
        (loss / accumulate if accumulate > 1 else loss).backward()
        if on_loss is not None:
            on_loss(loss)
    if after_backward is not None:
        after_backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def clone_model(model: nn.Module) -> nn.Module:
    """An independent copy with the same weights (ties preserved by ``deepcopy``'s memo)."""
    return copy.deepcopy(model)


class ManyTensors(nn.Module):
    """``count`` parameter tensors holding ``total`` entries between them (sizes differ by at most one entry)."""

    def __init__(self, count: int, total: int, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        base, extra = divmod(total, count)
        self.weights = nn.ParameterList(
            nn.Parameter(torch.randn(base + (i < extra), generator=gen) * 0.02) for i in range(count)
        )


def heavy_tailed_like(p: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A Student-t(3) gradient of ``p``'s shape: heavy-tailed, finite, like an LLM gradient's coordinates."""
    normal = torch.randn(p.shape, generator=generator)
    chi2 = torch.randn((3,) + tuple(p.shape), generator=generator).pow(2).sum(0)
    return (normal / (chi2 / 3).sqrt() * 1e-3).to(p.device, p.dtype)
