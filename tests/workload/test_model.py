"""The demo GPT: parameter names, shapes, initialisation, causality, determinism and a few training steps."""

from __future__ import annotations

import math

import pytest
import torch

from heavytail.workload.model import GPT, GPTConfig, make_gpt

CFG = GPTConfig(vocab_size=97, block_size=16, n_layer=2, n_head=2, d_model=32)


def test_parameter_names():
    names = [n for n, _ in GPT(CFG).named_parameters()]
    block = [
        "ln1.weight", "ln1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
        "ln2.weight", "ln2.bias", "mlp.fc.weight", "mlp.fc.bias", "mlp.proj.weight", "mlp.proj.bias",
    ]  # fmt: skip
    expected = ["embed.weight", "pos.weight"]
    expected += [f"blocks.{i}.{n}" for i in range(2) for n in block]
    expected += ["ln_f.weight", "ln_f.bias", "head.weight"]
    assert names == expected


def test_forward_shapes_and_initial_loss():
    model = make_gpt(GPTConfig(vocab_size=4096, block_size=16, n_layer=2, n_head=2, d_model=64), seed=0)
    idx = torch.randint(0, 4096, (4, 16), generator=torch.Generator().manual_seed(0))
    logits, loss = model(idx)
    assert logits.shape == (4, 16, 4096) and loss is None
    _, loss = model(idx, torch.roll(idx, -1, dims=1))
    # Nearly uniform logits at init: the loss is log(vocab).
    assert loss.item() == pytest.approx(math.log(4096), abs=0.1)
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_gpt2_initialisation():
    model = make_gpt(GPTConfig(vocab_size=4096, block_size=16, n_layer=4, n_head=2, d_model=128), seed=0)
    assert model.embed.weight.std().item() == pytest.approx(0.02, rel=0.02)
    assert model.head.weight.std().item() == pytest.approx(0.02, rel=0.02)
    assert model.blocks[0].mlp.fc.weight.std().item() == pytest.approx(0.02, rel=0.05)
    residual = 0.02 / math.sqrt(2 * 4)
    assert model.blocks[3].mlp.proj.weight.std().item() == pytest.approx(residual, rel=0.05)
    assert model.blocks[1].attn.proj.weight.std().item() == pytest.approx(residual, rel=0.05)
    assert model.blocks[0].attn.qkv.bias.abs().max().item() == 0.0
    assert torch.equal(model.ln_f.weight, torch.ones(128))


def test_causal():
    model = make_gpt(CFG, seed=0)
    idx = torch.randint(0, 97, (1, 16))
    changed = idx.clone()
    changed[0, 10] = (idx[0, 10] + 1) % 97
    a, _ = model(idx)
    b, _ = model(changed)
    torch.testing.assert_close(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_make_gpt_is_seeded_and_leaves_the_global_rng_alone():
    rng = torch.get_rng_state()
    a, b, c = make_gpt(CFG, seed=1), make_gpt(CFG, seed=1), make_gpt(CFG, seed=2)
    assert torch.equal(torch.get_rng_state(), rng)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.embed.weight, c.embed.weight)


def test_a_few_steps_reduce_the_loss():
    model = make_gpt(CFG, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 97, (8, 16), generator=g)
    targets = (idx * 7 + 3) % 97  # a per-token rule the model can learn
    losses = []
    for _ in range(30):
        opt.zero_grad()
        _, loss = model(idx, targets)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_dropout_only_in_training():
    model = make_gpt(GPTConfig(vocab_size=50, block_size=8, n_layer=1, n_head=2, d_model=16, dropout=0.5), seed=0)
    idx = torch.randint(0, 50, (2, 8))
    model.eval()
    torch.testing.assert_close(model(idx)[0], model(idx)[0])
    model.train()
    assert not torch.allclose(model(idx)[0], model(idx)[0])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"d_model": 30, "n_head": 4}, "divisible"),
        ({"n_layer": 0}, "n_layer"),
        ({"dropout": 1.0}, "dropout"),
        ({"vocab_size": 0}, "vocab_size"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GPTConfig(**{"vocab_size": 10, **kwargs})
