"""What each Triton kernel compiles to, ahead of time and without a GPU: registers, spills, shared memory, loads.

Runs the real launchers (``triton_pass.triton_gradient_pass``, ``triton_samples.sample_step`` and ``update_step``)
on small CPU tensors with every kernel launch intercepted, so the specializations compiled are exactly the ones
the launchers ask for (argument types, constexprs, ``num_warps``, ``enable_fp_fusion``, pointer alignment), then
compiles each with Triton's own pipeline for ``GPUTarget("cuda", arch, 32)`` and reports, per kernel and
architecture:

- ``regs``: registers per thread and ``spill``: bytes of spill stores/loads, from the ``ptxas -v`` log of the
  very ``ptxas`` call Triton makes (the ``ptxas`` that Triton ships);
- ``smem``: the shared memory Triton allocates (bytes; reductions and layout conversions);
- ``ld.v4 / ld.v2 / ld.1``: ``ld.global`` instructions in the PTX, vector and scalar, and ``128b`` those of them
  that move 128 bits (``ld.global.v4.b32``, ``ld.global.v2.b64``); each is one instruction of the kernel's code,
  a loop body counted once;
- ``fma``: fused multiply-adds in the PTX (0 where the kernel turns contraction off).

Nothing here runs on a GPU, so nothing here is a speed; ``benchmarks/device_check.sh`` holds the GPU checks.

    python benchmarks/kernel_report.py                 # every specialization, sm_80 and sm_90
    python benchmarks/kernel_report.py --quick         # one specialization per kernel, sm_90 (the test's run)
    python benchmarks/kernel_report.py --rev HEAD~3    # the kernels of another commit (same launcher calls)

Exit status 2 when this machine cannot compile Triton kernels ahead of time (no Triton, no ``ptxas``). Uses
Triton 3.9's internals (``create_function_from_signature``, ``JITFunction._pack_args``) to reproduce the
launcher's specialization; another Triton version may need this script adjusted.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import os
import re
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

# The kernels must be compiled, not interpreted, and every compile must run ptxas (a fresh cache) for its log.
os.environ.pop("TRITON_INTERPRET", None)
os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="heavytail-kernel-report-")

import torch  # noqa: E402

# Triton 3.9 warns when a launch leaves enable_fp_fusion unset (its default changes in 3.10); the report reads the
# choice from the PTX's FMA count instead.
warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODULES = ("triton_pass", "triton_samples")


class CannotCompile(Exception):
    """This machine has no way to compile Triton kernels ahead of time."""


def load_modules(rev: str | None) -> dict:
    """heavytail's Triton modules: this checkout's, or those of commit ``rev`` (imported from a temporary copy)."""
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        raise CannotCompile(f"Triton is not installed ({exc})") from exc
    modules = {}
    for name in MODULES:
        if rev is None:
            modules[name] = importlib.import_module(f"heavytail.estimators.{name}")
            continue
        source = subprocess.run(
            ["git", "show", f"{rev}:heavytail/estimators/{name}.py"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        path = Path(tempfile.mkdtemp(prefix="heavytail-kernel-report-src-")) / f"{name}_at_rev.py"
        path.write_text(source)  # a real file: Triton reads a kernel's source back through inspect
        spec = importlib.util.spec_from_file_location(f"_kernel_report_{name}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        modules[name] = module
    return modules


def capture_launches(modules: dict, quick: bool) -> list[tuple]:
    """Run the launchers on CPU tensors with launches intercepted; returns (kernel, args, kwargs) per launch."""
    from triton.runtime.jit import JITFunction

    from heavytail.estimators.gradient_pass import Denominators

    launches: list[tuple] = []

    def recorder(fn):
        def run(*args, grid, warmup, **kwargs):
            launches.append((fn, args, kwargs))

        return run

    for module in modules.values():
        for value in vars(module).values():
            if isinstance(value, JITFunction):
                value.run = recorder(value)

    gen = torch.Generator().manual_seed(0)
    n = 5000  # a body of whole tiles and a masked tail
    dtypes = [torch.float32] if quick else [torch.float32, torch.bfloat16, torch.float16, torch.float64]
    with_v = [torch.randn(n, generator=gen).to(d) for d in dtypes]
    without_v = [] if quick else [torch.randn(n, generator=gen).to(d) for d in dtypes]
    # one float32 gradient that starts 4 bytes into its storage: the unaligned specialization
    unaligned = [] if quick else [torch.randn(n + 1, generator=gen)[1:]]
    grads = with_v + without_v + unaligned
    vs = (
        [torch.rand(n, generator=gen) for _ in with_v]
        + [None] * len(without_v)
        + [torch.rand(n + 1)[1:]] * len(unaligned)
    )
    rows = len(grads)
    den = Denominators(
        vs, torch.full((rows,), 0.5, dtype=torch.float64), torch.full((rows,), 1e-8, dtype=torch.float64)
    )
    index = torch.randint(0, n, (rows, 64), generator=gen)
    modules["triton_pass"].triton_gradient_pass(grads, index, den, spike_threshold=5000.0)

    samples = modules["triton_samples"]
    L, B, W = 4, 2, 16
    f32, f64 = torch.float32, torch.float64
    # the default sample size (256) with and without a denominator, and 1,024 samples
    for S, has_den in [(256, True)] if quick else [(256, True), (256, False), (1024, True)]:
        state = dict(
            g=torch.randn(L, S, dtype=f64),
            valid=torch.ones(L, dtype=torch.bool),
            ratio=torch.rand(L, S, dtype=f64) if has_den else None,
            den=torch.rand(L, S, dtype=f64) if has_den else None,
            bias_correction=torch.ones(L, dtype=f64) if has_den else None,
            ratio_ok=torch.ones(L, dtype=torch.bool),
            memory=[tuple(torch.zeros(L, S, dtype=f32) for _ in range(3)) for _ in range(2)],
            memory_sum=torch.zeros(2, L, 3, dtype=f64),
            betas=torch.tensor([0.999, 0.95], dtype=f64),
            shadow_bias=torch.ones(B, L, dtype=f64),
            shadow_v=torch.zeros(B, L, S, dtype=f32),
            shadow_t=torch.zeros(B, L, dtype=f64),
            shadow_sum=torch.zeros(B, L, dtype=f64),
            shadow_max=torch.zeros(B, L, 2, dtype=f64),
            noise_mean=torch.zeros(L, S, dtype=f32),
            noise_seen=torch.zeros(L, dtype=f64),
            ring=torch.zeros(L, S, W, dtype=f32),
            ring_valid=torch.zeros(L, W, dtype=torch.bool),
            slot=0,
            threshold=5000.0,
            inflation=1.5,
            noise_beta=0.9,
            q=0.99,
        )
        samples.sample_step(**state)
        if has_den:
            events = [torch.zeros(L, S, dtype=f32), torch.zeros(L, S, dtype=f32)]
            p = torch.randn(L, S, dtype=f64)
            valid = torch.ones(L, dtype=torch.bool)
            samples.update_step(p, p + 1e-3, p, valid, events, torch.zeros(L, 16, dtype=f64), range(6))
    return launches


def _describe(value) -> str:
    text = getattr(value, "name", None) or str(value)
    return {"float32": "fp32", "float64": "fp64", "float16": "fp16", "bfloat16": "bf16"}.get(text, text)


def specialize(fn, args, kwargs, arch: int) -> tuple:
    """What the launcher would compile for one captured launch on ``arch``: (label, source, options, target)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = {"debug": False, **kwargs}
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    consts = [
        f"{fn.arg_names[path[0]]}={_describe(value)}"
        for path, value in sorted(constexprs.items())
        if fn.params[path[0]].is_constexpr
    ]
    label = " ".join([fn.__name__, *consts, f"warps={options.num_warps}"])
    return label, ASTSource(fn, signature, constexprs, attrs), options, target


def build(source, options, target) -> tuple:
    """Triton's compile of ``source``, and the log of its ptxas call."""
    import triton
    from triton import knobs

    log = io.StringIO()
    knobs.nvidia.dump_ptxas_log = True
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(source, target=target, options=options.__dict__)
    except (FileNotFoundError, RuntimeError) as exc:
        if "ptxas" in str(exc) or isinstance(exc, FileNotFoundError):
            raise CannotCompile(f"{type(exc).__name__}: {exc}") from exc
        raise
    finally:
        knobs.nvidia.dump_ptxas_log = False
    return compiled, log.getvalue()


def figures(compiled, log: str) -> dict:
    """Registers and spills (ptxas log), shared memory (Triton's metadata), global loads by width and FMAs (PTX)."""
    regs = re.search(r"Used (\d+) registers", log)
    stores = re.search(r"(\d+) bytes spill stores", log)
    loads = re.search(r"(\d+) bytes spill loads", log)
    vectors = {4: 0, 2: 0, 1: 0}
    wide = 0
    for vec, bits in re.findall(r"\bld\.global(?:\.[a-z_]+)*?(?:\.v(\d))?\.[bfsu](\d+)\b", compiled.asm["ptx"]):
        vectors[int(vec or 1)] += 1
        wide += int(vec or 1) * int(bits) >= 128
    return {
        "regs": int(regs.group(1)) if regs else -1,
        "spill": f"{stores.group(1) if stores else '?'}/{loads.group(1) if loads else '?'}",
        "smem": compiled.metadata.shared,
        "v4": vectors[4],
        "v2": vectors[2],
        "v1": vectors[1],
        "128b": wide,
        "fma": len(re.findall(r"\bfma\.rn\.", compiled.asm["ptx"])),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="80,90", help="compute capabilities, comma-separated (default 80,90)")
    parser.add_argument("--quick", action="store_true", help="one specialization per kernel, sm_90 only")
    parser.add_argument("--rev", default=None, help="report the kernels of this git revision instead")
    args = parser.parse_args(argv)
    archs = [90] if args.quick else [int(a) for a in args.arch.split(",")]
    try:
        modules = load_modules(args.rev)
        launches = capture_launches(modules, args.quick)
        seen: set[tuple[str, int]] = set()
        header = (
            f"{'kernel':<72} {'arch':>5} {'regs':>5} {'spill':>7} {'smem':>6} "
            f"{'ld.v4':>6} {'ld.v2':>6} {'ld.1':>5} {'128b':>5} {'fma':>4}"
        )
        print(f"heavytail Triton kernels, compiled ahead of time on a CPU-only machine (Triton {_triton_version()})")
        print(f"source: {'this checkout' if args.rev is None else args.rev}")
        print(header)
        worst = {"regs": 0, "spilled": 0}
        for arch in archs:
            for fn, call_args, kwargs in launches:
                label, source, options, target = specialize(fn, call_args, kwargs, arch)
                if (label, arch) in seen or (args.quick and any(s.split()[0] == fn.__name__ for s, _ in seen)):
                    continue
                seen.add((label, arch))
                compiled, log = build(source, options, target)
                f = figures(compiled, log)
                worst["regs"] = max(worst["regs"], f["regs"])
                worst["spilled"] += f["spill"] not in ("0/0",)
                print(
                    f"{label:<72} {'sm_' + str(arch):>5} {f['regs']:>5} {f['spill']:>7} {f['smem']:>6} "
                    f"{f['v4']:>6} {f['v2']:>6} {f['v1']:>5} {f['128b']:>5} {f['fma']:>4}"
                )
    except CannotCompile as exc:
        print(f"kernel_report: cannot compile Triton kernels ahead of time here: {exc}", file=sys.stderr)
        return 2
    print(f"max_regs={worst['regs']} kernels_with_spills={worst['spilled']} kernels={len(seen)}")
    return 0


def _triton_version() -> str:
    import triton

    return triton.__version__


if __name__ == "__main__":
    sys.exit(main())
