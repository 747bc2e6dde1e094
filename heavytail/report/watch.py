"""Re-writing a run's report as its records arrive, until the run finishes (``heavytail report --watch``)."""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path
from typing import Callable

from heavytail.report.html import write_report
from heavytail.report.rundir import NoRunYet, Run, find_run_dir, load_run

WATCHED_FILES = ("metrics.jsonl", "alerts.jsonl", "meta.json")
"""The files whose change makes a new report: records, alerts, and meta.json (which says when the run finished)."""


def _signature(run_dir: Path) -> tuple[tuple[int, int] | None, ...]:
    """Size and modification time of each watched file (None when absent): cheap to poll every few seconds
    where parsing a long run's records is not."""
    out: list[tuple[int, int] | None] = []
    for name in WATCHED_FILES:
        try:
            st = os.stat(run_dir / name)
        except OSError:
            out.append(None)
        else:
            out.append((st.st_size, st.st_mtime_ns))
    return tuple(out)


def watch_report(
    path: str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
    *,
    interval: float = 2.0,
    max_renders: int | None = None,
    on_render: Callable[[Run, Path], None] | None = None,
    on_wait: Callable[[NoRunYet], None] | None = None,
    sleep: Callable[[float], None] | None = None,
    max_columns: int = 600,
) -> Path | None:
    """Write the report of the run at ``path`` (see :func:`~heavytail.report.rundir.find_run_dir`) and write it
    again whenever metrics.jsonl, alerts.jsonl or meta.json change (size or modification time, polled every
    ``interval`` seconds), until meta.json says the run finished; returns the report's path.

    While the run is going the page reloads itself every ``interval`` seconds (at least 1). A place with no
    records yet is waited for (``on_wait`` is told why, once). ``on_render(run, report)`` is called after each
    report; ``max_renders`` stops after that many (None: until the run finishes; a run written by a monitor
    that predates the ``finished`` key never finishes, so stop it with Ctrl-C). ``sleep`` replaces
    ``time.sleep`` (tests drive a run's progress with it).
    """
    sleep = sleep or time.sleep
    written: Path | None = None
    last: tuple[tuple[int, int] | None, ...] | None = None
    renders = 0
    waited = False
    while True:
        try:
            run_dir = find_run_dir(path)
            signature = _signature(run_dir)  # taken before reading, so a change made while reading is seen next time
            if signature != last:
                with warnings.catch_warnings():
                    # A live run may be seen between writing a line and its newline: the next poll reads it whole.
                    warnings.filterwarnings("ignore", message=r".*skipped a cut last line")
                    run = load_run(run_dir)
                finished = run.finished is not None
                written = write_report(
                    run, out, max_columns=max_columns, refresh=None if finished else max(1.0, interval)
                )
                last = signature
                renders += 1
                if on_render is not None:
                    on_render(run, written)
                if finished or (max_renders is not None and renders >= max_renders):
                    return written
        except NoRunYet as exc:
            if not waited and on_wait is not None:
                on_wait(exc)
            waited = True
        sleep(interval)
