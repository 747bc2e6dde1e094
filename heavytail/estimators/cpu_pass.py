"""The gradient pass, sample gathers and checkpoint top-k as one C call over every tensor: the CPU's fused kernel.

Same contract and numbers as :mod:`heavytail.estimators.gradient_pass` (the ``torch`` reference it is tested
against): per tensor the finite count, power sums S1..S4, max |g|, non-finite count, and with a denominator
max r and #{r^2 > threshold} for r = |g| / (sqrt(v / bc) + eps) (r = 0 where v = 0), and the values of g, r and
v at each tensor's sampled coordinates. The power sums are float64 as in the reference; the ratio's max and
spike count are exactly the reference's float64 figures, reached without the square root and division per entry
that are most of the reference's cost (a bound clears almost every entry; ``cpu_kernels.c``, pass_item).

Why C: eager PyTorch makes one pass over memory per operation, about 23 of them per entry for this pass; the
kernel (``cpu_kernels.c``) reads each gradient entry, and each entry of AdamW's ``exp_avg_sq``, once, straight
from the tensors through a table of data pointers, and keeps every intermediate in registers, so its cost is the
memory read plus a few float64 operations per entry whatever the number of tensors. It is compiled on first use
with the system's C compiler (``$CC``, else ``cc``; ``-O3 -march=native``, OpenMP when available) into a cache
directory (``$HEAVYTAIL_CACHE_DIR``, else ``~/.cache/heavytail``), keyed by the source, the flags and the CPU, and
loaded with ctypes, which releases the GIL during the call. Without a compiler :func:`available` is false and
the monitor uses the torch path. Threads: ``torch.get_num_threads()``, like the training step's own kernels.

The same library holds the sample estimators (``cpu_samples.c``): :func:`sample_step` and :func:`update_step`
advance the monitor's per-sample states in place, one call each per step, equal to its torch code.
"""

from __future__ import annotations

import array
import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import NamedTuple, Sequence

import torch

from heavytail.estimators.gradient_pass import STAT_FIELDS, Denominators, PassResult

logger = logging.getLogger("heavytail")

SOURCE = Path(__file__).with_name("cpu_kernels.c")
SAMPLES_SOURCE = Path(__file__).with_name("cpu_samples.c")  # the sample estimators, in the same library
ABI_VERSION = 3

_DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}
# -fno-trapping-math: floating-point exceptions are not observed, which lets the compiler vectorise the selects of
# the sample estimators' loops (cpu_samples.c, which also turns off FMA contraction for itself); no value changes.
_FLAG_SETS = (
    ["-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-fopenmp"],
    ["-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-fopenmp-simd"],
    ["-O3", "-fno-math-errno", "-fno-trapping-math"],
)

_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_failure: str | None = None


class _Samples(ctypes.Structure):
    """``HtSamples`` in cpu_samples.c, field for field."""

    _P = ctypes.c_void_p
    _fields_ = [
        ("L", ctypes.c_int64),
        ("S", ctypes.c_int64),
        ("B", ctypes.c_int64),
        ("W", ctypes.c_int64),
        ("g", _P),
        ("valid", _P),
        ("has_den", ctypes.c_int),
        ("ratio", _P),
        ("den", _P),
        ("bc", _P),
        ("ratio_ok", _P),
        ("threshold", ctypes.c_double),
        ("inflation2", ctypes.c_float),
        ("level", _P * 2),
        ("age", _P * 2),
        ("active", _P * 2),
        ("memory_sum", _P),
        ("events", _P),
        ("betas", _P),
        ("bias", _P),
        ("shadow_v", _P),
        ("shadow_t", _P),
        ("shadow_sum", _P),
        ("shadow_max", _P),
        ("noise_mean", _P),
        ("noise_seen", _P),
        ("ring", _P),
        ("ring_valid", _P),
        ("slot", ctypes.c_int64),
        ("noise_beta", ctypes.c_float),
        ("q", ctypes.c_double),
        ("quantile", _P),
        ("shadow_warmup", ctypes.c_double),
    ]


def _cache_dir() -> Path:
    explicit = os.environ.get("HEAVYTAIL_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "heavytail"


def _cpu_signature() -> str:
    # -march=native ties the binary to this CPU's instruction set, so the CPU's flags are part of the key.
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _compile(compiler: str, out: Path) -> str:
    """The kernels' library in ``out``: a cached build for the first flag set that has one, else the first flag set
    that compiles. Raises ``OSError`` if ``out`` is not writable, ``RuntimeError`` with the compiler's last error."""
    sources = [SOURCE, SAMPLES_SOURCE]
    source = "\0".join(path.read_text() for path in sources)
    targets = []
    for flags in _FLAG_SETS:
        key = "\0".join([source, compiler, " ".join(flags), _cpu_signature(), platform.machine()])
        targets.append(out / f"cpu_kernels-{hashlib.sha256(key.encode()).hexdigest()[:20]}.so")
    for target in targets:  # a flag set that failed once is not retried in every process
        if target.exists():
            return str(target)
    out.mkdir(parents=True, exist_ok=True)
    error = "no flag set worked"
    for flags, target in zip(_FLAG_SETS, targets):
        fd, tmp = tempfile.mkstemp(dir=out, suffix=".so.tmp")
        os.close(fd)
        try:
            proc = subprocess.run(
                [compiler, *flags, "-fPIC", "-shared", "-o", tmp, *map(str, sources), "-lm"],
                capture_output=True,
                text=True,
                timeout=120,
            )
            if proc.returncode == 0:
                os.replace(tmp, target)  # atomic: concurrent processes never load a half-written file
                return str(target)
            lines = (proc.stderr or proc.stdout).strip().splitlines()
            error = lines[-1] if lines else f"exit status {proc.returncode}"
        except subprocess.SubprocessError as exc:
            error = f"{type(exc).__name__}: {exc}"
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    raise RuntimeError(error)


def _load() -> ctypes.CDLL | None:
    global _library, _failure
    with _lock:
        if _library is not None or _failure is not None:
            return _library
        if os.environ.get("HEAVYTAIL_NO_CPU_KERNEL") == "1":
            _failure = "disabled by HEAVYTAIL_NO_CPU_KERNEL=1"
            return None
        compiler = os.environ.get("CC") or "cc"
        if shutil.which(compiler) is None:
            _failure = f"no C compiler ({compiler!r} not found)"
            return None
        try:
            try:
                path = _compile(compiler, _cache_dir())
            except OSError:  # an unwritable cache: compile into a private temporary directory
                path = _compile(compiler, Path(tempfile.gettempdir()) / f"heavytail-{os.getuid()}")
            lib = ctypes.CDLL(path)
            if lib.ht_abi_version() != ABI_VERSION:
                raise RuntimeError(f"{path}: ABI version {lib.ht_abi_version()} != {ABI_VERSION}")
        except Exception as exc:  # any failure leaves the torch path in charge
            _failure = f"{type(exc).__name__}: {exc}"
            logger.info("heavytail: the CPU kernels are unavailable (%s); using the torch pass", _failure)
            return None
        p, i64, i32, f64 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_double
        lib.ht_pass.argtypes = [i64, p, p, p, p, p, p, p, i32, f64, i64, p, p, p, p, p, i32]
        lib.ht_gather.argtypes = [i64, p, p, p, i64, p, f64, p]
        lib.ht_top_abs.argtypes = [i64, p, p, p, p, p, p, p, i32]
        lib.ht_sumsq.argtypes = [i64, p, p, p, p, i32]
        lib.ht_samples.argtypes = [ctypes.POINTER(_Samples)]
        lib.ht_updates.argtypes = [i64, i64, p, p, p, p, p, p, i64, p]
        for fn in (lib.ht_pass, lib.ht_gather, lib.ht_top_abs, lib.ht_sumsq, lib.ht_samples, lib.ht_updates):
            fn.restype = i32
        _library = lib
        return lib


def available() -> bool:
    """Whether the CPU kernels are compiled and loaded here (compiles them on the first call)."""
    return _load() is not None


def unavailable_reason() -> str | None:
    """Why :func:`available` is false (None when it is true or has not been asked)."""
    return _failure


class _Table(NamedTuple):
    """What a kernel reads of a list of tensors: the tensors themselves (kept alive for the call; None for an
    absent or empty one), their data pointers (0 for an absent tensor), dtype codes and entry counts, as ctypes
    arrays (plain host memory, freed with the table; no tensor allocations per step)."""

    tensors: list[torch.Tensor | None]
    pointers: ctypes.Array
    codes: ctypes.Array
    numels: ctypes.Array


def _array(ctype: type, kind: str, values: list[int]) -> ctypes.Array:
    # array.array packs a list of ints several times faster than ctypes' (ctype * n)(*values); the ctypes view
    # keeps the array alive.
    return (ctype * len(values)).from_buffer(array.array(kind, values))


_POINTER_KIND = {8: "Q", 4: "I"}[ctypes.sizeof(ctypes.c_void_p)]


def _table(tensors: Sequence[torch.Tensor | None]) -> _Table:
    """The kernel's view of ``tensors``. The common case (every tensor present, non-empty, dense, on the CPU, of a
    kernel dtype) is read attribute by attribute over the whole list, about 0.6 us a tensor; anything else takes
    the general path."""
    try:
        codes = [_DTYPE_CODES[t.dtype] for t in tensors]  # None: AttributeError; another dtype: KeyError
    except (AttributeError, KeyError):
        return _general_table(tensors)
    Tensor = torch.Tensor
    numels = list(map(Tensor.numel, tensors))
    if 0 in numels or not all(map(Tensor.is_contiguous, tensors)) or not all([t.is_cpu for t in tensors]):
        return _general_table(tensors)
    pointers = list(map(Tensor.data_ptr, tensors))
    return _Table(
        list(tensors),
        _array(ctypes.c_void_p, _POINTER_KIND, pointers),
        _array(ctypes.c_int, "i", codes),
        _array(ctypes.c_int64, "q", numels),
    )


def _general_table(tensors: Sequence[torch.Tensor | None]) -> _Table:
    # The kernels read dense float32/float64/bfloat16/float16 memory in logical order; anything else is copied
    # into that form first (rare: .grad follows its parameter's layout, and parameters are dense floats).
    kept: list[torch.Tensor | None] = []
    pointers: list[int] = []
    codes: list[int] = []
    numels: list[int] = []
    for t in tensors:
        if t is None or t.numel() == 0:
            # An empty tensor (an empty shard) is present but has no entries: a non-null pointer never read.
            kept.append(None)
            pointers.append(0 if t is None else 1)
            codes.append(0)
            numels.append(0)
            continue
        n = t.numel()
        code = _DTYPE_CODES.get(t.dtype)
        if code is None or not t.is_contiguous() or not t.is_cpu:
            if not t.is_cpu or t.is_complex():
                raise ValueError("the CPU kernels take real CPU tensors")
            t = t.detach().to(torch.float32 if code is None else t.dtype).contiguous()
            code = _DTYPE_CODES[t.dtype]
        kept.append(t)
        pointers.append(t.data_ptr())
        codes.append(code)
        numels.append(n)
    return _Table(
        kept,
        _array(ctypes.c_void_p, _POINTER_KIND, pointers),
        _array(ctypes.c_int, "i", codes),
        _array(ctypes.c_int64, "q", numels),
    )


def _threads() -> int:
    return max(1, torch.get_num_threads())


def cpu_gradient_pass(
    grads: Sequence[torch.Tensor | None],
    sample_index: torch.Tensor,
    denominators: Denominators | None = None,
    *,
    spike_threshold: float = 5000.0,
) -> PassResult:
    """:func:`heavytail.estimators.gradient_pass.gradient_pass` in one C call (float64 results).

    ``sample_index`` is ``(L, S)`` int64; a ``None`` gradient gives a row of zero counts and NaN samples.
    """
    lib = _load()
    if lib is None:
        raise RuntimeError(f"the CPU kernels are unavailable: {_failure}")
    num_layers = len(grads)
    g = _table(grads)
    has_den = denominators is not None and any(v is not None for v in denominators.v)
    if has_den:
        # the kernel reads v over g's entries: a denominator of another size is no denominator
        v = _table(
            [
                v if v is not None and grads[i] is not None and v.numel() == grads[i].numel() else None
                for i, v in enumerate(denominators.v)
            ]
        )
        inv_bc = denominators.bias_correction.to(torch.float64).reciprocal().contiguous()
        eps = denominators.eps.to(torch.float64).contiguous()
    else:
        v = g  # not read
        inv_bc = eps = torch.zeros(num_layers, dtype=torch.float64)
    index = sample_index.to(torch.int64).contiguous()
    num_samples = index.shape[1]
    stats = torch.empty(num_layers, len(STAT_FIELDS), dtype=torch.float64)
    g_samples = torch.empty(num_layers, num_samples, dtype=torch.float64)
    r_samples, v_samples = torch.empty_like(g_samples), torch.empty_like(g_samples)
    status = lib.ht_pass(
        num_layers,
        g.pointers,
        g.codes,
        g.numels,
        v.pointers,
        v.codes,
        inv_bc.data_ptr(),
        eps.data_ptr(),
        int(has_den),
        float(spike_threshold) ** 0.5,
        num_samples,
        index.data_ptr(),
        stats.data_ptr(),
        g_samples.data_ptr(),
        r_samples.data_ptr(),
        v_samples.data_ptr(),
        _threads(),
    )
    if status != 0:
        raise MemoryError("heavytail CPU gradient pass: out of memory for its work table")
    return PassResult(stats, g_samples, r_samples, v_samples)


def gather(
    tensors: Sequence[torch.Tensor | None], sample_index: torch.Tensor, dtype: torch.dtype, fill: float = float("nan")
) -> torch.Tensor:
    """Each tensor's entries at its sampled coordinates, ``(L, S)`` in ``dtype`` (``fill`` where None)."""
    return _gather(_loaded(), _table(tensors), sample_index, dtype, fill)


def sums_of_squares(tensors: Sequence[torch.Tensor | None]) -> torch.Tensor:
    """Each tensor's sum of squares, float64 ``(L,)`` (0 for None): squared norms in one C call, one read of each
    tensor, accumulated in float64 (``torch._foreach_norm`` keeps float32 tensors' sums in float32)."""
    return _sums_of_squares(_loaded(), _table(tensors))


def sums_of_squares_and_gather(
    tensors: Sequence[torch.Tensor | None], sample_index: torch.Tensor, dtype: torch.dtype, fill: float = float("nan")
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`sums_of_squares` and :func:`gather` of the same tensors from one table: the gather right after the
    stream finds most sampled entries still in cache."""
    lib, table = _loaded(), _table(tensors)
    return _sums_of_squares(lib, table), _gather(lib, table, sample_index, dtype, fill)


def _loaded() -> ctypes.CDLL:
    lib = _load()
    if lib is None:
        raise RuntimeError(f"the CPU kernels are unavailable: {_failure}")
    return lib


def _gather(lib, table: _Table, sample_index: torch.Tensor, dtype: torch.dtype, fill: float) -> torch.Tensor:
    index = sample_index.to(torch.int64).contiguous()
    out = torch.empty(tuple(index.shape), dtype=torch.float64)
    n = len(table.tensors)
    lib.ht_gather(
        n, table.pointers, table.codes, table.numels, index.shape[1], index.data_ptr(), float(fill), out.data_ptr()
    )
    return out if dtype == torch.float64 else out.to(dtype)


def _sums_of_squares(lib, table: _Table) -> torch.Tensor:
    n = len(table.tensors)
    out = torch.empty(n, dtype=torch.float64)
    if lib.ht_sumsq(n, table.pointers, table.codes, table.numels, out.data_ptr(), _threads()) != 0:
        raise MemoryError("heavytail CPU sums of squares: out of memory for its work table")
    return out


def top_magnitudes(
    tensors: Sequence[torch.Tensor | None], counts: Sequence[int]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """For each tensor the ``counts[i]`` largest valid ``|x|`` (float32, descending, zero-padded) and the number
    of valid (finite, non-zero) entries: :func:`heavytail.estimators.hill.top_magnitudes` for every tensor in one
    call, by an exact radix select (one read and a sort of the valid entries of a tensor of up to 65,536, two reads
    of a larger one, never a sort or copy of it).
    """
    lib = _load()
    if lib is None:
        raise RuntimeError(f"the CPU kernels are unavailable: {_failure}")
    table = _table(tensors)
    counts = [int(c) for c in counts]
    offsets, total = [], 0
    for c in counts:
        offsets.append(total)
        total += c
    # named: a temporary's memory would be freed before the call reads it
    want, start = (ctypes.c_int64 * len(counts))(*counts), (ctypes.c_int64 * len(offsets))(*offsets)
    out = torch.empty(total, dtype=torch.float32)
    valid = torch.empty(len(tensors), dtype=torch.int64)
    status = lib.ht_top_abs(
        len(tensors),
        table.pointers,
        table.codes,
        table.numels,
        want,
        start,
        out.data_ptr(),
        valid.data_ptr(),
        _threads(),
    )
    if status != 0:
        raise MemoryError("heavytail CPU top-k: out of memory for its histograms")
    return [(out[o : o + c], valid[i]) for i, (o, c) in enumerate(zip(offsets, counts))]


# ---------------------------------------------------------------- the sample estimators (cpu_samples.c)


class SampleStep(NamedTuple):
    """What :func:`sample_step` returns besides the states it updates in place."""

    events: torch.Tensor  # (2, L, S) float32 0/1: episodes started this step, real denominator then first shadow
    quantile: torch.Tensor  # (L,) float64: the ratio's upper quantile per tensor (NaN without a denominator)


def _ptr(t: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...], name: str) -> int:
    # The kernel writes through these pointers: anything but the exact dense CPU layout is refused, never copied.
    if t.dtype != dtype or tuple(t.shape) != shape or not t.is_contiguous() or not t.is_cpu:
        raise ValueError(
            f"heavytail CPU sample step: {name} must be a contiguous CPU {dtype} tensor of shape "
            f"{shape}, got {t.dtype} {tuple(t.shape)} on {t.device}"
        )
    return t.data_ptr()


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
    """One step of the monitor's sample estimators in one C call, updating the states in place.

    The same figures as the monitor's torch code (``Monitor._stream_memory``, ``_stream_shadow``, the temporal
    part of ``_stream_noise`` and ``_upper_quantile``; tests/estimators/test_cpu_samples.py): ``g``, ``ratio``,
    ``den`` ``(L, S)`` float64 samples (``ratio``/``den``/``bias_correction`` None without a denominator);
    ``valid``/``ratio_ok`` ``(L,)`` masks; ``memory`` the (level, age, active) float32 states of the real
    denominator and the first shadow; ``shadow_bias`` ``(B, L)`` float64 ``1 - beta^t`` clamped at 1e-30;
    ``shadow_warmup``: a shadow's ratio figures and memory episodes count once it has averaged that many
    gradients (at least 1). States
    must be dense CPU tensors of the monitor's layout (``ValueError`` otherwise, before anything is written).
    """
    lib = _load()
    if lib is None:
        raise RuntimeError(f"the CPU kernels are unavailable: {_failure}")
    L, S = g.shape
    B, W = betas.shape[0], ring.shape[2]
    f32, f64 = torch.float32, torch.float64
    valid64 = valid.to(f64).contiguous()
    ok64 = ratio_ok.to(f64).contiguous()
    events = torch.zeros(2, L, S, dtype=f32)
    quantile = torch.empty(L, dtype=f64)
    a = _Samples()
    a.L, a.S, a.B, a.W = L, S, B, W
    a.g = _ptr(g, f64, (L, S), "g")
    a.valid, a.ratio_ok = valid64.data_ptr(), ok64.data_ptr()
    a.has_den = ratio is not None
    if ratio is not None:
        a.ratio, a.den = _ptr(ratio, f64, (L, S), "ratio"), _ptr(den, f64, (L, S), "den")
        bc = bias_correction.to(f64).contiguous()
        a.bc = _ptr(bc, f64, (L,), "bias_correction")
    a.threshold, a.inflation2 = float(threshold), float(inflation) * float(inflation)
    for f, (level, age, active) in enumerate(memory):
        a.level[f] = _ptr(level, f32, (L, S), "memory level")
        a.age[f] = _ptr(age, f32, (L, S), "memory age")
        a.active[f] = _ptr(active, f32, (L, S), "memory active")
    a.memory_sum = _ptr(memory_sum, f64, (2, L, memory_sum.shape[2]), "memory_sum")
    if memory_sum.shape[2] != 3:
        raise ValueError("heavytail CPU sample step: memory_sum must hold 3 fields")
    a.events, a.quantile = events.data_ptr(), quantile.data_ptr()
    a.betas = _ptr(betas, f64, (B,), "betas")
    a.bias = _ptr(shadow_bias, f64, (B, L), "shadow_bias")
    a.shadow_v = _ptr(shadow_v, f32, (B, L, S), "shadow_v")
    a.shadow_t = _ptr(shadow_t, f64, (B, L), "shadow_t")
    a.shadow_sum = _ptr(shadow_sum, f64, (B, L), "shadow_sum")
    a.shadow_max = _ptr(shadow_max, f64, (B, L, 2), "shadow_max")
    a.noise_mean = _ptr(noise_mean, f32, (L, S), "noise_mean")
    a.noise_seen = _ptr(noise_seen, f64, (L,), "noise_seen")
    a.ring = _ptr(ring, f32, (L, S, W), "ring")
    a.ring_valid = _ptr(ring_valid, torch.bool, (L, W), "ring_valid")
    a.slot, a.noise_beta, a.q = int(slot), float(noise_beta), float(q)
    a.shadow_warmup = max(1.0, float(shadow_warmup))
    if lib.ht_samples(ctypes.byref(a)) != 0:
        raise MemoryError("heavytail CPU sample step: out of memory for its scratch rows")
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
    """``Monitor._stream_updates`` in one C call: adds to ``update_sum`` ``(L, U)`` float64 in place, at
    ``columns`` = (rms_ratio, rms_steps, event_ratio_adam, events_adam, event_ratio_shadow, events_shadow).
    ``before``/``after``/``g`` ``(L, S)`` float64 samples; ``events`` the real denominator's and the first
    shadow's ``(L, S)`` float32 0/1 event masks (None when absent)."""
    lib = _load()
    if lib is None:
        raise RuntimeError(f"the CPU kernels are unavailable: {_failure}")
    L, S = g.shape
    f64 = torch.float64
    valid64 = valid.to(f64).contiguous()
    pointers = (ctypes.c_void_p * 2)(*[None if e is None else _ptr(e, torch.float32, (L, S), "events") for e in events])
    cols = (ctypes.c_int64 * 6)(*columns)
    lib.ht_updates(
        L,
        S,
        _ptr(before, f64, (L, S), "before"),
        _ptr(after, f64, (L, S), "after"),
        _ptr(g, f64, (L, S), "g"),
        valid64.data_ptr(),
        pointers,
        _ptr(update_sum, f64, (L, update_sum.shape[1]), "update_sum"),
        update_sum.shape[1],
        cols,
    )
