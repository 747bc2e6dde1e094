"""The upper quantile of each row of samples, from its top order statistics: the ratio's 99th percentile."""

from __future__ import annotations

import math

import torch

from heavytail.estimators.masks import float_mask


def upper_quantile(x: torch.Tensor, q: float) -> torch.Tensor:
    """``torch.nanquantile(x, q, dim=1)`` (linear interpolation, NaN ignored) for q near 1, from each row's top k.

    nanquantile sorts every row: 121 ms per step at 10,000 tensors x 256 samples on a CPU core, against 21 ms
    for ``topk`` of the few order statistics the interpolation reads (k = floor((1 - q)(S - 1)) + 2).
    """
    num = x.shape[1]
    k = min(num, int(math.floor((1.0 - q) * (num - 1))) + 2)
    n = num - float_mask(torch.ne, x, x, x.dtype).sum(dim=1)  # non-NaN entries
    top = torch.nan_to_num(x, nan=-math.inf, posinf=math.inf, neginf=-math.inf).topk(k, dim=1).values  # descending
    rank = (n - 1).clamp_min(0).to(x.dtype) * (1.0 - q)  # position counted from the top, in [0, k - 2]
    lo = rank.floor().long().clamp(max=k - 1)
    hi = (lo + 1).clamp(max=k - 1)
    frac = rank - lo.to(x.dtype)
    a, b = top.gather(1, lo[:, None])[:, 0], top.gather(1, hi[:, None])[:, 0]
    out = torch.where(frac == 0, a, a + (b - a) * frac)
    return torch.where(n > 0, out, math.nan)
