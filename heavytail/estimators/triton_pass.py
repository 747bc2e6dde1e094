"""The gradient pass as Triton multi-tensor kernels: one read of every gradient (and of v where there is one).

Same contract and numbers as :mod:`heavytail.estimators.gradient_pass` (the ``torch`` reference it is tested
against): per tensor the finite count, power sums S1..S4, max |g|, non-finite count, and with a denominator
max r and #{r^2 > threshold} for r = |g| / (sqrt(v / bc) + eps) (r = 0 where v = 0); and the values of g, r
and v at each tensor's sampled coordinates.

How it stays near the memory-bandwidth floor: the kernels take a table of data pointers instead of packed
copies, so each gradient entry is read exactly once, straight from the parameter's ``.grad``. Work is split into
chunks of ``CHUNK`` entries so a large tensor spreads over many programs; each program accumulates in float64
registers (exact power sums even for tiny gradients, whose fourth powers underflow float32) and writes one row
of partials, which two ``torch`` ops merge per tensor. Launches per step: one per (dtype, has-denominator)
group for the statistics and one for the samples, whatever the number of tensors.

Needs Triton and a CUDA device; ``TRITON_INTERPRET=1`` runs the same kernels on CPU tensors (slowly), which is
how the tests check them on machines without a GPU.
"""

from __future__ import annotations

import os
from typing import Sequence

import torch

from heavytail.estimators.gradient_pass import (
    ABSMAX,
    COUNT,
    NONFINITE,
    RATIO_MAX,
    RATIO_SPIKES,
    STAT_FIELDS,
    Denominators,
    PassResult,
)
from heavytail.transfer import to_device

try:  # Triton is optional: present with CUDA builds of PyTorch, absent on most CPU machines.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the environment
    triton = None
    tl = None

CHUNK = 1 << 16
"""Entries per program: large tensors are split so that every SM has work."""

BLOCK = 1024
"""Entries per vectorised iteration inside a program."""

_SUM_COLUMNS = [COUNT, 1, 2, 3, 4, NONFINITE, RATIO_SPIKES]
_MAX_COLUMNS = [ABSMAX, RATIO_MAX]


def available(device: torch.device | None = None) -> bool:
    """Whether the kernels can run here: Triton importable and a CUDA device (or the Triton interpreter)."""
    if triton is None:
        return False
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True
    return device is not None and device.type == "cuda"


if triton is not None:

    @triton.jit
    def _stats_kernel(
        ptrs,
        vptrs,
        work_tensor,
        work_start,
        work_len,
        bias_correction,
        eps,
        out,
        threshold,
        DTYPE: tl.constexpr,
        VDTYPE: tl.constexpr,
        HAS_V: tl.constexpr,
        BLOCK_SIZE: tl.constexpr,
    ):
        pid = tl.program_id(0)
        t = tl.load(work_tensor + pid)
        start = tl.load(work_start + pid)
        length = tl.load(work_len + pid)
        base = tl.load(ptrs + t).to(tl.pointer_type(DTYPE))
        count = tl.zeros([BLOCK_SIZE], dtype=tl.float64)
        s1 = tl.zeros([BLOCK_SIZE], dtype=tl.float64)
        s2 = tl.zeros([BLOCK_SIZE], dtype=tl.float64)
        s3 = tl.zeros([BLOCK_SIZE], dtype=tl.float64)
        s4 = tl.zeros([BLOCK_SIZE], dtype=tl.float64)
        absmax = tl.zeros([BLOCK_SIZE], dtype=tl.float64)
        rmax = tl.zeros([BLOCK_SIZE], dtype=tl.float64)
        spikes = tl.zeros([BLOCK_SIZE], dtype=tl.float64)
        if HAS_V:
            vbase = tl.load(vptrs + t).to(tl.pointer_type(VDTYPE))
            bc = tl.load(bias_correction + t).to(tl.float64)
            epsilon = tl.load(eps + t).to(tl.float64)
        for offset in range(0, length, BLOCK_SIZE):
            idx = start + offset + tl.arange(0, BLOCK_SIZE)
            inside = (offset + tl.arange(0, BLOCK_SIZE)) < length
            x = tl.load(base + idx, mask=inside, other=0.0).to(tl.float64)
            finite = (x == x) & (tl.abs(x) != float("inf")) & inside
            x = tl.where(finite, x, 0.0)
            x2 = x * x
            count += tl.where(finite, 1.0, 0.0)
            s1 += x
            s2 += x2
            s3 += x2 * x
            s4 += x2 * x2
            absmax = tl.maximum(absmax, tl.abs(x))
            if HAS_V:
                v = tl.load(vbase + idx, mask=inside, other=0.0).to(tl.float64)
                r = tl.abs(x) / (tl.sqrt(v / bc) + epsilon)
                r = tl.where(v > 0, r, 0.0)
                rmax = tl.maximum(rmax, r)
                spikes += tl.where(r * r > threshold, 1.0, 0.0)
        row = out + pid * 9
        total = tl.sum(count, 0)
        tl.store(row + 0, total)
        tl.store(row + 1, tl.sum(s1, 0))
        tl.store(row + 2, tl.sum(s2, 0))
        tl.store(row + 3, tl.sum(s3, 0))
        tl.store(row + 4, tl.sum(s4, 0))
        tl.store(row + 5, tl.max(absmax, 0))
        tl.store(row + 6, length.to(tl.float64) - total)
        tl.store(row + 7, tl.max(rmax, 0))
        tl.store(row + 8, tl.sum(spikes, 0))

    @triton.jit
    def _samples_kernel(
        ptrs,
        vptrs,
        rows,
        index,
        bias_correction,
        eps,
        g_out,
        r_out,
        v_out,
        num_samples,
        DTYPE: tl.constexpr,
        VDTYPE: tl.constexpr,
        HAS_V: tl.constexpr,
        SAMPLES: tl.constexpr,
    ):
        pid = tl.program_id(0)
        t = tl.load(rows + pid)
        base = tl.load(ptrs + t).to(tl.pointer_type(DTYPE))
        cols = tl.arange(0, SAMPLES)
        inside = cols < num_samples
        idx = tl.load(index + t * num_samples + cols, mask=inside, other=0)
        x = tl.load(base + idx, mask=inside, other=0.0).to(tl.float64)
        x = tl.where((x == x) & (tl.abs(x) != float("inf")), x, 0.0)
        tl.store(g_out + t * num_samples + cols, x, mask=inside)
        if HAS_V:
            vbase = tl.load(vptrs + t).to(tl.pointer_type(VDTYPE))
            v = tl.load(vbase + idx, mask=inside, other=0.0).to(tl.float64)
            bc = tl.load(bias_correction + t).to(tl.float64)
            epsilon = tl.load(eps + t).to(tl.float64)
            r = tl.where(v > 0, tl.abs(x) / (tl.sqrt(v / bc) + epsilon), 0.0)
            tl.store(r_out + t * num_samples + cols, r, mask=inside)
            tl.store(v_out + t * num_samples + cols, v, mask=inside)


_TL_DTYPES = {}
if tl is not None:
    _TL_DTYPES = {
        torch.float32: tl.float32,
        torch.float16: tl.float16,
        torch.bfloat16: tl.bfloat16,
        torch.float64: tl.float64,
    }


def _pointer_table(tensors: Sequence[torch.Tensor | None], device: torch.device) -> torch.Tensor:
    # Host-built int64 table of data pointers (0 for none); a pinned, asynchronous copy, no device read.
    return to_device([0 if t is None else t.data_ptr() for t in tensors], device, torch.int64)


def triton_gradient_pass(
    grads: Sequence[torch.Tensor | None],
    sample_index: torch.Tensor,
    denominators: Denominators | None = None,
    *,
    spike_threshold: float = 5000.0,
) -> PassResult:
    """:func:`heavytail.estimators.gradient_pass.gradient_pass` with Triton kernels (float64 results).

    Gradients must be contiguous (others are made contiguous first, a copy); ``sample_index`` is ``(L, S)``
    int64 on the gradients' device.
    """
    if triton is None:
        raise RuntimeError("triton_gradient_pass needs Triton (pip install triton) and a CUDA device")
    num_layers = len(grads)
    device = next((g.device for g in grads if g is not None), sample_index.device)
    grads = [None if g is None or g.numel() == 0 else g.detach().contiguous() for g in grads]
    vs: list[torch.Tensor | None] = [None] * num_layers
    if denominators is not None:
        vs = [None if v is None or grads[i] is None else v.detach().contiguous() for i, v in enumerate(denominators.v)]
        bias_correction = denominators.bias_correction.to(device, torch.float64)
        eps = denominators.eps.to(device, torch.float64)
    else:
        bias_correction = torch.ones(num_layers, device=device, dtype=torch.float64)
        eps = torch.zeros(num_layers, device=device, dtype=torch.float64)
    ptrs = _pointer_table(grads, device)
    vptrs = _pointer_table(vs, device)
    stats = torch.zeros(num_layers, len(STAT_FIELDS), device=device, dtype=torch.float64)
    stats[:, RATIO_MAX] = float("nan")
    num_samples = sample_index.shape[1]
    nan = float("nan")
    g_samples = torch.full((num_layers, num_samples), nan, device=device, dtype=torch.float64)
    r_samples = torch.full_like(g_samples, nan)
    v_samples = torch.full_like(g_samples, nan)
    index = sample_index.to(device, torch.int64).contiguous()

    groups: dict[tuple[torch.dtype, torch.dtype | None], list[int]] = {}
    for i, g in enumerate(grads):
        if g is not None:
            groups.setdefault((g.dtype, None if vs[i] is None else vs[i].dtype), []).append(i)
    for (dtype, vdtype), rows in groups.items():
        work_tensor, work_start, work_len = [], [], []
        for i in rows:
            n = grads[i].numel()
            for start in range(0, n, CHUNK):
                work_tensor.append(i)
                work_start.append(start)
                work_len.append(min(CHUNK, n - start))
        work = to_device([work_tensor, work_start, work_len], device, torch.int64)
        partial = torch.empty(len(work_tensor), 9, device=device, dtype=torch.float64)
        has_v = vdtype is not None
        vtl = _TL_DTYPES[vdtype] if has_v else tl.float32
        _stats_kernel[(len(work_tensor),)](
            ptrs,
            vptrs,
            work[0],
            work[1],
            work[2],
            bias_correction,
            eps,
            partial,
            float(spike_threshold),
            DTYPE=_TL_DTYPES[dtype],
            VDTYPE=vtl,
            HAS_V=has_v,
            BLOCK_SIZE=BLOCK,
        )
        owner = work[0]
        stats[:, _SUM_COLUMNS] = stats[:, _SUM_COLUMNS].index_add(0, owner, partial[:, [0, 1, 2, 3, 4, 6, 8]])
        maxima = torch.zeros(num_layers, 2, device=device, dtype=torch.float64)
        maxima.scatter_reduce_(0, owner[:, None].expand(-1, 2), partial[:, [5, 7]], "amax")
        row_index = to_device(rows, device, torch.int64)
        stats[row_index, ABSMAX] = maxima[row_index, 0]
        if has_v:
            stats[row_index, RATIO_MAX] = maxima[row_index, 1]
        if num_samples:
            _samples_kernel[(len(rows),)](
                ptrs,
                vptrs,
                row_index,
                index,
                bias_correction,
                eps,
                g_samples,
                r_samples,
                v_samples,
                num_samples,
                DTYPE=_TL_DTYPES[dtype],
                VDTYPE=vtl,
                HAS_V=has_v,
                SAMPLES=triton.next_power_of_2(num_samples),
            )
    if denominators is not None:
        missing = to_device([v is None for v in vs], device, torch.bool)
        stats[:, RATIO_SPIKES] = torch.where(missing, nan, stats[:, RATIO_SPIKES])
    return PassResult(stats, g_samples, r_samples, v_samples)
