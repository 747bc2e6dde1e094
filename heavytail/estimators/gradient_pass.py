"""One pass over every monitored gradient: power sums, max |g|, non-finite counts, denominator ratios, samples.

This is the only estimator that touches whole gradients on every step, so it is built for cost. Gradients are
packed into bounded chunks (at most ``chunk_numel`` entries, never a copy of the whole model) in the statistics
dtype, each tensor's piece starting on a block boundary (blocks of ``BLOCK`` entries, the last block of a piece
padded with zeros). Every reduction is then a reduction of a ``(blocks, BLOCK)`` matrix along its rows, which is
a contiguous, vectorised loop on every device, and the per-block partials (a few thousand numbers per chunk) are
merged per tensor with ``torch.segment_reduce``. So the number of kernel launches per step grows with the number
of chunks, that is with the parameter count, and not with the number of parameter tensors; and no temporary
grows with the entry count beyond the chunk: scratch is three chunk-sized buffers.

Per tensor ``l`` with entries g (non-finite entries are counted and then read as 0 so they never reach the sums):

- ``count`` = number of finite entries, ``s1..s4`` = sum g^p, ``absmax`` = max |g|, ``nonfinite`` = count of NaN/Inf;
- with a denominator (AdamW's ``exp_avg_sq`` v and its bias correction bc = 1 - beta2^t, eps):
  r = |g| / (sqrt(v / bc) + eps) as AdamW divides (Kingma & Ba 2015; Loshchilov & Hutter 2019),
  ``ratio_max`` = max r and ``ratio_spikes`` = #{r^2 > spike_threshold} (SPAM, Huang et al. 2025, uses 5000);
  coordinates with v = 0 (never had a gradient) count as r = 0;
- the values of g, r and v at a fixed set of sampled coordinates per tensor (for the noise and shadow estimators).

Cost per entry, all element-wise work in the statistics dtype: one packing copy of g, three passes for the
non-finite count and the clean-up, three products (g^2, g^3, g^4) and seven row reductions; with a denominator,
one packing copy of v, seven more element-wise passes and two row reductions. No boolean temporaries (they are
several times slower than float ones on the CPU) and no per-entry index tensors. A fused kernel reads g and v
once and writes only per-block partials (:mod:`heavytail.estimators.triton_pass` on CUDA); this is the reference
``torch`` path it must agree with, and the one the CPU runs. docs/performance.md has the measurements.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch

from heavytail.transfer import to_device

STAT_FIELDS = ("count", "s1", "s2", "s3", "s4", "absmax", "nonfinite", "ratio_max", "ratio_spikes")
COUNT, S1, S2, S3, S4, ABSMAX, NONFINITE, RATIO_MAX, RATIO_SPIKES = range(len(STAT_FIELDS))

BLOCK = 64
"""Entries per block. Pieces start on block boundaries, so a block's partial sums belong to one tensor; padding
costs at most ``BLOCK - 1`` entries per tensor (measured on the CPU: 64 is as fast as 256 on large tensors and 20%
faster at 10,000 tensors of 400 entries, which 256 pads by 28%)."""

CPU_SCRATCH_BYTES = 1 << 22
"""On the CPU a chunk's scratch buffers are kept under 4 MiB each: larger ones are returned to the operating
system when freed (glibc's mmap threshold) and page-faulted back in at the next step, which costs more than the
arithmetic (measured: 8 MiB buffers made the pass 5x slower)."""

MAX_PLANS = 64
"""Plans are cached per set of present gradients. Under mixture-of-experts routing that set changes from step to
step without end (top-2 of 64 experts: 2,016 sets; top-8: billions) and each plan holds device tensors, so the
caches are bounded: past this many, the oldest entry goes (a set seen again is planned again, on the host)."""


class Denominators(NamedTuple):
    """What AdamW divides each tensor's gradient by: sqrt(v / bias_correction) + eps.

    ``v`` has one entry per tensor (``None`` where there is no denominator); ``bias_correction`` and ``eps``
    are ``(L,)`` tensors on the gradients' device.
    """

    v: Sequence[torch.Tensor | None]
    bias_correction: torch.Tensor
    eps: torch.Tensor
    steps: torch.Tensor | None = None
    """``(L,)`` float64: how many gradients each denominator has averaged (the optimizer's step counter before
    this step), or None when unknown; the monitor's ratio warm-up reads it."""


class PassResult(NamedTuple):
    """Per-tensor statistics ``(L, len(STAT_FIELDS))`` and per-tensor samples ``(L, S)`` of g, r and v."""

    stats: torch.Tensor
    grad_samples: torch.Tensor
    ratio_samples: torch.Tensor
    denom_samples: torch.Tensor


@dataclass
class _Piece:
    layer: int  # row in the result
    start: int  # first flat index of the tensor covered by this piece
    stop: int
    whole: bool  # the piece is the whole tensor (no slicing needed)
    pad: int  # zero entries after the piece, up to the next block boundary


@dataclass
class _Chunk:
    pieces: list[_Piece]
    spec: list[tuple[int, int, int, bool, int]]  # (layer, start, stop, whole, pad) per piece: the packing loop's
    # input as plain tuples (attribute access on 10,000 dataclasses is measurable per step)
    numel: int  # entries of the packed buffer, padding included: a multiple of the block
    blocks: torch.Tensor  # (P,) blocks per piece, on device
    sample_src: torch.Tensor  # positions inside the chunk's packed buffer of samples that fall in this chunk
    sample_dst: torch.Tensor  # flat positions in the (L*S) sample buffer they go to


@dataclass
class _Plan:
    chunks: list[_Chunk]
    block: int
    rows: torch.Tensor  # (sum P,) result row of every piece of every chunk, in chunk order
    lengths: torch.Tensor  # (sum P,) entries of every piece, in the statistics dtype
    block_rows: list[torch.Tensor]  # per chunk, (P,) rows again (to broadcast per-row scalars to blocks)
    scratch: int  # entries of the largest chunk


class GradientPass:
    """A reusable plan for :func:`gradient_pass` over a fixed list of tensor sizes and sample indices.

    Building the plan (chunk layout, sample routing) costs host work proportional to the number of tensors; it
    is done once per set of present gradients and cached, so the per-step cost is the chunk loop alone.
    """

    def __init__(
        self,
        numels: Sequence[int],
        sample_index: torch.Tensor,
        *,
        chunk_numel: int = 1 << 23,
        dtype: torch.dtype = torch.float64,
    ) -> None:
        self.numels = list(numels)
        self.sample_index = sample_index  # (L, S) int64 on the host, indices into each flattened tensor
        self.chunk_numel = int(chunk_numel)
        self.dtype = dtype
        self._plans: dict[tuple[bool, ...], _Plan] = {}
        self._pads: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
        self._missing: dict[tuple[tuple[bool, ...], tuple[bool, ...]], torch.Tensor] = {}

    def _capacity(self, device: torch.device) -> tuple[int, int]:
        """(block, chunk capacity in entries) for ``device``; the capacity is a multiple of the block."""
        cap = self.chunk_numel
        if device.type == "cpu":
            cap = min(cap, CPU_SCRATCH_BYTES // torch.empty((), dtype=self.dtype).element_size())
        block = min(BLOCK, cap)
        return block, max(block, cap // block * block)

    def _plan(self, present: tuple[bool, ...], device: torch.device) -> _Plan:
        plan = self._plans.get(present)
        if plan is not None:
            return plan
        block, cap = self._capacity(device)
        samples = self.sample_index  # built on the host, so planning never waits on the device
        num_samples = samples.shape[1]
        chunks: list[_Chunk] = []
        rows: list[int] = []
        lengths: list[int] = []
        block_rows: list[torch.Tensor] = []
        pieces: list[_Piece] = []
        fill = 0

        def close() -> None:
            nonlocal pieces, fill
            if not pieces:
                return
            src, dst, offset = [], [], 0
            for piece in pieces:
                idx = samples[piece.layer]
                inside = (idx >= piece.start) & (idx < piece.stop)
                cols = torch.nonzero(inside).flatten()
                src.append(idx[cols] - piece.start + offset)
                dst.append(piece.layer * num_samples + cols)
                offset += piece.stop - piece.start + piece.pad
            chunk_rows = [p.layer for p in pieces]
            rows.extend(chunk_rows)
            lengths.extend(p.stop - p.start for p in pieces)
            block_rows.append(to_device(chunk_rows, device, torch.int64))
            chunks.append(
                _Chunk(
                    pieces=pieces,
                    spec=[(p.layer, p.start, p.stop, p.whole, p.pad) for p in pieces],
                    numel=offset,
                    blocks=to_device([(p.stop - p.start + p.pad) // block for p in pieces], device, torch.int64),
                    sample_src=to_device(torch.cat(src), device),
                    sample_dst=to_device(torch.cat(dst), device),
                )
            )
            pieces, fill = [], 0

        for layer, (numel, here) in enumerate(zip(self.numels, present)):
            if not here or numel == 0:
                continue
            start = 0
            while start < numel:
                take = min(numel - start, cap - fill)  # cap - fill is a multiple of the block
                pad = -take % block
                pieces.append(_Piece(layer, start, start + take, take == numel, pad))
                fill += take + pad
                start += take
                if fill >= cap:
                    close()
        close()
        plan = _Plan(
            chunks=chunks,
            block=block,
            rows=to_device(rows, device, torch.int64),
            lengths=to_device(lengths, device, self.dtype),
            block_rows=block_rows,
            scratch=max((c.numel for c in chunks), default=0),
        )
        if len(self._plans) >= MAX_PLANS:
            self._plans.pop(next(iter(self._plans)))
        self._plans[present] = plan
        return plan

    def _pad(self, device: torch.device, dtype: torch.dtype) -> list[torch.Tensor]:
        """Zero tensors of every padding length (index = length), built once per device and dtype."""
        pads = self._pads.get((device, dtype))
        if pads is None:
            zeros = torch.zeros(BLOCK, device=device, dtype=dtype)
            pads = self._pads[(device, dtype)] = [zeros[:k] for k in range(BLOCK)]
        return pads

    def _pack(
        self, chunk: _Chunk, tensors: Sequence[torch.Tensor | None], out: torch.Tensor, staging: torch.Tensor
    ) -> None:
        """Copy the chunk's pieces of ``tensors`` into ``out``, each padded to the block; ``None`` reads as 0.

        Many small pieces are packed in their own dtype first and then converted in one copy: ``torch.cat``
        converting on the way costs per input (measured 5x slower for 2,000 pieces of 256 entries).
        """
        first = next((tensors[layer] for layer, *_ in chunk.spec if tensors[layer] is not None), None)
        src_dtype = out.dtype if first is None else first.dtype
        convert = (
            src_dtype != out.dtype
            and len(chunk.spec) > 8
            and torch.empty((), dtype=src_dtype).element_size() <= out.element_size()
        )
        dtype = src_dtype if convert else out.dtype
        pads = self._pad(out.device, dtype)
        parts: list[torch.Tensor] = []
        append = parts.append
        for layer, start, stop, whole, pad in chunk.spec:
            t = tensors[layer]
            if t is None:
                append(torch.zeros(stop - start, device=out.device, dtype=dtype))
            else:
                flat = t.reshape(-1)
                append(flat if whole else flat[start:stop])
            if pad:
                append(pads[pad])
        if convert:
            packed = staging.view(dtype)[: out.numel()]
            torch.cat(parts, out=packed)
            out.copy_(packed)
        else:
            torch.cat(parts, out=out)

    def __call__(
        self,
        grads: Sequence[torch.Tensor | None],
        denominators: Denominators | None = None,
        *,
        spike_threshold: float = 5000.0,
    ) -> PassResult:
        """Statistics of ``grads`` (``None`` entries give a row of zero counts and NaN samples)."""
        num_layers = len(self.numels)
        present = tuple(g is not None for g in grads)
        device = next((g.device for g in grads if g is not None), torch.device("cpu"))
        dtype = self.dtype
        nan = float("nan")
        stats = torch.zeros(num_layers, len(STAT_FIELDS), device=device, dtype=dtype)
        num_samples = self.sample_index.shape[1]
        g_samples = torch.full((num_layers * num_samples,), nan, device=device, dtype=dtype)
        v_samples = torch.full_like(g_samples, nan)
        has_denominator = denominators is not None and any(v is not None for v in denominators.v)
        plan = self._plan(present, device)
        block = plan.block
        if has_denominator:
            inv_bc = denominators.bias_correction.to(device, dtype).reciprocal()
            # eps / [v > 0] makes d infinite where v = 0; with eps = 0 that would be 0 / 0, so eps is at least the
            # smallest normal number (which changes no d above 1e-290).
            eps = denominators.eps.to(device, dtype).clamp_min(torch.finfo(dtype).tiny)
            has_v = [v is not None for v in denominators.v]
            threshold = math.sqrt(spike_threshold)  # r^2 > T  <=>  r > sqrt(T), for r >= 0
            tiny = torch.full((), torch.finfo(dtype).tiny, device=device, dtype=dtype)
        # Three chunk-sized scratch buffers serve every chunk of this call.
        scratch = [torch.empty(plan.scratch, device=device, dtype=dtype) for _ in range(3)]
        sums: list[torch.Tensor] = []
        maxima: list[torch.Tensor] = []

        for chunk, rows in zip(plan.chunks, plan.block_rows):
            n = chunk.numel
            nb = n // block
            x, t, u = (buf[:n] for buf in scratch)
            self._pack(chunk, grads, x, u)  # the packing copy, in the statistics dtype
            xb, tb, ub = x.view(nb, block), t.view(nb, block), u.view(nb, block)
            # Non-finite entries: x * 0 is 0 where finite and NaN where not; counted, then read as 0.
            torch.mul(x, 0.0, out=t).nan_to_num_(nan=1.0)
            nonfinite = tb.sum(1)
            x.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
            g_samples.index_copy_(0, chunk.sample_dst, x.index_select(0, chunk.sample_src))
            s1 = xb.sum(1)
            absmax = torch.maximum(xb.amax(1), xb.amin(1).neg_())
            torch.mul(x, x, out=t)
            s2 = tb.sum(1)
            torch.mul(t, x, out=u)
            s3 = ub.sum(1)
            s4 = tb.square_().sum(1)
            block_sums = [nonfinite, s1, s2, s3, s4]
            block_max = [absmax]

            if has_denominator:
                if any(has_v[layer] for layer, *_ in chunk.spec):
                    self._pack(chunk, denominators.v, t, u)
                    v_samples.index_copy_(0, chunk.sample_dst, t.index_select(0, chunk.sample_src))
                    c = torch.repeat_interleave(inv_bc[rows], chunk.blocks, output_size=nb)[:, None]
                    e = torch.repeat_interleave(eps[rows], chunk.blocks, output_size=nb)[:, None]
                    # d = sqrt(v / bc) + eps / [v > 0]: infinite where v = 0, so r = |g| / d reads 0 there.
                    # sqrt of tiny + v / bc: the CPU's sqrt is ~30x slower on zeros and subnormals (padding, unused
                    # embedding rows), and adding the smallest normal changes no v above 1e-290 (1e-30 in float32).
                    torch.addcmul(tiny, tb, c, out=ub).sqrt_()
                    torch.gt(tb, 0.0, out=tb)
                    torch.addcdiv(ub, e.expand(nb, block), tb, out=ub)
                    r = torch.div(xb, ub, out=ub).abs_()
                    block_max.append(r.amax(1))
                    block_sums.append(torch.gt(r, threshold, out=tb).sum(1))
                else:
                    zeros = torch.zeros(nb, device=device, dtype=dtype)
                    block_max.append(zeros)
                    block_sums.append(zeros)
            sums.append(torch.segment_reduce(torch.stack(block_sums, 1), "sum", lengths=chunk.blocks, axis=0))
            maxima.append(torch.segment_reduce(torch.stack(block_max, 1), "max", lengths=chunk.blocks, axis=0))

        if plan.chunks:
            piece_sums = torch.cat(sums)  # (pieces, 5 or 6)
            piece_max = torch.cat(maxima)  # (pieces, 1 or 2)
            rows = plan.rows
            stats[:, COUNT].index_add_(0, rows, plan.lengths - piece_sums[:, 0])
            stats[:, S1 : S4 + 1].index_add_(0, rows, piece_sums[:, 1:5])
            stats[:, NONFINITE].index_add_(0, rows, piece_sums[:, 0])
            stats[:, ABSMAX].scatter_reduce_(0, rows, piece_max[:, 0], "amax")
            if has_denominator:
                stats[:, RATIO_SPIKES].index_add_(0, rows, piece_sums[:, 5])
                stats[:, RATIO_MAX].scatter_reduce_(0, rows, piece_max[:, 1], "amax")

        shape = (num_layers, num_samples)
        g_samples, v_samples = g_samples.view(shape), v_samples.view(shape)
        if has_denominator:
            key = (present, tuple(has_v))
            missing = self._missing.get(key)
            if missing is None:  # built once per pattern: no host-to-device copy on the step path
                if len(self._missing) >= MAX_PLANS:
                    self._missing.pop(next(iter(self._missing)))
                missing = self._missing[key] = to_device([not (v and g) for v, g in zip(has_v, present)], device)
            stats[:, RATIO_MAX] = torch.where(missing, nan, stats[:, RATIO_MAX])
            stats[:, RATIO_SPIKES] = torch.where(missing, nan, stats[:, RATIO_SPIKES])
            v_samples = torch.where(missing[:, None], nan, v_samples)
            r_samples = g_samples.abs() / ((v_samples * inv_bc[:, None]).sqrt() + eps[:, None])
            r_samples = torch.where(v_samples > 0, r_samples, torch.where(missing[:, None], nan, 0.0))
        else:
            stats[:, RATIO_MAX] = nan
            r_samples = torch.full_like(g_samples, nan)
        return PassResult(stats, g_samples, r_samples, v_samples)


def gradient_pass(
    grads: Sequence[torch.Tensor | None],
    sample_index: torch.Tensor | None = None,
    denominators: Denominators | None = None,
    *,
    spike_threshold: float = 5000.0,
    dtype: torch.dtype = torch.float64,
    chunk_numel: int = 1 << 23,
) -> PassResult:
    """One-shot form of :class:`GradientPass` (builds the plan every call; tests and notebooks)."""
    if sample_index is None:
        sample_index = torch.zeros(len(grads), 0, dtype=torch.long)
    numels = [0 if g is None else g.numel() for g in grads]
    plan = GradientPass(numels, sample_index, chunk_numel=chunk_numel, dtype=dtype)
    return plan(grads, denominators, spike_threshold=spike_threshold)
