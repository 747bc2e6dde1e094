"""The Triton gradient pass against the torch gradient pass, on every case the C kernel is tested on (on CUDA, or in
Triton's interpreter on the CPU)."""

from __future__ import annotations

import importlib.util
import math
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

HAS_TRITON = importlib.util.find_spec("triton") is not None
if HAS_TRITON and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # run the kernels on CPU tensors: slow, exact

pytestmark = [
    pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed"),
    # the interpreter's NumPy reports the IEEE divisions by zero and invalid operations the formulas rely on
    pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter"),
]

from heavytail.estimators.gradient_pass import (  # noqa: E402
    ABSMAX,
    COUNT,
    NONFINITE,
    RATIO_MAX,
    RATIO_SPIKES,
    S1,
    S4,
    Denominators,
    gradient_pass,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FIELDS = ("stats", "grad_samples", "ratio_samples", "denom_samples")


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    from heavytail.estimators import triton_pass

    monkeypatch.setattr(triton_pass, "CHUNK", 4096)  # several programs per large tensor, each with a partial tile


def _on(device, grads, den=None):
    grads = [None if g is None else g.to(device) for g in grads]
    if den is not None:
        den = Denominators(
            [None if v is None else v.to(device) for v in den.v], den.bias_correction.to(device), den.eps.to(device)
        )
    return grads, den


def _both(grads, index, den=None, threshold=5000.0):
    """(Triton, torch reference) on DEVICE, both as CPU float64 results."""
    from heavytail.estimators.triton_pass import triton_gradient_pass

    grads, den = _on(DEVICE, grads, den)
    want = gradient_pass(grads, sample_index=index.cpu(), denominators=den, spike_threshold=threshold)
    got = triton_gradient_pass(grads, index.to(DEVICE), den, spike_threshold=threshold)
    return (
        type(got)(*(t.cpu() for t in got)),
        type(want)(*(t.cpu().to(torch.float64) for t in want)),
    )


def _assert_same(got, want, rtol=1e-12):
    """The C kernel's test: sums to float64 rounding (another order of addition); counts, maxima and samples exact
    up to that tolerance, NaN where the reference has NaN."""
    for name in FIELDS:
        torch.testing.assert_close(
            getattr(got, name), getattr(want, name), rtol=rtol, atol=1e-300, equal_nan=True, msg=name
        )


def _case(seed: int, dtype=torch.float32, vdtype=torch.float32, samples: int = 32):
    """The C kernel's case (tests/estimators/test_cpu_pass.py): NaN and +-Inf gradients, zero v, an empty tensor,
    a tensor without a gradient and one without a denominator, rows of an embedding that never had a gradient."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(40, 30), (5,), (1,), (70_000,), (17, 3, 2), (0,), (600, 300)]
    grads = [
        (torch.randn(*s, generator=gen) * 10 ** float(torch.randint(-8, 1, (1,), generator=gen))).to(dtype)
        for s in shapes
    ]
    grads[0][3, 4] = float("nan")
    grads[3][7] = float("inf")
    grads[3][70] = -float("inf")
    grads[6][:200] = 0.0  # rows that never had a gradient (an embedding): g = 0 and v = 0
    grads.insert(2, None)
    vs = [
        None if g is None else (torch.rand(g.shape, generator=gen) * 1e-3 * g.float().abs().mean()).to(vdtype)
        for g in grads
    ]
    vs[1] = None
    vs[4][:10] = 0.0  # never-seen coordinates: r = 0
    vs[7][:200] = 0.0
    n = len(grads)
    den = Denominators(
        vs, torch.linspace(0.1, 1.0, n, dtype=torch.float64), torch.full((n,), 1e-8, dtype=torch.float64)
    )
    index = torch.stack(
        [torch.randint(0, max(1, 1 if g is None else max(g.numel(), 1)), (samples,), generator=gen) for g in grads]
    )
    return grads, den, index


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("vdtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("threshold", [5000.0, 50.0, 1.0])
def test_kernels_match_the_torch_pass(dtype, vdtype, threshold):
    grads, den, index = _case(0, dtype, vdtype)
    got, want = _both(grads, index, den, threshold)
    _assert_same(got, want)
    assert got.stats[:, RATIO_SPIKES].nansum() > 0 or threshold == 5000.0  # the spike count is exercised
    empty = 6  # the (0,) tensor: present, no entries, a denominator of no entries
    assert got.stats[empty].tolist() == [0.0] * len(got.stats[empty])
    assert math.isnan(got.stats[2, RATIO_MAX]) and math.isnan(got.stats[1, RATIO_SPIKES])  # no g; no v


def test_kernels_without_denominators_match_the_torch_pass():
    grads, _, index = _case(1)
    got, want = _both(grads, index)
    _assert_same(got, want)
    assert torch.isnan(got.stats[:, RATIO_MAX]).all() and (got.stats[:, RATIO_SPIKES] == 0).all()


def test_denominators_that_are_all_absent_are_no_denominators():
    # as the reference: ratio max NaN, spike count 0 (not NaN) when no tensor has a denominator
    grads, den, index = _case(2)
    den = Denominators([None] * len(grads), den.bias_correction, den.eps)
    got, want = _both(grads, index, den)
    _assert_same(got, want)


def test_ratio_max_and_spike_count_are_exact_next_to_the_threshold():
    # Ratios within a few float32 roundings of the threshold, on both sides: a float32 ratio or threshold (a Python
    # float kernel argument is float32 in Triton) would miscount them.
    threshold = 5000.0
    g = torch.ones(4096, dtype=torch.float32)
    target = math.sqrt(threshold) * (1.0 + torch.linspace(-3e-7, 3e-7, 4096, dtype=torch.float64))
    v = (1.0 / target**2).to(torch.float32)  # r = 1 / sqrt(v) (eps = 0, bias correction 1)
    den = Denominators([v], torch.ones(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64))
    got, want = _both([g], torch.arange(8)[None], den, threshold)
    exact = (1.0 / v.double().sqrt() > math.sqrt(threshold)).sum()
    assert got.stats[0, RATIO_SPIKES] == want.stats[0, RATIO_SPIKES] == exact
    assert 0 < exact < 4096
    assert got.stats[0, RATIO_MAX] == want.stats[0, RATIO_MAX]


def test_heavy_tailed_ratios_many_records_and_spikes():
    gen = torch.Generator().manual_seed(3)
    grads = [torch.randn(300_000, generator=gen) * 1e-3]
    vs = [(torch.randn(300_000, generator=gen) * 1e-3) ** 2]
    den = Denominators(vs, torch.full((1,), 0.3, dtype=torch.float64), torch.full((1,), 1e-8, dtype=torch.float64))
    got, want = _both(grads, torch.randint(0, 300_000, (1, 64), generator=gen), den)
    _assert_same(got, want)


@pytest.mark.parametrize("where", [1234, 0, 1999])  # inside a whole tile, the first entry, the partial tile
def test_nan_denominator_poisons_the_ratio_max_as_in_the_reference(where):
    gen = torch.Generator().manual_seed(where)
    g = [torch.randn(2000, generator=gen)]
    v = torch.rand(2000, generator=gen)
    v[where] = float("nan")
    den = Denominators([v], torch.ones(1, dtype=torch.float64), torch.full((1,), 1e-8, dtype=torch.float64))
    got, want = _both(g, torch.tensor([[where, 1, 2, 3]]), den)
    assert math.isnan(want.stats[0, RATIO_MAX]) and math.isnan(got.stats[0, RATIO_MAX])
    _assert_same(got, want)
    assert got.ratio_samples[0, 0] == 0.0 and math.isnan(got.denom_samples[0, 0])  # the reference's sample rule


def test_nan_and_inf_gradients_next_to_zero_and_inf_denominators():
    g = torch.tensor([float("nan"), float("inf"), -float("inf"), 1.0, 0.0, 2.0, 3.0, -4.0] * 3)
    v = torch.tensor([0.0, 1.0, 0.0, float("inf"), 0.0, 0.0, 1e-30, 1.0] * 3)
    den = Denominators([v], torch.full((1,), 0.5, dtype=torch.float64), torch.zeros(1, dtype=torch.float64))
    got, want = _both([g], torch.arange(8)[None], den, threshold=1.0)
    _assert_same(got, want)
    assert got.stats[0, NONFINITE] == 9 and got.stats[0, COUNT] == 15


def test_non_contiguous_and_unsupported_dtypes_are_read_in_logical_order():
    base = torch.randn(64, 48)
    grads = [base.t(), base[:, ::2], torch.randint(-3, 3, (10,)).to(torch.int32)]
    index = torch.tensor([[0, 5, 100, 3071], [0, 1, 2, 1535], [0, 3, 9, 9]])
    got, _ = _both(grads, index)
    want = gradient_pass([g.contiguous().float() for g in grads], sample_index=index)
    _assert_same(got, want)


def test_tensors_that_are_not_16_byte_aligned_take_the_scalar_variant():
    # views starting 1 and 3 entries into their storage (a flat buffer's pieces): the kernel without alignment hints
    gen = torch.Generator().manual_seed(7)
    flat = torch.randn(20_003, generator=gen)
    vflat = torch.rand(20_003, generator=gen)
    grads = [flat[1:10_001], flat[10_003:], torch.randn(5000, generator=gen)]
    vs = [vflat[1:10_001], vflat[10_003:], torch.rand(5000, generator=gen)]
    den = Denominators(vs, torch.full((3,), 0.5, dtype=torch.float64), torch.full((3,), 1e-8, dtype=torch.float64))
    got, want = _both(grads, torch.randint(0, 5000, (3, 16), generator=gen), den, threshold=10.0)
    _assert_same(got, want)


def test_a_denominator_of_another_size_is_no_denominator():
    # the CPU pass's rule: v is read over g's entries, so a v of another size gives NaN ratio figures (never an
    # out-of-bounds read), and the other tensors are untouched
    from heavytail.estimators import cpu_pass
    from heavytail.estimators.triton_pass import triton_gradient_pass

    gen = torch.Generator().manual_seed(4)
    grads = [torch.randn(300, generator=gen), torch.randn(40, 30, generator=gen)]
    good = torch.rand(300, generator=gen)
    den = Denominators(
        [good, torch.rand(30, 40 + 1, generator=gen)],
        torch.ones(2, dtype=torch.float64),
        torch.full((2,), 1e-8, dtype=torch.float64),
    )
    index = torch.randint(0, 300, (2, 8), generator=gen)
    _, want = _both(grads, index, Denominators([good, None], den.bias_correction, den.eps))
    on_device, den = _on(DEVICE, grads, den)  # the torch pass has no such rule: only the kernel runs
    mismatched = triton_gradient_pass(on_device, index.to(DEVICE), den)
    mismatched = type(mismatched)(*(t.cpu() for t in mismatched))
    _assert_same(mismatched, want)  # as if that tensor had no denominator
    assert math.isnan(mismatched.stats[1, RATIO_MAX]) and math.isnan(mismatched.stats[1, RATIO_SPIKES])
    assert torch.isnan(mismatched.ratio_samples[1]).all() and torch.isnan(mismatched.denom_samples[1]).all()
    if cpu_pass.available():
        _assert_same(cpu_pass.cpu_gradient_pass(grads, index, _on("cpu", grads, den)[1]), mismatched)


@settings(max_examples=25, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 3000), min_size=1, max_size=6),
    scale=st.sampled_from([1e-30, 1e-12, 1e-3, 1.0, 1e12]),
    specials=st.lists(st.sampled_from([math.nan, math.inf, -math.inf, 0.0]), max_size=4),
    seed=st.integers(0, 2**16),
)
def test_kernels_match_the_torch_pass_on_random_inputs(sizes, scale, specials, seed):
    gen = torch.Generator().manual_seed(seed)
    grads = [torch.randn(n, generator=gen) * scale for n in sizes]
    for i, value in enumerate(specials):
        if grads[i % len(grads)].numel():
            grads[i % len(grads)][0] = value
    vs = [(torch.randn(n, generator=gen) * scale) ** 2 for n in sizes]
    n = len(sizes)
    den = Denominators(
        vs, torch.rand(n, generator=gen, dtype=torch.float64) + 0.05, torch.full((n,), 1e-8, dtype=torch.float64)
    )
    index = torch.stack([torch.randint(0, max(s, 1), (16,), generator=gen) for s in sizes])
    got, want = _both(grads, index, den, threshold=10.0)
    _assert_same(got, want, rtol=1e-10)


@pytest.mark.parametrize("eps", [1e-8, 1e-30, 0.0])
def test_subnormal_and_zero_denominators_next_to_small_gradients(eps):
    gen = torch.Generator().manual_seed(5)
    n = 20_000
    g = torch.randn(n, generator=gen) * 1e-3
    v = (torch.randn(n, generator=gen) * 1e-3) ** 2
    v[::7] = torch.rand(len(v[::7]), generator=gen) * 1e-39  # subnormal float32 denominators
    v[3::11] = 0.0
    g[5::13] = torch.randn(len(g[5::13]), generator=gen) * 1e-21  # gradients whose squares are subnormal
    g[::7] *= 1e-15  # small gradients on the subnormal denominators: large ratios only without eps
    den = Denominators([v], torch.full((1,), 0.02, dtype=torch.float64), torch.full((1,), eps, dtype=torch.float64))
    got, want = _both([g], torch.arange(64)[None], den)
    _assert_same(got, want)


def test_power_sums_of_tiny_gradients_are_float64():
    # fourth powers of 1e-12 underflow float32; the kernel accumulates in float64
    g = torch.full((5000,), 1e-12, dtype=torch.float32)
    got, want = _both([g], torch.arange(4)[None])
    _assert_same(got, want)
    assert got.stats[0, S4] > 0 and got.stats[0, S1] > 0 and got.stats[0, ABSMAX] == pytest.approx(1e-12)


def test_monitor_with_the_triton_kernel_writes_the_same_records(tmp_path):
    import heavytail as ht
    from tests.conftest import TinyNet, read_records, tiny_batch

    runs = {}
    for kernel in ("torch", "triton"):
        torch.manual_seed(0)
        model = TinyNet().to(DEVICE)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        with ht.Monitor(model, opt, every=2, log_dir=tmp_path / kernel, kernel=kernel, ratio_warmup=2) as mon:
            for step in range(4):
                idx, y = tiny_batch(step)
                loss = torch.nn.functional.mse_loss(model(idx.to(DEVICE)), y.to(DEVICE))
                loss.backward()
                mon.observe_loss(loss)
                opt.step()
                opt.zero_grad(set_to_none=True)
        runs[kernel] = read_records(tmp_path / kernel)
    for a, b in zip(runs["torch"], runs["triton"], strict=True):
        for key, value in a["metrics"].items():
            if value is None:
                assert b["metrics"][key] is None, key
            else:
                assert b["metrics"][key] == pytest.approx(value, rel=1e-6, abs=1e-12), key
