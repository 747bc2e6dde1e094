"""Device memory the monitor holds at its default configuration, against the model's parameter bytes.

Two figures per model:

- ``extra_bytes``: memory the monitor *holds* between steps: every tensor reachable from the monitor (its
  statistic families' streaming state ``mon.families``, the coordinate sample index, the gradient pass's cached plan and pads, queued
  flag copies...) on the parameters' device, each storage counted once, the model's parameters, gradients and
  optimizer state excluded. Broken down by where it is held, so the dominant state is named.
- ``transient_bytes``: the peak of what the monitor's step hooks allocate on top of that, while they run (the
  gradient pass's chunk scratch, the estimators' temporaries). On CUDA from the caching allocator's peak
  statistics, on the CPU from the profiler's allocation events (``profile_memory=True``). On CUDA the step's peak
  (``torch.cuda.max_memory_allocated``) with and without the monitor is reported as well: that is what a user
  sees, and it only moves if the hooks' transients rise above the backward pass's own peak.

``extra_pct`` = extra_bytes / parameter bytes. The GPT-2 124M figures need no training: the model and monitor are
built, one step's gradients set, and the hooks run once (on the CPU this takes a few seconds).

    python benchmarks/memory.py                         # tiny and gpt2-small on the CPU
    python benchmarks/memory.py --device cuda           # also the CUDA peak-allocation figures
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
from collections import defaultdict
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _models import MODELS, train_step, workload  # noqa: E402

import heavytail  # noqa: E402

# Monitor attributes that hold the user's objects, not the monitor's own memory.
_NOT_MONITOR = {"model", "optimizer", "params", "scaler", "config", "_backends", "_alert_callbacks"}


def _storage(t: torch.Tensor) -> tuple[int, int]:
    s = t.untyped_storage()
    return s.data_ptr(), s.nbytes()


def held_tensors(mon: heavytail.Monitor, device: torch.device) -> dict[str, int]:
    """Bytes held by the monitor on ``device``, by the attribute path that first reaches each storage."""
    exclude: set[int] = set()
    for p in mon.params:
        exclude.add(_storage(p)[0])
        if p.grad is not None:
            exclude.add(_storage(p.grad)[0])
    if mon.optimizer is not None:
        for state in mon.optimizer.state.values():
            for v in state.values():
                if isinstance(v, torch.Tensor):
                    exclude.add(_storage(v)[0])
    seen_objects: set[int] = set()
    seen_storages: set[int] = set()
    sizes: dict[str, int] = defaultdict(int)

    def walk(obj: Any, path: str, depth: int) -> None:
        if depth > 8 or id(obj) in seen_objects:
            return
        if isinstance(obj, torch.Tensor):
            if obj.device.type != device.type or obj.numel() == 0:
                return
            ptr, nbytes = _storage(obj)
            if ptr in exclude or ptr in seen_storages:
                return
            seen_storages.add(ptr)
            sizes[path] += nbytes
            return
        seen_objects.add(id(obj))
        if isinstance(obj, dict):
            for k, v in obj.items():
                walk(v, f"{path}.{k}" if isinstance(k, str) and depth < 2 else path, depth + 1)
        elif isinstance(obj, (list, tuple, set, frozenset)):
            fields = getattr(obj, "_fields", None)  # NamedTuple state
            for i, v in enumerate(obj):
                walk(v, f"{path}.{fields[i]}" if fields and depth < 2 else path, depth + 1)
        elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            for f in dataclasses.fields(obj):
                walk(getattr(obj, f.name), path, depth + 1)
        elif type(obj).__module__.startswith("heavytail") and hasattr(obj, "__dict__"):
            for k, v in vars(obj).items():
                walk(v, f"{path}.{k}" if depth < 1 else path, depth + 1)
        elif hasattr(obj, "__dict__") and type(obj).__module__.startswith("collections"):
            for v in vars(obj).values():
                walk(v, path, depth + 1)

    # Each family's own tensors under its name first: the sample group holds its members, which would
    # otherwise be counted under ``families.samples``.
    for name, family in sorted(mon.families.items(), key=lambda item: item[0] == "samples"):
        walk(family, f"families.{name}", 1)
    for name, value in vars(mon).items():
        if name not in _NOT_MONITOR:
            walk(value, name, 0)
    return dict(sizes)


def _cpu_peak(fn) -> int:
    """Peak bytes allocated on the CPU while ``fn()`` runs, from the profiler's allocation events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    totals = [
        e["args"]["Total Allocated"]
        for e in events
        if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0
    ]
    return max([0] + totals)


def _hooks(mon: heavytail.Monitor) -> None:
    mon._on_backward_end()
    mon._before_step()
    mon._after_step()


def measure(model_name: str, device: torch.device, every: int) -> dict[str, Any]:
    wl = workload(model_name, device)
    model = wl.model(seed=0)
    opt = wl.optimizer(model)
    batch = wl.batches(count=1)[0]
    params = [p for p in model.parameters() if p.requires_grad]
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    cuda = device.type == "cuda"
    out: dict[str, Any] = {
        "model": model_name,
        "params": sum(p.numel() for p in params),
        "tensors": len(params),
        "param_bytes": param_bytes,
    }
    real_steps = model_name != "gpt2-small" or cuda
    with tempfile.TemporaryDirectory() as log_dir:
        if real_steps:
            for _ in range(2):
                train_step(wl, model, opt, batch)
            if cuda:
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
                train_step(wl, model, opt, batch)
                torch.cuda.synchronize(device)
                out["step_peak_baseline"] = torch.cuda.max_memory_allocated(device)
        else:  # GPT-2 on the CPU: gradients and an optimizer state without running the model
            gen = torch.Generator().manual_seed(0)
            for p in params:
                p.grad = (torch.randn(p.shape, generator=gen) * 1e-3).to(device)
            opt.step()
        mon = heavytail.Monitor(model, opt, every=every, log_dir=log_dir)
        if real_steps:
            for _ in range(2):
                train_step(wl, model, opt, batch, on_loss=mon.observe_loss)
            if cuda:
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
                train_step(wl, model, opt, batch, on_loss=mon.observe_loss)
                torch.cuda.synchronize(device)
                out["step_peak_monitored"] = torch.cuda.max_memory_allocated(device)
            # Gradients in place for the isolated hook measurement below.
            idx, targets = batch
            with wl.autocast:
                _, loss = model(idx, targets)
            loss.backward()
        else:
            _hooks(mon)  # builds the plan
        held = held_tensors(mon, device)
        if cuda:
            torch.cuda.synchronize(device)
            before = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            _hooks(mon)
            torch.cuda.synchronize(device)
            out["transient_bytes"] = torch.cuda.max_memory_allocated(device) - before
        else:
            out["transient_bytes"] = _cpu_peak(lambda: _hooks(mon))
        mon.close()
    out["held"] = held
    out["extra_bytes"] = sum(held.values())
    out["extra_pct"] = 100.0 * out["extra_bytes"] / param_bytes
    return out


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--models", default="tiny,gpt2-small", help="comma-separated: " + ", ".join(MODELS))
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--top", type=int, default=6, help="largest holders listed per model")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    device = torch.device(args.device)
    results = []
    for name in args.models.split(","):
        if name not in MODELS:
            parser.error(f"unknown model {name!r}")
        r = measure(name, device, args.every)
        results.append(r)
        print(
            f"{name}: {r['params'] / 1e6:.2f} M parameters in {r['tensors']} tensors, "
            f"{r['param_bytes'] / 2**20:.1f} MiB of parameters ({device})"
        )
        for path, nbytes in sorted(r["held"].items(), key=lambda kv: -kv[1])[: args.top]:
            print(f"  {path:<32} {nbytes / 2**20:>9.3f} MiB  {100 * nbytes / r['param_bytes']:>7.3f}% of params")
        print(
            f"  {'transient peak of the hooks':<32} {r['transient_bytes'] / 2**20:>9.3f} MiB  "
            f"{100 * r['transient_bytes'] / r['param_bytes']:>7.3f}% of params"
        )
        if "step_peak_baseline" in r:
            diff = r["step_peak_monitored"] - r["step_peak_baseline"]
            print(
                f"  step peak: {r['step_peak_baseline'] / 2**20:.1f} MiB unmonitored, "
                f"{r['step_peak_monitored'] / 2**20:.1f} MiB monitored ({diff / 2**20:+.1f} MiB)"
            )
        print(
            f"  extra_bytes={r['extra_bytes']} param_bytes={r['param_bytes']} extra_pct={r['extra_pct']:.3f} "
            f"transient_bytes={r['transient_bytes']}"
        )
    last = results[-1]
    print(f"extra_bytes={last['extra_bytes']} param_bytes={last['param_bytes']} extra_pct={last['extra_pct']:.3f}")
    return results


if __name__ == "__main__":
    main()
