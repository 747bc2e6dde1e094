"""Reading run directories and writing the self-contained HTML report (one run, or optimizers side by side)."""

from heavytail.report.html import (
    render_compare_report,
    render_report,
    write_compare_report,
    write_report,
)
from heavytail.report.rundir import (
    KNOWN_FAMILIES,
    NoRunYet,
    Record,
    Run,
    RunDirError,
    find_run_dir,
    find_runs,
    load_run,
    split_key,
)
from heavytail.report.stats import RunStatus, run_status
from heavytail.report.summary import compare_text, summary_text
from heavytail.report.watch import watch_report

__all__ = [
    "KNOWN_FAMILIES",
    "NoRunYet",
    "Record",
    "Run",
    "RunDirError",
    "RunStatus",
    "compare_text",
    "find_run_dir",
    "find_runs",
    "load_run",
    "render_compare_report",
    "render_report",
    "run_status",
    "split_key",
    "summary_text",
    "watch_report",
    "write_compare_report",
    "write_report",
]
