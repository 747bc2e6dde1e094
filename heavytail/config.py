"""The monitor's one configuration object, validated when it is built."""

from __future__ import annotations

import dataclasses
import numbers
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

ALERT_RULES = ("loss_spike", "grad_spike", "tail_index_drop", "nonfinite_grad", "hidden_spike")


@dataclass(kw_only=True)
class MonitorConfig:
    """Everything a :class:`heavytail.Monitor` can be told. Every field has a default that is safe to leave on."""

    every: int = 100
    """Optimizer steps per checkpoint. Statistics stream on the device every step; every ``every`` steps they are
    aggregated, copied to the host once and written as one record."""

    log_dir: str | Path | None = None
    """Run directory. ``None`` means ``heavytail_runs/<timestamp>`` in the working directory."""

    backends: Sequence[Any] = ("jsonl",)
    """Backend names (``jsonl``, ``tensorboard``, ``wandb``, ``console``) or objects with ``log``/``close``.
    ``jsonl`` is always added: it is the record of the run."""

    include: Sequence[Any] | None = None
    """Parameters to watch: name globs (``"blocks.*.attn.*"``), regexes (``"re:...*weight$"``) or module types
    (``torch.nn.Linear``). ``None`` watches every trainable parameter."""

    exclude: Sequence[Any] | None = None
    """Parameters not to watch, in the same forms as ``include``; applied after it."""

    group_by: Any = None
    """Aggregate tensors into groups for very large models: a regex whose first match in a parameter name is the
    group (``r"blocks\\.\\d+"``: one set of keys per block) or a callable from name to group. Groups merge
    exactly (power sums add, tops merge); ``None`` reports every tensor."""

    resume: bool = False
    """Continue the run already in ``log_dir``: its records are kept and the step count goes on from its last
    record (or from the state given to ``Monitor.load_state_dict``). The integrations set it when their trainer
    resumes from a checkpoint."""

    overwrite: bool = False
    """Replace the run already in ``log_dir``: its records, alerts, flight records, ``meta.json`` and report are
    removed at attach (other files in the directory stay). Without ``resume`` or ``overwrite``, a ``log_dir``
    that already holds a run is refused at attach, so two runs never mix in one record."""

    run_name: str | None = None
    """A name for the run in backends and reports. Defaults to the run directory's name."""

    sample_size: int = 256
    """Coordinates sampled per tensor (fixed at attach, seeded) for the noise tail, the shadow denominators, the
    ratio quantiles and the denominator memory. Memory: a few floats per sampled coordinate."""

    sample_budget: int | None = 1 << 16
    """Total sampled coordinates over all watched tensors. With more than ``sample_budget // sample_size``
    tensors (256 at the defaults) each tensor keeps ``max(8, sample_budget // tensors)`` coordinates instead of
    ``sample_size``, so the sample estimators' step cost and memory stay bounded whatever the tensor count (a
    mixture-of-experts model of 10,000 tensors costs what one of 256 does). The count in use is
    ``Monitor.sample_size`` and ``sample_size`` in ``meta.json``. ``None``: ``sample_size`` for every tensor."""

    noise_window: int = 16
    """Steps of sampled noise kept on the device (a ring buffer), and the window each coordinate's deviations are
    standardised over: each time the ring fills, its ``sample_size * noise_window`` deviations per tensor are
    folded into a tally, and the noise tail index at a checkpoint is read from every window folded since the
    previous one (the ring as it stands when none was)."""

    noise_beta: float = 0.9
    """EMA coefficient of the per-coordinate running mean that temporal noise deviations are taken against."""

    ratio_warmup: int = 10
    """Steps a tensor's optimizer second moment must have averaged before its denominator ratios count
    (``adam/ratio_max``, ``adam/ratio_p99``, ``adam/spike_frac``, ``adam/memory_*``; a shadow denominator's
    ``shadow*/`` figures likewise count from its own ``ratio_warmup``-th gradient). At step 2 AdamW's
    sqrt(v_hat) is one earlier gradient's magnitude, so the ratio is a ratio of two independent gradients: over
    a million coordinates its maximum reads 1e4-1e5 on any healthy run. After 10 gradients a Gaussian
    coordinate's ratio follows a Student-t with 10 degrees of freedom, whose largest of 10^6 draws is about 10
    (the long-run value is about 5; with 2 gradients it is about 1,000). Counted by the optimizer's own step counter, so a resumed run is warm. 0
    or 1: no warm-up."""

    spike_threshold: float = 5000.0
    """A coordinate is a hidden spike when (g / (sqrt(v_hat) + eps))^2 exceeds this (SPAM's 5000)."""

    memory_inflation: float = 1.5
    """Denominator memory: an episode opened by a large-gradient event lasts while sqrt(v_hat) stays above this
    multiple of its pre-event value."""

    memory_window: int = 0
    """Denominator memory: s, the number of steps before and after an event over which ``*/memory_damping``
    compares the update per unit of gradient (sum |delta p| / sum |g| on the event's coordinate); 16 is a good
    value. 0 (the default) turns the damping windows off (no ``memory_damping`` keys): they cost about 1 ms of
    CPU per step on a small GPT (about 40 small elementwise operations on the sampled coordinates) and a ring of
    2s steps of the sampled coordinates, 1.5% of the parameter bytes on GPT-2 124M (docs/metrics.md)."""

    shadow_betas: Sequence[float] = (0.999, 0.95)
    """beta2 values of the shadow denominators (an EMA of g^2 on the sampled coordinates): what AdamW's
    denominator would have done with the same gradients, for every optimizer."""

    hill_plot_unit: str | None = None
    """The unit (a tensor's name, or a ``group_by`` group) whose Hill plot (alpha against k, the chosen k marked)
    is written at each checkpoint to ``hill_plot.jsonl`` in the run directory and drawn in the report; None: the
    unit with the lowest ``grad/hill_alpha`` at that checkpoint. An unknown name is an error at attach."""

    min_tail_samples: int = 1000
    """Tensors (or groups) with fewer entries get no tail index (null). With a few hundred entries the estimator
    has only a dozen order statistics to work with and its error bar is as wide as the estimate itself; such
    tensors (norm gains, biases) can still be watched together with ``group_by``."""

    tail_top_max: int = 1 << 15
    """At most this many top order statistics per tensor are taken at a checkpoint for the tail index."""

    seed: int = 0
    """Seed of the coordinate sample."""

    stats_dtype: torch.dtype = torch.float64
    """Accumulation dtype of the power sums (float64 keeps kurtosis exact; float32 halves the traffic)."""

    kernel: str = "auto"
    """The per-step gradient pass: ``"triton"`` (fused multi-tensor kernels, CUDA), ``"cpu"`` (one fused C kernel
    over every tensor, compiled on first use with the system's C compiler), ``"torch"`` (the packed reference, any
    device) or ``"auto"`` (Triton on CUDA when it is installed, the C kernel on the CPU when a compiler is there,
    else torch). All give the same figures (docs/performance.md). The same choice runs the sample estimators (the
    denominator memory, shadow denominators, temporal noise and update ratios) as one C or Triton kernel call per
    step, with a float64 ``stats_dtype``; ``"torch"`` keeps the torch code, their reference, everywhere."""

    chunk_numel: int = 1 << 23
    """Gradients are reduced in packed chunks of at most this many entries: the temporary memory bound."""

    flight_steps: int = 32
    """Steps of compact per-layer statistics kept in the device ring buffer that every alert carries."""

    alerts: Sequence[str] = ALERT_RULES
    """Alert rules that are on."""

    alert_cooldown: int = 50
    """Steps during which a rule does not fire again: for the same metric (``nonfinite_grad``, ``hidden_spike``,
    ``tail_index_drop``), or, for ``loss_spike`` and ``grad_spike``, for an event already open on any of the rule's
    streams (docs/alerts.md, "One event, one alert"). One event, one alert."""

    tail_alpha_threshold: float = 2.0
    """``tail_index_drop`` fires when a layer's Hill alpha is under this (2: infinite variance) by more than
    two standard errors, so a small layer's noisy estimate does not raise a false alarm."""

    hidden_spike_frac: float = 0.0
    """``hidden_spike`` fires when the fraction of a layer's coordinates over ``spike_threshold`` exceeds this."""

    false_alarm_rate: float = 1e-4
    """False spike flags per step and stream the loss/gradient-norm detectors aim at (1e-4: about one false alert
    per 10,000 steps per stream). Each stream's threshold is calibrated to it from the tail of its own forecast
    errors (peaks over threshold, SPOT; docs/spike-detection.md); it also sets the slow-divergence rule's limit."""

    spike_z: float | None = None
    """A fixed robust z-score over which the loss/gradient-norm detectors flag a spike, in place of the threshold
    calibrated to ``false_alarm_rate`` (``None``: calibrated)."""

    spike_warmup: int | None = None
    """Steps before the spike detectors may flag (``None``: the detector's default, 50)."""

    skip_spikes: bool = False
    """Undo the optimizer step, on the device and with no synchronization, when the loss or global-norm detector
    flags a spike at that step (never during warm-up; a slow divergence does not skip). Costs a copy of the
    parameters and optimizer state; skipped steps are counted in ``spikes/skipped_steps`` and in the alerts."""

    track_preclip: bool = True
    """Also measure gradient norms at the end of each backward pass, before clipping and unscaling."""

    track_gns: bool = True
    """Measure the gradient noise scale (``gns/`` keys): the first micro-batch's squared norms under gradient
    accumulation, each rank's under DDP (one extra read of the gradients per step). One process without
    accumulation has no small batch to compare and records none."""

    gns_beta: float = 0.99
    """EMA coefficient of the noise scale's two estimates, |G|^2 and tr(Sigma) (the n-th step enters with weight
    ``max(1 - gns_beta, 1/n)``, so the first steps form a running mean); 1 keeps the running mean of every step."""

    batch_size: int | None = None
    """Examples in one backward pass on one rank (one micro-batch), if the user declares it: ``gns/b_simple`` and
    ``gns/b_robust`` are then in examples (``gns/trace_sigma`` per example); ``None``: in micro-batches."""

    probe_every: int = 0
    """Run the noise probe (many mini-batch gradients of a held batch) every this many checkpoints; 0 is off."""

    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form metadata written into ``meta.json`` (hyper-parameters, the trainer's name, ...)."""

    def __post_init__(self) -> None:
        positive_ints = (
            "every",
            "sample_size",
            "noise_window",
            "min_tail_samples",
            "tail_top_max",
            "chunk_numel",
            "flight_steps",
        )
        for name in positive_ints:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"MonitorConfig.{name} must be a positive integer, got {value!r}")
        if self.sample_budget is not None and (
            isinstance(self.sample_budget, bool) or not isinstance(self.sample_budget, int) or self.sample_budget <= 0
        ):
            raise ValueError(
                f"MonitorConfig.sample_budget must be a positive integer or None, got {self.sample_budget!r}"
            )
        for name in ("alert_cooldown", "probe_every", "ratio_warmup", "memory_window"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"MonitorConfig.{name} must be a non-negative integer, got {value!r}")
        # Type checks first, so a wrong type is an error naming the field, never a bare TypeError from a comparison.
        for name in ("noise_beta", "memory_inflation", "spike_threshold", "tail_alpha_threshold", "hidden_spike_frac"):
            _require_real(name, getattr(self, name))
        if self.log_dir is not None and not isinstance(self.log_dir, (str, os.PathLike)):
            raise ValueError(f"MonitorConfig.log_dir must be a path (str or os.PathLike) or None, got {self.log_dir!r}")
        if self.hill_plot_unit is not None and not isinstance(self.hill_plot_unit, str):
            raise ValueError(f"MonitorConfig.hill_plot_unit must be a unit name or None, got {self.hill_plot_unit!r}")
        if self.run_name is not None and not isinstance(self.run_name, str):
            raise ValueError(f"MonitorConfig.run_name must be a string or None, got {self.run_name!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"MonitorConfig.seed must be an integer, got {self.seed!r}")
        if self.spike_z is not None:
            _require_real("spike_z", self.spike_z)
            if not self.spike_z > 0:
                raise ValueError(f"MonitorConfig.spike_z must be positive or None, got {self.spike_z!r}")
        if self.spike_warmup is not None and (
            isinstance(self.spike_warmup, bool) or not isinstance(self.spike_warmup, int) or self.spike_warmup < 2
        ):
            raise ValueError(f"MonitorConfig.spike_warmup must be an integer >= 2 or None, got {self.spike_warmup!r}")
        _require_real("false_alarm_rate", self.false_alarm_rate)
        if not 0.0 < self.false_alarm_rate < 1.0:
            raise ValueError(f"MonitorConfig.false_alarm_rate must be in (0, 1), got {self.false_alarm_rate!r}")
        for name in ("track_preclip", "track_gns", "resume", "overwrite", "skip_spikes"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"MonitorConfig.{name} must be True or False, got {getattr(self, name)!r}")
        if self.resume and self.overwrite:
            raise ValueError(
                "MonitorConfig.resume and MonitorConfig.overwrite: choose one (continue the run in "
                "log_dir, or replace it)"
            )
        if not isinstance(self.extra, dict):
            raise ValueError(f"MonitorConfig.extra must be a dict, got {self.extra!r}")
        _require_real("gns_beta", self.gns_beta)
        if not 0.0 <= self.gns_beta <= 1.0:
            raise ValueError(f"MonitorConfig.gns_beta must be in [0, 1], got {self.gns_beta!r}")
        if self.batch_size is not None and (
            isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size <= 0
        ):
            raise ValueError(f"MonitorConfig.batch_size must be a positive integer or None, got {self.batch_size!r}")
        if not 0.0 <= self.noise_beta < 1.0:
            raise ValueError(f"MonitorConfig.noise_beta must be in [0, 1), got {self.noise_beta!r}")
        if not self.memory_inflation > 1.0:
            raise ValueError(f"MonitorConfig.memory_inflation must be greater than 1, got {self.memory_inflation!r}")
        if not self.spike_threshold > 0:
            raise ValueError(f"MonitorConfig.spike_threshold must be positive, got {self.spike_threshold!r}")
        if not self.tail_alpha_threshold > 0:
            raise ValueError(f"MonitorConfig.tail_alpha_threshold must be positive, got {self.tail_alpha_threshold!r}")
        if not 0.0 <= self.hidden_spike_frac < 1.0:
            raise ValueError(f"MonitorConfig.hidden_spike_frac must be in [0, 1), got {self.hidden_spike_frac!r}")
        if isinstance(self.shadow_betas, numbers.Real):
            self.shadow_betas = (self.shadow_betas,)
        if not isinstance(self.shadow_betas, Sequence) or any(
            isinstance(b, bool) or not isinstance(b, numbers.Real) for b in self.shadow_betas
        ):
            raise ValueError(f"MonitorConfig.shadow_betas must be a sequence of numbers, got {self.shadow_betas!r}")
        self.shadow_betas = tuple(float(b) for b in self.shadow_betas)
        if any(not 0.0 < b < 1.0 for b in self.shadow_betas):
            raise ValueError(f"MonitorConfig.shadow_betas must lie in (0, 1), got {self.shadow_betas!r}")
        if isinstance(self.backends, (str, bytes)) or not isinstance(self.backends, Sequence):
            self.backends = (self.backends,)
        self.backends = tuple(self.backends)
        if isinstance(self.alerts, str):
            self.alerts = (self.alerts,)
        if not isinstance(self.alerts, Sequence):
            raise ValueError(f"MonitorConfig.alerts must be a sequence of rule names, got {self.alerts!r}")
        self.alerts = tuple(self.alerts)
        unknown = [a for a in self.alerts if a not in ALERT_RULES]
        if unknown:
            raise ValueError(
                f"MonitorConfig.alerts: unknown rule {unknown[0]!r}; known rules are {', '.join(ALERT_RULES)}"
            )
        for name in ("include", "exclude"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, (str, type)) or not isinstance(value, Sequence)):
                setattr(self, name, (value,))
            for pattern in getattr(self, name) or ():
                if not isinstance(pattern, (str, re.Pattern, type)):
                    raise TypeError(
                        f"MonitorConfig.{name}: a pattern must be a glob string, 're:<regex>', a compiled "
                        f"regex or a module type, got {pattern!r}"
                    )
                if isinstance(pattern, str) and pattern.startswith("re:"):
                    try:
                        re.compile(pattern[3:])
                    except re.error as exc:
                        raise ValueError(f"MonitorConfig.{name}: invalid regex {pattern!r}: {exc}") from None
        if self.kernel not in ("auto", "torch", "triton", "cpu"):
            raise ValueError(f"MonitorConfig.kernel must be 'auto', 'torch', 'triton' or 'cpu', got {self.kernel!r}")
        if self.group_by is not None and not callable(self.group_by):
            if not isinstance(self.group_by, str):
                raise ValueError(
                    f"MonitorConfig.group_by must be a regex string, a callable or None, got {self.group_by!r}"
                )
            try:
                re.compile(self.group_by)
            except re.error as exc:
                raise ValueError(f"MonitorConfig.group_by: invalid regex {self.group_by!r}: {exc}") from None
        if self.stats_dtype not in (torch.float32, torch.float64):
            raise ValueError(
                f"MonitorConfig.stats_dtype must be torch.float32 or torch.float64, got {self.stats_dtype!r}"
            )

    @classmethod
    def from_arguments(cls, config: "MonitorConfig | None" = None, **overrides: Any) -> "MonitorConfig":
        """``config`` with ``overrides`` applied (a new, validated object), or a config from ``overrides`` alone."""
        if config is None:
            return cls(**overrides)
        return cls(**{**config.to_init_dict(), **overrides}) if overrides else config

    def to_init_dict(self) -> dict[str, Any]:
        """The fields as given, to build a modified copy: ``MonitorConfig(**{**cfg.to_init_dict(), "every": 10})``."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly view (types and objects become their names)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            out[f.name] = _jsonable(getattr(self, f.name))
        return out


def _require_real(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"MonitorConfig.{name} must be a number, got {value!r}")


def _jsonable(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, type):
        return f"{value.__module__}.{value.__qualname__}"
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.dtype):
        return str(value)
    return type(value).__name__
