"""Optimizer taps: step hooks that bracket every update, and reads of the optimizer's denominator state."""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import torch

from heavytail.distributed import local
from heavytail.estimators import cpu_pass
from heavytail.estimators.gradient_pass import Denominators
from heavytail.transfer import to_device


class OptimizerTap:
    """Calls ``before()`` just before and ``after()`` just after every ``optimizer.step()``.

    Uses ``Optimizer.register_step_pre_hook`` / ``register_step_post_hook``, so the training loop does not change
    and steps that never reach the optimizer (``GradScaler`` skips a step with inf/NaN gradients) are not counted.
    ``remove()`` takes both hooks off; calling it twice is harmless.

    ``step(closure)``: the closure runs *inside* ``step()``, after the pre-hook, and it is what computes the
    gradients (Lightning steps every optimizer this way: forward, backward and clipping happen in the closure). So
    when a closure is given, the pre-hook wraps it and ``before()`` runs right after its first call returns, on the
    fresh gradients and before the update. Later calls (LBFGS's line search) do not count again. If the optimizer
    never calls the closure, ``before()`` runs in the post-hook, so every step is still seen once.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, before: Callable[[], None], after: Callable[[], None]):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"Monitor: optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self._before = before
        self._after = after
        self._before_pending = False
        self._handles = [
            optimizer.register_step_pre_hook(self._pre),
            optimizer.register_step_post_hook(self._post),
        ]

    def _pre(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        # ``args`` starts with the optimizer itself (torch passes the bound call's arguments).
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
        if closure is None:
            self._before()
            return None
        self._before_pending = True

        def closure_then_before() -> Any:
            result = closure()
            if self._before_pending:
                self._before_pending = False
                self._before()
            return result

        if "closure" in kwargs:
            return args, {**kwargs, "closure": closure_then_before}
        return (args[0], closure_then_before, *args[2:]), kwargs

    def _post(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        if self._before_pending:  # a closure the optimizer never called
            self._before_pending = False
            self._before()
        self._after()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


class ScalerTap:
    """Calls ``after()`` after every ``scaler.update()`` of a ``torch.amp.GradScaler``.

    A GradScaler that finds inf or NaN gradients skips ``optimizer.step()``: the step hooks never fire, and the
    backward passes of that iteration would count as micro-batches of the next step. ``update()`` closes every
    iteration, stepped or skipped, so the monitor learns there that an iteration ended without a step. The tap
    shadows the instance's ``update`` with a wrapper (the class is not touched); ``remove()`` takes it off if it is
    still the one installed.
    """

    def __init__(self, scaler: Any, after: Callable[[], None]) -> None:
        self._scaler = scaler
        original = scaler.update

        def update(*args: Any, **kwargs: Any) -> Any:
            result = original(*args, **kwargs)
            after()
            return result

        self._wrapper = update
        scaler.update = update

    def remove(self) -> None:
        if self._scaler is not None and self._scaler.__dict__.get("update") is self._wrapper:
            del self._scaler.update
        self._scaler = None


def check_owns(optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor], names: Sequence[str]) -> None:
    """Raise ``ValueError`` when a watched parameter is not in any of ``optimizer``'s param groups."""
    owned = {id(p) for group in optimizer.param_groups for p in group["params"]}
    missing = [n for n, p in zip(names, params) if id(p) not in owned]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ValueError(
            f"Monitor: the optimizer does not own the watched parameter {missing[0]!r}{more}; pass the optimizer "
            "that trains this model, or exclude those parameters"
        )


def _group_of(optimizer: torch.optim.Optimizer) -> dict[int, dict]:
    return {id(p): group for group in optimizer.param_groups for p in group["params"]}


def optimizer_kind(group: Mapping[str, Any]) -> str:
    """What plays the denominator for a parameter group (DESIGN's table): adam, adafactor, lion, muon, sgd, other."""
    if "ns_coefficients" in group or "ns_steps" in group:
        return "muon"
    if "beta2_decay" in group:
        return "adafactor"
    if "betas" in group and isinstance(group.get("eps"), float):
        return "adam"
    if "betas" in group:
        return "lion"
    if "momentum" in group and "dampening" in group:
        return "sgd"
    return "other"


def param_kinds(optimizer: torch.optim.Optimizer | None, params: Sequence[torch.Tensor]) -> list[str]:
    """:func:`optimizer_kind` of each parameter's group ("none" without an optimizer)."""
    if optimizer is None:
        return ["none"] * len(params)
    groups = _group_of(optimizer)
    return [optimizer_kind(groups[id(p)]) if id(p) in groups else "none" for p in params]


def _adafactor_variance(state: Mapping[str, Any], group: Mapping[str, Any], p: torch.Tensor) -> torch.Tensor | None:
    """Adafactor's second-moment estimate v_hat, materialised from its factors as ``torch.optim.Adafactor`` does.

    Factored (2-D and up): v_hat = row_var @ col_var / mean(row_var) (Shazeer & Stern 2018); vectors keep a full
    ``variance``. The optimizer divides by max(sqrt(v_hat), eps1), so v_hat is clamped at eps1^2 here.
    """
    eps1 = group["eps"][0] if isinstance(group.get("eps"), (tuple, list)) else None
    if eps1 is None:
        eps1 = torch.finfo(p.dtype).eps
    if state.get("row_var") is not None and state.get("col_var") is not None:
        row, col = state["row_var"], state["col_var"]
        v = (row @ col) / row.mean(dim=-2, keepdim=True).clamp(min=eps1)
    elif state.get("variance") is not None:
        v = state["variance"]
    else:
        return None
    return v.clamp(min=eps1 * eps1)


def denominators(
    optimizer: torch.optim.Optimizer | None,
    params: Sequence[torch.Tensor],
    device: torch.device,
    rows: Mapping[int, int] | None = None,
) -> Denominators | None:
    """The optimizer's denominator for each watched parameter, as the *next* ``step()`` will divide by it.

    - Adam-like groups (``exp_avg_sq`` with ``betas`` and a scalar ``eps``: Adam, AdamW, NAdam, RAdam, fused or
      foreach, and the AdamW half of Muon+AdamW): v_{t-1}, its bias correction 1 - beta2^(t-1) from the
      optimizer's own step counter, and eps (``max_exp_avg_sq`` under AMSGrad).
    - Adafactor: the factored estimate v_hat materialised per tensor (a transient of the tensor's size), no bias
      correction (its beta2 schedule has none), eps folded into v_hat as the optimizer clamps it.
    ``None`` entries mark parameters without one (first step, or Lion, Muon, SGD); the shadow denominators
    cover those. Reads tensors only: no host-device synchronization. ``rows``: ``id(p)`` -> index in ``params``
    (built here when not given).
    """
    if optimizer is None:
        return None
    if rows is None:
        rows = {id(p): i for i, p in enumerate(params)}
    count = len(params)
    vs: list[torch.Tensor | None] = [None] * count
    one = torch.ones(())
    steps: list[torch.Tensor] = [one] * count
    beta2s, epss = [0.0] * count, [0.0] * count
    found = False
    state_of = optimizer.state
    # Group by group: the hyper-parameters are read once per group, and each watched parameter costs a few dict
    # lookups (this runs at every step, for models of up to tens of thousands of tensors).
    for group in optimizer.param_groups:
        adam = "betas" in group and isinstance(group.get("eps"), float)
        adafactor = "beta2_decay" in group
        if not (adam or adafactor):
            continue
        if adam:
            amsgrad, beta2, eps = bool(group.get("amsgrad")), float(group["betas"][1]), float(group["eps"])
        for p in group["params"]:
            i = rows.get(id(p))
            if i is None:
                continue
            state = state_of.get(p)
            if not state:
                continue
            if adam and "exp_avg_sq" in state:
                v = state["max_exp_avg_sq"] if amsgrad and "max_exp_avg_sq" in state else state["exp_avg_sq"]
                vs[i] = local(v)
                step = state.get("step", one)
                steps[i] = step if isinstance(step, torch.Tensor) else torch.tensor(float(step))
                beta2s[i], epss[i] = beta2, eps
                found = True
            elif adafactor:
                v = _adafactor_variance(state, group, p)
                if v is not None:  # no bias correction (its beta2 schedule has none), eps folded into v
                    vs[i] = v
                    step = state.get("step", one)
                    steps[i] = step if isinstance(step, torch.Tensor) else torch.tensor(float(step))
                    found = True
    if not found:
        return None
    try:  # one stack: the counters all on the host (the default), or all on the device
        step_vec = torch.stack(steps).reshape(-1)
    except RuntimeError:  # counters of different shapes, () and (1,), or on different devices
        step_vec = None
    if step_vec is not None and step_vec.device.type == "cpu":
        step_vec = to_device(step_vec, device, torch.float64)
    elif step_vec is not None:
        step_vec = step_vec.to(device, torch.float64)
    elif all(s.device.type == "cpu" for s in steps):
        step_vec = to_device(torch.stack([s.reshape(()) for s in steps]), device, torch.float64)
    else:  # capturable/fused optimizers keep them on the device
        step_vec = torch.stack([s.to(device, torch.float64, non_blocking=True).reshape(()) for s in steps])
    beta2 = _constant(beta2s, device)
    bias_correction = 1.0 - beta2**step_vec
    return Denominators(vs, bias_correction, _constant(epss, device), step_vec)


_CONSTANTS: dict[tuple, torch.Tensor] = {}
_MAX_CONSTANTS = 16


def _constant(values: list[float], device: torch.device) -> torch.Tensor:
    """``values`` as a float64 tensor on ``device``, built once per distinct list: the per-tensor beta2 and eps
    change only when a user edits a param group, and building them from Python lists at every step costs more
    than the rest of this read. Read-only: every consumer derives new tensors from them."""
    key = (device, tuple(values))
    tensor = _CONSTANTS.get(key)
    if tensor is None:
        if len(_CONSTANTS) >= _MAX_CONSTANTS:
            _CONSTANTS.pop(next(iter(_CONSTANTS)))
        tensor = _CONSTANTS[key] = to_device(values, device, torch.float64)
    return tensor


SMALL_TENSOR = 1 << 14
"""Tensors up to this many entries are sampled together: one copy of all of them and one gather. Indexing each
tensor on its own costs ~12 us of dispatch, more than copying 16,000 entries."""


def gather_samples(
    tensors: Sequence[torch.Tensor | None],
    sample_index: torch.Tensor,
    dtype: torch.dtype,
    fill: float = math.nan,
    prepared: bool = False,
) -> torch.Tensor:
    """Each tensor's entries at its sampled coordinates, ``(L, S)`` (``fill`` where a tensor is None).
    ``prepared``: the tensors are already local and real (or None), as the monitor's parameter list is."""
    # A shard may be empty; a complex tensor has no real samples (casting would drop its imaginary part).
    if not prepared:
        tensors = [None if t is None or t.is_complex() else local(t) for t in tensors]
    if sample_index.device.type == "cpu" and cpu_pass.available():  # one C call for every tensor
        return cpu_pass.gather(tensors, sample_index, dtype, fill)
    out = torch.full(tuple(sample_index.shape), fill, device=sample_index.device, dtype=dtype)
    rows = [i for i, t in enumerate(tensors) if t is not None and t.numel() > 0]
    small = [i for i in rows if tensors[i].numel() <= SMALL_TENSOR]
    big = [i for i in rows if tensors[i].numel() > SMALL_TENSOR]
    device = sample_index.device
    if small:
        flat = torch.cat([tensors[i].detach().reshape(-1) for i in small])
        sizes = torch.tensor([tensors[i].numel() for i in small])
        offsets = to_device(torch.cumsum(sizes, 0) - sizes, device)
        index = to_device(small, device, torch.int64)
        out[index] = flat[(sample_index[index] + offsets[:, None]).reshape(-1)].view(len(small), -1).to(dtype)
    if big:
        out[to_device(big, device, torch.int64)] = torch.stack(
            [tensors[i].detach().reshape(-1)[sample_index[i]].to(dtype) for i in big]
        )
    return out


def premomentum_matrix(
    optimizer: torch.optim.Optimizer, p: torch.Tensor, group: Mapping[str, Any] | None
) -> torch.Tensor | None:
    """The matrix Muon is about to orthogonalise for ``p`` (in param group ``group``): buf_t = lerp(buf_{t-1},
    g_t, 1 - mu), then the Nesterov form lerp(g_t, buf_t, mu) (``torch.optim.Muon``, whose first step starts from
    buf_0 = 0); ``None`` without grad."""
    if group is None or p.grad is None:
        return None
    state = optimizer.state.get(p) or {}
    mu = float(group["momentum"])
    previous = state.get("momentum_buffer")
    buf = (torch.zeros_like(p.grad) if previous is None else previous).lerp(p.grad, 1 - mu)
    return p.grad.lerp(buf, mu) if group.get("nesterov", True) else buf
