"""Weights & Biases backend: metrics into the active run (or one it starts), alerts as W&B alerts."""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path
from typing import Any, Mapping

logger = logging.getLogger(__name__)

# W&B alert levels by heavytail severity.
_LEVELS = {"info": "INFO", "warning": "WARN", "critical": "ERROR"}


def config_dict(config: Any) -> dict[str, Any]:
    """The monitor's config as a plain dict W&B can store: a dataclass, a mapping, or an object's attributes."""
    if config is None:
        return {}
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        # Not dataclasses.asdict: it deep-copies every field, and MonitorConfig.backends may hold backend objects
        # (a SummaryWriter, a W&B run) that cannot be copied.
        raw = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    elif isinstance(config, Mapping):
        raw = dict(config)
    else:
        raw = {k: v for k, v in vars(config).items() if not k.startswith("_")} if hasattr(config, "__dict__") else {}
    return {str(k): _plain(v) for k, v in raw.items()}


def _plain(value: Any) -> Any:
    # W&B's config serializer refuses arbitrary objects (callables, devices, enums); keep what JSON can say.
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return repr(value)


def _metric_glob(key: str) -> str:
    # W&B groups charts by the part of the key before the first slash, and define_metric globs match by prefix,
    # so one glob per group ("grad/*", "adam/*") covers every layer.
    head, slash, _ = key.partition("/")
    return f"{head}/*" if slash else key


class WandbBackend:
    """Logs checkpoint records into a W&B run and sends alerts as W&B alerts.

    **Which run.** The run is chosen at the first record, not at construction, so a run that a trainer starts
    late (Hugging Face ``Trainer`` starts its W&B run when training begins) is still found. If ``wandb.run`` is
    set, records go into that run, and the backend never finishes it; if the user's run finishes first, the
    backend drops records (with one warning) until another run is active. Otherwise the backend starts a run
    (``project`` defaults to ``"heavytail"``, ``name`` to ``config.run_name`` or else the run directory's name,
    ``dir`` to ``log_dir`` or W&B's own default; the mode comes from ``WANDB_MODE`` unless ``mode`` is given),
    and ``close`` finishes it and, when no other run is active, shuts W&B's service process down
    (``wandb.teardown``; pass ``teardown=False`` to keep it, e.g. to keep a key given to ``wandb.login`` for
    the session).

    **Keys and x-axis.** Metric keys are logged as they are (``grad/hill_alpha/<param>``), with ``prefix``
    prepended if given (for a shared run whose own keys would collide). The optimizer step is logged as the
    metric ``heavytail/step`` (``step_key``), never as ``wandb.log(step=...)``, and ``define_metric`` makes it the
    x-axis of heavytail's groups (``grad/*``, ``adam/*``, ``noise/*``, ``alerts/*``; in a run the backend started
    or under a ``prefix``, also of top-level keys such as ``loss``), so charts follow the optimizer step even when
    other code advances W&B's own step. In a run the user started, unprefixed top-level keys are left alone, as
    the user may log ``loss`` too. NaN and Inf are logged as they are.

    **Alerts.** Each alert is sent with ``run.alert`` (title ``heavytail <rule>``; W&B holds back a repeat of the
    same title for ``alert_wait_s`` seconds), counted in the series ``alerts/<rule>`` (cumulative count, at the
    alert's step), and its message kept in the summary key ``alerts/last``. A failure to send (offline, no
    network, alerts disabled) is logged once and never raised.
    """

    def __init__(
        self,
        log_dir: Path | str | None = None,
        config: Any = None,
        *,
        project: str | None = None,
        entity: str | None = None,
        name: str | None = None,
        group: str | None = None,
        tags: list[str] | None = None,
        mode: str | None = None,
        prefix: str = "",
        step_key: str = "heavytail/step",
        alert_wait_s: float = 300.0,
        teardown: bool = True,
    ) -> None:
        try:
            import wandb
        except ImportError as err:
            raise ImportError(
                "wandb backend: the wandb package is missing; install it with `pip install heavytail[wandb]`"
            ) from err
        self._wandb = wandb
        self.log_dir = None if log_dir is None else Path(log_dir)
        self._config = config
        self._init_kwargs = {
            "project": project or "heavytail",
            "entity": entity,
            # the monitor's own default run name is the run directory's name
            "name": name or getattr(config, "run_name", None) or (self.log_dir.name if self.log_dir else None),
            "group": group,
            "tags": tags,
            "mode": mode,
        }
        self._prefix = prefix
        self._step_key = step_key
        self._alert_wait_s = alert_wait_s
        self._teardown = teardown
        self.run: Any = None  # the run records go into; None until the first record
        self.owns_run = False
        self._defined: set[str] = set()
        self._alert_counts: dict[str, int] = {}
        self._warned: set[str] = set()
        self._closed = False

    # -- the run ---------------------------------------------------------------------------------------------

    def _current_run(self) -> Any:
        """The run to log into now, starting one at the first record if no run is active; None to drop."""
        wandb = self._wandb
        if self.owns_run:
            if getattr(self.run, "_is_finished", False):  # the user called wandb.finish() on our run
                self._warn_once("finished", "wandb backend: the run was finished by other code; dropping records")
                return None
            return self.run
        active = wandb.run
        if active is None:
            if self.run is None:
                self._start_run()
                return self.run
            self._warn_once("finished", "wandb backend: the W&B run it logged into has finished; dropping records")
            return None
        if active is not self.run:
            self.run = active
            self._defined = set()
            try:
                active.config.update({"heavytail": config_dict(self._config)}, allow_val_change=True)
            except Exception as err:  # provenance only; never worth losing the metrics for
                self._warn_once("config", f"wandb backend: could not add the heavytail config to the run: {err}")
        return active

    def _start_run(self) -> None:
        kwargs = {k: v for k, v in self._init_kwargs.items() if v is not None}
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            kwargs["dir"] = str(self.log_dir)
        self.run = self._wandb.init(config=config_dict(self._config), **kwargs)
        self.owns_run = True
        self._defined = set()

    def _define(self, run: Any, keys: Any) -> None:
        """Make ``step_key`` the x-axis of every group of ``keys`` not yet defined in ``run``."""
        if self._step_key not in self._defined:
            run.define_metric(self._step_key)
            self._defined.add(self._step_key)
        for key in keys:
            glob = self._prefix + _metric_glob(key)
            # an exact top-level key ("loss") in the user's run may be the user's own series too
            if glob in self._defined or (glob == key and not self.owns_run):
                continue
            run.define_metric(glob, step_metric=self._step_key)
            self._defined.add(glob)

    def _warn_once(self, what: str, message: str) -> None:
        if what not in self._warned:
            self._warned.add(what)
            logger.warning(message)

    # -- the contract ----------------------------------------------------------------------------------------

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        if self._closed:
            return
        run = self._current_run()
        if run is None:
            return
        self._define(run, metrics)
        payload: dict[str, Any] = {self._prefix + key: float(value) for key, value in metrics.items()}
        payload[self._step_key] = int(step)
        run.log(payload)

    def alert(self, alert: Mapping[str, Any]) -> None:
        if self._closed:
            return
        run = self._current_run()
        if run is None:
            return
        rule = str(alert.get("rule", "alert"))
        step = alert.get("step")
        message = str(alert.get("message", ""))
        where = f", layer {alert['layer']}" if alert.get("layer") else ""
        text = f"{message} (step {step}{where}"
        text += f"; flight record {alert['flight_record']})" if alert.get("flight_record") else ")"
        level = getattr(self._wandb.AlertLevel, _LEVELS.get(str(alert.get("severity")), "WARN"))
        try:
            run.alert(title=f"heavytail {rule}", text=text, level=level, wait_duration=self._alert_wait_s)
        except Exception as err:  # offline, no network, alerts off: the record below and alerts.jsonl remain
            self._warn_once("alert", f"wandb backend: could not send a W&B alert ({err}); alerts are still logged")
        self._alert_counts[rule] = self._alert_counts.get(rule, 0) + 1
        key = f"alerts/{rule}"
        self._define(run, (key,))
        row: dict[str, Any] = {self._prefix + key: self._alert_counts[rule]}
        if isinstance(step, int) or (isinstance(step, float) and math.isfinite(step)):
            row[self._step_key] = int(step)
        run.log(row)
        run.summary[self._prefix + "alerts/last"] = f"step {step} {rule}: {message}"

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if not self.owns_run or self.run is None:
            return  # the user's run is the user's to finish
        self.run.finish()
        if self._teardown and not self._other_runs_active():
            # wandb.teardown finishes every unfinished run, hence the check; it stops the wandb-core process and
            # W&B's threads, which otherwise live until the interpreter exits.
            self._wandb.teardown()

    def _other_runs_active(self) -> bool:
        if self._wandb.run is not None:
            return True
        # wandb.run only tracks the latest run; with reinit="create_new" others may be active. W&B has no public
        # way to list them, so this reads its setup singleton, and assumes "yes" (no teardown) if that changes.
        try:
            from wandb.sdk import wandb_setup

            if not hasattr(wandb_setup, "_singleton"):
                return True
            singleton = wandb_setup._singleton
            return singleton is not None and singleton.most_recent_active_run is not None
        except Exception:
            return True
