"""The demo runner: train the embedded workload with the monitor on, write the report, print what it found."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, TextIO

import torch
from torch import nn

from heavytail.config import MonitorConfig
from heavytail.monitor import Monitor
from heavytail.optim import Lion, muon_with_adamw
from heavytail.report import Run, load_run, write_report
from heavytail.report.summary import duration
from heavytail.report.summary import summary_text as run_summary_text
from heavytail.runfiles import clear_run_dir
from heavytail.workload import SIZES, DemoWorkload, build_demo

__all__ = [
    "DEFAULT_LR",
    "DEFAULT_STEPS",
    "OPTIMIZERS",
    "DemoResult",
    "ProgressBar",
    "TrainedRun",
    "choose_threads",
    "demo_loss",
    "make_optimizer",
    "run_demo",
    "summary_text",
    "train_monitored",
    "validation_loss",
]

OPTIMIZERS: tuple[str, ...] = ("adamw", "lion", "muon", "sgd")
"""Optimizers the demo and the comparison know by name."""

DEFAULT_LR: dict[str, float] = {
    "adamw": 1e-3,
    "lion": 3e-4,
    "muon": 0.02,
    "sgd": 0.05,
}
"""Learning rates for the demo workload (peak, after warm-up), tuned on the ``small`` size so that each optimizer
trains: see docs/cli.md for the sweep. Muon's entry is the Muon learning rate of the hidden matrices; its AdamW
half (embeddings, head, norms, biases) uses the ``adamw`` entry."""

DEFAULT_STEPS = 300
"""Optimizer steps of ``heavytail demo`` (about 1-3 minutes on two CPU cores at the ``small`` size)."""

DEFAULT_MICRO_BATCHES = 32
# Micro-batches per training step: 2 gives the micro-batch noise source and the gradient noise scale their two
# batch sizes at the cost of two smaller backward passes instead of one.
DEFAULT_ACCUMULATE = 2
"""Mini-batches of the held-out batch per noise probe."""


# ----------------------------------------------------------------------------------------------------------------
# Optimizers


def make_optimizer(
    name: str, model: nn.Module, lr: float | None = None, *, adamw_lr: float | None = None
) -> torch.optim.Optimizer:
    """One of :data:`OPTIMIZERS` for ``model``, with the demo's hyper-parameters.

    - ``adamw``: ``torch.optim.AdamW``, betas (0.9, 0.95) (the usual LLM setting, and the same as Muon's AdamW
      half, so the monitor's ``shadow95`` denominator is a replica of the real one), eps 1e-8;
    - ``lion``: :class:`heavytail.optim.Lion`, betas (0.9, 0.99) (Chen et al. 2023);
    - ``muon``: :func:`heavytail.optim.muon_with_adamw`: Muon (momentum 0.95, Nesterov) on hidden matrices,
      AdamW (betas (0.9, 0.95)) at ``adamw_lr`` (default ``DEFAULT_LR["adamw"]``) on the rest;
    - ``sgd``: ``torch.optim.SGD`` with momentum 0.9.

    No weight decay for any of them: it is held equal (at zero) so that only the update rule differs.
    ``lr`` defaults to :data:`DEFAULT_LR`.
    """
    name = name.lower()
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}")
    lr = DEFAULT_LR[name] if lr is None else float(lr)
    if not lr > 0:
        raise ValueError(f"learning rate of {name} must be positive, got {lr}")
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    if name == "lion":
        return Lion(params, lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    if name == "muon":
        return muon_with_adamw(
            model, lr=lr, adamw_lr=DEFAULT_LR["adamw"] if adamw_lr is None else adamw_lr, weight_decay=0.0
        )
    return torch.optim.SGD(params, lr=lr, momentum=0.9)


def choose_threads(requested: int | None = None, size: str = "small") -> int:
    """Set and return torch's intra-op thread count for a demo or comparison run.

    ``requested`` wins. Otherwise one thread for the ``tiny`` and ``small`` sizes: their matrices are too small
    for intra-op parallelism to pay (on two lightly loaded cores the demo ran 8 steps per second on two threads,
    monitor included, and bare steps 9-10 per second on one), and when the machine is busy, OpenMP threads that spin waiting for a
    core make them several times slower (0.7-1.3 s per step on two threads against 0.2 s on one). ``medium``
    keeps torch's default (one per core) unless the machine is already busy (1-minute load average at least the
    core count minus one half), then one.
    """
    if requested is not None:
        if requested < 1:
            raise ValueError(f"threads must be positive, got {requested}")
        torch.set_num_threads(requested)
        return requested
    if size in ("tiny", "small"):
        torch.set_num_threads(1)
        return 1
    cores = os.cpu_count() or 1
    try:
        busy = os.getloadavg()[0] >= cores - 0.5
    except (AttributeError, OSError):  # no load average (Windows)
        busy = False
    if busy and torch.get_num_threads() > 1:
        torch.set_num_threads(1)
    return torch.get_num_threads()


def warmup_steps(steps: int) -> int:
    """Linear learning-rate warm-up length: 5% of the run, at least 1 and at most 100 steps."""
    return max(1, min(100, steps // 20))


def demo_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The workload's loss on ``(inputs, targets)``: mean next-token cross-entropy (the probe's ``loss_fn``)."""
    _, loss = model(batch[0], batch[1])
    return loss


def validation_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], chunk: int = 64) -> torch.Tensor:
    """Mean next-token cross-entropy of ``model`` over every token of ``batch`` (the held-out text), as a tensor.

    Evaluated in eval mode under ``torch.no_grad`` in pieces of ``chunk`` sequences, each piece's mean loss
    weighted by its token count, so the result is the mean over all tokens whatever ``chunk`` is; the model's
    training mode is restored. The held-out loss of a language model: what it predicts on text it never trained
    on, the figure to rank optimizers and learning rates by (a training loss also measures memorisation).
    """
    inputs, targets = batch
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=inputs.device)
    try:
        with torch.no_grad():
            for x, y in zip(inputs.split(chunk), targets.split(chunk)):
                _, loss = model(x, y)
                total += loss.double() * y.numel()
    finally:
        model.train(was_training)
    return total / max(targets.numel(), 1)


# ----------------------------------------------------------------------------------------------------------------
# Progress


def _clock(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "--:--"
    seconds = int(round(seconds))
    m, s = divmod(seconds, 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class ProgressBar:
    """A one-line progress bar on a stream (stderr): step, loss, steps per second, time left.

    On a terminal the line is redrawn in place at most ten times a second; on a pipe or a file one line is
    written at the first step and then every 10% (no carriage returns in logs). ``stream=None`` draws nothing.
    """

    def __init__(self, total: int, label: str = "", stream: TextIO | None = sys.stderr, width: int = 24) -> None:
        self.total = max(1, int(total))
        self.label = label
        self.stream = stream
        self.width = width
        self.tty = bool(stream is not None and getattr(stream, "isatty", lambda: False)())
        self.start = time.perf_counter()
        self._last_draw = -math.inf
        self._last_decile = -1
        self.extra = ""

    def needs_draw(self, step: int) -> bool:
        """Whether :meth:`update` at ``step`` would draw (so the caller reads the loss only then)."""
        if self.stream is None:
            return False
        if step >= self.total:
            return True
        if self.tty:
            return time.perf_counter() - self._last_draw >= 0.1
        return step * 10 // self.total > self._last_decile

    def line(self, step: int, loss: float | None) -> str:
        elapsed = time.perf_counter() - self.start
        rate = step / elapsed if elapsed > 0 else math.nan
        left = (self.total - step) / rate if rate > 0 else math.nan
        filled = int(self.width * step / self.total)
        bar = "#" * filled + "." * (self.width - filled)
        loss_text = f"loss {loss:.4f}" if loss is not None and math.isfinite(loss) else "loss -"
        head = f"{self.label} " if self.label else ""
        extra = f" {self.extra}" if self.extra else ""
        return f"{head}[{bar}] {step}/{self.total} {loss_text} {rate:.2f} it/s {_clock(elapsed)}<{_clock(left)}{extra}"

    def update(self, step: int, loss: float | None) -> None:
        if not self.needs_draw(step):
            return
        self._last_draw = time.perf_counter()
        self._last_decile = step * 10 // self.total
        text = self.line(step, loss)
        if self.tty:
            self.stream.write("\r\x1b[2K" + text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.stream is not None and self.tty:
            self.stream.write("\n")
            self.stream.flush()


@contextlib.contextmanager
def _alerts_off_the_terminal(active: bool) -> Iterator[None]:
    """While a progress bar draws, the monitor's alert log lines would break it: hold them (they are in
    alerts.jsonl and the summary)."""
    log = logging.getLogger("heavytail")
    if not active or log.handlers:
        yield
        return
    handler, propagate = logging.NullHandler(), log.propagate
    log.addHandler(handler)
    log.propagate = False
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.propagate = propagate


# ----------------------------------------------------------------------------------------------------------------
# One monitored training run


@dataclass
class TrainedRun:
    """What :func:`train_monitored` did."""

    run_dir: Path
    steps: int
    seconds: float
    losses: list[float]
    """The loss at every step (read from the device after training, one copy)."""
    alerts: list[dict] = field(default_factory=list)
    probe: bool = False
    """Whether the noise probe ran at checkpoints."""
    val_loss: float | None = None
    """:func:`validation_loss` on ``workload.validation`` (all the held-out text) with the final weights; ``None``
    when the workload has no validation windows."""


def train_monitored(
    workload: DemoWorkload,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    steps: int,
    log_dir: str | os.PathLike[str],
    every: int,
    probe: bool = True,
    micro_batches: int = DEFAULT_MICRO_BATCHES,
    accumulate: int = DEFAULT_ACCUMULATE,
    run_name: str | None = None,
    extra: Mapping[str, Any] | None = None,
    progress: TextIO | None = sys.stderr,
    label: str = "",
    config: Mapping[str, Any] | None = None,
) -> TrainedRun:
    """Train ``model`` on ``workload.batches`` for ``steps`` steps with a :class:`~heavytail.Monitor` attached.

    Batch ``t`` is ``workload.batches.get(t)`` (the seed fixes the order), the learning rate warms up linearly
    over :func:`warmup_steps` and then stays constant, and nothing else is done to the gradients (no clipping),
    so the monitor sees the optimizer's raw behaviour. With ``probe`` the monitor runs the noise probe at every
    checkpoint on ``workload.held_out`` split into ``micro_batches`` mini-batches. Each step's batch is split into
    ``accumulate`` micro-batches whose gradients accumulate (the loss divided by ``accumulate``): the same gradient
    as one backward pass, and the two batch sizes the micro-batch noise source and the gradient noise scale
    (``gns/``, in sequences) read. After the last step, the validation loss (:func:`validation_loss` over
    ``workload.validation``, outside the monitor) goes in ``TrainedRun.val_loss``. ``config`` overrides
    :class:`~heavytail.MonitorConfig` fields. The run directory is cleared of a previous run's files first.
    """
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    clear_run_dir(log_dir)
    fields = dict(
        every=every,
        log_dir=log_dir,
        run_name=run_name or log_dir.name,
        extra=dict(extra or {}),
        probe_every=1 if probe else 0,
        batch_size=max(1, workload.batches.batch_size // accumulate),
    )
    fields.update(config or {})
    cfg = MonitorConfig(**fields)
    warm = warmup_steps(steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: min(1.0, (t + 1) / warm))
    bar = ProgressBar(steps, label=label, stream=progress)
    losses = torch.empty(steps)
    alerts: list[dict] = []
    model.train()
    start = time.perf_counter()
    with _alerts_off_the_terminal(progress is not None), Monitor(model, optimizer, config=cfg) as monitor:
        if probe:
            monitor.set_probe(demo_loss, workload.held_out, micro_batches=micro_batches)
        monitor.on_alert(alerts.append)
        for step in range(steps):
            x, y = workload.batches.get(step)
            parts = [(xm, ym) for xm, ym in zip(x.tensor_split(accumulate), y.tensor_split(accumulate)) if len(xm)]
            loss = torch.zeros(())
            for xm, ym in parts:
                _, micro_loss = model(xm, ym)
                (micro_loss / len(parts)).backward()
                monitor.observe_loss(micro_loss)
                loss = loss + micro_loss.detach() / len(parts)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            losses[step] = loss.detach()
            if bar.needs_draw(step + 1):
                bar.extra = f"alerts {len(alerts)}" if alerts else ""
                bar.update(step + 1, float(losses[step]))
    seconds = time.perf_counter() - start
    bar.close()
    losses_list = losses.tolist()  # sync point: once, after training
    val = None
    if workload.validation is not None:
        val = float(validation_loss(model, workload.validation))  # sync point: once, after training
    return TrainedRun(
        run_dir=log_dir,
        steps=steps,
        seconds=seconds,
        losses=losses_list,
        alerts=alerts,
        probe=bool(probe),
        val_loss=val,
    )


# ----------------------------------------------------------------------------------------------------------------
# The demo


@dataclass
class DemoResult:
    """What :func:`run_demo` wrote and found."""

    run_dir: Path
    report: Path
    trained: TrainedRun
    summary: str
    workload: dict[str, Any]


def default_every(steps: int) -> int:
    """Checkpoint interval giving about 20 checkpoints over the run (at least every step, at most every 100)."""
    return max(1, min(100, steps // 20))


def check_run(size: str, steps: int, every: int | None) -> int:
    """Validate a run's size and step budget; returns the checkpoint interval (``default_every`` when None)."""
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose one of {', '.join(SIZES)}")
    if steps < 1:
        raise ValueError(f"steps must be positive, got {steps}")
    every = default_every(steps) if every is None else every
    if every < 1:
        raise ValueError(f"every must be positive, got {every}")
    return every


def run_demo(
    *,
    steps: int = DEFAULT_STEPS,
    out: str | os.PathLike[str] = "heavytail_runs/demo",
    text: str | os.PathLike[str] | None = None,
    seed: int = 0,
    size: str = "small",
    every: int | None = None,
    optimizer: str = "adamw",
    lr: float | None = None,
    probe: bool = True,
    device: str | torch.device = "cpu",
    progress: TextIO | None = sys.stderr,
    threads: int | None = None,
) -> DemoResult:
    """Train the embedded workload (:func:`heavytail.workload.build_demo`) with the monitor on and write the report.

    The run directory is ``out`` (a previous run's files there are replaced) and the report ``out/report.html``.
    ``threads``: torch's intra-op threads (default: :func:`choose_threads`). Returns the paths, the training
    record and the :func:`summary_text` of the run.
    """
    every = check_run(size, steps, every)
    name = optimizer.lower()
    threads = choose_threads(threads, size)
    workload = build_demo(seed=seed, text=text, steps=steps, device=device, size=size)
    lr = DEFAULT_LR.get(name) if lr is None else lr
    opt = make_optimizer(name, workload.model, lr)
    extra = {
        "demo": "heavytail demo",
        "optimizer_name": name,
        "lr": lr,
        "warmup_steps": warmup_steps(steps),
        "seed": seed,
        "torch_threads": threads,
        **{f"workload/{k}": v for k, v in workload.config.items()},
    }
    trained = train_monitored(
        workload,
        workload.model,
        opt,
        steps=steps,
        log_dir=out,
        every=every,
        probe=probe,
        run_name=f"demo-{name}",
        extra=extra,
        progress=progress,
        label=f"{name}",
    )
    run = load_run(out)
    report = write_report(run)
    summary = summary_text(run, trained, workload.config, report=report)
    return DemoResult(run_dir=Path(out), report=report, trained=trained, summary=summary, workload=workload.config)


# ----------------------------------------------------------------------------------------------------------------
# Summary


def summary_text(
    run: Run,
    trained: TrainedRun | None = None,
    workload: Mapping[str, Any] | None = None,
    *,
    report: Path | None = None,
    top: int = 5,
    first_alerts: int = 3,
) -> str:
    """The demo's account of its run: :func:`heavytail.report.summary_text` (what ``heavytail summary`` prints
    for any run) under a first line that says what was trained and how fast."""
    meta = run.meta
    steps = int(run.steps[-1]) if len(run.steps) else 0
    what = f"{meta.get('model', 'model')}"
    if workload:
        what += f" ({workload.get('size', '?')}, {workload.get('n_params', 0):,} parameters)"
    took = f" in {duration(trained.seconds)} ({trained.steps / trained.seconds:.1f} it/s" if trained else ""
    threads = (meta.get("extra") or {}).get("torch_threads")
    if trained:
        took += f", {threads} thread{'s' if threads != 1 else ''})" if threads else ")"
    probe_off = trained is not None and not trained.probe and not run.layers("probe/hill_alpha")
    title = f"{steps} steps of {what} with {meta.get('optimizer', '?')}{took}."
    if trained is not None and trained.val_loss is not None:
        title += f"\nValidation loss (all the held-out text, final weights): {trained.val_loss:.3f}."
    return run_summary_text(
        run,
        title=title,
        status=False,  # printed right after the run closed
        notes=["Noise probe: off (--no-probe)."] if probe_off else (),
        report=report,
        top=top,
        first_alerts=first_alerts,
    )
