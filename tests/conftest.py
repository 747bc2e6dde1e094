"""Shared fixtures: a tiny model and a helper that reads a run directory back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn


class TinyNet(nn.Module):
    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, width)
        self.fc1 = nn.Linear(width, 4 * width)
        self.fc2 = nn.Linear(4 * width, width)
        self.head = nn.Linear(width, 1)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.embed(idx).mean(dim=1)
        return self.head(self.fc2(torch.nn.functional.gelu(self.fc1(h))))


def tiny_batch(step: int, batch: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    idx = torch.randint(0, 50, (batch, 8), generator=gen)
    y = torch.randn(batch, 1, generator=gen)
    return idx, y


def train(model, optimizer, monitor, steps: int, start: int = 0) -> list[float]:
    losses = []
    for step in range(start, start + steps):
        idx, y = tiny_batch(step)
        loss = torch.nn.functional.mse_loss(model(idx), y)
        loss.backward()
        if monitor is not None:
            monitor.observe_loss(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses


def newton_schulz_float32(grad: torch.Tensor, ns_coefficients, ns_steps: int, eps: float) -> torch.Tensor:
    """torch.optim.Muon's quintic Newton-Schulz iteration, in float32 instead of bfloat16.

    Tests that compare Muon runs to saved figures or to each other patch it in
    (``torch.optim._muon._zeropower_via_newtonschulz``): the bfloat16 CPU matmul differs between CPUs with and
    without AVX-512 BF16, and between reduction orders, by enough to move a 60-step trajectory by tens of percent.
    """
    a, b, c = ns_coefficients
    x = grad.float()
    tall = grad.size(0) > grad.size(1)
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=eps)
    for _ in range(ns_steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


def read_records(run_dir: Path | str) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_alerts(run_dir: Path | str) -> list[dict]:
    path = Path(run_dir) / "alerts.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture
def tiny_model() -> TinyNet:
    torch.manual_seed(0)
    return TinyNet()
