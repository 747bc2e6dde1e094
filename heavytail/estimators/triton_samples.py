"""The monitor's sample estimators as two Triton kernels: one launch a step, and one after the optimizer's update.

The CUDA twin of ``cpu_samples.c`` (:func:`heavytail.estimators.cpu_pass.sample_step`), with the same call and
the same contract: the denominator-memory episodes of the real denominator and the first shadow, the shadow
denominators, the temporal-noise EMA and ring, and (``update_step``) the update-to-gradient ratios, computed on
the ``(L, S)`` sampled coordinates with the monitor's torch code's operations and dtypes (float32 states, float64
where torch promotes), updating the state tensors in place. In torch these are about 250 small operations a step,
each a launch and a few microseconds of a GPU that has nothing else to do meanwhile; here one program per tensor
does them all. The ratio's percentile stays a few torch operations (a top-k). Every float64 constant the
formulas use comes in through a float64 tensor: a literal in a Triton kernel is float32.

Tested against the torch code and the C kernel through Triton's interpreter (``TRITON_INTERPRET=1``, CPU
tensors; tests/estimators/test_triton_samples.py), where every state is bitwise equal but the sums over the
samples (added in another order, equal to float64 rounding) and, against torch on the CPU, the shadow ratio max
(torch's vectorised CPU square root is not always correctly rounded). What makes the GPU's figures the interpreter's:
both launches turn FMA contraction off (``enable_fp_fusion=False``: Triton 3.9 contracts by default, and a fused
``beta * v + (1 - beta) * g^2`` rounds once where torch rounds twice); divisions and square roots are the IEEE
``div.rn``/``sqrt.rn`` in float64 and no float32 operation flushes subnormals (``benchmarks/kernel_report.py``
counts the FMAs in the PTX: 0); and NaN never reaches ``tl.max``/``tl.maximum`` unguarded (they skip NaN on a
GPU and propagate it in the interpreter): NaN ratios are masked and counted, and the NaN of torch's ``amax`` is
restored explicitly. The same tests run on a GPU in ``benchmarks/device_check.sh``.
"""

from __future__ import annotations

from typing import Sequence

import torch

from heavytail.estimators.cpu_pass import SampleStep
from heavytail.estimators.quantile import upper_quantile
from heavytail.transfer import to_device

try:  # Triton is optional: present with CUDA builds of PyTorch, absent on most CPU machines.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the environment
    triton = None
    tl = None

_DBL_MAX = 1.7976931348623157e308


if triton is not None:

    @triton.jit
    def _nan_to_num64(x, big):
        x = tl.where(x != x, 0.0, x)
        return tl.minimum(tl.maximum(x, -big), big)

    @triton.jit
    def _add(p, value):
        # one program owns each accumulator it touches: a plain read-modify-write, no atomics
        tl.store(p, tl.load(p) + value)

    @triton.jit
    def _memory_row(r, vh, valid, inflation2, threshold, level_p, age_p, active_p, events_p, sums_p, offs, inside):
        # memory.update for one row; valid is the row's float32 0/1 validity
        level = tl.load(level_p + offs, mask=inside, other=0.0)
        age = tl.load(age_p + offs, mask=inside, other=0.0)
        active = tl.load(active_p + offs, mask=inside, other=0.0)
        ok = tl.where(r * 0 + vh * 0 == 0, valid, 0.0)
        ongoing = active * ok
        a = age + ongoing
        ending = ongoing * tl.where(vh <= (inflation2 * level).to(tl.float64), 1.0, 0.0)
        act = active - ending
        large = tl.where(r * r > threshold, 1.0, 0.0) * tl.where(vh > 0, 1.0, 0.0)
        ev = ok * (1.0 - act) * large
        fresh = tl.where(vh * 0 == 0, vh, 0.0).to(tl.float32)
        tl.store(level_p + offs, tl.where(ev == 1.0, fresh, level), mask=inside)
        tl.store(age_p + offs, a * (1.0 - tl.maximum(ev, ending)), mask=inside)
        tl.store(active_p + offs, act + ev, mask=inside)
        tl.store(events_p + offs, ev, mask=inside)
        started = tl.sum(tl.where(inside, ev, 0.0).to(tl.float64), 0)
        ended = tl.sum(tl.where(inside, ending, 0.0).to(tl.float64), 0)
        ended_steps = tl.sum(tl.where(inside, ending * a, 0.0).to(tl.float64), 0)
        _add(sums_p + 0, started)
        _add(sums_p + 1, ended)
        _add(sums_p + 2, ended_steps)

    @triton.jit
    def _sample_step_kernel(
        g_p,
        valid_p,
        ratio_p,
        den_p,
        bc_p,
        ratio_ok_p,
        level0,
        age0,
        active0,
        level1,
        age1,
        active1,
        memory_sum,
        events,
        betas,
        bias,
        shadow_v,
        shadow_t,
        shadow_sum,
        shadow_max,
        noise_mean,
        noise_seen,
        ring,
        ring_valid,
        consts,
        slot,
        noise_beta,
        inflation2,
        L,
        S,
        W,
        B: tl.constexpr,
        HAS_DEN: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        l = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        inside = cols < S
        offs = l * S + cols
        threshold = tl.load(consts + 0)
        eps = tl.load(consts + 1)
        big = tl.load(consts + 2)
        g = tl.load(g_p + offs, mask=inside, other=0.0)
        valid = tl.load(valid_p + l)
        if HAS_DEN:
            r = tl.load(ratio_p + offs, mask=inside, other=0.0)
            vh = tl.load(den_p + offs, mask=inside, other=0.0) / tl.load(bc_p + l)
            ok = tl.load(ratio_ok_p + l).to(tl.float32)
            _memory_row(
                r, vh, ok, inflation2, threshold, level0, age0, active0, events, memory_sum + l * 3, offs, inside
            )
        gj = _nan_to_num64(g, big)
        for b in tl.static_range(B):
            bl = b * L + l
            v = tl.load(shadow_v + bl * S + cols, mask=inside, other=0.0)
            beta = tl.load(betas + b)
            t = tl.load(shadow_t + bl)
            ok_b = (valid != 0) & (t >= tl.load(consts + 4))
            vj = v.to(tl.float64)
            vhb = vj / tl.load(bias + bl)
            rb = tl.abs(gj) / (tl.sqrt(vhb) + eps) * tl.where(vj > 0, 1.0, 0.0).to(tl.float64)
            over = tl.sum(tl.where(inside & (rb * rb > threshold), 1.0, 0.0).to(tl.float64), 0)
            nans = tl.sum(tl.where(inside & (rb != rb), 1.0, 0.0), 0)
            rmax = tl.max(tl.where(inside & (rb == rb), rb, 0.0), 0)
            rmax = tl.where(nans > 0, float("nan"), rmax)  # torch's amax: NaN if any entry is
            fresh = (beta * vj + (1.0 - beta) * (gj * gj)).to(tl.float32)
            tl.store(shadow_v + bl * S + cols, tl.where(valid != 0, fresh, v), mask=inside)
            _add(shadow_sum + bl, tl.where(ok_b, over / S, 0.0))
            old = tl.load(shadow_max + bl * 2)
            new = tl.where(ok_b, rmax, 0.0)
            tl.store(shadow_max + bl * 2, tl.where((old != old) | (new != new), float("nan"), tl.maximum(old, new)))
            _add(shadow_max + bl * 2 + 1, tl.where(ok_b, 1.0, 0.0))
            if b == 0:
                _memory_row(
                    rb,
                    vhb,
                    tl.where(ok_b, 1.0, 0.0),
                    inflation2,
                    threshold,
                    level1,
                    age1,
                    active1,
                    events + L * S,
                    memory_sum + (L + l) * 3,
                    offs,
                    inside,
                )
            tl.store(shadow_t + bl, t + valid)
        # Temporal noise: the deviation from the EMA into the ring (once the EMA has a value), then the EMA.
        mean = tl.load(noise_mean + offs, mask=inside, other=0.0)
        seen = tl.load(noise_seen + l)
        push = (valid != 0) & (seen > 0)
        dev = (g - mean.to(tl.float64)).to(tl.float32)
        dev = tl.minimum(tl.maximum(tl.where(dev != dev, 0.0, dev), -3.4028234663852886e38), 3.4028234663852886e38)
        tl.store(ring + offs * W + slot, dev * tl.where(push, 1.0, 0.0), mask=inside)
        tl.store(ring_valid + l * W + slot, push)
        beta_n = tl.where(seen > 0, noise_beta, 0.0)
        fresh_mean = ((beta_n * mean).to(tl.float64) + (1.0 - beta_n).to(tl.float64) * gj).to(tl.float32)
        tl.store(noise_mean + offs, tl.where(valid != 0, fresh_mean, mean), mask=inside)
        tl.store(noise_seen + l, seen + valid)

    @triton.jit
    def _update_kernel(
        before_p,
        after_p,
        g_p,
        valid_p,
        ev0,
        ev1,
        upd,
        consts,
        S,
        UCOLS,
        C0,
        C1,
        C2,
        C3,
        C4,
        C5,
        HAS0: tl.constexpr,
        HAS1: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        l = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        inside = cols < S
        offs = l * S + cols
        tiny = tl.load(consts + 3)
        d = tl.abs(tl.load(after_p + offs, mask=inside, other=0.0) - tl.load(before_p + offs, mask=inside, other=0.0))
        ga = tl.abs(tl.load(g_p + offs, mask=inside, other=0.0))
        g_rms = tl.sqrt(tl.sum(tl.where(inside, ga * ga, 0.0), 0) / S)
        ratio = tl.sqrt(tl.sum(tl.where(inside, d * d, 0.0), 0) / S) / g_rms
        ok = (tl.load(valid_p + l) != 0) & (g_rms > 0) & (ratio * 0 == 0)
        row = upd + l * UCOLS
        _add(row + C0, tl.where(ok, ratio, 0.0))
        _add(row + C1, tl.where(ok, 1.0, 0.0))
        usable = (ga > 0) & (d * 0 == 0) & inside
        rj = tl.where(d * 0 == 0, d, 0.0) / tl.maximum(tl.where(ga == ga, ga, 0.0), tiny)
        if HAS0:
            hit = tl.where(usable, tl.load(ev0 + offs, mask=inside, other=0.0).to(tl.float64), 0.0)
            _add(row + C2, tl.sum(hit * rj, 0))
            _add(row + C3, tl.sum(hit, 0))
        if HAS1:
            hit = tl.where(usable, tl.load(ev1 + offs, mask=inside, other=0.0).to(tl.float64), 0.0)
            _add(row + C4, tl.sum(hit * rj, 0))
            _add(row + C5, tl.sum(hit, 0))


_CONSTS: dict[tuple[float, torch.device], torch.Tensor] = {}


def _consts(threshold: float, device: torch.device, shadow_warmup: float = 1.0) -> torch.Tensor:
    # threshold, the shadows' eps, nan_to_num's bound, the update ratio's floor, the shadows' warm-up: float64,
    # never Triton literals.
    # Copied to the device once per threshold (an asynchronous copy from pinned memory), not at every step.
    key = (float(threshold), device, float(shadow_warmup))
    if key not in _CONSTS:
        _CONSTS[key] = to_device(
            [float(threshold), 1e-8, _DBL_MAX, 1e-30, max(1.0, float(shadow_warmup))], device, torch.float64
        )
    return _CONSTS[key]


def _warps(block: int) -> int:
    # two samples per thread up to 1,024 samples (16 warps), so a row's dozen float64 temporaries stay in registers
    return max(4, min(16, block // 64))


def _check(t: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...], name: str) -> torch.Tensor:
    if t.dtype != dtype or tuple(t.shape) != shape or not t.is_contiguous():
        raise ValueError(
            f"heavytail Triton sample step: {name} must be a contiguous {dtype} tensor of shape "
            f"{shape}, got {t.dtype} {tuple(t.shape)}"
        )
    return t


def sample_step(
    *,
    g: torch.Tensor,
    valid: torch.Tensor,
    ratio: torch.Tensor | None,
    den: torch.Tensor | None,
    bias_correction: torch.Tensor | None,
    ratio_ok: torch.Tensor,
    memory: Sequence[Sequence[torch.Tensor]],
    memory_sum: torch.Tensor,
    betas: torch.Tensor,
    shadow_bias: torch.Tensor,
    shadow_v: torch.Tensor,
    shadow_t: torch.Tensor,
    shadow_sum: torch.Tensor,
    shadow_max: torch.Tensor,
    noise_mean: torch.Tensor,
    noise_seen: torch.Tensor,
    ring: torch.Tensor,
    ring_valid: torch.Tensor,
    slot: int,
    threshold: float,
    inflation: float,
    noise_beta: float,
    q: float,
    shadow_warmup: float = 1.0,
) -> SampleStep:
    """:func:`heavytail.estimators.cpu_pass.sample_step` on the GPU: the same arguments, states and result."""
    if triton is None:
        raise RuntimeError("the Triton sample step needs Triton (pip install triton) and a CUDA device")
    L, S = g.shape
    B, W = betas.shape[0], ring.shape[2]
    f32, f64 = torch.float32, torch.float64
    device = g.device
    _check(g, f64, (L, S), "g")
    states = [_check(t, f32, (L, S), "memory state") for family in memory for t in family]
    for t, dtype, shape, name in (
        (memory_sum, f64, (2, L, 3), "memory_sum"),
        (betas, f64, (B,), "betas"),
        (shadow_bias, f64, (B, L), "shadow_bias"),
        (shadow_v, f32, (B, L, S), "shadow_v"),
        (shadow_t, f64, (B, L), "shadow_t"),
        (shadow_sum, f64, (B, L), "shadow_sum"),
        (shadow_max, f64, (B, L, 2), "shadow_max"),
        (noise_mean, f32, (L, S), "noise_mean"),
        (noise_seen, f64, (L,), "noise_seen"),
        (ring, f32, (L, S, W), "ring"),
        (ring_valid, torch.bool, (L, W), "ring_valid"),
    ):
        _check(t, dtype, shape, name)
    has_den = ratio is not None
    if has_den:
        _check(ratio, f64, (L, S), "ratio")
        _check(den, f64, (L, S), "den")
        bc = bias_correction.to(device, f64).contiguous()
    else:
        ratio = den = g  # not read
        bc = betas
    # before the kernel: once it has run, nothing may fail (the monitor would measure the step again)
    if has_den:
        quantile = upper_quantile(ratio, q)
    else:
        quantile = torch.full((L,), float("nan"), dtype=f64, device=device)
    events = torch.zeros(2, L, S, dtype=f32, device=device)
    block = triton.next_power_of_2(S)
    _sample_step_kernel[(L,)](
        g,
        valid.to(f64).contiguous(),
        ratio,
        den,
        bc,
        ratio_ok.to(f64).contiguous(),
        *states,
        memory_sum,
        events,
        betas,
        shadow_bias,
        shadow_v,
        shadow_t,
        shadow_sum,
        shadow_max,
        noise_mean,
        noise_seen,
        ring,
        ring_valid,
        _consts(threshold, device, shadow_warmup),
        int(slot) % W,
        float(noise_beta),
        float(inflation) * float(inflation),
        L,
        S,
        W,
        B=B,
        HAS_DEN=has_den,
        BLOCK=block,
        num_warps=_warps(block),
        enable_fp_fusion=False,  # each multiply and add rounds on its own, as in the torch code
    )
    return SampleStep(events, quantile)


def update_step(
    before: torch.Tensor,
    after: torch.Tensor,
    g: torch.Tensor,
    valid: torch.Tensor,
    events: Sequence[torch.Tensor | None],
    update_sum: torch.Tensor,
    columns: Sequence[int],
) -> None:
    """:func:`heavytail.estimators.cpu_pass.update_step` on the GPU: adds to ``update_sum`` in place."""
    if triton is None:
        raise RuntimeError("the Triton update step needs Triton (pip install triton) and a CUDA device")
    L, S = g.shape
    f64 = torch.float64
    for t, name in ((before, "before"), (after, "after"), (g, "g")):
        _check(t, f64, (L, S), name)
    _check(update_sum, f64, (L, update_sum.shape[1]), "update_sum")
    ev = [None if e is None else _check(e, torch.float32, (L, S), "events") for e in events]
    block = triton.next_power_of_2(S)
    _update_kernel[(L,)](
        before,
        after,
        g,
        valid.to(f64).contiguous(),
        ev[0] if ev[0] is not None else g,
        ev[1] if ev[1] is not None else g,
        update_sum,
        _consts(0.0, g.device),
        S,
        update_sum.shape[1],
        *columns,
        HAS0=ev[0] is not None,
        HAS1=ev[1] is not None,
        BLOCK=block,
        num_warps=_warps(block),
        enable_fp_fusion=False,
    )
