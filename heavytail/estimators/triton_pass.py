"""The gradient pass as Triton multi-tensor kernels: one read of every gradient (and of v where there is one).

Same contract and numbers as :mod:`heavytail.estimators.gradient_pass` (the ``torch`` reference it is tested
against, tests/estimators/test_triton_pass.py): per tensor the finite count, power sums S1..S4, max |g|,
non-finite count, and with a denominator max r and #{r > sqrt(threshold)} for r = |g| / (sqrt(v / bc) + eps)
(r = 0 where v = 0; a NaN v makes the max NaN, as torch's amax does); and the values of g, r and v at each
tensor's sampled coordinates. The rules the torch pass leaves implicit are the C kernel's (``cpu_kernels.c``):
an empty tensor is present with no entries (zeros, not NaN), and a v of another size than its gradient is no
denominator (NaN ratio figures, never a read out of bounds).

How it stays near the memory-bandwidth floor: the kernels take a table of data pointers instead of packed
copies, so each gradient entry is read exactly once, straight from the parameter's ``.grad``. Work is split into
chunks of ``CHUNK`` entries so a large tensor spreads over many programs; each program reads 16-byte rows (one
128-bit load per row where both tensors are 16-byte aligned, which the pointer table's grouping tells the
compiler), accumulates in float64 registers (exact power sums even for tiny gradients, whose fourth powers
underflow float32) and writes one row of partials, which a few ``torch`` ops merge per tensor. Launches per
step: one per (dtype, denominator dtype, alignment) group for the statistics and one per (dtype, denominator
dtype) for the samples, whatever the number of tensors.

GPU and interpreter agree on every figure but the power sums' last bits: the ratio uses only a product, an
IEEE square root and an IEEE division in float64 (nothing for FMA contraction to fuse), and no NaN ever reaches
a max (NaN v are counted instead: ``tl.max`` skips NaN on a GPU and propagates it in the interpreter). The sums
are added in another order than torch's (and with FMAs on the GPU), equal to float64 rounding.

Needs Triton and a CUDA device; ``TRITON_INTERPRET=1`` runs the same kernels on CPU tensors (slowly), which is
how the tests check them on machines without a GPU. ``benchmarks/kernel_report.py`` compiles them ahead of time
and prints their registers, spills and load widths.
"""

from __future__ import annotations

import math
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
"""Entries per program: large tensors are split so that every SM has work (a multiple of every tile)."""

NUM_WARPS = 4
ROWS_PER_THREAD = {1: 4, 2: 2, 4: 2, 8: 1}
"""The statistics kernel reads tiles of ``(rows, VEC)`` entries, ``VEC`` = 16 bytes of the gradient's dtype: each
thread owns whole rows (one 128-bit load each, this many per tile: 8 float32 or bfloat16 entries, 4 float64) and
reduces them in its own registers, so the float64 accumulators hold one value per row, not one per entry
(registers per thread: benchmarks/kernel_report.py). Tensors not 16-byte aligned (views into flat buffers) are
read with ``VEC`` = 1, by scalar loads."""


def _tile(dtype: torch.dtype, aligned: bool) -> tuple[int, int]:
    """(rows, VEC) of the statistics kernel's tile for gradients of ``dtype``."""
    vec = 16 // torch.empty((), dtype=dtype).element_size() if aligned else 1
    return ROWS_PER_THREAD[vec] * 32 * NUM_WARPS, vec


_SUM_COLUMNS = [COUNT, 1, 2, 3, 4, NONFINITE, RATIO_SPIKES]
_PARTIAL_SUMS = [0, 1, 2, 3, 4, 6, 8]  # partial columns added per tensor, in _SUM_COLUMNS order
_PARTIAL_MAX = [5, 7]  # max |g|, max r
_PARTIAL_NAN = 9  # entries whose r is NaN (a NaN v): the tensor's ratio max is NaN, as torch's amax makes it
_PARTIAL_WIDTH = 10


def available(device: torch.device | None = None) -> bool:
    """Whether the kernels can run here: Triton importable and a CUDA device (or the Triton interpreter)."""
    if triton is None:
        return False
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True
    return device is not None and device.type == "cuda"


if triton is not None:

    @triton.jit
    def _tile_stats(x, v, inv_bc, epsilon, threshold, HAS_V: tl.constexpr):
        """One tile's figures per row (each row is one thread's): power sums, max |g|, non-finite count, and with
        v the ratio's max, spike count and NaN count. Masked-out entries arrive as x = v = 0 and count nowhere."""
        x = x.to(tl.float64)
        finite = tl.abs(x) < float("inf")  # false for NaN and +-Inf
        nonfinite = tl.sum((~finite).to(tl.int32), 1)
        x = tl.where(finite, x, 0.0)
        x2 = x * x
        s1 = tl.sum(x, 1)
        s2 = tl.sum(x2, 1)
        s3 = tl.sum(x2 * x, 1)
        s4 = tl.sum(x2 * x2, 1)
        absmax = tl.max(tl.abs(x), 1)  # NaN-free operands: the GPU's max and the interpreter's agree
        if HAS_V:
            v = v.to(tl.float64)
            # r as AdamW divides; 0 where v <= 0 (never seen), and a NaN v (or bias correction) is counted instead
            # of reaching the max, whose NaN handling differs between the GPU and the interpreter.
            r = tl.abs(x) / (tl.sqrt(v * inv_bc) + epsilon)
            bad = (v != v) | ((v > 0) & (r != r))
            r = tl.where((v > 0) & ~bad, r, 0.0)
            rmax = tl.max(r, 1)
            spikes = tl.sum((r > threshold).to(tl.int32), 1)
            nans = tl.sum(bad.to(tl.int32), 1)
        else:
            rmax = absmax * 0.0
            spikes = nonfinite * 0
            nans = nonfinite * 0
        return s1, s2, s3, s4, absmax, nonfinite, rmax, spikes, nans

    @triton.jit
    def _stats_kernel(
        table,
        work,
        inv_bias_correction,
        eps,
        consts,
        out,
        DTYPE: tl.constexpr,
        VDTYPE: tl.constexpr,
        HAS_V: tl.constexpr,
        ALIGNED: tl.constexpr,
        ROWS: tl.constexpr,
        VEC: tl.constexpr,
    ):
        pid = tl.program_id(0)
        t = tl.load(work + pid * 3)
        start = tl.load(work + pid * 3 + 1)
        length = tl.load(work + pid * 3 + 2)
        g_addr = tl.load(table + t * 3)
        v_addr = tl.load(table + t * 3 + 1)
        g_ptr = g_addr.to(tl.pointer_type(DTYPE))
        if ALIGNED:  # both tensors 16-byte aligned, and start a multiple of CHUNK: 128-bit loads over the body
            g_ptr = tl.multiple_of(g_ptr, 16)
            start = tl.multiple_of(start, 16)
        threshold = tl.load(consts)
        inv_bc = 1.0
        epsilon = 0.0
        v_ptr = g_ptr  # not read without v
        if HAS_V:
            v_ptr = v_addr.to(tl.pointer_type(VDTYPE))
            if ALIGNED:
                v_ptr = tl.multiple_of(v_ptr, 16)
            inv_bc = tl.load(inv_bias_correction + t)
            epsilon = tl.load(eps + t)
        # A (ROWS, VEC) tile of consecutive entries: row i holds entries [i * VEC, (i + 1) * VEC), one thread's.
        offs = tl.arange(0, ROWS)[:, None] * VEC + tl.arange(0, VEC)[None, :]
        zero = tl.zeros([ROWS], dtype=tl.float64)
        count = tl.zeros([ROWS], dtype=tl.int32)
        s1, s2, s3, s4, absmax, rmax = zero, zero, zero, zero, zero, zero
        nonfinite, spikes, nans = count, count, count
        body = length - length % (ROWS * VEC)
        for offset in range(0, body, ROWS * VEC):  # whole tiles: no mask
            x = tl.load(g_ptr + (start + offset) + offs)
            v = x
            if HAS_V:
                v = tl.load(v_ptr + (start + offset) + offs)
            a1, a2, a3, a4, amax, nf, rm, sp, nn = _tile_stats(x, v, inv_bc, epsilon, threshold, HAS_V)
            s1, s2, s3, s4 = s1 + a1, s2 + a2, s3 + a3, s4 + a4
            absmax = tl.maximum(absmax, amax)
            rmax = tl.maximum(rmax, rm)
            nonfinite, spikes, nans = nonfinite + nf, spikes + sp, nans + nn
        if body < length:  # the last, partial tile
            inside = offs < length - body
            x = tl.load(g_ptr + (start + body) + offs, mask=inside, other=0.0)
            v = x
            if HAS_V:
                v = tl.load(v_ptr + (start + body) + offs, mask=inside, other=0.0)
            a1, a2, a3, a4, amax, nf, rm, sp, nn = _tile_stats(x, v, inv_bc, epsilon, threshold, HAS_V)
            s1, s2, s3, s4 = s1 + a1, s2 + a2, s3 + a3, s4 + a4
            absmax = tl.maximum(absmax, amax)
            rmax = tl.maximum(rmax, rm)
            nonfinite, spikes, nans = nonfinite + nf, spikes + sp, nans + nn
        row = out + pid * 10
        bad = tl.sum(nonfinite, 0).to(tl.float64)
        tl.store(row + 0, length.to(tl.float64) - bad)
        tl.store(row + 1, tl.sum(s1, 0))
        tl.store(row + 2, tl.sum(s2, 0))
        tl.store(row + 3, tl.sum(s3, 0))
        tl.store(row + 4, tl.sum(s4, 0))
        tl.store(row + 5, tl.max(absmax, 0))
        tl.store(row + 6, bad)
        tl.store(row + 7, tl.max(rmax, 0))
        tl.store(row + 8, tl.sum(spikes, 0).to(tl.float64))
        tl.store(row + 9, tl.sum(nans, 0).to(tl.float64))

    @triton.jit
    def _samples_kernel(
        table,
        rows,
        index,
        inv_bias_correction,
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
        base = tl.load(table + t * 3).to(tl.pointer_type(DTYPE))
        numel = tl.load(table + t * 3 + 2)
        cols = tl.arange(0, SAMPLES)
        inside = cols < num_samples
        idx = tl.load(index + t * num_samples + cols, mask=inside, other=0)
        there = inside & (idx >= 0) & (idx < numel)  # no entry there (an empty tensor): g and v NaN, r 0
        x = tl.load(base + idx, mask=there, other=0.0).to(tl.float64)
        x = tl.where(tl.abs(x) < float("inf"), x, 0.0)
        tl.store(g_out + t * num_samples + cols, tl.where(there, x, float("nan")), mask=inside)
        if HAS_V:
            vbase = tl.load(table + t * 3 + 1).to(tl.pointer_type(VDTYPE))
            v = tl.load(vbase + idx, mask=there, other=0.0).to(tl.float64)
            inv_bc = tl.load(inv_bias_correction + t)
            epsilon = tl.load(eps + t)
            r = tl.where(v > 0, tl.abs(x) / (tl.sqrt(v * inv_bc) + epsilon), 0.0)
            tl.store(r_out + t * num_samples + cols, r, mask=inside)
            tl.store(v_out + t * num_samples + cols, tl.where(there, v, float("nan")), mask=inside)


_TL_DTYPES = {}
if tl is not None:
    _TL_DTYPES = {
        torch.float32: tl.float32,
        torch.float16: tl.float16,
        torch.bfloat16: tl.bfloat16,
        torch.float64: tl.float64,
    }


_CONSTS: dict[tuple[float, torch.device], torch.Tensor] = {}


def _consts(spike_threshold: float, device: torch.device) -> torch.Tensor:
    # sqrt(threshold) as a float64 tensor (a Python float kernel argument is float32 in Triton): r > sqrt(T) is the
    # reference's spike test, exactly. Copied to the device once per threshold, not at every step.
    key = (float(spike_threshold), device)
    if key not in _CONSTS:
        _CONSTS[key] = to_device([math.sqrt(spike_threshold)], device, torch.float64)
    return _CONSTS[key]


def _readable(t: torch.Tensor) -> torch.Tensor:
    """``t`` as the kernels read it: dense, of a kernel dtype (others are copied to float32, as the C kernel does)."""
    t = t.detach()
    if t.is_complex():
        raise ValueError("the Triton gradient pass takes real tensors")
    if t.dtype not in _TL_DTYPES:
        t = t.to(torch.float32)
    return t.contiguous()


def triton_gradient_pass(
    grads: Sequence[torch.Tensor | None],
    sample_index: torch.Tensor,
    denominators: Denominators | None = None,
    *,
    spike_threshold: float = 5000.0,
) -> PassResult:
    """:func:`heavytail.estimators.gradient_pass.gradient_pass` with Triton kernels (float64 results).

    ``sample_index`` is ``(L, S)`` int64 on the gradients' device. Gradients are read in logical order
    (non-contiguous ones are copied first, and dtypes other than float32/float64/bfloat16/float16 go to float32);
    a ``None`` gradient gives a row of zero counts and NaN samples, an empty one a row of zeros. A denominator
    with another number of entries than its gradient is no denominator (NaN ratio figures), as in the C kernel.
    """
    if triton is None:
        raise RuntimeError("triton_gradient_pass needs Triton (pip install triton) and a CUDA device")
    num_layers = len(grads)
    device = next((g.device for g in grads if g is not None), sample_index.device)
    f64 = torch.float64
    gs = [None if g is None else _readable(g) for g in grads]
    has_den = denominators is not None and any(v is not None for v in denominators.v)
    vs: list[torch.Tensor | None] = [None] * num_layers
    if has_den:
        vs = [
            _readable(v) if v is not None and g is not None and v.numel() == g.numel() else None
            for g, v in zip(gs, denominators.v)
        ]
        inv_bc = denominators.bias_correction.to(device, f64).reciprocal()
        eps = denominators.eps.to(device, f64)
    else:
        inv_bc = eps = torch.zeros(num_layers, device=device, dtype=f64)  # not read
    num_samples = sample_index.shape[1]
    nan = float("nan")
    stats = torch.zeros(num_layers, len(STAT_FIELDS), device=device, dtype=f64)
    g_samples = torch.full((num_layers, num_samples), nan, device=device, dtype=f64)
    r_samples = torch.full_like(g_samples, nan)
    v_samples = torch.full_like(g_samples, nan)

    # The host's tables, one copy to the device: per tensor (g pointer, v pointer, entries), the work items of every
    # launch (tensor, first entry, entries), each sample launch's tensors, and which tensors have no denominator.
    table: list[int] = []
    stats_groups: dict[tuple, list[int]] = {}  # (g dtype, v dtype, 16-byte aligned) -> tensors
    sample_groups: dict[tuple, list[int]] = {}  # (g dtype, v dtype) -> tensors
    for i, (g, v) in enumerate(zip(gs, vs)):
        gp = 0 if g is None else g.data_ptr()
        vp = 0 if v is None else v.data_ptr()
        table += [gp, vp, 0 if g is None else g.numel()]
        if g is None:
            continue
        vdtype = None if v is None else v.dtype
        sample_groups.setdefault((g.dtype, vdtype), []).append(i)
        if g.numel():
            aligned = gp % 16 == 0 and vp % 16 == 0
            stats_groups.setdefault((g.dtype, vdtype, aligned), []).append(i)
    work: list[int] = []
    launches = []
    for (dtype, vdtype, aligned), rows in stats_groups.items():
        first = len(work) // 3
        for i in rows:
            n = gs[i].numel()
            for start in range(0, n, CHUNK):
                work += [i, start, min(CHUNK, n - start)]
        launches.append((dtype, vdtype, aligned, first, len(work) // 3 - first))
    sample_rows: list[int] = []
    sample_launches = []
    for (dtype, vdtype), rows in sample_groups.items():
        sample_launches.append((dtype, vdtype, len(sample_rows), len(rows)))
        sample_rows += rows
    missing = [int(v is None) for v in vs]
    host = to_device(table + work + sample_rows + missing, device, torch.int64)
    table_dev, work_dev, rows_dev, missing_dev = host.split([len(table), len(work), len(sample_rows), num_layers])

    items = len(work) // 3
    if items:
        partial = torch.empty(items, _PARTIAL_WIDTH, device=device, dtype=f64)
        consts = _consts(spike_threshold, device)
        for dtype, vdtype, aligned, first, count in launches:
            rows, vec = _tile(dtype, aligned)
            _stats_kernel[(count,)](
                table_dev,
                work_dev[3 * first :],
                inv_bc,
                eps,
                consts,
                partial[first:],
                DTYPE=_TL_DTYPES[dtype],
                VDTYPE=_TL_DTYPES[vdtype] if vdtype is not None else tl.float32,
                HAS_V=vdtype is not None,
                ALIGNED=aligned,
                ROWS=rows,
                VEC=vec,
                num_warps=NUM_WARPS,
                enable_fp_fusion=True,  # only the power sums have multiply-adds: one rounding fewer; r has none
            )
        owner = work_dev.view(-1, 3)[:, 0]
        stats[:, _SUM_COLUMNS] = stats[:, _SUM_COLUMNS].index_add(0, owner, partial[:, _PARTIAL_SUMS])
        maxima = torch.zeros(num_layers, 2, device=device, dtype=f64)
        maxima.scatter_reduce_(0, owner[:, None].expand(-1, 2), partial[:, _PARTIAL_MAX], "amax")
        nans = torch.zeros(num_layers, device=device, dtype=f64).index_add_(0, owner, partial[:, _PARTIAL_NAN])
        stats[:, ABSMAX] = maxima[:, 0]
        stats[:, RATIO_MAX] = torch.where(nans > 0, nan, maxima[:, 1])
    if num_samples:
        index = sample_index.to(device, torch.int64).contiguous()
        for dtype, vdtype, first, count in sample_launches:
            _samples_kernel[(count,)](
                table_dev,
                rows_dev[first:],
                index,
                inv_bc,
                eps,
                g_samples,
                r_samples,
                v_samples,
                num_samples,
                DTYPE=_TL_DTYPES[dtype],
                VDTYPE=_TL_DTYPES[vdtype] if vdtype is not None else tl.float32,
                HAS_V=vdtype is not None,
                SAMPLES=triton.next_power_of_2(num_samples),
                enable_fp_fusion=False,
            )
    if has_den:
        missing = missing_dev.bool()
        stats[:, RATIO_MAX] = torch.where(missing, nan, stats[:, RATIO_MAX])
        stats[:, RATIO_SPIKES] = torch.where(missing, nan, stats[:, RATIO_SPIKES])
    else:
        stats[:, RATIO_MAX] = nan
    return PassResult(stats, g_samples, r_samples, v_samples)
