"""One pass over every monitored gradient: power sums, max |g|, non-finite counts, denominator ratios, samples.

This is the only estimator that touches whole gradients on every step, so it is built for cost: gradients are
packed into bounded chunks (``chunk_numel`` entries, never a copy of the whole model) and each chunk is reduced
per tensor with ``torch.segment_reduce``, so the number of kernel launches per step grows with the number of
chunks, not with the number of parameter tensors. Large tensors are split across chunks and their partial
results merged (sums add, maxima take the max). Everything stays on the gradients' device: the result is a
tensor, never a Python number.

Per tensor ``l`` with entries g (non-finite entries are counted and then read as 0 so they never reach the sums):

- ``count`` = number of finite entries, ``s1..s4`` = sum g^p, ``absmax`` = max |g|, ``nonfinite`` = count of NaN/Inf;
- with a denominator (AdamW's ``exp_avg_sq`` v and its bias correction bc = 1 - beta2^t, eps):
  r = |g| / (sqrt(v / bc) + eps) as AdamW divides (Kingma & Ba 2015; Loshchilov & Hutter 2019),
  ``ratio_max`` = max r and ``ratio_spikes`` = #{r^2 > spike_threshold} (SPAM, Huang et al. 2025, uses 5000);
  coordinates with v = 0 (never had a gradient) count as r = 0;
- the values of g, r and v at a fixed set of sampled coordinates per tensor (for the noise and shadow estimators).

A Triton kernel could fuse all of this into one read of g (and of v); this is the reference ``torch`` path,
which on CPU is also the fast one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch

STAT_FIELDS = ("count", "s1", "s2", "s3", "s4", "absmax", "nonfinite", "ratio_max", "ratio_spikes")
COUNT, S1, S2, S3, S4, ABSMAX, NONFINITE, RATIO_MAX, RATIO_SPIKES = range(len(STAT_FIELDS))


class Denominators(NamedTuple):
    """What AdamW divides each tensor's gradient by: sqrt(v / bias_correction) + eps.

    ``v`` has one entry per tensor (``None`` where there is no denominator); ``bias_correction`` and ``eps``
    are ``(L,)`` tensors on the gradients' device.
    """

    v: Sequence[torch.Tensor | None]
    bias_correction: torch.Tensor
    eps: torch.Tensor


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


@dataclass
class _Chunk:
    pieces: list[_Piece]
    lengths: torch.Tensor  # (P,) entries per piece, on device
    rows: torch.Tensor  # (P,) result row per piece, on device
    sample_src: torch.Tensor  # positions inside the chunk's flat buffer of samples that fall in this chunk
    sample_dst: torch.Tensor  # flat positions in the (L*S) sample buffer they go to


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
        self._plans: dict[tuple[bool, ...], list[_Chunk]] = {}

    def _plan(self, present: tuple[bool, ...], device: torch.device) -> list[_Chunk]:
        plan = self._plans.get(present)
        if plan is not None:
            return plan
        samples = self.sample_index  # built on the host, so planning never waits on the device
        num_samples = samples.shape[1]
        chunks: list[_Chunk] = []
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
                offset += piece.stop - piece.start
            chunks.append(
                _Chunk(
                    pieces=pieces,
                    lengths=torch.tensor([p.stop - p.start for p in pieces], device=device),
                    rows=torch.tensor([p.layer for p in pieces], device=device),
                    sample_src=torch.cat(src).to(device),
                    sample_dst=torch.cat(dst).to(device),
                )
            )
            pieces, fill = [], 0

        for layer, (numel, here) in enumerate(zip(self.numels, present)):
            if not here or numel == 0:
                continue
            start = 0
            while start < numel:
                take = min(numel - start, self.chunk_numel - fill)
                pieces.append(_Piece(layer, start, start + take))
                fill += take
                start += take
                if fill >= self.chunk_numel:
                    close()
        close()
        self._plans[present] = chunks
        return chunks

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
        stats = torch.zeros(num_layers, len(STAT_FIELDS), device=device, dtype=dtype)
        stats[:, RATIO_MAX] = float("nan")
        num_samples = self.sample_index.shape[1]
        nan = float("nan")
        g_samples = torch.full((num_layers * num_samples,), nan, device=device, dtype=dtype)
        r_samples = torch.full_like(g_samples, nan)
        v_samples = torch.full_like(g_samples, nan)
        has_denominator = denominators is not None and any(v is not None for v in denominators.v)
        if has_denominator:
            ratio_rows = torch.tensor([v is not None and present[i] for i, v in enumerate(denominators.v)])
            stats[:, RATIO_MAX] = 0.0

        for chunk in self._plan(present, device):
            flat = [grads[p.layer].reshape(-1)[p.start : p.stop] for p in chunk.pieces]
            x = (torch.cat(flat) if len(flat) > 1 else flat[0]).to(dtype)
            finite = torch.isfinite(x)
            x = torch.where(finite, x, 0.0)
            x2 = x * x
            lengths = chunk.lengths
            seg = torch.stack(
                [
                    torch.segment_reduce(finite.to(dtype), "sum", lengths=lengths),
                    torch.segment_reduce(x, "sum", lengths=lengths),
                    torch.segment_reduce(x2, "sum", lengths=lengths),
                    torch.segment_reduce(x2 * x, "sum", lengths=lengths),
                    torch.segment_reduce(x2 * x2, "sum", lengths=lengths),
                ],
                dim=1,
            )
            stats[:, COUNT : S4 + 1].index_add_(0, chunk.rows, seg)
            absmax = torch.segment_reduce(x.abs(), "max", lengths=lengths)
            stats[:, ABSMAX].scatter_reduce_(0, chunk.rows, absmax, "amax")
            nonfinite = lengths.to(dtype) - seg[:, 0]
            stats[:, NONFINITE].index_add_(0, chunk.rows, nonfinite)
            g_samples[chunk.sample_dst] = x[chunk.sample_src]

            if has_denominator:
                if any(denominators.v[p.layer] is not None for p in chunk.pieces):
                    r, v = self._ratio(x, chunk, denominators)
                    ratio_max = torch.segment_reduce(r, "max", lengths=lengths)
                    stats[:, RATIO_MAX].scatter_reduce_(0, chunk.rows, ratio_max, "amax")
                    spikes = torch.segment_reduce((r * r > spike_threshold).to(dtype), "sum", lengths=lengths)
                    stats[:, RATIO_SPIKES].index_add_(0, chunk.rows, spikes)
                    r_samples[chunk.sample_dst] = r[chunk.sample_src]
                    v_samples[chunk.sample_dst] = v[chunk.sample_src]

        if has_denominator:
            missing = ~ratio_rows.to(device)
            stats[:, RATIO_MAX] = torch.where(missing, nan, stats[:, RATIO_MAX])
            stats[:, RATIO_SPIKES] = torch.where(missing, nan, stats[:, RATIO_SPIKES])
        shape = (num_layers, num_samples)
        return PassResult(stats, g_samples.view(shape), r_samples.view(shape), v_samples.view(shape))

    def _ratio(self, x: torch.Tensor, chunk: _Chunk, den: Denominators) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = self.dtype
        parts = []
        for piece in chunk.pieces:
            v = den.v[piece.layer]
            if v is None:
                # NaN v gives NaN r; those rows are set to NaN after the pass anyway.
                parts.append(torch.full((piece.stop - piece.start,), float("nan"), device=x.device, dtype=dtype))
            else:
                parts.append(v.reshape(-1)[piece.start : piece.stop])
        v = torch.cat([p.to(dtype) for p in parts]) if len(parts) > 1 else parts[0].to(dtype)
        bias_correction = den.bias_correction.to(dtype)[chunk.rows]
        eps = den.eps.to(dtype)[chunk.rows]
        if len(parts) > 1:
            bias_correction = torch.repeat_interleave(bias_correction, chunk.lengths)
            eps = torch.repeat_interleave(eps, chunk.lengths)
        r = x.abs() / (torch.sqrt(v / bias_correction) + eps)
        # A coordinate whose denominator has never seen a gradient (v = 0: an embedding row not yet used) gets
        # |g|/eps, which is the optimizer's first update of it, not a spike the denominator hides: read it as 0.
        r = torch.where(v > 0, r, 0.0)
        return r, v


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
