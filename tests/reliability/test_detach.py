"""close() leaves the model and optimizer exactly as they were, and the monitor never changes what training does.

Gradients, optimizer state, final weights and the global RNG are compared bit for bit with and without a monitor.
"""

from __future__ import annotations

import torch
import torch.nn.modules.module as torch_module
import torch.optim.optimizer as torch_optimizer
from torch import nn

import heavytail as ht
from tests.reliability import one_intra_op_thread  # noqa: F401 (autouse fixture)

_MODULE_HOOKS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)
_OPTIMIZER_HOOKS = (
    "_optimizer_step_pre_hooks",
    "_optimizer_step_post_hooks",
    "_optimizer_state_dict_pre_hooks",
    "_optimizer_state_dict_post_hooks",
    "_optimizer_load_state_dict_pre_hooks",
    "_optimizer_load_state_dict_post_hooks",
)


class Net(nn.Module):
    """Embedding, dropout (so any use of the global RNG by the monitor would change the training) and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(40, 16)
        self.body = nn.Sequential(nn.Linear(16, 32), nn.Dropout(0.2), nn.GELU(), nn.Linear(32, 16))
        self.head = nn.Linear(16, 1)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.embed(idx).mean(dim=1)))


def _setup():
    torch.manual_seed(0)
    model = Net()
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def _step(model, opt, mon, step: int, nan_at: int | None = None) -> None:
    gen = torch.Generator().manual_seed(step)
    idx, y = torch.randint(0, 40, (8, 6), generator=gen), torch.randn(8, 1, generator=gen)
    loss = nn.functional.mse_loss(model(idx), y)
    loss.backward()
    if step == nan_at:
        model.body[0].weight.grad[0, 0] = float("nan")  # the monitor must not clean it up either
    if mon is not None:
        mon.observe_loss(loss)
    opt.step()
    opt.zero_grad(set_to_none=True)


def _hook_counts(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, int]:
    counts = {}
    for name, module in model.named_modules():
        for attr in _MODULE_HOOKS:
            counts[f"{name}.{attr}"] = len(getattr(module, attr))
    for name, p in model.named_parameters():
        counts[f"{name}._post_accumulate_grad_hooks"] = len(p._post_accumulate_grad_hooks or {})
        counts[f"{name}._backward_hooks"] = len(p._backward_hooks or {})
    for attr in _OPTIMIZER_HOOKS:
        counts[f"optimizer.{attr}"] = len(getattr(opt, attr))
    counts["global.optimizer_pre"] = len(torch_optimizer._global_optimizer_pre_hooks)
    counts["global.optimizer_post"] = len(torch_optimizer._global_optimizer_post_hooks)
    counts["global.module_forward"] = len(torch_module._global_forward_hooks)
    counts["global.module_backward"] = len(torch_module._global_backward_hooks)
    return counts


def _attributes(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, set[str]]:
    attrs = {f"module {name}": set(vars(module)) for name, module in model.named_modules()}
    for name, p in model.named_parameters():
        # PyTorch keeps an empty hook dict on a tensor once a hook was registered and removed: not ours, no hook.
        attrs[f"param {name}"] = {k for k, v in vars(p).items() if not (k == "_post_accumulate_grad_hooks" and not v)}
    attrs["optimizer"] = set(vars(opt))
    attrs["param_groups"] = {k for g in opt.param_groups for k in g}
    return attrs


def _assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, equal_nan=True, msg=f"{key} differs")


def test_close_leaves_model_and_optimizer_as_they_were(tmp_path):
    model, opt = _setup()
    _step(model, opt, None, 0)  # the optimizer has state before the monitor comes
    hooks, attrs = _hook_counts(model, opt), _attributes(model, opt)
    state_keys = {id(p): set(s) for p, s in opt.state.items()}
    mon = ht.Monitor(model, opt, every=2, log_dir=tmp_path / "a")
    assert _hook_counts(model, opt) != hooks  # it did attach
    for step in range(1, 6):
        _step(model, opt, mon, step)
    mon.close()
    assert _hook_counts(model, opt) == hooks
    assert _attributes(model, opt) == attrs
    assert {id(p): set(s) for p, s in opt.state.items()} == state_keys  # no extra optimizer state
    assert not any(isinstance(v, ht.Monitor) for v in vars(model).values())
    # Nothing remembers the model: it attaches again.
    ht.Monitor(model, opt, log_dir=tmp_path / "b").close()
    assert _hook_counts(model, opt) == hooks


def test_the_monitor_never_changes_a_gradient(tmp_path):
    """Gradients as the optimizer receives them, captured before and after the monitor's hook, are the same
    tensors with the same bits (a NaN included), at every step and at checkpoints."""
    model, opt = _setup()
    before, after = [], []

    def capture(into):
        def hook(optimizer, args, kwargs):
            into.append({n: (p.grad, p.grad.data_ptr(), p.grad.clone()) for n, p in model.named_parameters()})

        return hook

    opt.register_step_pre_hook(capture(before))  # runs before the monitor's hook
    mon = ht.Monitor(model, opt, every=2, log_dir=tmp_path)
    opt.register_step_pre_hook(capture(after))  # and this one after it
    for step in range(6):
        _step(model, opt, mon, step, nan_at=3)
    mon.close()
    assert len(before) == len(after) == 6
    for b, a in zip(before, after):
        for name in b:
            assert a[name][0] is b[name][0] and a[name][1] == b[name][1]  # the same tensor, in place
            torch.testing.assert_close(a[name][2], b[name][2], rtol=0, atol=0, equal_nan=True)


def test_training_is_bit_for_bit_the_same_with_and_without_a_monitor(tmp_path):
    runs = {}
    for monitored in (False, True):
        model, opt = _setup()
        grads = []
        opt.register_step_pre_hook(
            lambda o, a, k, grads=grads, model=model: grads.append(
                {n: p.grad.clone() for n, p in model.named_parameters()}
            )
        )
        mon = ht.Monitor(model, opt, every=3, log_dir=tmp_path / "m") if monitored else None
        for step in range(10):
            _step(model, opt, mon, step)
            if step == 6 and mon is not None:
                mon.close()  # detached mid-run: training goes on as if it had never been there
        runs[monitored] = (model.state_dict(), opt.state_dict(), grads, torch.get_rng_state())
    (w0, o0, g0, rng0), (w1, o1, g1, rng1) = runs[False], runs[True]
    _assert_same_tensors(w0, w1)
    for s0, s1 in zip(g0, g1, strict=True):
        _assert_same_tensors(s0, s1)
    assert o0["param_groups"] == o1["param_groups"]
    assert o0["state"].keys() == o1["state"].keys()
    for k in o0["state"]:
        _assert_same_tensors(o0["state"][k], o1["state"][k])
    assert torch.equal(rng0, rng1)  # the monitor draws nothing from the global generator
