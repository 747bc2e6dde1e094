"""Alert rules: turn per-step flags (already on the host) and checkpoint records into alert records."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from heavytail.estimators.spike import Cooldown

SEVERITY = {
    "loss_spike": "warning",
    "grad_spike": "warning",
    "tail_index_drop": "warning",
    "nonfinite_grad": "critical",
    "hidden_spike": "warning",
}


class AlertEngine:
    """Applies the configured rules, with a per-rule, per-stream cooldown so one event is one alert.

    Each rule watches a set of streams (the loss; the global and per-layer gradient norms; per-layer non-finite
    counts, hidden-spike fractions and tail indices). A step's flags over a rule's streams produce at most one
    alert, naming the stream that scored highest and listing the others, so a spike that hits every layer of a
    model is one alert, not a hundred. A stream that flagged within ``alert_cooldown`` steps does not alert again.
    """

    def __init__(self, config: Any, log_dir: Path, emit: Callable[[dict], None], warmup: int = 100) -> None:
        self.rules = set(config.alerts)
        self.cooldown_steps = int(config.alert_cooldown)
        self.tail_threshold = float(config.tail_alpha_threshold)
        self.hidden_frac = float(config.hidden_spike_frac)
        self.spike_threshold = float(config.spike_threshold)
        self.log_dir = Path(log_dir)
        self._emit = emit
        # Early steps have a denominator built from very few gradients (at step 2, v_hat is g_1^2 alone), so
        # every ratio is large: hidden spikes are judged only once the detectors are warm too.
        self.warmup = int(warmup)
        self._cooldowns: dict[str, Cooldown] = {}
        self.count = 0

    def _cooldown(self, rule: str, num_streams: int) -> Cooldown:
        cooldown = self._cooldowns.get(rule)
        if cooldown is None or cooldown.num_streams != num_streams:
            cooldown = self._cooldowns[rule] = Cooldown(num_streams, self.cooldown_steps)
        return cooldown

    def _new(self, rule: str, flags: Sequence[bool], step: int) -> list[bool]:
        return self._cooldown(rule, len(flags))(list(flags), step=step)

    def _fire(
        self,
        rule: str,
        step: int,
        metric: str,
        layer: str | None,
        value: float,
        threshold: float,
        message: str,
        layers: Sequence[str] = (),
    ) -> None:
        self.count += 1
        alert = {
            "step": int(step),
            "wall_time": time.time(),
            "rule": rule,
            "severity": SEVERITY[rule],
            "metric": metric,
            "layer": layer,
            "value": float(value),
            "threshold": float(threshold),
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
        values: np.ndarray,
        names: Sequence[str],
        metric: str,
        threshold: float,
        describe: Callable[[str, float, float], str],
        prefer_first: bool = False,
    ) -> None:
        if rule not in self.rules:
            return
        if not flags.any():  # the usual step: nothing to alert, the cooldowns only learn the step (no Python loop)
            self._cooldown(rule, len(flags)).quiet(step)
            return
        new = np.asarray(self._new(rule, [bool(f) for f in flags], step))
        if not new.any():
            return
        order = [i for i in np.argsort(-np.nan_to_num(scores, nan=-np.inf), kind="stable") if new[i]]
        if prefer_first and new[0]:  # a global stream that flagged heads the alert; the layers follow
            order = [0] + [i for i in order if i != 0]
        top = order[0]
        others = [names[i] for i in order[1:]]
        message = describe(names[top], float(values[top]), float(scores[top]))
        if others:
            shown = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
            message += f"; also {shown}"
        layer = names[top] if names[top] not in ("loss", "global") else None
        self._fire(
            rule,
            step,
            metric if layer is None else f"{metric}/{layer}",
            layer,
            values[top],
            threshold,
            message,
            [names[i] for i in order],
        )

    def process_step_flags(self, step: int, packed: np.ndarray, names: Sequence[str], z_threshold: float) -> None:
        """Rules on one step's flag vector (the layout written by ``Monitor._stream_step``)."""
        num_layers = len(names)
        streams = 2 + num_layers
        flags = packed[:streams] > 0.5
        scores = packed[streams : 2 * streams]
        values = packed[2 * streams : 3 * streams]
        rest = packed[3 * streams :]
        nonfinite = rest[:num_layers]
        spike_frac = rest[num_layers : 2 * num_layers]
        ratio_max = rest[2 * num_layers : 3 * num_layers]

        self._rule(
            "loss_spike",
            step,
            flags[:1],
            scores[:1],
            values[:1],
            ["loss"],
            "loss",
            z_threshold,
            lambda n, v, s: f"loss {v:.4g} at step {step} is {s:.1f} robust standard deviations above its recent level",
        )
        self._rule(
            "grad_spike",
            step,
            flags[1:],
            scores[1:],
            values[1:],
            ["global", *names],
            "grad/norm",
            z_threshold,
            lambda n, v, s: (
                (f"gradient norm {v:.4g} at step {step} is {s:.1f} robust standard deviations above its recent level")
                if n == "global"
                else (
                    f"gradient norm of {n} ({v:.4g}) at step {step} is {s:.1f} robust standard deviations above "
                    f"its recent level"
                )
            ),
            prefer_first=True,
        )
        self._rule(
            "nonfinite_grad",
            step,
            nonfinite > 0,
            nonfinite,
            nonfinite,
            list(names),
            "grad/nonfinite_count",
            0.0,
            lambda n, v, s: (
                f"{int(v)} non-finite gradient entries in {n} at step {step} (excluded from the statistics)"
            ),
        )
        hidden = (np.nan_to_num(spike_frac, nan=0.0) > self.hidden_frac) & (step > self.warmup)
        ratio = math.sqrt(self.spike_threshold)
        self._rule(
            "hidden_spike",
            step,
            hidden,
            np.nan_to_num(ratio_max, nan=0.0),
            spike_frac,
            list(names),
            "adam/spike_frac",
            self.hidden_frac,
            lambda n, v, s: (
                f"{v:.3g} of the coordinates of {n} have |g| over {ratio:.0f}x AdamW's running "
                f"RMS at step {step} (max ratio {s:.1f}): the denominator will absorb this gradient "
                f"and damp the following updates"
            ),
        )

    def process_record(self, step: int, metrics: dict[str, float], names: Sequence[str]) -> None:
        """Rules on a checkpoint record: a layer's tail index under the threshold."""
        alphas = np.array([metrics.get(f"grad/hill_alpha/{n}", math.nan) for n in names], dtype=np.float64)
        ses = np.array([metrics.get(f"grad/hill_alpha_se/{n}", math.nan) for n in names], dtype=np.float64)
        # Confident drops only: the estimate plus two standard errors is still under the threshold (one-sided
        # 97.7%), so a small tensor's noisy estimate does not raise a false alarm.
        with np.errstate(over="ignore", invalid="ignore"):  # inf alpha (no power-law tail) is simply no drop
            upper = np.nan_to_num(alphas + 2.0 * np.nan_to_num(ses, nan=0.0), nan=np.inf)
        low = upper < self.tail_threshold
        self._rule(
            "tail_index_drop",
            step,
            low,
            -np.nan_to_num(alphas, nan=np.inf),
            alphas,
            list(names),
            "grad/hill_alpha",
            self.tail_threshold,
            lambda n, v, s: (
                f"tail index of {n}'s gradient is {v:.2f} at step {step}, under "
                f"{self.tail_threshold:g} by more than two standard errors: infinite variance"
            ),
        )

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count, "cooldowns": {k: c.state_dict() for k, c in self._cooldowns.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.count = int(state.get("count", 0))
        self._cooldowns = {}
        for rule, saved in state.get("cooldowns", {}).items():
            cooldown = Cooldown(len(saved["last_flag"]), int(saved["steps"]))
            cooldown.load_state_dict(saved)
            self._cooldowns[rule] = cooldown
