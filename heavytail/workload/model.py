"""A small GPT (nanoGPT layout, GPT-2 initialisation) for the demo workload."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["GPT", "GPTConfig", "make_gpt"]


@dataclass
class GPTConfig:
    """Shape of a :class:`GPT`."""

    vocab_size: int
    """Number of token ids (the tokenizer's ``vocab_size``)."""
    block_size: int = 64
    """Longest sequence the position embedding covers."""
    n_layer: int = 2
    """Transformer blocks."""
    n_head: int = 4
    """Attention heads per block; must divide ``d_model``."""
    d_model: int = 128
    """Residual stream width; the MLP is 4x wider."""
    dropout: float = 0.0
    """Dropout on attention weights and residual branches (0 keeps runs bit-reproducible given the data)."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "d_model"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"GPTConfig.{name} must be a positive int, got {value!r}")
        if self.d_model % self.n_head:
            raise ValueError(f"GPTConfig.d_model ({self.d_model}) must be divisible by n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout}")

    def to_dict(self) -> dict:
        """The fields as a plain dict (for run records)."""
        return asdict(self)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with one fused ``qkv`` projection."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model)
        self.proj = nn.Linear(config.d_model, config.d_model)
        self.resid_drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_drop(self.proj(y))


class MLP(nn.Module):
    """Position-wise feed-forward: d -> 4d -> GELU -> d."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(config.d_model, 4 * config.d_model)
        self.proj = nn.Linear(4 * config.d_model, config.d_model)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln1(x)), then + mlp(ln2(x))."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(config.d_model)
        self.attn = CausalSelfAttention(config)
        self.ln2 = nn.LayerNorm(config.d_model)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """Decoder-only transformer: token + learned position embeddings, pre-LN blocks, final LayerNorm, untied head.

    Parameter names are the ones heavytail's metric keys carry (``embed.weight``, ``pos.weight``,
    ``blocks.0.attn.qkv.weight``, ``blocks.0.mlp.proj.weight``, ``ln_f.weight``, ``head.weight``). The head is
    untied from the embedding so the two show their own gradient tails (the head's rows of rare tokens are where
    the largest, rarest gradient entries land).

    Initialisation follows GPT-2 (Radford et al. 2019) as in nanoGPT: weights N(0, 0.02), biases zero, and the
    two residual projections per block N(0, 0.02 / sqrt(2 * n_layer)) so the residual stream's variance does not
    grow with depth. At initialisation the logits are nearly uniform: the loss is about log(vocab_size).
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.pos = nn.Embedding(config.block_size, config.d_model)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.d_model)
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """GPT-2 initialisation, drawn from ``generator`` (the global RNG if None)."""
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                std = residual_std if name.endswith((".attn.proj", ".mlp.proj")) else 0.02
                nn.init.normal_(module.weight, mean=0.0, std=std, generator=generator)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (B, T, vocab) for token ids ``idx`` (B, T), and the mean next-token cross-entropy if ``targets``.

        Targets equal to -1 are ignored (padding).
        """
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}")
        positions = torch.arange(T, device=idx.device)
        x = self.drop(self.embed(idx) + self.pos(positions))
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln_f(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(B * T, -1), targets.reshape(B * T), ignore_index=-1)
        return logits, loss

    def num_parameters(self) -> int:
        """Number of parameters (every parameter is trainable at construction)."""
        return sum(p.numel() for p in self.parameters())


def make_gpt(config: GPTConfig, seed: int = 0, device: torch.device | str = "cpu") -> GPT:
    """A :class:`GPT` whose initial weights depend on ``seed`` only (not on the global RNG, not on ``device``).

    Weights are drawn on the CPU from a ``torch.Generator`` seeded with ``seed``, then moved: the optimizer
    comparison starts every optimizer from these identical weights. The global RNG is left untouched.
    """
    with torch.random.fork_rng(devices=[]):
        model = GPT(config)  # nn.Linear's own init draws from the global RNG; fork_rng keeps that private
    model.reset_parameters(torch.Generator().manual_seed(seed))
    return model.to(device)
