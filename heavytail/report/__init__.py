"""Reading run directories and writing the self-contained HTML report (one run, or optimizers side by side)."""

from heavytail.report.html import (
    render_compare_report,
    render_report,
    write_compare_report,
    write_report,
)
from heavytail.report.rundir import (
    KNOWN_FAMILIES,
    Record,
    Run,
    RunDirError,
    load_run,
    split_key,
)

__all__ = [
    "KNOWN_FAMILIES",
    "Record",
    "Run",
    "RunDirError",
    "load_run",
    "render_compare_report",
    "render_report",
    "split_key",
    "write_compare_report",
    "write_report",
]
