"""Run directories for the report tests: synthetic ones in the format of docs/run-directory.md (independent of
the monitor), and real ones written by a small monitored training run."""

from __future__ import annotations

import json
import math
import struct
import zlib
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Sequence

import numpy as np
import pytest
import torch

DEFAULT_LAYERS = (
    "embed.weight",
    "blocks.0.attn.qkv.weight",
    "blocks.0.mlp.fc1.weight",
    "blocks.1.attn.qkv.weight",
    "blocks.1.mlp.fc2.weight",
    "head.weight",
)
HEAVY_LAYER = "blocks.1.attn.qkv.weight"  # its tail index dips under 2 around the loss spike


def _dump(obj: Any) -> str:
    def clean(o: Any) -> Any:
        if isinstance(o, dict):
            return {k: clean(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [clean(v) for v in o]
        if isinstance(o, float) and not math.isfinite(o):
            return None
        return o

    return json.dumps(clean(obj), allow_nan=False, separators=(",", ":"))


def make_run_dir(
    path: Path,
    *,
    layers: Sequence[str] = DEFAULT_LAYERS,
    heavy_layer: str | None = None,
    n_checkpoints: int = 50,
    every: int = 10,
    optimizer: str | None = "AdamW",
    seed: int = 0,
    with_alerts: bool = True,
    with_noise: bool = True,
    with_adam: bool = True,
    with_meta: bool = True,
    run_name: str = "synthetic",
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write a plausible run directory: per-layer tail index, kurtosis and denominator ratio, a loss spike.

    ``heavy_layer`` (default: the 4th layer) has a tail index under 2 for a few checkpoints around the spike;
    a few values are null; ``noise/hill_alpha`` is written every 5th checkpoint only; two alerts are written.
    """
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True, exist_ok=True)
    layers = list(layers)
    heavy = heavy_layer if heavy_layer is not None else layers[min(3, len(layers) - 1)]
    steps = [every * (i + 1) for i in range(n_checkpoints)]
    spike = steps[min(len(steps) - 1, int(len(steps) * 0.6))]
    t0 = 1764097200.0
    if with_meta:
        meta = {
            "heavytail_version": "0.1.0",
            "run_name": run_name,
            "started": t0,
            "torch_version": "2.13.0",
            "device": "cpu",
            "model": "GPT",
            "optimizer": optimizer,
            "every": every,
            "params": [{"name": n, "shape": [64, 64], "numel": 4096, "dtype": "float32"} for n in layers],
            "config": {"every": every, "backends": ["jsonl"], "hill_k_frac": 0.02},
            "extra": extra if extra is not None else {"lr": 3e-4, "betas": [0.9, 0.95], "seed": seed},
        }
        (path / "meta.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")

    base_alpha = {name: 2.6 + 0.5 * i for i, name in enumerate(layers)}
    lines = []
    for c, step in enumerate(steps):
        near = abs(step - spike) <= 2 * every
        loss = 2.5 + 5.0 * math.exp(-step / (every * 15)) + 0.05 * rng.standard_normal()
        if step == spike:
            loss = 7.9
        m: dict[str, float | None] = {"loss": loss, "grad/norm": 1.0 + 0.1 * rng.standard_normal()}
        for i, name in enumerate(layers):
            alpha = base_alpha[name] + 0.15 * rng.standard_normal()
            if name == heavy and near:
                alpha = 1.6 + 0.1 * rng.standard_normal()
            # Excess kurtosis (Gaussian 0), as the monitor writes it; a light layer may read a little under 0.
            kurt = 3.0 * math.exp(2.0 / max(alpha - 1.0, 0.3)) * (1 + 0.1 * abs(rng.standard_normal())) - 3.5
            ratio = 3.0 + 2.0 * abs(rng.standard_normal()) + (120.0 if step == spike and name == heavy else 0.0)
            m[f"grad/hill_alpha/{name}"] = alpha
            m[f"grad/hill_alpha_se/{name}"] = alpha / math.sqrt(80)
            m[f"grad/kurtosis/{name}"] = kurt
            m[f"grad/kurtosis_gauss/{name}"] = 0.18  # the 0.99 quantile of a Gaussian's excess kurtosis, n = 4096
            m[f"grad/norm/{name}"] = 0.3 + 0.05 * i + 0.02 * rng.standard_normal()
            m[f"grad/max/{name}"] = 0.05 * (kurt + 3.0)
            if with_adam:
                m[f"adam/ratio_max/{name}"] = ratio
                m[f"adam/spike_frac/{name}"] = 0.001 * (ratio > 50)
            if with_noise and c % 5 == 4:
                m[f"noise/hill_alpha/{name}"] = alpha + 0.4
        # a few nulls, as NaN/Inf are written
        if c == 7:
            m[f"grad/kurtosis/{layers[0]}"] = None
        if c == 11:
            m[f"grad/hill_alpha/{layers[-1]}"] = None
        lines.append(_dump({"step": step, "wall_time": t0 + 2.0 * step, "metrics": m}))
    (path / "metrics.jsonl").write_text("".join(line + "\n" for line in lines), encoding="utf-8")

    if with_alerts:
        (path / "flight").mkdir(exist_ok=True)
        alerts = [
            {
                "step": spike - every,
                "wall_time": t0 + 2.0 * (spike - every),
                "rule": "tail_index_drop",
                "severity": "critical",
                "metric": f"grad/hill_alpha/{heavy}",
                "layer": heavy,
                "value": 1.62,
                "threshold": 2.0,
                "message": f"tail index of {heavy} fell to 1.62 (< 2: infinite variance)",
                "flight_record": f"flight/{spike - every:06d}_tail_index_drop.json",
            },
            {
                "step": spike,
                "wall_time": t0 + 2.0 * spike,
                "rule": "loss_spike",
                "severity": "warning",
                "metric": "loss",
                "layer": None,
                "value": 7.9,
                "threshold": 4.1,
                "message": f"loss 7.9 at step {spike} is 6.3 robust standard deviations above its recent level",
                "flight_record": f"flight/{spike:06d}_loss_spike.json",
            },
        ]
        (path / "alerts.jsonl").write_text("".join(_dump(a) + "\n" for a in alerts), encoding="utf-8")
        for a in alerts:
            flight = {
                "step": a["step"],
                "rule": a["rule"],
                "layers": layers,
                "steps": steps[:3],
                "series": {"grad/norm": [[0.3] * len(layers)] * 3, "loss": [3.0, 3.0, 3.0]},
            }
            (path / a["flight_record"]).write_text(_dump(flight), encoding="utf-8")
    return path


def make_monitored_run(
    path: Path,
    *,
    optimizer: str = "adamw",
    steps: int = 32,
    every: int = 4,
    spike_at: int | None = 25,
    run_name: str | None = None,
    clip: float | None = 5.0,
) -> Path:
    """Train the tests' TinyNet under a real :class:`heavytail.Monitor` into ``path`` and close it.

    At step ``spike_at`` the targets are scaled by 100, so the run has a real loss and gradient spike (with
    ``spike_warmup=8`` the detectors may flag it) and a large denominator ratio; ``clip`` clips the global
    gradient norm, so ``grad/norm`` (after) and ``grad/norm_preclip`` (before) differ at the spike.
    """
    import heavytail as ht
    from heavytail.optim import Lion
    from tests.conftest import TinyNet, tiny_batch

    torch.manual_seed(0)
    model = TinyNet()
    opt = Lion(model.parameters(), lr=3e-4) if optimizer == "lion" else torch.optim.AdamW(model.parameters(), lr=1e-3)
    with ht.Monitor(model, opt, every=every, log_dir=path, run_name=run_name, spike_warmup=8) as mon:
        for step in range(steps):
            idx, y = tiny_batch(step)
            if step == spike_at:
                y = y * 100
            loss = torch.nn.functional.mse_loss(model(idx), y)
            loss.backward()
            mon.observe_loss(loss)
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
    return path


def strip_finished(run_dir: Path) -> Path:
    """Make a closed run look killed: SIGKILL leaves the records of every checkpoint (flushed as written) and a
    meta.json without the ``finished`` and ``final_step`` that ``Monitor.close`` adds."""
    meta = json.loads((run_dir / "meta.json").read_text())
    meta.pop("finished", None)
    meta.pop("final_step", None)
    (run_dir / "meta.json").write_text(json.dumps(meta, indent=2))
    return run_dir


@pytest.fixture(scope="session")
def monitored(tmp_path_factory) -> SimpleNamespace:
    """Real run directories written by the monitor (made once per session, about a second each):

    - ``trainer_out``: a trainer's output directory, the AdamW run in ``trainer_out/heavytail`` (where the
      Hugging Face and Lightning integrations write), named ``tiny-adamw``; ``adamw`` is that run directory;
    - ``lion``: the same model, data and spike under Lion, in a directory of its own;
    - ``killed``: a copy of the AdamW run as a SIGKILL leaves it (no ``finished`` in meta.json).

    Tests must not write into them; copy one first (``shutil.copytree``). Modules outside tests/report import
    this fixture, which registers it once more: the runs are still made once.
    """
    import shutil

    if _MONITORED:
        return _MONITORED[0]
    root = tmp_path_factory.mktemp("monitored")
    trainer_out = root / "trainer_out"
    (trainer_out / "checkpoint-32").mkdir(parents=True)  # what else a trainer keeps there
    adamw = make_monitored_run(trainer_out / "heavytail", run_name="tiny-adamw")
    lion = make_monitored_run(root / "lion", optimizer="lion", run_name="tiny-lion")
    killed = strip_finished(Path(shutil.copytree(adamw, root / "killed")))
    _MONITORED.append(SimpleNamespace(root=root, trainer_out=trainer_out, adamw=adamw, lion=lion, killed=killed))
    return _MONITORED[0]


_MONITORED: list[SimpleNamespace] = []


@pytest.fixture
def names() -> SimpleNamespace:
    """The synthetic runs' layer names: ``layers``, ``heavy`` (dips under alpha 2), ``evil`` and ``quote``."""
    return SimpleNamespace(layers=DEFAULT_LAYERS, heavy=HEAVY_LAYER, evil=EVIL_LAYER, quote=QUOTE_LAYER)


@pytest.fixture
def make_run(tmp_path: Path) -> Callable[..., Path]:
    """Factory: ``make_run(name="run", **options)`` writes a synthetic run directory under tmp_path."""

    def factory(name: str = "run", **options: Any) -> Path:
        return make_run_dir(tmp_path / name, **options)

    return factory


@pytest.fixture(scope="session")
def write_run_dir() -> Callable[..., Path]:
    """``make_run_dir(path, **options)`` itself, for fixtures broader than one test."""
    return make_run_dir


@pytest.fixture
def run_dir(make_run: Callable[..., Path]) -> Path:
    """A synthetic run directory: 6 layers x 50 checkpoints, a loss spike, an alpha under 2, two alerts."""
    return make_run()


EVIL_LAYER = "<script>alert(1)</script>"
QUOTE_LAYER = "blocks.\"&'.weight"


@pytest.fixture
def evil_run_dir(make_run: Callable[..., Path]) -> Path:
    """A run whose layer names, messages and metadata try to inject markup and to close the data script."""
    return make_run(
        "evil",
        layers=["embed.weight", EVIL_LAYER, QUOTE_LAYER, "x</script><img src=x onerror=alert(2)>"],
        heavy_layer=EVIL_LAYER,
        run_name="<b>run</b>\"&'",
        extra={"note": "</script><script>alert(3)</script>", "amp": "a&b"},
    )


def decode_png(data: bytes) -> np.ndarray:
    """Pixels of an 8-bit, non-interlaced PNG as an (H, W, channels) uint8 array (enough for screenshots).

    Filters None, Sub and Up are vectorised; Average and Paeth run byte by byte (about 1 s for a full page).
    """
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("not a PNG")
    pos, idat, header = 8, [], None
    while pos < len(data):
        length, tag = struct.unpack(">I4s", data[pos : pos + 8])
        body = data[pos + 8 : pos + 8 + length]
        pos += 12 + length
        if tag == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif tag == b"IDAT":
            idat.append(body)
        elif tag == b"IEND":
            break
    if header is None:
        raise ValueError("PNG without IHDR")
    w, h, depth, ctype, _, _, interlace = header
    if depth != 8 or interlace:
        raise ValueError(f"unsupported PNG: depth {depth}, interlace {interlace}")
    bpp = {0: 1, 2: 3, 4: 2, 6: 4}[ctype]
    stride = w * bpp
    raw = zlib.decompress(b"".join(idat))
    out = np.zeros((h, stride), dtype=np.uint8)
    prev = np.zeros(stride, dtype=np.uint8)
    for y in range(h):
        start = y * (stride + 1)
        kind = raw[start]
        line = np.frombuffer(raw, dtype=np.uint8, count=stride, offset=start + 1)
        if kind == 0:
            cur = line.copy()
        elif kind == 1:
            cur = (np.cumsum(line.reshape(w, bpp).astype(np.int64), axis=0) % 256).astype(np.uint8).reshape(stride)
        elif kind == 2:
            cur = line + prev
        else:
            buf, up = bytearray(line.tobytes()), prev.tobytes()
            for x in range(stride):
                a = buf[x - bpp] if x >= bpp else 0
                b = up[x]
                if kind == 3:
                    buf[x] = (buf[x] + ((a + b) >> 1)) & 255
                else:
                    c = up[x - bpp] if x >= bpp else 0
                    pa, pb, pc = abs(b - c), abs(a - c), abs(a + b - 2 * c)
                    buf[x] = (buf[x] + (a if pa <= pb and pa <= pc else (b if pb <= pc else c))) & 255
            cur = np.frombuffer(bytes(buf), dtype=np.uint8)
        out[y] = cur
        prev = cur
    return out.reshape(h, w, bpp)


@pytest.fixture
def png_pixels() -> Callable[[bytes], np.ndarray]:
    """The PNG decoder, as a fixture so test modules need not import conftest."""
    return decode_png
