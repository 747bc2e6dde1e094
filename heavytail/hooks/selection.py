"""Which parameters a monitor watches: name globs, regexes and module types, with clear errors."""

from __future__ import annotations

import fnmatch
import re
from typing import Any, Sequence

import torch
from torch import nn


def _param_owner_types(model: nn.Module) -> dict[str, type]:
    owners: dict[str, type] = {}
    for module_name, module in model.named_modules():
        for param_name, _ in module.named_parameters(recurse=False):
            full = f"{module_name}.{param_name}" if module_name else param_name
            owners.setdefault(full, type(module))
    return owners


def _matches(pattern: Any, name: str, owner: type | None) -> bool:
    if isinstance(pattern, type):
        return owner is not None and issubclass(owner, pattern)
    if isinstance(pattern, re.Pattern):
        return pattern.search(name) is not None
    if isinstance(pattern, str):
        if pattern.startswith("re:"):
            try:
                return re.search(pattern[3:], name) is not None
            except re.error as exc:  # name the pattern: a bare re.error does not say which option was wrong
                raise ValueError(f"include/exclude: invalid regex {pattern!r}: {exc}") from None
        return fnmatch.fnmatchcase(name, pattern)
    raise TypeError(
        f"include/exclude: a pattern must be a glob string, 're:<regex>', a compiled regex or a module "
        f"type, got {pattern!r}"
    )


def select_parameters(
    model: nn.Module,
    include: Sequence[Any] | None = None,
    exclude: Sequence[Any] | None = None,
) -> list[tuple[str, torch.nn.Parameter]]:
    """The trainable parameters of ``model`` to watch, in ``named_parameters()`` order.

    A parameter is watched when it requires grad, matches any ``include`` pattern (all do when ``include`` is
    None) and matches no ``exclude`` pattern. Shared (tied) parameters are watched once, under their first name.
    Raises ``ValueError`` when nothing is left, naming the reason.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"Monitor: model must be a torch.nn.Module, got {type(model).__name__}")
    owners = _param_owner_types(model)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise ValueError(f"Monitor: {type(model).__name__} has no trainable parameters (none requires grad)")
    chosen = trainable
    if include is not None:
        for pattern in include:
            if not any(_matches(pattern, n, owners.get(n)) for n, _ in trainable):
                raise ValueError(f"Monitor: include pattern {pattern!r} matches no trainable parameter")
        chosen = [(n, p) for n, p in chosen if any(_matches(pat, n, owners.get(n)) for pat in include)]
    if exclude is not None:
        chosen = [(n, p) for n, p in chosen if not any(_matches(pat, n, owners.get(n)) for pat in exclude)]
    if not chosen:
        raise ValueError("Monitor: include/exclude leave no parameter to watch")
    return chosen
