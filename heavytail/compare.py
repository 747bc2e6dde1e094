"""The comparison runner: the same model, data order, seed and budget under several optimizers, side by side."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence, TextIO

import numpy as np
import torch

from heavytail import __version__
from heavytail.demo import (
    DEFAULT_LR,
    DEFAULT_MICRO_BATCHES,
    OPTIMIZERS,
    TrainedRun,
    check_run,
    choose_threads,
    make_optimizer,
    train_monitored,
    warmup_steps,
)
from heavytail.report import Run, load_run, write_compare_report
from heavytail.workload import build_demo

__all__ = [
    "CompareResult",
    "SeedsResult",
    "aggregate_seeds",
    "DEFAULT_COMPARE_STEPS",
    "TAIL_FAMILIES",
    "DENOMINATOR_FAMILIES",
    "MEMORY_FAMILIES",
    "UPDATE_FAMILIES",
    "fair_note",
    "parse_lrs",
    "parse_optimizers",
    "parse_seeds",
    "run_compare",
    "run_seeds",
    "run_summary",
]

DEFAULT_COMPARE_STEPS = 300
"""Steps per optimizer of ``heavytail sweep`` when ``--steps`` is not given."""

TAIL_FAMILIES = ("grad/hill_alpha", "noise/hill_alpha", "probe/hill_alpha", "probe/stable_alpha")
"""Tail indices summarised per layer: coordinate tail, temporal noise tail, the probe's noise tail (Hill, stable)."""

DENOMINATOR_FAMILIES = (
    "adam/ratio_max",
    "shadow999/ratio_max",
    "shadow95/ratio_max",
    "adam/spike_frac",
    "shadow999/spike_frac",
    "shadow95/spike_frac",
)
"""Denominator figures summarised per layer: the optimizer's own (AdamW, the AdamW half of Muon) and the shadows."""

MEMORY_FAMILIES = ("adam/memory_steps", "shadow999/memory_steps", "shadow95/memory_steps")
"""Denominator memory (steps the denominator stays inflated after a spike), when the monitor recorded it."""

UPDATE_FAMILIES = (
    "update/rms_ratio",
    "adam/event_update_ratio",
    "shadow999/event_update_ratio",
    "lion/sign_flip_frac",
    "muon/sv_cond",
)
"""How the update answers the gradient: RMS(delta p) / RMS(g) on every step, |delta p| / |g| at the denominator
events (a gradient far above its history), Lion's sign flips and the spread of the matrix Muon orthogonalises."""


def parse_optimizers(text: str | Sequence[str]) -> list[str]:
    """``"adamw,lion"`` (or a list) into known optimizer names, in order, without duplicates."""
    items = text.split(",") if isinstance(text, str) else list(text)
    names: list[str] = []
    for item in items:
        name = item.strip().lower()
        if not name:
            continue
        if name not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}")
        if name not in names:
            names.append(name)
    if not names:
        raise ValueError(f"no optimizer given; choose from {', '.join(OPTIMIZERS)}")
    return names


def parse_lrs(text: str | None) -> dict[str, float]:
    """``"adamw=3e-4,lion=1e-4"`` into ``{"adamw": 3e-4, "lion": 1e-4}``; names must be known optimizers."""
    out: dict[str, float] = {}
    if not text:
        return out
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        name, sep, value = item.partition("=")
        name = name.strip().lower()
        if not sep or name not in OPTIMIZERS:
            raise ValueError(
                f"--lr entries are optimizer=value with an optimizer from {', '.join(OPTIMIZERS)}; got {item!r}"
            )
        try:
            lr = float(value)
        except ValueError:
            raise ValueError(f"--lr {name}: {value.strip()!r} is not a number") from None
        if not (lr > 0 and math.isfinite(lr)):
            raise ValueError(f"--lr {name}: the learning rate must be positive, got {value.strip()}")
        out[name] = lr
    return out


def parse_seeds(text: str | Sequence[int]) -> list[int]:
    """``"0,1,2"`` (or a list) into distinct non-negative seeds, in order."""
    items = text.split(",") if isinstance(text, str) else list(text)
    seeds: list[int] = []
    for item in items:
        if isinstance(item, str):
            item = item.strip()
            if not item:
                continue
            try:
                seed = int(item)
            except ValueError:
                raise ValueError(f"--seeds: {item!r} is not an integer") from None
        else:
            seed = int(item)
        if seed < 0:
            raise ValueError(f"--seeds: seeds must be non-negative, got {seed}")
        if seed not in seeds:
            seeds.append(seed)
    if not seeds:
        raise ValueError("--seeds: no seed given")
    return seeds


@dataclass
class CompareResult:
    """What :func:`run_compare` wrote."""

    out: Path
    summary_path: Path
    report: Path
    summary: dict[str, Any]
    trained: dict[str, TrainedRun]


def _checksum(tensors: Sequence[torch.Tensor]) -> str:
    """A short fingerprint of tensors' values (float64 sums of values and of values times their position)."""
    total, weighted = 0.0, 0.0
    for t in tensors:
        flat = t.detach().reshape(-1).to("cpu", torch.float64)
        total += float(flat.sum())
        weighted += float((flat * torch.arange(1, flat.numel() + 1, dtype=torch.float64)).sum()) / max(flat.numel(), 1)
    return f"{total:.10e}/{weighted:.10e}"


def fair_note(settings: Mapping[str, Any], lrs: Mapping[str, float]) -> str:
    """The comparison's fairness statement: what was held equal, what differs."""
    lr_text = ", ".join(f"{k} {v:g}" for k, v in lrs.items())
    muon = (
        " Muon runs AdamW (at the adamw learning rate) on embeddings, head, norms and biases, as its recipe does."
        if "muon" in lrs
        else ""
    )
    return (
        "Held equal: the model and its initial weights (GPT {size}, seed {seed}, weights checksum {init}); the data "
        "order (batch t is the same seeded draw for every run, checksum of the first batches {data}); the seed; the "
        "step budget ({steps} steps); the batch ({batch} sequences of {block} tokens); the learning-rate schedule's "
        "shape (linear warm-up over {warm} steps, then constant); no weight decay and no gradient clipping; the "
        "monitor configuration (a checkpoint every {every} steps, the same sampled coordinates, noise probe on "
        "{probe}). Differs: the optimizer and its learning rate ({lrs}).{muon}"
    ).format(
        size=settings.get("size"),
        seed=settings.get("seed"),
        init=settings.get("init_checksum"),
        data=settings.get("data_checksum"),
        steps=settings.get("steps"),
        batch=settings.get("batch_size"),
        block=settings.get("block_size"),
        warm=settings.get("warmup_steps"),
        every=settings.get("every"),
        probe=(
            f"{settings.get('probe_micro_batches')} mini-batches of the held-out batch at every checkpoint"
            if settings.get("probe")
            else "off"
        ),
        lrs=lr_text,
        muon=muon,
    )


def run_compare(
    optimizers: Sequence[str] = OPTIMIZERS,
    *,
    steps: int = DEFAULT_COMPARE_STEPS,
    out: str | os.PathLike[str] = "heavytail_runs/compare",
    lrs: Mapping[str, float] | None = None,
    seed: int = 0,
    size: str = "small",
    every: int | None = None,
    text: str | os.PathLike[str] | None = None,
    probe: bool = True,
    device: str | torch.device = "cpu",
    progress: TextIO | None = sys.stderr,
    command: str | None = None,
    threads: int | None = None,
) -> CompareResult:
    """Train the demo workload once per optimizer under identical conditions and compare them.

    Every run starts from the same initial weights (``DemoWorkload.new_model``), sees the same batches in the
    same order (``batches.get(t)``), takes ``steps`` steps with the same warm-up and is monitored with the same
    configuration into ``<out>/<optimizer>/``; only the optimizer and its learning rate (``lrs``, default
    :data:`heavytail.demo.DEFAULT_LR`) differ. Writes ``<out>/summary.json`` (:func:`run_summary` per optimizer;
    format in docs/cli.md) and ``<out>/compare.html``. ``threads``: torch's intra-op threads, the same for every
    run (default: :func:`heavytail.demo.choose_threads`).
    """
    names = parse_optimizers(optimizers)
    every = check_run(size, steps, every)
    unknown = [k for k in (lrs or {}) if k not in OPTIMIZERS]
    if unknown:
        raise ValueError(f"unknown optimizer in lrs: {unknown[0]!r}")
    chosen = {n: float((lrs or {}).get(n, DEFAULT_LR[n])) for n in names}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    threads = choose_threads(threads, size)

    workload = build_demo(seed=seed, text=text, steps=steps, device=device, size=size)
    settings: dict[str, Any] = {
        "steps": steps,
        "seed": seed,
        "size": size,
        "every": every,
        "batch_size": workload.batches.batch_size,
        "block_size": workload.batches.block_size,
        "warmup_steps": warmup_steps(steps),
        "schedule": "linear warm-up, then constant",
        "weight_decay": 0.0,
        "grad_clip": None,
        "probe": bool(probe),
        "probe_micro_batches": DEFAULT_MICRO_BATCHES if probe else 0,
        "init_checksum": _checksum(list(workload.new_model().parameters())),
        "data_checksum": _checksum([t for s in range(3) for t in workload.batches.get(s)]),
        "device": str(device),
        "torch_threads": threads,
    }
    trained: dict[str, TrainedRun] = {}
    for name in names:
        model = workload.new_model()
        optimizer = make_optimizer(name, model, chosen[name])
        extra = {
            "compare": "heavytail sweep",
            "optimizer_name": name,
            "lr": chosen[name],
            "seed": seed,
            "init_checksum": settings["init_checksum"],
            "data_checksum": settings["data_checksum"],
            **{f"workload/{k}": v for k, v in workload.config.items()},
        }
        trained[name] = train_monitored(
            workload,
            model,
            optimizer,
            steps=steps,
            log_dir=out / name,
            every=every,
            probe=probe,
            run_name=name,
            extra=extra,
            progress=progress,
            label=f"{name:<5}",
        )
    runs = {name: load_run(out / name) for name in names}
    per_run = {name: run_summary(runs[name], trained[name], chosen[name], out) for name in names}
    summary: dict[str, Any] = {
        "heavytail_version": __version__,
        "created": time.time(),
        "command": command,
        "settings": settings,
        "learning_rates": chosen,
        "held_equal": [
            "model init",
            "data order",
            "seed",
            "steps",
            "batch",
            "lr schedule shape",
            "weight decay (0)",
            "gradient clipping (none)",
            "monitor config",
        ],
        "differs": ["optimizer", "lr"],
        "note": fair_note(settings, chosen),
        "workload": workload.config,
        "optimizers": per_run,
    }
    summary_path = out / "summary.json"
    tmp = summary_path.with_name(".summary.json.tmp")
    tmp.write_text(json.dumps(_jsonable(summary), indent=2, allow_nan=False) + "\n", encoding="utf-8")
    os.replace(tmp, summary_path)
    report = write_compare_report(
        runs,
        out / "compare.html",
        summary={**{name: _report_figures(per_run[name]) for name in names}, **_report_settings(settings)},
        note=summary["note"],
    )
    return CompareResult(out=out, summary_path=summary_path, report=report, summary=summary, trained=trained)


# ----------------------------------------------------------------------------------------------------------------
# Several seeds


@dataclass
class SeedsResult:
    """What :func:`run_seeds` wrote: one :class:`CompareResult` per seed and the aggregate summary."""

    out: Path
    summary_path: Path
    summary: dict[str, Any]
    per_seed: dict[int, CompareResult]


def _spread(values: Sequence[float | None]) -> dict[str, Any]:
    """Mean, sample standard deviation (ddof 1; null for one value), min and max of the finite ``values``, and the
    values themselves in seed order (null where a seed has none)."""
    finite = np.array([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    return {
        "mean": float(finite.mean()) if finite.size else math.nan,
        "std": float(finite.std(ddof=1)) if finite.size > 1 else math.nan,
        "min": float(finite.min()) if finite.size else math.nan,
        "max": float(finite.max()) if finite.size else math.nan,
        "n": int(finite.size),
        "values": [v if v is not None and math.isfinite(v) else None for v in values],
    }


_SEED_SCALARS = ("val_loss", "final_loss", "first_checkpoint_loss", "min_checkpoint_loss", "loss_spikes", "alerts")


def aggregate_seeds(summaries: Mapping[int, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per optimizer, each figure of :func:`run_summary` across seeds as :func:`_spread` (mean, std, min, max, n,
    values in seed order): the scalars (``val_loss``, ``final_loss``, ``loss_spikes``, ...), ``overall`` per family,
    and the per-layer medians of ``tail_index``, ``denominator``, ``memory`` and ``update`` per family and layer.

    ``summaries`` maps a seed to that seed's ``summary.json`` (its ``optimizers`` entry is read).
    """
    seeds = list(summaries)
    names: list[str] = []
    for seed in seeds:
        for name in summaries[seed]["optimizers"]:
            if name not in names:
                names.append(name)
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        runs = [summaries[seed]["optimizers"].get(name, {}) for seed in seeds]
        entry: dict[str, Any] = {"lr": runs[0].get("lr")}
        for key in _SEED_SCALARS:
            entry[key] = _spread([r.get(key) for r in runs])
        families = sorted({f for r in runs for f in r.get("overall", {})})
        entry["overall"] = {f: _spread([r.get("overall", {}).get(f) for r in runs]) for f in families}
        for group in ("tail_index", "denominator", "memory", "update"):
            fams: dict[str, dict[str, Any]] = {}
            for family in sorted({f for r in runs for f in r.get(group, {})}):
                layers = sorted({layer for r in runs for layer in r.get(group, {}).get(family, {})})
                fams[family] = {
                    layer: _spread([r.get(group, {}).get(family, {}).get(layer) for r in runs]) for layer in layers
                }
            entry[group] = fams
        out[name] = entry
    return out


def run_seeds(
    optimizers: Sequence[str] = OPTIMIZERS,
    seeds: Sequence[int] = (0, 1, 2),
    *,
    out: str | os.PathLike[str] = "heavytail_runs/compare",
    command: str | None = None,
    **kwargs: Any,
) -> SeedsResult:
    """:func:`run_compare` once per seed into ``<out>/seed<k>/`` (each with its own ``summary.json`` and
    ``compare.html``), then ``<out>/summary.json``: :func:`aggregate_seeds` across the seeds (mean, sample standard
    deviation, min, max and the per-seed values of every figure), with the seeds, the learning rates and each
    seed's summary path. ``kwargs`` go to :func:`run_compare` (steps, lrs, size, probe, ...); the seed changes the
    initial weights, the data order and the probe's held-out batch, not the validation text.
    """
    seeds = parse_seeds(seeds)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    per_seed: dict[int, CompareResult] = {}
    for seed in seeds:
        per_seed[seed] = run_compare(optimizers, out=out / f"seed{seed}", seed=seed, command=command, **kwargs)
    first = per_seed[seeds[0]].summary
    settings = {k: v for k, v in first["settings"].items() if k not in ("seed", "init_checksum", "data_checksum")}
    summary: dict[str, Any] = {
        "heavytail_version": __version__,
        "created": time.time(),
        "command": command,
        "seeds": seeds,
        "settings": settings,
        "learning_rates": first["learning_rates"],
        "per_seed": {str(seed): f"seed{seed}/summary.json" for seed in seeds},
        "note": (
            f"Each seed is a sweep of its own under {out}/seed<k>/ (held equal within a seed: "
            + ", ".join(first["held_equal"])
            + "); across seeds the initial weights, the data order and the probe's held-out batch change, the "
            "validation text (all the held-out tail) does not. Figures: mean, sample standard deviation (ddof 1), "
            "min, max and the per-seed values."
        ),
        "workload": {k: v for k, v in first["workload"].items() if k != "seed"},
        "optimizers": aggregate_seeds({seed: per_seed[seed].summary for seed in seeds}),
    }
    summary_path = out / "summary.json"
    tmp = summary_path.with_name(".summary.json.tmp")
    tmp.write_text(json.dumps(_jsonable(summary), indent=2, allow_nan=False) + "\n", encoding="utf-8")
    os.replace(tmp, summary_path)
    return SeedsResult(out=out, summary_path=summary_path, summary=summary, per_seed=per_seed)


# ----------------------------------------------------------------------------------------------------------------
# Summary of one run


def _per_layer_medians(run: Run, family: str) -> dict[str, float] | None:
    layers, _, values = run.matrix(family)
    if not layers:
        return None
    out = {}
    for name, row in zip(layers, values):
        finite = row[np.isfinite(row)]
        out[name] = float(np.median(finite)) if finite.size else math.nan
    return out


def _overall(run: Run, family: str) -> float:
    _, _, values = run.matrix(family)
    finite = values[np.isfinite(values)]
    return float(np.median(finite)) if finite.size else math.nan


def run_summary(
    run: Run, trained: TrainedRun | None = None, lr: float | None = None, relative_to: Path | None = None
) -> dict[str, Any]:
    """The figures of one optimizer's run for ``summary.json``.

    ``final_loss``: the last checkpoint's ``loss`` (the mean over the steps of its interval, a training loss);
    ``val_loss``: the mean loss over all the held-out text with the final weights (``TrainedRun.val_loss``, null
    without a training record); ``loss_spikes``:
    the ``loss_spike`` alerts; ``alerts_by_rule``; per-layer medians over the run of the tail indices
    (:data:`TAIL_FAMILIES`), of the denominator figures (:data:`DENOMINATOR_FAMILIES`; ``adam/`` only where the
    optimizer has an AdamW denominator) and of the denominator memory (:data:`MEMORY_FAMILIES`, ``{}`` when the
    monitor did not record it) and of the update figures (:data:`UPDATE_FAMILIES`, those recorded); ``overall``:
    each family's median over all layers and checkpoints.
    """
    _, loss = run.series("loss")
    finite_loss = loss[np.isfinite(loss)]
    rules = Counter(str(a.get("rule", "?")) for a in run.alerts)
    families = TAIL_FAMILIES + DENOMINATOR_FAMILIES + MEMORY_FAMILIES + UPDATE_FAMILIES

    def group(names: Sequence[str]) -> dict[str, dict[str, float]]:
        out = {}
        for family in names:
            medians = _per_layer_medians(run, family)
            if medians is not None:
                out[family] = medians
        return out

    path = run.path
    if relative_to is not None:
        try:
            path = run.path.relative_to(relative_to)
        except ValueError:
            pass
    return {
        "optimizer_class": run.meta.get("optimizer"),
        "lr": lr,
        "run_dir": str(path),
        "train_seconds": trained.seconds if trained else None,
        "steps": int(run.steps[-1]) if len(run.steps) else 0,
        "checkpoints": len(run.steps),
        "final_loss": float(finite_loss[-1]) if finite_loss.size else math.nan,
        "val_loss": trained.val_loss if trained is not None and trained.val_loss is not None else math.nan,
        "first_checkpoint_loss": float(finite_loss[0]) if finite_loss.size else math.nan,
        "min_checkpoint_loss": float(finite_loss.min()) if finite_loss.size else math.nan,
        "loss_spikes": rules.get("loss_spike", 0),
        "alerts": len(run.alerts),
        "alerts_by_rule": dict(rules.most_common()),
        "tail_index": group(TAIL_FAMILIES),
        "denominator": group(DENOMINATOR_FAMILIES),
        "memory": group(MEMORY_FAMILIES),
        "update": group(UPDATE_FAMILIES),
        "overall": {f: _overall(run, f) for f in families if run.layers(f)},
    }


_REPORT_FIGURES = (
    ("grad/hill_alpha", "median coordinate α (grad/hill_alpha)"),
    ("noise/hill_alpha", "median noise α, temporal (noise/hill_alpha)"),
    ("probe/hill_alpha", "median noise α, probe (probe/hill_alpha)"),
    ("probe/stable_alpha", "median noise stable α, probe"),
    ("adam/ratio_max", "median adam/ratio_max (own denominator)"),
    ("shadow999/ratio_max", "median shadow999/ratio_max"),
    ("shadow95/ratio_max", "median shadow95/ratio_max"),
    ("adam/spike_frac", "median adam/spike_frac"),
    ("shadow999/spike_frac", "median shadow999/spike_frac"),
    ("shadow95/spike_frac", "median shadow95/spike_frac"),
    ("adam/memory_steps", "median adam/memory_steps"),
    ("shadow999/memory_steps", "median shadow999/memory_steps"),
    ("update/rms_ratio", "median update/rms_ratio (RMS update / RMS gradient)"),
    ("shadow999/event_update_ratio", "median shadow999/event_update_ratio (|update| / |g| at events)"),
)


def _report_figures(s: Mapping[str, Any]) -> dict[str, Any]:
    """The scalar figures of a run summary, as rows of the comparison page's table."""
    rows: dict[str, Any] = {
        "learning rate": s.get("lr"),
        "training time (s)": round(s["train_seconds"], 1) if s.get("train_seconds") else None,
        "validation loss (held-out text, final weights)": s.get("val_loss"),
        "final loss (training, last checkpoint)": s.get("final_loss"),
        "loss spikes": s.get("loss_spikes"),
    }
    overall = s.get("overall", {})
    for family, label in _REPORT_FIGURES:
        rows[label] = overall.get(family)
    return rows


def _report_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    keep = (
        "steps",
        "seed",
        "size",
        "every",
        "batch_size",
        "block_size",
        "warmup_steps",
        "schedule",
        "weight_decay",
        "probe_micro_batches",
        "init_checksum",
        "data_checksum",
    )
    return {k: settings[k] for k in keep if k in settings}


def _jsonable(obj: Any) -> Any:
    """NaN and infinities become null (JSON has neither), numpy scalars plain numbers."""
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        v = float(obj)
        return v if math.isfinite(v) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj
