"""The C kernels (gradient pass, gathers, top-k) against the torch reference path and float64 references."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from heavytail.estimators import cpu_pass
from heavytail.estimators.gradient_pass import RATIO_MAX, RATIO_SPIKES, Denominators, gradient_pass
from heavytail.estimators.hill import top_magnitudes

pytestmark = pytest.mark.skipif(not cpu_pass.available(), reason=f"no CPU kernels: {cpu_pass.unavailable_reason()}")

FIELDS = ("stats", "grad_samples", "ratio_samples", "denom_samples")


def _case(seed: int, dtype=torch.float32, vdtype=torch.float32, samples: int = 32):
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


def _assert_same(got, want, rtol=1e-12):
    for name in FIELDS:
        torch.testing.assert_close(
            getattr(got, name), getattr(want, name).to(torch.float64), rtol=rtol, atol=1e-300, equal_nan=True, msg=name
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("vdtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("threshold", [5000.0, 50.0, 1.0])
def test_kernel_matches_the_torch_pass(dtype, vdtype, threshold):
    grads, den, index = _case(0, dtype, vdtype)
    want = gradient_pass(grads, sample_index=index, denominators=den, spike_threshold=threshold)
    got = cpu_pass.cpu_gradient_pass(grads, index, den, spike_threshold=threshold)
    _assert_same(got, want)
    assert got.stats[:, RATIO_SPIKES].nansum() > 0 or threshold == 5000.0  # the spike count is exercised


def test_kernel_without_denominators_matches_the_torch_pass():
    grads, _, index = _case(1)
    _assert_same(cpu_pass.cpu_gradient_pass(grads, index, None), gradient_pass(grads, sample_index=index))


def test_ratio_max_and_spike_count_are_exact_next_to_the_threshold():
    # Ratios within a few float32 roundings of the threshold, on both sides: a float32 ratio would miscount them.
    threshold = 5000.0
    g = torch.ones(4096, dtype=torch.float32)
    target = math.sqrt(threshold) * (1.0 + torch.linspace(-3e-7, 3e-7, 4096, dtype=torch.float64))
    v = (1.0 / target**2).to(torch.float32)  # r = 1 / sqrt(v) (eps = 0, bias correction 1)
    den = Denominators([v], torch.ones(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64))
    index = torch.arange(8)[None]
    want = gradient_pass([g], sample_index=index, denominators=den, spike_threshold=threshold)
    got = cpu_pass.cpu_gradient_pass([g], index, den, spike_threshold=threshold)
    exact = (1.0 / v.double().sqrt() > math.sqrt(threshold)).sum()
    assert got.stats[0, RATIO_SPIKES] == want.stats[0, RATIO_SPIKES] == exact
    assert 0 < exact < 4096
    assert got.stats[0, RATIO_MAX] == want.stats[0, RATIO_MAX]


def test_heavy_tailed_ratios_many_records_and_spikes():
    # Cauchy-like ratios: records and spikes everywhere, so most tiles take the float64 look.
    gen = torch.Generator().manual_seed(3)
    grads = [torch.randn(300_000, generator=gen) * 1e-3]
    vs = [(torch.randn(300_000, generator=gen) * 1e-3) ** 2]
    den = Denominators(vs, torch.full((1,), 0.3, dtype=torch.float64), torch.full((1,), 1e-8, dtype=torch.float64))
    index = torch.randint(0, 300_000, (1, 64), generator=gen)
    _assert_same(
        cpu_pass.cpu_gradient_pass(grads, index, den), gradient_pass(grads, sample_index=index, denominators=den)
    )


def test_nan_denominator_poisons_the_ratio_max_as_in_the_reference():
    g = [torch.randn(2000)]
    v = torch.rand(2000)
    v[1234] = float("nan")
    den = Denominators([v], torch.ones(1, dtype=torch.float64), torch.full((1,), 1e-8, dtype=torch.float64))
    index = torch.arange(4)[None]
    want = gradient_pass(g, sample_index=index, denominators=den)
    got = cpu_pass.cpu_gradient_pass(g, index, den)
    assert math.isnan(want.stats[0, RATIO_MAX]) and math.isnan(got.stats[0, RATIO_MAX])
    _assert_same(got, want)


def test_non_contiguous_and_unsupported_dtypes_are_read_in_logical_order():
    base = torch.randn(64, 48)
    grads = [base.t(), base[:, ::2], torch.randint(-3, 3, (10,)).to(torch.int32)]
    index = torch.tensor([[0, 5, 100, 3071], [0, 1, 2, 1535], [0, 3, 9, 9]])
    want = gradient_pass([g.contiguous().float() for g in grads], sample_index=index)
    _assert_same(cpu_pass.cpu_gradient_pass(grads, index), want)


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 3000), min_size=1, max_size=6),
    scale=st.sampled_from([1e-30, 1e-12, 1e-3, 1.0, 1e12]),
    specials=st.lists(st.sampled_from([math.nan, math.inf, -math.inf, 0.0]), max_size=4),
    seed=st.integers(0, 2**16),
)
def test_kernel_matches_the_torch_pass_on_random_inputs(sizes, scale, specials, seed):
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
    _assert_same(
        cpu_pass.cpu_gradient_pass(grads, index, den, spike_threshold=10.0),
        gradient_pass(grads, sample_index=index, denominators=den, spike_threshold=10.0),
        rtol=1e-10,
    )


def test_gather_matches_indexing():
    tensors = [torch.randn(5, 7), None, torch.randn(3).to(torch.bfloat16), torch.randn(4, 4).t(), torch.empty(0)]
    index = torch.tensor([[0, 34, 7], [0, 0, 0], [2, 1, 0], [15, 1, 4], [0, 0, 0]])
    got = cpu_pass.gather(tensors, index, torch.float64, fill=-1.0)
    for i, t in enumerate(tensors):
        if t is None or t.numel() == 0:
            assert (got[i] == -1.0).all()
        else:
            torch.testing.assert_close(got[i], t.reshape(-1)[index[i]].double())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_sums_of_squares_match_float64_numpy(dtype):
    gen = torch.Generator().manual_seed(3)
    # sizes across the 65,536-entry work items; a transposed view (copied first); tiny and huge magnitudes
    tensors = [
        torch.randn(200_001, generator=gen),
        None,
        torch.empty(0),
        torch.randn(3, 5, generator=gen).t(),
        torch.randn(7, generator=gen) * 1e-20,
        torch.randn(1000, generator=gen) * 1e30,
    ]
    tensors = [t if t is None else t.to(dtype) for t in tensors]
    got = cpu_pass.sums_of_squares(tensors)
    assert got.dtype == torch.float64 and got.shape == (len(tensors),)
    for value, t in zip(got.tolist(), tensors):
        if t is None or t.numel() == 0:
            assert value == 0.0
            continue
        x = t.double().numpy()
        want = float(np.sum(x * x))
        if math.isinf(want):  # float16 / bfloat16 of 1e30 are inf
            assert math.isinf(value)
        else:
            assert value == pytest.approx(want, rel=1e-12)


def test_sums_of_squares_carry_non_finite_entries_like_a_norm():
    got = cpu_pass.sums_of_squares(
        [torch.tensor([1.0, float("inf")]), torch.tensor([float("nan"), 2.0]), torch.tensor([3.0, 4.0])]
    )
    assert math.isinf(got[0]) and math.isnan(got[1]) and got[2] == 25.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_top_magnitudes_match_topk(dtype):
    gen = torch.Generator().manual_seed(0)
    tensors = [
        torch.randn(50_000, generator=gen) * 1e-4,
        torch.randn(7, generator=gen),
        torch.zeros(100),
        torch.randint(-2, 3, (5000,), generator=gen).float(),  # massive ties
        torch.randn(3000, generator=gen) ** 9,
        torch.randn(20, generator=gen),
        torch.rand(1000, generator=gen),
        # Past the kernel's whole-tensor sort (65,536 entries): the histogram, then the boundary bin's keys.
        torch.randn(200_000, generator=gen) ** 3,
        torch.randint(-3, 4, (100_000,), generator=gen).float(),  # the boundary bin is all ties
        1 + torch.rand(150_000, generator=gen) / 256,  # every key in one top-16-bit bin
        torch.zeros(70_000).index_fill_(0, torch.arange(0, 70_000, 7000), 1.5),  # fewer valid than wanted
    ]
    tensors = [t.to(dtype) for t in tensors]
    tensors[0][:10] = float("nan")
    tensors[0][10:20] = float("inf")
    tensors[5][3] = 0.0
    tensors[7][:5] = float("inf")
    counts = [4001, 7, 10, 1500, 3000, 30, 1, 20_001, 10_001, 15_001, 50]
    for t, m, (top, valid) in zip(tensors, counts, cpu_pass.top_magnitudes(tensors, counts)):
        want, want_valid = top_magnitudes(t.reshape(-1), m)
        assert int(valid) == int(want_valid)
        assert top.shape == (m,)
        torch.testing.assert_close(top[: want.numel()], want.float(), rtol=0, atol=0)
        assert (top[want.numel() :] == 0).all()


def test_top_magnitudes_of_subnormals_and_huge_values():
    t = torch.tensor([1e-45, 1e-40, 3e38, -3e38, 1e-38, 0.0, 2.0], dtype=torch.float32)
    ((top, valid),) = cpu_pass.top_magnitudes([t], [5])
    assert int(valid) == 6
    assert top.tolist() == torch.sort(t.abs()[t != 0], descending=True).values[:5].tolist()


def test_monitor_with_the_cpu_kernel_writes_the_same_records(tmp_path):
    import heavytail as ht
    from tests.conftest import TinyNet, read_records, tiny_batch

    runs = {}
    for kernel in ("torch", "cpu"):
        torch.manual_seed(0)
        model = TinyNet()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        # ratio_warmup=4: the later records compare warm denominator figures, the first one the warm-up nulls
        with ht.Monitor(
            model, opt, every=3, log_dir=tmp_path / kernel, kernel=kernel, min_tail_samples=100, ratio_warmup=4
        ) as mon:
            for step in range(9):
                idx, y = tiny_batch(step)
                loss = torch.nn.functional.mse_loss(model(idx), y)
                loss.backward()
                if step == 4:
                    model.fc1.weight.grad[0, 0] = float("nan")
                mon.observe_loss(loss)
                opt.step()
                opt.zero_grad(set_to_none=True)
        runs[kernel] = read_records(tmp_path / kernel)
    assert len(runs["cpu"]) == 3
    for a, b in zip(runs["torch"], runs["cpu"], strict=True):
        assert a["metrics"].keys() == b["metrics"].keys()
        for key, value in a["metrics"].items():
            if value is None:
                assert b["metrics"][key] is None, key
            elif key == "grad/norm_preclip" or key.startswith("grad/norm_preclip/"):
                # The torch path's pre-clip norms come from torch._foreach_norm, which sums float32 gradients in
                # float32 in an order that depends on the thread count; the C kernel sums in float64. A float32 sum
                # of n squares is within about sqrt(n) * 6e-8 relative of the exact one (a few 1e-6 at the
                # 1e3-1e4 entries of these layers), the per-layer and the global norm alike.
                assert b["metrics"][key] == pytest.approx(value, rel=1e-5), key
            else:
                assert b["metrics"][key] == pytest.approx(value, rel=1e-9, abs=1e-12), key


def test_without_a_compiler_the_monitor_uses_the_torch_pass(tmp_path):
    code = (
        "import torch, heavytail as ht\n"
        "from heavytail.estimators import cpu_pass\n"
        "m = torch.nn.Linear(4, 4); opt = torch.optim.AdamW(m.parameters())\n"
        "mon = ht.Monitor(m, opt, every=1, log_dir=r'%s')\n"
        "assert mon._kernels.gradient_pass is None, mon._kernels.gradient_pass\n"
        "m(torch.randn(2, 4)).sum().backward(); opt.step(); mon.close()\n"
        "assert not cpu_pass.available()\n"
        "try:\n"
        "    ht.Monitor(torch.nn.Linear(2, 2), kernel='cpu', log_dir=r'%s')\n"
        "except ValueError as e:\n"
        "    assert 'CPU kernels are unavailable' in str(e), e\n"
        "else:\n"
        "    raise AssertionError('kernel=cpu without a compiler must fail at attach time')\n"
    ) % (tmp_path / "a", tmp_path / "b")
    env = {**os.environ, "CC": "no-such-compiler-heavytail", "HEAVYTAIL_CACHE_DIR": str(tmp_path / "cache")}
    subprocess.run(
        [sys.executable, "-c", code],
        check=True,
        env=env,
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    )
    assert (tmp_path / "a" / "metrics.jsonl").read_text().strip()


def test_the_compiled_library_is_cached(tmp_path):
    code = "from heavytail.estimators import cpu_pass; assert cpu_pass.available(), cpu_pass.unavailable_reason()"
    env = {**os.environ, "HEAVYTAIL_CACHE_DIR": str(tmp_path)}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=root)
    built = sorted(p.name for p in tmp_path.iterdir())
    assert len(built) == 1 and built[0].endswith(".so")
    stamp = (tmp_path / built[0]).stat().st_mtime_ns
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=root)
    assert (tmp_path / built[0]).stat().st_mtime_ns == stamp
    assert np.all([p.suffix == ".so" for p in tmp_path.iterdir()])


@pytest.mark.parametrize("eps", [1e-8, 1e-30, 0.0])  # the lean bit test, and the full one it needs eps for
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
    index = torch.arange(64)[None]
    want = gradient_pass([g], sample_index=index, denominators=den)
    got = cpu_pass.cpu_gradient_pass([g], index, den)
    _assert_same(got, want)


def test_sums_of_squares_and_gather_equal_the_two_calls():
    gen = torch.Generator().manual_seed(1)
    tensors = [torch.randn(5000, generator=gen), None, torch.randn(3, 7, generator=gen).double(), torch.randn(40)]
    index = torch.stack([torch.randint(0, 21 if i == 2 else 40, (8,), generator=gen) for i in range(4)])
    index[0] = torch.randint(0, 5000, (8,), generator=gen)
    squares, samples = cpu_pass.sums_of_squares_and_gather(tensors, index, torch.float32, 0.0)
    assert torch.equal(squares, cpu_pass.sums_of_squares(tensors))
    assert torch.equal(samples, cpu_pass.gather(tensors, index, torch.float32, 0.0))
    assert samples.dtype == torch.float32 and (samples[1] == 0).all()


def test_the_first_micro_batch_is_read_once_for_its_norms_and_its_samples(tmp_path, monkeypatch):
    """Under gradient accumulation the gns family's squared norms and the noise family's micro-batch samples of
    a step's first pass come from one C call; the later passes only gather."""
    import heavytail as ht
    from tests.conftest import TinyNet, tiny_batch

    calls = []
    for name in ("sums_of_squares", "gather", "sums_of_squares_and_gather"):
        fn = getattr(cpu_pass, name)
        monkeypatch.setattr(cpu_pass, name, lambda *a, _fn=fn, _name=name, **k: calls.append(_name) or _fn(*a, **k))
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    with ht.Monitor(model, opt, every=100, log_dir=tmp_path, track_preclip=False):
        for step in range(4):
            if step == 3:
                calls.clear()
            for m in range(2):
                idx, y = tiny_batch(2 * step + m)
                (torch.nn.functional.mse_loss(model(idx), y) / 2).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    # gather is also the parameter samples' read before and after the update (the updates family)
    assert calls.count("sums_of_squares_and_gather") == 1 and "sums_of_squares" not in calls
    assert calls.count("gather") == 1 + 2
