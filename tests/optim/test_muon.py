"""MuonWithAdamW: parameter split, equivalence with two separate optimizers, hooks, state and schedulers."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from heavytail.optim import MuonWithAdamW, muon_with_adamw, split_params


class TinyLM(nn.Module):
    """The shape of a GPT: embeddings, hidden matrices with biases, norms, an output head."""

    def __init__(self, vocab=32, d=16, tie=False):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.fc = nn.Linear(d, 2 * d)
        self.proj = nn.Linear(2 * d, d)
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        if tie:
            self.head.weight = self.embed.weight

    def forward(self, idx):
        h = self.embed(idx)
        h = h + self.proj(torch.relu(self.fc(h)))
        return self.head(self.ln_f(h))


def _loss(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())


def _batches(n, vocab=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    # A learnable rule (next token = token + 1) so the loss has somewhere to go.
    out = []
    for _ in range(n):
        x = torch.randint(0, vocab, (8, 12), generator=g)
        out.append((x, (x + 1) % vocab))
    return out


def _names(opt, kind):
    return [n for g in opt.param_groups if g["optimizer"] == kind for n in g["param_names"]]


def test_split_sends_hidden_matrices_to_muon_and_the_rest_to_adamw():
    muon, adamw = split_params(TinyLM())
    assert [n for n, _ in muon] == ["fc.weight", "proj.weight"]
    assert [n for n, _ in adamw] == ["embed.weight", "fc.bias", "proj.bias", "ln_f.weight", "ln_f.bias", "head.weight"]


def test_tied_head_counts_once_as_embedding():
    muon, adamw = split_params(TinyLM(tie=True))
    assert [n for n, _ in muon] == ["fc.weight", "proj.weight"]
    assert "embed.weight" in [n for n, _ in adamw] and "head.weight" not in [n for n, _ in adamw]


def test_storage_tied_head_is_detected():
    model = TinyLM()
    # A different Parameter object over the embedding's storage: named_parameters() does not fold this tie.
    model.head.weight = nn.Parameter(model.embed.weight.data)
    model.head_out = model.head
    del model.head
    _, adamw = split_params(model)
    assert "head_out.weight" in [n for n, _ in adamw]


def test_adamw_names_override():
    muon, adamw = split_params(TinyLM(), adamw_names=["fc.*"])
    assert [n for n, _ in muon] == ["embed.weight", "proj.weight", "head.weight"]
    assert "fc.weight" in [n for n, _ in adamw] and "ln_f.weight" in [n for n, _ in adamw]
    with pytest.raises(ValueError, match="match no trainable parameter"):
        split_params(TinyLM(), adamw_names=["lm_head.weight"])


def test_frozen_and_empty_models():
    model = TinyLM()
    model.embed.requires_grad_(False)
    _, adamw = split_params(model)
    assert "embed.weight" not in [n for n, _ in adamw]
    with pytest.raises(ValueError, match="no trainable parameters"):
        split_params(nn.Linear(2, 2).requires_grad_(False))


def test_every_parameter_in_exactly_one_sub_optimizer():
    model = TinyLM()
    opt = muon_with_adamw(model)
    listed = [p for g in opt.param_groups for p in g["params"]]
    assert len(listed) == len({id(p) for p in listed})
    assert {id(p) for p in listed} == {id(p) for p in model.parameters()}
    assert [g["optimizer"] for g in opt.param_groups] == ["muon", "adamw"]
    assert opt.param_groups[0] is opt.muon.param_groups[0]
    assert opt.param_groups[1] is opt.adamw.param_groups[0]
    assert isinstance(opt.muon, torch.optim.Muon) and isinstance(opt.adamw, torch.optim.AdamW)


def test_trains_a_tiny_model():
    torch.manual_seed(0)
    model = TinyLM()
    opt = muon_with_adamw(model, lr=0.02, adamw_lr=1e-2)
    batches = _batches(60)
    losses = []
    for batch in batches:
        opt.zero_grad()
        loss = _loss(model, batch)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5


def test_same_result_as_two_separate_optimizers():
    torch.manual_seed(0)
    model = TinyLM()
    twin = copy.deepcopy(model)
    opt = muon_with_adamw(model, lr=0.05, adamw_lr=1e-2, weight_decay=0.1)
    muon_named, adamw_named = split_params(twin)
    muon = torch.optim.Muon([p for _, p in muon_named], lr=0.05, weight_decay=0.1, momentum=0.95)
    adamw = torch.optim.AdamW([p for _, p in adamw_named], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    for batch in _batches(5):
        for m, opts in ((model, [opt]), (twin, [muon, adamw])):
            for o in opts:
                o.zero_grad()
            _loss(m, batch).backward()
            for o in opts:
                o.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_state_lookup_by_parameter():
    model = TinyLM()
    opt = muon_with_adamw(model)
    _loss(model, _batches(1)[0]).backward()
    opt.step()
    assert "momentum_buffer" in opt.state[model.fc.weight]
    assert {"exp_avg", "exp_avg_sq", "step"} <= set(opt.state[model.embed.weight])
    assert {"exp_avg", "exp_avg_sq"} <= set(opt.state[model.fc.bias])
    assert len(opt.state) == len(list(model.parameters()))
    assert model.fc.weight in opt.state and torch.zeros(1) not in opt.state
    with pytest.raises(KeyError):
        opt.state[torch.zeros(1)]


def test_step_hooks_fire_once_per_step():
    model = TinyLM()
    opt = muon_with_adamw(model)
    seen = []
    handles = [
        opt.register_step_pre_hook(lambda o, a, k: seen.append(("pre", o))),
        opt.register_step_post_hook(lambda o, a, k: seen.append(("post", o))),
        register_optimizer_step_pre_hook(lambda o, a, k: seen.append(("global_pre", o))),
        register_optimizer_step_post_hook(lambda o, a, k: seen.append(("global_post", o))),
    ]
    try:
        for batch in _batches(3):
            opt.zero_grad()
            _loss(model, batch).backward()
            opt.step()
    finally:
        for h in handles:
            h.remove()
    assert [tag for tag, _ in seen] == ["global_pre", "pre", "post", "global_post"] * 3
    assert all(o is opt for _, o in seen)


def test_closure():
    model = TinyLM()
    opt = muon_with_adamw(model)
    batch = _batches(1)[0]
    calls = []

    def closure():
        calls.append(1)
        opt.zero_grad()
        loss = _loss(model, batch)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert calls == [1] and torch.is_tensor(loss)
    assert "momentum_buffer" in opt.state[model.fc.weight]


def test_state_dict_round_trip():
    torch.manual_seed(0)
    model = TinyLM()
    opt = muon_with_adamw(model, adamw_lr=1e-2)
    batches = _batches(6)

    def train(m, o, bs):
        for batch in bs:
            o.zero_grad()
            _loss(m, batch).backward()
            o.step()

    train(model, opt, batches[:3])
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    clone = copy.deepcopy(model)
    opt2 = muon_with_adamw(clone, lr=1.0, adamw_lr=1.0)
    buf.seek(0)
    opt2.load_state_dict(torch.load(buf))
    assert [g["lr"] for g in opt2.param_groups] == [0.02, 1e-2]
    assert opt2.param_groups[0] is opt2.muon.param_groups[0]
    assert opt2.param_groups[1] is opt2.adamw.param_groups[0]
    torch.testing.assert_close(
        opt2.state[clone.fc.weight]["momentum_buffer"], opt.state[model.fc.weight]["momentum_buffer"]
    )
    train(model, opt, batches[3:])
    train(clone, opt2, batches[3:])
    for a, b in zip(model.parameters(), clone.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_load_state_dict_rejects_a_different_layout():
    model = TinyLM()
    sd = muon_with_adamw(model).state_dict()
    sd["param_groups"] = sd["param_groups"][::-1]
    with pytest.raises(ValueError, match="belongs to 'muon' here"):
        muon_with_adamw(model).load_state_dict(sd)
    with pytest.raises(ValueError, match="parameter groups"):
        muon_with_adamw(model).load_state_dict({"state": {}, "param_groups": sd["param_groups"][:1]})


def test_lr_scheduler_reaches_both_sub_optimizers():
    model = TinyLM()
    opt = muon_with_adamw(model, lr=0.02, adamw_lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5**step)
    with warnings.catch_warnings():
        # The scheduler warns if it cannot see optimizer.step() being called first.
        warnings.simplefilter("error")
        for batch in _batches(2):
            opt.zero_grad()
            _loss(model, batch).backward()
            opt.step()
            sched.step()
    assert opt.muon.param_groups[0]["lr"] == pytest.approx(0.02 * 0.25)
    assert opt.adamw.param_groups[0]["lr"] == pytest.approx(1e-3 * 0.25)
    # After a checkpoint reload the scheduler still drives the (new) sub-optimizer groups.
    opt.load_state_dict(opt.state_dict())
    sched.step()
    assert opt.muon.param_groups[0]["lr"] == pytest.approx(0.02 * 0.125)
    assert opt.adamw.param_groups[0]["lr"] == pytest.approx(1e-3 * 0.125)


def test_zero_grad_and_add_param_group():
    model = TinyLM()
    extra = nn.Linear(4, 4)
    opt = muon_with_adamw(model)
    # muon_with_adamw names its groups' parameters, and torch wants all groups of one optimizer named or none.
    opt.add_param_group({"params": [("extra.weight", extra.weight)], "optimizer": "muon", "lr": 0.01})
    opt.add_param_group({"params": [("extra.bias", extra.bias)], "optimizer": "adamw"})
    assert [g["optimizer"] for g in opt.param_groups] == ["muon", "adamw", "muon", "adamw"]
    assert opt.muon.param_groups[-1]["lr"] == 0.01
    loss = _loss(model, _batches(1)[0]) + extra(torch.ones(4)).sum()
    loss.backward()
    opt.step()
    assert "momentum_buffer" in opt.state[extra.weight]
    opt.zero_grad()
    assert all(p.grad is None for g in opt.param_groups for p in g["params"])
    # Round trip with interleaved groups keeps the interleaving.
    opt.load_state_dict(opt.state_dict())
    assert [g["optimizer"] for g in opt.param_groups] == ["muon", "adamw", "muon", "adamw"]
    assert opt.param_groups[2] is opt.muon.param_groups[1]


def test_bad_groups():
    model = TinyLM()
    opt = muon_with_adamw(model)
    with pytest.raises(ValueError, match='"optimizer"'):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2, 2))]})
    with pytest.raises(ValueError, match="already belong"):
        opt.add_param_group({"params": [model.fc.weight], "optimizer": "adamw"})
    with pytest.raises(ValueError, match="2D"):
        MuonWithAdamW([{"params": [nn.Parameter(torch.zeros(3))], "optimizer": "muon"}])
    with pytest.raises(TypeError, match="muon_with_adamw"):
        MuonWithAdamW([nn.Parameter(torch.zeros(2, 2))])


def test_only_adamw_parameters():
    model = nn.Sequential(nn.Embedding(5, 3), nn.LayerNorm(3))
    opt = muon_with_adamw(model)
    assert opt.muon is None and [g["optimizer"] for g in opt.param_groups] == ["adamw"]
    model(torch.tensor([1, 2])).sum().backward()
    opt.step()
    assert "exp_avg_sq" in opt.state[model[0].weight]


def test_deepcopy():
    model = TinyLM()
    opt = muon_with_adamw(model)
    _loss(model, _batches(1)[0]).backward()
    opt.step()
    clone = copy.deepcopy(opt)
    assert clone.param_groups[0] is clone.muon.param_groups[0]
    p = clone.param_groups[0]["params"][0]
    assert "momentum_buffer" in clone.state[p]
    assert clone.state_dict()["state"].keys() == opt.state_dict()["state"].keys()


def test_demo_gpt_split():
    from heavytail.workload.model import GPT, GPTConfig

    model = GPT(GPTConfig(vocab_size=50, block_size=8, n_layer=2, n_head=2, d_model=16))
    opt = muon_with_adamw(model)
    hidden = [f"blocks.{i}.{m}.weight" for i in range(2) for m in ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")]
    assert _names(opt, "muon") == hidden
    assert {"embed.weight", "pos.weight", "head.weight", "ln_f.weight"} <= set(_names(opt, "adamw"))
