"""Seeded batches, the held-out tail, and the one-call demo builder."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from heavytail.workload import SIZES, build_demo
from heavytail.workload.data import Batches, held_out_batch, split_held_out

# Token i is i: a window's values show where it was cut from.
STREAM = torch.arange(10_000)


def test_batches_are_windows_with_shifted_targets():
    x, y = Batches(STREAM, batch_size=4, block_size=8, seed=0).get(0)
    assert x.shape == y.shape == (4, 8) and x.dtype == torch.long
    torch.testing.assert_close(x[:, 1:], y[:, :-1])
    torch.testing.assert_close(x, x[:, :1] + torch.arange(8))  # contiguous windows of the stream
    assert int(y.max()) < len(STREAM)


def test_same_seed_same_order_and_random_access():
    a = Batches(STREAM, 4, 8, seed=3)
    b = Batches(STREAM, 4, 8, seed=3)
    for (xa, ya), (xb, yb) in zip(itertools.islice(a, 5), itertools.islice(b, 5)):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    # get(step) does not depend on what was drawn before, nor on the global RNG.
    torch.manual_seed(123)
    assert torch.equal(a.get(4)[0], next(itertools.islice(b, 4, 5))[0])
    assert not torch.equal(a.get(0)[0], a.get(1)[0])
    assert not torch.equal(a.get(0)[0], Batches(STREAM, 4, 8, seed=4).get(0)[0])


def test_held_out_tail_is_disjoint_from_training_windows():
    train, tail = split_held_out(STREAM, 0.05)
    assert len(tail) == 500 and torch.equal(torch.cat([train, tail]), STREAM)
    x, y = held_out_batch(STREAM, batch_size=16, block_size=8, seed=0)
    assert x.shape == (16, 8) and int(x.min()) >= 9_500
    assert torch.equal(x, held_out_batch(STREAM, 16, 8, seed=0)[0])
    xs = torch.cat([Batches(train, 16, 8, seed=0).get(s)[1] for s in range(50)])
    assert int(xs.max()) < 9_500


def test_too_short_streams():
    with pytest.raises(ValueError, match="block_size"):
        Batches(torch.arange(8), 2, 8)
    with pytest.raises(ValueError, match="held-out"):
        held_out_batch(torch.arange(100), 2, 8)
    with pytest.raises(ValueError, match="fraction"):
        split_held_out(STREAM, 1.0)
    with pytest.raises(ValueError, match="step"):
        Batches(STREAM, 2, 8).get(-1)


@pytest.fixture(scope="module")
def demo():
    return build_demo(seed=0, size="tiny", max_bytes=300_000, steps=20)


def test_build_demo(demo):
    cfg = demo.config
    tiny = SIZES["tiny"]
    assert cfg["n_layer"] == tiny["n_layer"] and cfg["batch_size"] == tiny["batch_size"]
    assert cfg["vocab_size"] == demo.tokenizer.vocab_size <= 4096
    assert cfg["n_train_tokens"] + cfg["n_held_out_tokens"] == cfg["n_tokens"]
    assert -1.4 < cfg["zipf_slope"] < -0.7
    x, y = demo.batches.get(0)
    assert x.shape == (tiny["batch_size"], tiny["block_size"])
    hx, _ = demo.held_out
    assert hx.shape == (4 * tiny["batch_size"], tiny["block_size"])
    _, loss = demo.model(x, y)
    assert loss.item() == pytest.approx(math.log(cfg["vocab_size"]), abs=0.15)


def test_build_demo_is_deterministic_per_seed(demo):
    again = build_demo(seed=0, size="tiny", max_bytes=300_000)
    other = build_demo(seed=1, size="tiny", max_bytes=300_000)
    for s in range(3):
        assert torch.equal(demo.batches.get(s)[0], again.batches.get(s)[0])
        assert not torch.equal(demo.batches.get(s)[0], other.batches.get(s)[0])
    assert torch.equal(demo.held_out[0], again.held_out[0])
    assert torch.equal(demo.model.embed.weight, again.model.embed.weight)
    assert not torch.equal(demo.model.embed.weight, other.model.embed.weight)
    fresh = demo.new_model()
    for pa, pb in zip(fresh.parameters(), again.model.parameters()):
        assert torch.equal(pa, pb)


def test_demo_trains(demo):
    model = demo.new_model()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _step, (x, y) in zip(range(40), demo.batches):
        opt.zero_grad()
        _, loss = model(x, y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 1.0


def test_build_demo_on_user_text(tmp_path):
    f = tmp_path / "corpus.txt"
    f.write_text(" ".join(f"word{i % 50}" for i in range(20_000)))
    w = build_demo(text=f, size="tiny")
    assert w.config["corpus"] == str(f)
    assert w.tokenizer.vocab_size == 52  # <unk>, " " and 50 words
    assert w.model.head.out_features == 52


def test_build_demo_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown size"):
        build_demo(size="huge")
    with pytest.raises(FileNotFoundError, match="missing"):
        build_demo(text=tmp_path / "missing")
    with pytest.raises(ValueError, match="steps"):
        build_demo(steps=0)
