"""Console backend: a compact fixed-width table of the worst layers at each checkpoint, and one line per alert."""

from __future__ import annotations

import math
import sys
from typing import Any, Mapping, Sequence, TextIO

# (family, "min" | "max"): rank layers by the lowest tail index (heaviest tail) and by the highest
# gradient/denominator ratio (the largest gradient the AdamW denominator failed to absorb).
DEFAULT_RANKINGS: tuple[tuple[str, str], ...] = (("grad/hill_alpha", "min"), ("adam/ratio_max", "max"))

VALUE_WIDTH = 9
NAME_WIDTH = 32


def format_value(value: Any) -> str:
    """A metric value in at most ``VALUE_WIDTH`` characters; NaN and missing values as ``-``."""
    if value is None:
        return "-"
    value = float(value)
    if math.isnan(value):
        return "-"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    for digits in (4, 3, 2, 1):  # only exponents of three digits need fewer digits to fit
        text = f"{value:.{digits}g}"
        if len(text) <= VALUE_WIDTH:
            break
    return text


def shorten(name: str, width: int = NAME_WIDTH) -> str:
    """``name`` cut in the middle to ``width`` characters: the block index and the parameter kind both stay."""
    if len(name) <= width:
        return name
    keep = width - 3
    return name[: keep // 2] + "..." + name[-(keep - keep // 2) :]


def worst_layers(metrics: Mapping[str, float], family: str, order: str, top: int) -> list[tuple[str, float]]:
    """The ``top`` layers of ``family`` by value, lowest first for ``order="min"``, highest first for ``"max"``.

    NaN values (a layer with nothing to estimate from) rank last: they are not evidence of a heavy tail.
    """
    prefix = family + "/"
    rows = [(key[len(prefix) :], float(v)) for key, v in metrics.items() if key.startswith(prefix)]
    sign = 1.0 if order == "min" else -1.0
    rows.sort(key=lambda row: (math.isnan(row[1]), sign * row[1] if not math.isnan(row[1]) else 0.0, row[0]))
    return rows[:top]


class ConsoleBackend:
    """Prints a compact table at each checkpoint (to ``sys.stderr`` unless ``stream`` is given)::

        heavytail step 1200  loss 2.843  grad/norm 1.234
          lowest grad/hill_alpha                      highest adam/ratio_max
              1.52 blocks.3.mlp.fc1.weight                412 blocks.0.attn.qkv.weight
              ...

    Keyword options: ``stream`` (a text stream), ``top`` (layers per ranking, default 5), ``rankings``
    (``(family, "min"|"max")`` pairs, default lowest ``grad/hill_alpha`` and highest ``adam/ratio_max``).
    A ranking whose family is absent from a record is left out. NaN prints as ``-``.
    """

    def __init__(
        self,
        log_dir: Any = None,
        config: Any = None,
        *,
        stream: TextIO | None = None,
        top: int = 5,
        rankings: Sequence[tuple[str, str]] = DEFAULT_RANKINGS,
    ) -> None:
        if top < 1:
            raise ValueError(f"console backend: top must be at least 1, got {top}")
        for family, order in rankings:
            if order not in ("min", "max"):
                raise ValueError(f"console backend: ranking order for {family!r} must be 'min' or 'max', got {order!r}")
        self._stream = stream
        self._top = top
        self._rankings = tuple(rankings)
        self._closed = False

    @property
    def stream(self) -> TextIO:
        # Resolved at each write, not at construction, so redirections of sys.stderr (pytest, notebooks) apply.
        return self._stream if self._stream is not None else sys.stderr

    def format_record(self, metrics: Mapping[str, float], step: int) -> str:
        """The table printed for one checkpoint record."""
        lines = [
            f"heavytail step {step}  loss {format_value(metrics.get('loss'))}"
            f"  grad/norm {format_value(metrics.get('grad/norm'))}"
        ]
        columns = []
        for family, order in self._rankings:
            rows = worst_layers(metrics, family, order, self._top)
            if rows:
                title = f"{'lowest' if order == 'min' else 'highest'} {family}"
                cells = [f"{format_value(v):>{VALUE_WIDTH}} {shorten(name):<{NAME_WIDTH}}" for name, v in rows]
                columns.append([f"{title:<{VALUE_WIDTH + 1 + NAME_WIDTH}}", *cells])
        if columns:
            blank = " " * (VALUE_WIDTH + 1 + NAME_WIDTH)
            for i in range(max(len(c) for c in columns)):
                lines.append(("  " + "  ".join(c[i] if i < len(c) else blank for c in columns)).rstrip())
        return "\n".join(lines)

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        if self._closed:
            return
        self.stream.write(self.format_record(metrics, step) + "\n")
        self.stream.flush()

    def alert(self, alert: Mapping[str, Any]) -> None:
        if self._closed:
            return
        where = f" [{alert['layer']}]" if alert.get("layer") else ""
        flight = f" ({alert['flight_record']})" if alert.get("flight_record") else ""
        line = (
            f"heavytail ALERT {str(alert.get('severity', '?')).upper()} step {alert.get('step', '?')} "
            f"{alert.get('rule', '?')}{where}: {alert.get('message', '')}{flight}"
        )
        self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        # The stream is borrowed (stderr or the user's), so it is flushed, never closed.
        if not self._closed:
            self._closed = True
            self.stream.flush()
