"""Endurance: 20,000 steps on a tiny model, and the size of one record for a model with 1,000 tensors.

The soak checks what a long run would reveal: memory that creeps (Python objects, tensors kept alive, caches),
hooks that multiply, files that grow faster than one record per checkpoint. It prints its figures (runtime, memory
trend, bytes per record), which docs/reliability.md quotes.
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import sys
import time
import tracemalloc

import numpy as np
import pytest
import torch
from torch import nn

import heavytail as ht
from tests.reliability import one_intra_op_thread, read_lines  # noqa: F401 (autouse fixture)

STEPS, EVERY = 20_000, 100
WARM = 2_000  # steps after which memory must stay flat (allocator pools and plan caches filled)
TRACE = (10_000, 10_500)  # a window traced with tracemalloc (it triples the cost of a step, so not the whole run)
COLUMNS = ("step", "rss", "blocks", "hooks", "file", "traced")


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: peak RSS is the best portable figure (flat peak is flat memory)
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def _hooks(model: nn.Module, opt: torch.optim.Optimizer) -> int:
    params = sum(len(p._post_accumulate_grad_hooks or {}) + len(p._backward_hooks or {}) for p in model.parameters())
    return params + len(opt._optimizer_step_pre_hooks) + len(opt._optimizer_step_post_hooks)


class Probe:
    """A backend that samples the process at every checkpoint (after the JSONL backend wrote the record).

    Samples go into a preallocated array, so the probe itself allocates no Python objects that would read as growth.
    """

    def __init__(self, model, opt, metrics_path, checkpoints: int) -> None:
        self.model, self.opt, self.metrics_path = model, opt, metrics_path
        self.table = np.full((checkpoints, len(COLUMNS)), -1, dtype=np.int64)
        self.n = 0

    def log(self, metrics, step) -> None:
        traced = tracemalloc.get_traced_memory()[0] if tracemalloc.is_tracing() else -1
        self.table[self.n] = (
            step,
            _rss_bytes(),
            sys.getallocatedblocks(),
            _hooks(self.model, self.opt),
            os.path.getsize(self.metrics_path),
            traced,
        )
        self.n += 1

    def column(self, name: str, since: int = 0) -> np.ndarray:
        rows = self.table[: self.n]
        return rows[rows[:, 0] >= since, COLUMNS.index(name)]

    def close(self) -> None:
        pass


@pytest.mark.slow
def test_soak_20000_steps_memory_hooks_and_files_stay_flat(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
    data = torch.randn(512, 4)
    target = data.sum(dim=1, keepdim=True) + 0.1 * torch.randn(512, 1)
    hooks_before = _hooks(model, opt)
    probe = Probe(model, opt, tmp_path / "metrics.jsonl", STEPS // EVERY)
    mon = ht.Monitor(model, opt, every=EVERY, log_dir=tmp_path, backends=[probe])
    hooks_attached = _hooks(model, opt)
    gc.collect()
    start = time.perf_counter()
    snapshot = None
    for step in range(STEPS):
        if step == TRACE[0]:
            tracemalloc.start()
            snapshot = tracemalloc.take_snapshot()
        elif step == TRACE[1]:
            grown = tracemalloc.take_snapshot().compare_to(snapshot, "lineno")
            tracemalloc.stop()
        i = (step * 16) % 512
        loss = nn.functional.mse_loss(model(data[i : i + 16]), target[i : i + 16])
        loss.backward()
        mon.observe_loss(loss)
        opt.step()
        opt.zero_grad(set_to_none=True)
    elapsed = time.perf_counter() - start
    mon.close()

    records = read_lines(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(EVERY, STEPS + 1, EVERY))
    assert probe.column("step").tolist() == [r["step"] for r in records]

    # Hooks: as many at every checkpoint as right after attach; none after close.
    assert hooks_attached > hooks_before == 0
    assert set(probe.column("hooks").tolist()) == {hooks_attached}
    assert _hooks(model, opt) == hooks_before

    # Memory: flat after warm-up. Python heap blocks within noise (torch's own caches still fill, ever more
    # slowly, as they do without a monitor); RSS within a few MB (allocator slack).
    blocks, rss = probe.column("blocks", since=WARM), probe.column("rss", since=WARM)
    traced = probe.column("traced")
    traced = traced[traced >= 0]
    block_growth = int(blocks[len(blocks) // 2 :].max() - blocks[0])
    rss_growth = int(rss[len(rss) // 2 :].max() - rss[0])
    trace_growth = int(traced[-1] - traced[0])
    top = "\n".join(str(s) for s in grown[:5])
    # The bound catches a leak of one block every four steps (4,500 blocks over the 18,000 steps after WARM); without a leak the
    # growth measured 925-1,138 blocks on this machine (2026-12-06, before and after that day's changes alike), so
    # a bound of 1,000 was inside the noise. The traced bytes below are the finer check.
    assert block_growth < 2_500, f"Python heap grew by {block_growth} blocks"
    assert rss_growth < 8 << 20, f"RSS grew by {rss_growth / 2**20:.1f} MiB"
    assert trace_growth < 32 << 10, f"traced Python memory grew by {trace_growth} B over {TRACE}:\n{top}"

    # Files: one line per checkpoint, the same size each (it holds the same keys; digits vary).
    files = probe.column("file").tolist()
    sizes = [b - a for a, b in zip([0] + files, files)]
    median = statistics.median(sizes)
    assert all(abs(s - median) <= 0.1 * median for s in sizes), (min(sizes), median, max(sizes))
    assert os.path.getsize(tmp_path / "metrics.jsonl") == sum(sizes)
    alerts = read_lines(tmp_path / "alerts.jsonl")

    print(
        f"\nsoak: {STEPS} steps in {elapsed:.1f} s ({1e3 * elapsed / STEPS:.2f} ms/step, monitor included); "
        f"{len(alerts)} alerts"
    )
    print(
        f"soak: after warm-up ({WARM} steps) Python heap {blocks[0]} -> {blocks[-1]} blocks "
        f"(max growth {block_growth}), RSS {rss[0] / 2**20:.1f} -> {rss[-1] / 2**20:.1f} MiB "
        f"(max growth {rss_growth / 2**20:.2f} MiB), tracemalloc over steps {TRACE}: {trace_growth:+d} B"
    )
    print(f"soak: metrics.jsonl {len(records)} records, {min(sizes)}..{max(sizes)} bytes each (median {median:.0f})")


class Many(nn.Module):
    """500 blocks of one Linear(4, 4): 1,000 parameter tensors named ``blocks.<i>.weight`` / ``blocks.<i>.bias``."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(4, 4) for _ in range(500)])

    def forward(self, x):
        return sum(block(x).sum() for block in self.blocks)


def _one_checkpoint_record(run, **kwargs) -> tuple[bytes, dict, ht.Monitor]:
    torch.manual_seed(0)
    model = Many()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with ht.Monitor(model, opt, every=1, log_dir=run, sample_size=16, noise_window=4, **kwargs) as mon:
        model(torch.randn(2, 4)).backward()
        opt.step()
        opt.zero_grad()
    line = (run / "metrics.jsonl").read_bytes()
    (record,) = [json.loads(x) for x in line.splitlines()]
    return line, record, mon


def test_record_size_for_a_model_with_1000_tensors(tmp_path):
    """One checkpoint of a model with 1,000 small parameter tensors: the bytes of one metrics.jsonl line, per
    tensor and grouped (``group_by``)."""
    line, record, mon = _one_checkpoint_record(tmp_path / "tensors")
    assert len(mon.names) == 1000
    keys, size = len(record["metrics"]), len(line)
    longest = max(len(n) for n in mon.names)
    per_tensor = {k.rsplit("/", 1)[0] for k in record["metrics"] if k.endswith("/blocks.0.weight")}
    print(
        f"\nrecord for 1,000 tensors (AdamW, names up to {longest} chars): {size} bytes, {keys} keys "
        f"({len(per_tensor)} per tensor), {size / keys:.1f} bytes per key"
    )
    # The bound in docs/reliability.md: K keys per tensor (K <= 50 with the default config: 34 for AdamW, 43 under
    # gradient accumulation, 5 more for DDP rank noise; Muon 2 more), each at most len(name) + 58 bytes (a family
    # prefix of up to 29 characters, quotes, colon, comma and a float repr of up to 24 characters), plus the global
    # keys.
    assert len(per_tensor) <= 50 and keys <= 50 * 1000 + 64
    assert size <= keys * (longest + 58) + 4096

    for label, group_by in (
        ("per block (500 groups)", r"blocks\.\d+"),
        ("per 50 blocks (10 groups)", lambda n: f"blocks/{int(n.split('.')[1]) // 50}"),
    ):
        run = tmp_path / f"grouped{len(label)}"
        line, record, _ = _one_checkpoint_record(run, group_by=group_by)
        print(f"record grouped {label}: {len(line)} bytes, {len(record['metrics'])} keys")
        assert len(line) < size


def test_mixture_of_experts_routing_keeps_the_plan_cache_bounded(tmp_path):
    """Top-2 routing over 16 experts: 120 different sets of present gradients. The gradient pass plans one layout
    per set and caches it; the cache must stay bounded (each plan holds device tensors, and top-k of many experts
    gives sets without end), and a set planned again must give the same statistics."""
    from heavytail.estimators.gradient_pass import MAX_PLANS

    class MoE(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.experts = nn.ModuleList([nn.Linear(8, 8) for _ in range(16)])
            self.head = nn.Linear(8, 1)

        def forward(self, x, used):
            return self.head(sum(self.experts[i](x) for i in used))

    torch.manual_seed(0)
    model = MoE()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    names = [n for n, _ in model.named_parameters()]
    seen = []
    mon = ht.Monitor(model, opt, every=300, log_dir=tmp_path)
    opt.register_step_pre_hook(
        lambda o, a, k: seen.append(
            {n: p.grad.double().clone() for n, p in zip(names, model.parameters()) if p.grad is not None}
        )
    )
    gen = torch.Generator().manual_seed(0)
    for _ in range(300):
        used = torch.randperm(16, generator=gen)[:2].tolist()
        model(torch.randn(4, 8, generator=gen), used).sum().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        assert len(mon._pass._plans) <= MAX_PLANS  # private, but it is the memory this test is about
    mon.close()
    (record,) = read_lines(tmp_path / "metrics.jsonl")
    for name in names:
        squares = [float((g[name] ** 2).sum()) for g in seen if name in g]
        expected = (sum(squares) / len(squares)) ** 0.5
        assert record["metrics"][f"grad/norm/{name}"] == pytest.approx(expected, rel=1e-9)
