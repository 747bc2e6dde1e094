"""Alert rules: turn per-step flags (already on the host) and checkpoint records into alert records."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np
import torch

from heavytail.estimators import spike
from heavytail.estimators.spike import Cooldown, SpikeConfig, SpikeState

SEVERITY = {
    "loss_spike": "warning",
    "grad_spike": "warning",
    "tail_index_drop": "warning",
    "nonfinite_grad": "critical",
    "hidden_spike": "warning",
}

# While a spike rule's event is open, a stream whose z-score was over RISING times the threshold at each of the
# RISING_STEPS previous steps rose into its flag with the event (a drift carries the layer, then the global
# norm, over the threshold a few steps apart: they sit over half the threshold for several steps first) and
# joins it. Any other flag is a new spike and alerts, including a spike whose first step scored just under the
# threshold and whose second step flags: one step over half the threshold is not a rise. Measured with
# benchmarks/spike_detection.py --streams: a drift gives one alert in 99% of runs, and spike recall is unchanged.
RISING = 0.5
RISING_STEPS = 2


class StepFlags(NamedTuple):
    """One step's flag vector: what the step path copies to the host asynchronously for the per-step rules.

    S = 2 + L streams (the loss, the global gradient norm, one gradient norm per layer), L layers. Tensors on the
    device (``pack_step_flags``), numpy arrays on the host (``unpack_step_flags``), except ``detector``: the
    spike detectors' state *before* this step's value, a ``SpikeState`` of tensors either way, from which
    ``spike.compute`` gives the forecast this step was compared with and the value over which it flagged.
    """

    flags: Any  # (S,) the spike detectors' flags (a spike or a slow divergence)
    scores: Any  # (S,) their robust z-scores
    values: Any  # (S,) the values they scored: the loss, the global norm, each layer's norm
    thresholds: Any  # (S,) the z-score over which each stream flagged a spike (calibrated; inf in warm-up)
    drift: Any  # (S,) the flag is a slow divergence (the CUSUM) and not a spike
    detector: SpikeState  # (S,) each: the detectors' state before this step
    nonfinite: Any  # (L,) non-finite gradient entries
    spike_frac: Any  # (L,) fraction of coordinates over the hidden-spike ratio
    ratio_max: Any  # (L,) largest |g| / (sqrt(v_hat) + eps); NaN where not measured


# The flag vector's layout, in order: these stream-sized fields, the detector state's fields (stream-sized), then
# these layer-sized fields. pack_step_flags writes it and unpack_step_flags reads it; nothing else indexes it.
_STREAM_FIELDS = ("flags", "scores", "values", "thresholds", "drift")
_LAYER_FIELDS = ("nonfinite", "spike_frac", "ratio_max")


def flag_vector_size(num_layers: int) -> int:
    """Length of a step's flag vector for ``num_layers`` layers."""
    streams = 2 + num_layers
    return (len(_STREAM_FIELDS) + len(SpikeState._fields)) * streams + len(_LAYER_FIELDS) * num_layers


def pack_step_flags(step: StepFlags) -> torch.Tensor:
    """One float32 vector of a step's flags: one ``torch.cat`` on the device, no host synchronization.

    The detector's ``count`` travels as float32, exact up to 2^24 steps; past that only ``warmed_up`` reads it.
    """
    num_layers = step.nonfinite.numel()
    parts = [
        *(getattr(step, name) for name in _STREAM_FIELDS),
        *step.detector,
        *(getattr(step, name) for name in _LAYER_FIELDS),
    ]
    sizes = [part.numel() for part in parts]  # shapes are host metadata: reading them does not synchronize
    want = [2 + num_layers] * (len(parts) - len(_LAYER_FIELDS)) + [num_layers] * len(_LAYER_FIELDS)
    if sizes != want:
        raise ValueError(f"step flags: field sizes {sizes} do not fit {num_layers} layers (expected {want})")
    return torch.cat([part.reshape(-1).to(torch.float32) for part in parts])


def unpack_step_flags(packed: np.ndarray | torch.Tensor, num_layers: int) -> StepFlags:
    """The fields of a flag vector written by ``pack_step_flags`` (views of ``packed``; host memory only)."""
    packed = np.asarray(packed)
    if packed.shape != (flag_vector_size(num_layers),):
        raise ValueError(
            f"step flags: a vector of {flag_vector_size(num_layers)} values for {num_layers} layers, "
            f"got shape {packed.shape}"
        )
    streams = 2 + num_layers
    offset = 0

    def take(size: int) -> np.ndarray:
        nonlocal offset
        offset += size
        return packed[offset - size : offset]

    head = {name: take(streams) for name in _STREAM_FIELDS}
    state = {name: torch.from_numpy(take(streams)) for name in SpikeState._fields}
    state["count"] = state["count"].to(torch.int64)
    state["log_domain"] = state["log_domain"] > 0.5
    tail = {name: take(num_layers) for name in _LAYER_FIELDS}
    return StepFlags(detector=SpikeState(**state), **head, **tail)


class AlertEngine:
    """Applies the configured rules so that one event is one alert, stating what was observed and expected.

    Each rule watches a set of streams (the loss; the global and per-layer gradient norms; per-layer non-finite
    counts, hidden-spike fractions and tail indices). A step's flags over a rule's streams produce at most one
    alert, naming the stream that scored highest and listing the others, so a spike that hits every layer of a
    model is one alert, not a hundred. A stream that flagged within ``alert_cooldown`` steps does not alert
    again, so a spike lasting several steps, or a shift flagged for a while, is one alert.

    For the loss and gradient-norm spikes an event also spans streams: it lasts until none of the rule's streams
    has flagged for ``alert_cooldown`` steps, and a stream that rises into its flag while it is open (z-score
    over ``RISING`` times the threshold at each of the ``RISING_STEPS`` previous steps) joins it without a new
    alert. So a drift that carries one layer, then its bias, then the global norm over the threshold a few steps
    apart is one alert, while a stream that jumps to its flag from a quiet step is a new spike and alerts.
    """

    def __init__(self, config: Any, log_dir: Path, emit: Callable[[dict], None], warmup: int = 100) -> None:
        self.rules = set(config.alerts)
        self.cooldown_steps = int(config.alert_cooldown)
        self.tail_threshold = float(config.tail_alpha_threshold)
        self.hidden_frac = float(config.hidden_spike_frac)
        self.hidden_spike_cut = float(config.spike_threshold)  # the r^2 cut of a hidden spike
        # With skip_spikes, a spike (not a drift) on the loss or the global norm undid the step's update.
        self.skip_spikes = bool(getattr(config, "skip_spikes", False))
        self.log_dir = Path(log_dir)
        self._emit = emit
        # Early steps have a denominator built from very few gradients (at step 2, v_hat is g_1^2 alone), so
        # every ratio is large: hidden spikes are judged only once the detectors are warm too.
        self.warmup = int(warmup)
        self._cooldowns: dict[str, Cooldown] = {}
        # The last RISING_STEPS steps' z-scores, by step: whether a stream rose into its flag or jumped.
        self._scores: dict[int, np.ndarray] = {}
        self.count = 0

    @staticmethod
    def pack_flags(**fields: Any) -> torch.Tensor:
        """``pack_step_flags(StepFlags(**fields))``: the step path's flag vector, in the layout this engine reads."""
        return pack_step_flags(StepFlags(**fields))

    def _cooldown(self, rule: str, num_streams: int) -> Cooldown:
        cooldown = self._cooldowns.get(rule)
        if cooldown is None or cooldown.num_streams != num_streams:
            cooldown = self._cooldowns[rule] = Cooldown(num_streams, self.cooldown_steps)
        return cooldown

    def _fire(self, rule: str, step: int, metric: str, layer: str | None, fields: dict, message: str, layers) -> None:
        self.count += 1
        alert = {
            "step": int(step),
            "wall_time": time.time(),
            "rule": rule,
            "severity": SEVERITY[rule],
            "metric": metric,
            "layer": layer,
            **{key: float(value) for key, value in fields.items()},
            "message": message,
            "layers": list(layers),
            "flight_record": f"flight/{int(step):06d}_{rule}.json",
        }
        self._emit(alert)

    def _rule(
        self,
        rule: str,
        step: int,
        flags: np.ndarray,
        scores: np.ndarray,
        names: Sequence[str],
        metric: str,
        fields: Callable[[int], dict],
        describe: Callable[[str, dict], str],
        joins: np.ndarray | None = None,
        prefer_first: bool = False,
    ) -> None:
        """One rule on one step's flags. ``fields(i)`` gives the record's numbers for stream i: ``value``,
        ``threshold`` (the rule's own threshold), ``expected``, ``value_threshold`` (where the rule fires, in
        the value's units), and any the rule adds. ``joins[i]``: stream i's flag joins an open event of the rule
        (without ``joins``, each stream alerts on its own cooldown)."""
        if rule not in self.rules:
            return
        cooldown = self._cooldown(rule, len(flags))
        if not flags.any():  # the usual step: nothing to alert, the cooldowns only learn the step (no Python loop)
            cooldown.quiet(step)
            return
        last = cooldown.last_flag
        new = np.asarray(cooldown([bool(f) for f in flags], step=step))
        if joins is not None and last is not None and step - last <= self.cooldown_steps:  # an open event
            new &= ~joins
        if not new.any():
            return
        order = [i for i in np.argsort(-np.nan_to_num(scores, nan=-np.inf), kind="stable") if new[i]]
        if prefer_first and new[0]:  # a global stream that flagged heads the alert; the layers follow
            order = [0] + [i for i in order if i != 0]
        top = order[0]
        numbers = fields(top)
        message = describe(names[top], numbers)
        others = [names[i] for i in order[1:]]
        if others:
            shown = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
            message += f"; also {shown}"
        layer = names[top] if names[top] not in ("loss", "global") else None
        self._fire(
            rule,
            step,
            metric if layer is None else f"{metric}/{layer}",
            layer,
            numbers,
            message,
            [names[i] for i in order],
        )

    def process_step_flags(
        self, step: int, packed: np.ndarray, names: Sequence[str], spike_config: SpikeConfig
    ) -> None:
        """Rules on one step's flag vector (written by ``pack_step_flags`` on the step path)."""
        f = unpack_step_flags(packed, len(names))
        flags = f.flags > 0.5
        drift = f.drift > 0.5
        thresholds = np.asarray(f.thresholds, dtype=np.float64)
        rising = np.ones(len(flags), dtype=bool)
        for back in range(1, RISING_STEPS + 1):  # a step not seen (a restart without state) counts as quiet
            before = self._scores.get(step - back)
            if before is None or len(before) != len(flags):
                rising[:] = False
            else:
                rising &= before > RISING * thresholds
        self._scores = {s: z for s, z in self._scores.items() if s > step - RISING_STEPS}
        self._scores[int(step)] = np.array(f.scores, dtype=np.float64)
        skipped = self.skip_spikes and bool((flags[:2] & ~drift[:2]).any())
        forecast: list[np.ndarray] = []  # expected and upper, computed on the host only on a step that alerts

        def spike_fields(i: int) -> dict:
            if not forecast:  # the detectors' state before this step gives what the step was compared with
                summary = spike.compute(f.detector, spike_config, threshold=torch.from_numpy(f.thresholds.copy()))
                forecast.extend((summary.baseline.numpy(), summary.upper.numpy()))  # sync point: none, host data
            return {
                "value": f.values[i],
                "threshold": thresholds[i],
                "expected": forecast[0][i],
                "value_threshold": forecast[1][i],
                "z": f.scores[i],
                "z_threshold": thresholds[i],
                "drift": float(drift[i]),
                "skipped_step": float(skipped),
            }

        margin = f"{spike_config.rtol:.0%}" + (f" + {spike_config.atol:g}" if spike_config.atol else "")
        how = (
            f"calibrated to {spike_config.false_alarm_rate:g} false alarms per step"
            if spike_config.calibrated
            else "fixed"
        )

        def describe_spike(subject: str, n: dict) -> str:
            if n["drift"]:
                text = (
                    f"{subject} at step {step}: slow divergence, observed {n['value']:.4g}, expected "
                    f"{n['expected']:.4g} (the detector's forecast): the values have stayed above their slow level for "
                    f"several steps (a CUSUM over its limit, {how}), and this value and the previous one are both "
                    f"{margin} over the forecast where the rise began"
                )
            else:
                text = (
                    f"{subject} at step {step}: observed {n['value']:.4g}, expected {n['expected']:.4g} (the "
                    f"detector's forecast), threshold {n['value_threshold']:.4g} (z = {n['z']:.1f} robust standard "
                    f"deviations above the forecast; the rule fires above z = {n['z_threshold']:.3g}, {how}, and "
                    f"{margin} over the forecast)"
                )
            return text + ("; the step's update was skipped (skip_spikes)" if n["skipped_step"] else "")

        self._rule(
            "loss_spike",
            step,
            flags[:1],
            f.scores[:1],
            ["loss"],
            "loss",
            spike_fields,
            lambda n, v: describe_spike("loss spike", v),
            joins=rising[:1],
        )
        self._rule(
            "grad_spike",
            step,
            flags[1:],
            f.scores[1:],
            ["global", *names],
            "grad/norm",
            lambda i: spike_fields(i + 1),
            lambda n, v: describe_spike("gradient norm spike" if n == "global" else f"gradient norm spike in {n}", v),
            joins=rising[1:],
            prefer_first=True,
        )

        nonfinite = f.nonfinite
        self._rule(
            "nonfinite_grad",
            step,
            nonfinite > 0,
            nonfinite,
            list(names),
            "grad/nonfinite_count",
            lambda i: {"value": nonfinite[i], "threshold": 0.0, "expected": 0.0, "value_threshold": 0.0},
            lambda n, v: (
                f"{int(v['value'])} non-finite gradient entries in {n} at step {step}: observed {int(v['value'])}, "
                f"expected 0, threshold 0 (any is an alert); excluded from the statistics"
            ),
        )
        hidden = (np.nan_to_num(f.spike_frac, nan=0.0) > self.hidden_frac) & (step > self.warmup)
        ratio_max = np.nan_to_num(f.ratio_max, nan=0.0)
        ratio = math.sqrt(self.hidden_spike_cut)
        self._rule(
            "hidden_spike",
            step,
            hidden,
            ratio_max,
            list(names),
            "adam/spike_frac",
            lambda i: {
                "value": f.spike_frac[i],
                "threshold": self.hidden_frac,
                "expected": self.hidden_frac,
                "value_threshold": self.hidden_frac,
                "ratio_max": ratio_max[i],
            },
            lambda n, v: (
                f"hidden spike in {n} at step {step}: observed {v['value']:.4g} of the coordinates with |g| over "
                f"{ratio:.0f}x AdamW's running RMS (max ratio {v['ratio_max']:.1f}), expected at most "
                f"{self.hidden_frac:.4g}, threshold {self.hidden_frac:.4g}: the denominator will absorb this "
                f"gradient and damp the following updates"
            ),
        )

    def process_record(self, step: int, metrics: dict[str, float], names: Sequence[str]) -> None:
        """Rules on a checkpoint record: a layer's tail index under the threshold."""
        alphas = np.array([metrics.get(f"grad/hill_alpha/{n}", math.nan) for n in names], dtype=np.float64)
        ses = np.array([metrics.get(f"grad/hill_alpha_se/{n}", math.nan) for n in names], dtype=np.float64)
        ses = np.nan_to_num(ses, nan=0.0)
        # Confident drops only: the estimate plus two standard errors is still under the threshold (one-sided
        # 97.7%), so a small tensor's noisy estimate does not raise a false alarm.
        with np.errstate(over="ignore", invalid="ignore"):  # inf alpha (no power-law tail) is simply no drop
            upper = np.nan_to_num(alphas + 2.0 * ses, nan=np.inf)
        low = upper < self.tail_threshold
        self._rule(
            "tail_index_drop",
            step,
            low,
            -np.nan_to_num(alphas, nan=np.inf),
            list(names),
            "grad/hill_alpha",
            lambda i: {
                "value": alphas[i],
                "threshold": self.tail_threshold,
                "expected": self.tail_threshold,
                "value_threshold": self.tail_threshold - 2.0 * ses[i],
                "se": ses[i],
            },
            lambda n, v: (
                f"tail index of {n}'s gradient at step {step}: observed {v['value']:.4g} (standard error "
                f"{v['se']:.2g}), expected at least {self.tail_threshold:.4g} (finite variance), threshold "
                f"{v['value_threshold']:.4g} ({self.tail_threshold:g} minus two standard errors): infinite variance"
            ),
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "cooldowns": {k: c.state_dict() for k, c in self._cooldowns.items()},
            "scores": [{"step": step, "values": z.tolist()} for step, z in self._scores.items()],  # sync point: none
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.count = int(state.get("count", 0))
        self._cooldowns = {}
        for rule, saved in state.get("cooldowns", {}).items():
            cooldown = Cooldown(len(saved["last_flag"]), int(saved["steps"]))
            cooldown.load_state_dict(saved)
            self._cooldowns[rule] = cooldown
        self._scores = {int(s["step"]): np.array(s["values"], dtype=np.float64) for s in state.get("scores", [])}
