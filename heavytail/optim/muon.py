"""Muon on hidden weight matrices and AdamW on everything else, presented as one optimizer."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Iterator, MutableMapping
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.optim.optimizer import Optimizer

__all__ = ["HEAD_NAMES", "MuonWithAdamW", "muon_with_adamw", "split_params"]

#: Last component of a module path that marks an output head (nanoGPT ``head``, Hugging Face ``lm_head``,
#: ``classifier`` and ``score``, torchtitan ``output``). Heads and embeddings are not maps between hidden spaces,
#: and Muon's authors found they train better with AdamW (Jordan et al. 2024), so every Muon recipe excludes them.
HEAD_NAMES = frozenset({"head", "lm_head", "output", "classifier", "score"})

_KINDS = ("muon", "adamw")


def split_params(
    model: nn.Module, adamw_names: Iterable[str] | None = None
) -> tuple[list[tuple[str, nn.Parameter]], list[tuple[str, nn.Parameter]]]:
    """Split a model's trainable parameters into (Muon, AdamW) lists of ``(name, parameter)``.

    Muon (Jordan et al. 2024, "Muon: an optimizer for hidden layers in neural networks") orthogonalises the update
    of a 2-D hidden weight matrix; everything else goes to AdamW: parameters with ``ndim != 2`` (biases, norm
    gains, convolution kernels), weights of ``nn.Embedding``/``nn.EmbeddingBag`` modules and anything tied to
    them, and output heads (modules whose name is in :data:`HEAD_NAMES`).

    ``adamw_names`` replaces the embedding and head detection: a 2-D parameter goes to AdamW exactly when its
    name matches one of these exact names or ``fnmatch`` patterns (``"blocks.*.attn.qkv.weight"``). Parameters
    with ``ndim != 2`` always go to AdamW, since Muon cannot update them. A pattern that matches no parameter is an
    error, so a typo cannot silently send a head to Muon.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError(f"{type(model).__name__} has no trainable parameters")

    if adamw_names is not None:
        patterns = [adamw_names] if isinstance(adamw_names, str) else list(adamw_names)
        unmatched = [pat for pat in patterns if not any(fnmatch.fnmatchcase(n, pat) for n, _ in named)]
        if unmatched:
            raise ValueError(f"adamw_names entries match no trainable parameter: {unmatched}")

        def wants_adamw(name: str, p: Tensor) -> bool:
            return any(fnmatch.fnmatchcase(name, pat) for pat in patterns)

    else:
        embedding_params: list[Tensor] = []
        for module in model.modules():
            if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
                embedding_params.extend(module.parameters(recurse=False))
        embedding_ids = {id(p) for p in embedding_params}
        # A head tied to the embedding through a *different* Parameter object sharing storage is still the
        # embedding; named_parameters() only folds ties that reuse the same object.
        embedding_ptrs = {_storage_ptr(p) for p in embedding_params} - {None}

        def wants_adamw(name: str, p: Tensor) -> bool:
            if id(p) in embedding_ids or _storage_ptr(p) in embedding_ptrs:
                return True
            module_path = name.rsplit(".", 1)[0] if "." in name else ""
            return module_path.rsplit(".", 1)[-1] in HEAD_NAMES

    muon: list[tuple[str, nn.Parameter]] = []
    adamw: list[tuple[str, nn.Parameter]] = []
    for name, p in named:
        if p.ndim != 2 or wants_adamw(name, p):
            adamw.append((name, p))
        else:
            muon.append((name, p))
    return muon, adamw


def _storage_ptr(p: Tensor) -> int | None:
    # Meta tensors and some tensor subclasses (sharded DTensors) have no usable data pointer.
    if p.device.type == "meta":
        return None
    try:
        return p.data_ptr() or None
    except RuntimeError:
        return None


def muon_with_adamw(
    model: nn.Module,
    lr: float = 0.02,
    adamw_lr: float = 3e-4,
    weight_decay: float = 0.0,
    momentum: float = 0.95,
    adamw_betas: tuple[float, float] = (0.9, 0.95),
    *,
    adamw_names: Iterable[str] | None = None,
    adamw_eps: float = 1e-8,
    **muon_kwargs: Any,
) -> "MuonWithAdamW":
    """Build the usual Muon recipe for ``model``: Muon on hidden matrices, AdamW on the rest (see :func:`split_params`).

    ``lr``, ``momentum`` and ``muon_kwargs`` (``nesterov``, ``ns_steps``, ``ns_coefficients``, ``eps``,
    ``adjust_lr_fn``) go to ``torch.optim.Muon``; ``adamw_lr``, ``adamw_betas`` and ``adamw_eps`` to
    ``torch.optim.AdamW``; ``weight_decay`` (decoupled) to both. The defaults are those of Keller Jordan's
    nanoGPT speedrun (Muon lr 0.02, momentum 0.95, Nesterov; AdamW betas (0.9, 0.95)).

    Returns one optimizer: ``param_groups`` hold every parameter with ``group["optimizer"]`` naming its
    sub-optimizer and ``group["param_names"]`` the parameters' names.
    """
    muon_named, adamw_named = split_params(model, adamw_names)
    groups: list[dict[str, Any]] = []
    if muon_named:
        groups.append({"params": muon_named, "optimizer": "muon"})
    if adamw_named:
        groups.append({"params": adamw_named, "optimizer": "adamw"})
    return MuonWithAdamW(
        groups,
        lr=lr,
        adamw_lr=adamw_lr,
        weight_decay=weight_decay,
        momentum=momentum,
        adamw_betas=adamw_betas,
        adamw_eps=adamw_eps,
        **muon_kwargs,
    )


class _MergedState(MutableMapping):
    """``optimizer.state`` of a :class:`MuonWithAdamW`: each parameter's state lives in its own sub-optimizer.

    Reads are live (a sub-optimizer's ``load_state_dict`` replaces its state dict, and this view follows), and a
    parameter without state yet gets an empty dict, as with ``torch.optim``'s ``defaultdict(dict)``.
    """

    def __init__(self, owner: "MuonWithAdamW") -> None:
        self._owner = owner

    def _inner_for(self, key: Any) -> Optimizer | None:
        kind = self._owner._kind_of.get(key) if isinstance(key, Tensor) else None
        if kind is not None:
            return self._owner._inner[kind]
        for opt in self._owner._inner.values():
            if key in opt.state:
                return opt
        return None

    def __getitem__(self, key: Any) -> Any:
        opt = self._inner_for(key)
        if opt is None:
            raise KeyError(key)
        return opt.state[key]

    def __setitem__(self, key: Any, value: Any) -> None:
        opt = self._inner_for(key)
        if opt is None:
            raise KeyError(f"not a parameter of this optimizer: {key!r}")
        opt.state[key] = value

    def __delitem__(self, key: Any) -> None:
        opt = self._inner_for(key)
        if opt is None or key not in opt.state:
            raise KeyError(key)
        del opt.state[key]

    def __contains__(self, key: object) -> bool:
        # Not Mapping's default (which calls __getitem__): that would create empty entries as a side effect.
        return any(key in opt.state for opt in self._owner._inner.values())

    def __iter__(self) -> Iterator[Any]:
        for opt in self._owner._inner.values():
            yield from opt.state

    def __len__(self) -> int:
        return sum(len(opt.state) for opt in self._owner._inner.values())

    def __repr__(self) -> str:
        return f"_MergedState({dict(self)!r})"


class MuonWithAdamW(Optimizer):
    """``torch.optim.Muon`` and ``torch.optim.AdamW`` over disjoint parameters, stepping together as one optimizer.

    Muon: B_t = mu * B_{t-1} + (1 - mu) * g_t, O_t = NewtonSchulz5(g_t + mu * (B_t - g_t)) (Nesterov),
    theta -= lr * sqrt(max(1, rows/cols)) * O_t (Jordan et al. 2024; torch's implementation, state
    ``momentum_buffer``). AdamW: Loshchilov & Hutter 2019 (state ``exp_avg``, ``exp_avg_sq``, ``step``).

    Each entry of ``params`` is a parameter group with ``"optimizer": "muon"`` or ``"adamw"``; its other keys
    override that sub-optimizer's defaults (so ``lr`` in an AdamW group is an AdamW learning rate). To the
    outside this is a plain optimizer:

    - ``param_groups`` is the sub-optimizers' groups, the very same dict objects, so learning-rate schedulers
      and manual ``group["lr"] = ...`` edits reach the sub-optimizers;
    - ``state[p]`` finds ``momentum_buffer`` for a Muon parameter and ``exp_avg_sq`` for an AdamW one;
    - ``register_step_pre_hook``/``register_step_post_hook`` fire once per ``step()``. The sub-optimizers are
      stepped without their hook wrappers, so global optimizer hooks also fire once per step, not three times;
      hooks registered on ``.muon``/``.adamw`` themselves therefore do not fire;
    - ``state_dict()`` is the standard format over the concatenated groups and ``load_state_dict`` splits it back.
    """

    def __init__(
        self,
        params: Iterable[dict[str, Any]],
        *,
        lr: float = 0.02,
        adamw_lr: float = 3e-4,
        weight_decay: float = 0.0,
        momentum: float = 0.95,
        adamw_betas: tuple[float, float] = (0.9, 0.95),
        adamw_eps: float = 1e-8,
        **muon_kwargs: Any,
    ) -> None:
        self._muon_defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, **muon_kwargs)
        self._adamw_defaults = dict(lr=adamw_lr, betas=tuple(adamw_betas), eps=adamw_eps, weight_decay=weight_decay)
        # Set before Optimizer.__init__, which routes every group through add_param_group below.
        self._inner: dict[str, Optimizer] = {}
        self._kind_of: dict[Tensor, str] = {}
        groups = list(params)
        if groups and not all(isinstance(g, dict) for g in groups):
            raise TypeError(
                'MuonWithAdamW takes parameter groups with an "optimizer" key; build it with muon_with_adamw(model)'
            )
        defaults = dict(
            lr=lr,
            adamw_lr=adamw_lr,
            weight_decay=weight_decay,
            momentum=momentum,
            adamw_betas=tuple(adamw_betas),
            adamw_eps=adamw_eps,
            **muon_kwargs,
        )
        super().__init__(groups, defaults)
        self.state = _MergedState(self)  # type: ignore[assignment]

    @property
    def muon(self) -> Optimizer | None:
        """The inner ``torch.optim.Muon`` (None when no parameter is a hidden matrix)."""
        return self._inner.get("muon")

    @property
    def adamw(self) -> Optimizer | None:
        """The inner ``torch.optim.AdamW`` (None when every parameter is a hidden matrix)."""
        return self._inner.get("adamw")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the sub-optimizer named by ``param_group["optimizer"]`` ("muon" or "adamw")."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, but got {type(param_group)}")
        kind = param_group.get("optimizer")
        if kind not in _KINDS:
            raise ValueError(f'each parameter group needs "optimizer": "muon" or "adamw", got {kind!r}')
        params = param_group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        tensors = [p[1] if isinstance(p, tuple) else p for p in params]
        taken = [p for p in tensors if p in self._kind_of]
        if taken:
            raise ValueError(f"{len(taken)} parameter(s) already belong to another parameter group")
        param_group = {**param_group, "params": params}
        inner = self._inner.get(kind)
        if inner is None:
            # The sub-optimizer is built from its first group: torch optimizers refuse an empty parameter list.
            if kind == "muon":
                inner = torch.optim.Muon([param_group], **self._muon_defaults)
            else:
                inner = torch.optim.AdamW([param_group], **self._adamw_defaults)
            self._inner[kind] = inner
        else:
            inner.add_param_group(param_group)
        self.param_groups.append(inner.param_groups[-1])
        for p in tensors:
            self._kind_of[p] = kind

    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Evaluate ``closure`` (if given) once, then step Muon and AdamW on their own parameters."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for opt in self._inner.values():
            _step_without_hooks(opt)
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a :meth:`state_dict` of a ``MuonWithAdamW`` built over the same parameters and groups."""
        state_dict = state_dict.copy()
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"loaded state dict has {len(saved_groups)} parameter groups, "
                f"this optimizer has {len(self.param_groups)}"
            )
        parts: dict[str, dict[str, Any]] = {kind: {"state": {}, "param_groups": []} for kind in self._inner}
        for i, (group, saved) in enumerate(zip(self.param_groups, saved_groups)):
            kind = group["optimizer"]
            if saved.get("optimizer") != kind:
                raise ValueError(
                    f"parameter group {i} belongs to {kind!r} here but to {saved.get('optimizer')!r} in the state dict"
                )
            parts[kind]["param_groups"].append(saved)
            for pid in saved["params"]:
                if pid in state_dict["state"]:
                    parts[kind]["state"][pid] = state_dict["state"][pid]
        for kind, opt in self._inner.items():
            opt.load_state_dict(parts[kind])
        # The sub-optimizers now hold new group dicts. Refill the same list object, in the original interleaving,
        # because schedulers and user code may hold a reference to optimizer.param_groups.
        taken = {kind: 0 for kind in self._inner}
        new_groups = []
        for group in self.param_groups:
            kind = group["optimizer"]
            new_groups.append(self._inner[kind].param_groups[taken[kind]])
            taken[kind] += 1
        self.param_groups[:] = new_groups
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def __getstate__(self) -> dict[str, Any]:
        # Optimizer.__getstate__ keeps only defaults/state/param_groups; the sub-optimizers are the real state.
        return {
            "defaults": self.defaults,
            "param_groups": self.param_groups,
            "_inner": self._inner,
            "_muon_defaults": self._muon_defaults,
            "_adamw_defaults": self._adamw_defaults,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._kind_of = {p: g["optimizer"] for g in self.param_groups for p in g["params"]}
        self.state = _MergedState(self)  # type: ignore[assignment]


def _step_without_hooks(opt: Optimizer) -> Any:
    # Optimizer.__init__ wraps each subclass's step once (profile_hook_step) with the code that runs the global
    # and per-instance step hooks; calling the function underneath keeps global hooks to one call per outer step.
    step = type(opt).step
    if getattr(step, "hooked", False):
        step = step.__wrapped__
    return step(opt)
