"""TensorBoard backend: per-layer scalars, a grouped custom-scalars layout, tail-index histograms, alerts as text."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

# Per-block charts multiply the layout by the number of blocks; past this many the custom-scalars tab becomes
# slower to render than the plain scalars tab it is meant to improve on, so only the all-layers chart is kept.
MAX_BLOCK_CHARTS = 64


def split_layer_key(key: str) -> tuple[str, str] | None:
    """``"grad/hill_alpha/blocks.0.attn.qkv.weight"`` -> ``("grad/hill_alpha", "blocks.0.attn.qkv.weight")``.

    Per-layer metric keys are ``<source>/<quantity>/<parameter name>``; global keys (``loss``, ``grad/norm``) have
    fewer than three parts and give None. Splitting at most twice keeps a parameter name that contains ``/``.
    """
    parts = key.split("/", 2)
    if len(parts) < 3:
        return None
    return f"{parts[0]}/{parts[1]}", parts[2]


def block_of(layer: str) -> str:
    """The repeated block a parameter belongs to: the name up to its first numeric part, else its first part.

    ``blocks.0.attn.qkv.weight`` -> ``blocks.0``; ``model.layers.11.mlp.up_proj.weight`` -> ``model.layers.11``;
    ``embed.weight`` -> ``embed``. Numeric parts are ``ModuleList``/``Sequential`` indices, i.e. transformer blocks.
    """
    parts = layer.split(".")
    for i, part in enumerate(parts[:-1]):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return parts[0]


def is_tail_index_family(family: str) -> bool:
    """Whether a per-layer family holds tail indices (``grad/hill_alpha``, ``noise/hill_alpha``, ...)."""
    return family.rsplit("/", 1)[-1].endswith("alpha")


def custom_scalars_layout(families: Mapping[str, Iterable[str]]) -> dict[str, dict[str, list]]:
    """The ``SummaryWriter.add_custom_scalars`` layout for per-layer families: ``{family: [layer names]}``.

    One category per family (``grad/hill_alpha``, ``grad/kurtosis``, ``adam/ratio_max``, ..., in that order:
    tail indices, kurtosis, denominator ratios, then the rest alphabetically), holding a
    multiline chart of all layers (regex ``^family/.*``, so layers that appear later still match) and, when the
    model has between 2 and ``MAX_BLOCK_CHARTS`` blocks, one multiline chart per block (``blocks.0``, ...).
    """
    layout: dict[str, dict[str, list]] = {}
    for family in sorted(families, key=_family_order):
        layers = sorted(families[family])
        prefix = re.escape(family) + "/"
        charts: dict[str, list] = {f"{family} (all layers)": ["Multiline", [f"^{prefix}.*"]]}
        blocks = sorted({block_of(layer) for layer in layers}, key=_natural_key)
        if 2 <= len(blocks) <= MAX_BLOCK_CHARTS:
            for block in blocks:
                charts[f"{family} {block}"] = ["Multiline", [f"^{prefix}{re.escape(block)}(\\..*)?$"]]
        layout[family] = charts
    return layout


def _family_order(family: str) -> tuple[int, str]:
    # The figures the dashboard exists for come first: tail indices, then kurtosis, then denominator ratios.
    quantity = family.rsplit("/", 1)[-1]
    if quantity.endswith("alpha"):
        rank = 0
    elif quantity == "kurtosis":
        rank = 1
    elif quantity == "ratio_max":
        rank = 2
    else:
        rank = 3
    return rank, family


def _natural_key(name: str) -> list:
    # blocks.2 before blocks.10
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", name)]


def alert_markdown(alert: Mapping[str, Any]) -> str:
    """An alert record as the Markdown shown in TensorBoard's Text tab."""

    def cell(value: Any) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "-"
        if isinstance(value, float):
            return f"{value:.6g}"
        return str(value).replace("|", "\\|")

    head = (
        f"**{str(alert.get('severity', 'alert')).upper()}** `{alert.get('rule', '?')}` at step {alert.get('step', '?')}"
    )
    fields = ("metric", "layer", "value", "threshold", "flight_record")
    table = (
        "| "
        + " | ".join(fields)
        + " |\n"
        + "|"
        + "---|" * len(fields)
        + "\n"
        + "| "
        + " | ".join(cell(alert.get(f)) for f in fields)
        + " |"
    )
    return f"{head}\n\n{alert.get('message', '')}\n\n{table}"


class TensorBoardBackend:
    """Writes checkpoint records and alerts as TensorBoard event files (``<log_dir>/tensorboard`` by default).

    - every metric key becomes a scalar with the optimizer step as x-axis; NaN and Inf are written as they are
      (TensorBoard draws them as markers, and a non-finite value is exactly what one wants to see);
    - a custom-scalars layout (the "Custom Scalars" tab) is written once, at the first checkpoint: one category
      per per-layer family with all layers on one chart, and one chart per block;
    - each checkpoint adds a histogram over layers of every tail-index family (``grad/hill_alpha_hist``, finite
      values only), or of the families named in ``histogram_families``;
    - alerts are Markdown text under the tag ``alerts``.

    Keyword options: ``tb_dir`` (where the event files go), ``histogram_families`` (families to histogram, e.g.
    ``("grad/hill_alpha", "grad/kurtosis")``), ``flush_secs`` and ``max_queue`` (passed to ``SummaryWriter``;
    the backend also flushes at every checkpoint and alert).
    """

    def __init__(
        self,
        log_dir: Path | str | None = None,
        config: Any = None,
        *,
        tb_dir: Path | str | None = None,
        histogram_families: Iterable[str] | None = None,
        flush_secs: int = 120,
        max_queue: int = 10,
    ) -> None:
        if log_dir is None and tb_dir is None:
            raise ValueError("tensorboard backend: give log_dir (events go to <log_dir>/tensorboard) or tb_dir")
        try:
            from tensorboard.compat.proto.summary_pb2 import Summary
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise ImportError(
                "tensorboard backend: the tensorboard package is missing; "
                "install it with `pip install heavytail[tensorboard]`"
            ) from err
        self._summary_cls = Summary
        self.dir = Path(tb_dir) if tb_dir is not None else Path(log_dir) / "tensorboard"
        self.dir.mkdir(parents=True, exist_ok=True)
        self._writer = SummaryWriter(log_dir=str(self.dir), max_queue=max_queue, flush_secs=flush_secs)
        self._histogram_families = None if histogram_families is None else frozenset(histogram_families)
        self._layout_written = False
        self._closed = False

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        if self._closed:  # SummaryWriter would silently reopen a file (and a writer thread); drop instead
            return
        families: dict[str, list[str]] = {}
        values: dict[str, list[float]] = {}
        for key, value in metrics.items():
            split = split_layer_key(key)
            if split is not None:
                family, layer = split
                families.setdefault(family, []).append(layer)
                values.setdefault(family, []).append(value)
        # One event holding every scalar of the checkpoint: add_scalar per key costs ~50 us and one event each,
        # which at 10,000 parameters x 10 families is seconds per checkpoint and a much larger file.
        # _get_file_writer is what SummaryWriter's own add_* methods write through; it has no public twin.
        summary = self._summary_cls(
            value=[self._summary_cls.Value(tag=key, simple_value=float(v)) for key, v in metrics.items()]
        )
        self._writer._get_file_writer().add_summary(summary, step)
        if not self._layout_written and families:
            self._writer.add_custom_scalars(custom_scalars_layout(families))
            self._layout_written = True
        for family, family_values in values.items():
            wanted = (
                is_tail_index_family(family) if self._histogram_families is None else family in self._histogram_families
            )
            if not wanted:
                continue
            finite = [float(v) for v in family_values if math.isfinite(v)]
            if finite:
                self._writer.add_histogram(f"{family}_hist", np.asarray(finite, dtype=np.float64), step)
        self._writer.flush()

    def alert(self, alert: Mapping[str, Any]) -> None:
        if self._closed:
            return
        self._writer.add_text("alerts", alert_markdown(alert), int(alert.get("step") or 0))
        self._writer.flush()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._writer.close()
