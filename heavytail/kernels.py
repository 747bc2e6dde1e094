"""Which kernels run the step's estimators here (C on the CPU, Triton on CUDA, or torch), and their fallback."""

from __future__ import annotations

import warnings
from typing import Any, Callable, Sequence

import torch

from heavytail.config import MonitorConfig
from heavytail.estimators import cpu_pass

UNAVAILABLE = object()
"""What :meth:`Kernels.call` returns when the kernel is absent or has just failed: run the torch reference."""

_FAILURE = {
    "gradient_pass": "the fused gradient pass failed ({error}); using the torch pass from now on",
    "samples": "the sample estimators' kernel failed ({error}); using the torch code from now on",
}


class Kernels:
    """The fused kernels one monitor uses, chosen once at attach by :func:`select`.

    ``gradient_pass``: the one-read pass over every gradient (``cpu_pass.cpu_gradient_pass`` or
    ``triton_pass.triton_gradient_pass``); ``samples``: the module whose ``sample_step``/``update_step`` run the
    sample families in one call (``cpu_pass`` or ``triton_samples``). None means the torch code, which computes
    the same figures and stays the reference in the tests. A kernel that fails (a build, launch or layout error)
    is reported once and replaced by the torch code for the rest of the run; it writes nothing when it fails.
    """

    def __init__(self, gradient_pass: Callable | None, samples: Any, device: torch.device) -> None:
        self.gradient_pass = gradient_pass
        self.samples = samples
        self.device = device

    def call(self, kind: str, function: str | None, *args: Any, **kwargs: Any) -> Any:
        """``kind``'s kernel (or its ``function``) applied to the arguments, or ``UNAVAILABLE``."""
        impl = getattr(self, kind)
        if impl is None:
            return UNAVAILABLE
        try:
            return (impl if function is None else getattr(impl, function))(*args, **kwargs)
        except Exception as exc:  # the torch code gives the same numbers
            setattr(self, kind, None)
            error = f"{type(exc).__name__}: {exc}"
            warnings.warn(f"heavytail: {_FAILURE[kind].format(error=error)}", RuntimeWarning, stacklevel=3)
            return UNAVAILABLE

    def sums_of_squares(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor | None:
        """Each tensor's sum of squares in one C call (float64 sums) on the CPU, or None: use torch's norms."""
        if self.gradient_pass is None or self.device.type != "cpu":
            return None
        try:
            return cpu_pass.sums_of_squares(tensors)
        except (RuntimeError, MemoryError, OSError):  # no kernel here: torch's norms give the same figure
            return None

    def sums_of_squares_and_gather(
        self, tensors: Sequence[torch.Tensor | None], sample_index: torch.Tensor, dtype: torch.dtype, fill: float
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Each tensor's sum of squares and its entries at the sampled coordinates in one C call on the CPU, or
        None: read them separately."""
        if self.gradient_pass is None or self.device.type != "cpu":
            return None
        try:
            return cpu_pass.sums_of_squares_and_gather(tensors, sample_index, dtype, fill)
        except (RuntimeError, MemoryError, OSError):
            return None

    def top_magnitudes(self, tensors: Sequence[torch.Tensor], counts: Sequence[int]) -> list | None:
        """Every tensor's top magnitudes in one C call on the CPU, or None: use ``hill.top_magnitudes``."""
        if self.device.type != "cpu" or not cpu_pass.available():
            return None
        return cpu_pass.top_magnitudes(tensors, counts)


def select(config: MonitorConfig, device: torch.device) -> Kernels:
    """The kernels ``config.kernel`` and the machine call for."""
    return Kernels(_gradient_pass(config.kernel, device), _sample_kernels(config, device), device)


def _gradient_pass(kernel: str, device: torch.device) -> Callable | None:
    if kernel == "torch":
        return None
    if device.type == "cpu" and kernel in ("auto", "cpu"):
        if cpu_pass.available():
            return cpu_pass.cpu_gradient_pass
        if kernel == "cpu":
            raise ValueError(
                f"MonitorConfig.kernel='cpu': the CPU kernels are unavailable ({cpu_pass.unavailable_reason()})"
            )
        return None
    if kernel == "cpu":
        raise ValueError(f"MonitorConfig.kernel='cpu' needs CPU tensors; the parameters are on {device}")
    from heavytail.estimators import triton_pass

    if triton_pass.available(device) and (device.type == "cuda" or kernel == "triton"):
        return triton_pass.triton_gradient_pass
    if kernel == "triton":
        raise ValueError("MonitorConfig.kernel='triton' needs Triton and a CUDA device (or TRITON_INTERPRET=1)")
    return None


def _sample_kernels(config: MonitorConfig, device: torch.device) -> Any:
    """``cpu_pass`` on the CPU, ``triton_samples`` on CUDA, or None. Both take float64 samples (``stats_dtype``)."""
    if config.kernel == "torch" or config.stats_dtype != torch.float64:
        return None
    if device.type == "cpu":
        return cpu_pass if config.kernel in ("auto", "cpu") and cpu_pass.available() else None
    if device.type == "cuda" and config.kernel in ("auto", "triton"):
        from heavytail.estimators import triton_pass, triton_samples

        return triton_samples if triton_pass.available(device) else None
    return None
