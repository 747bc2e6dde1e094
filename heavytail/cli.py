"""The ``heavytail`` command: ``demo``, ``summary``, ``report``, ``compare`` and ``sweep``."""

from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from heavytail import __version__

if TYPE_CHECKING:
    from heavytail.report import Run

EXIT_OK = 0
EXIT_ERROR = 1  # a run could not be done as asked (bad input file, unwritable output, ...)
EXIT_RUN_DIR = 2  # a run directory that cannot be read (RunDirError); argparse also exits 2 on bad arguments


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _adder(parser: argparse.ArgumentParser, hidden: bool):
    """``parser.add_argument``, or, when ``hidden``, the same option unlisted and without a default (so a given
    option is told from an absent one)."""

    def add(*flags: str, **kwargs: object) -> None:
        if hidden:
            kwargs["help"] = argparse.SUPPRESS
            kwargs["default"] = argparse.SUPPRESS
        parser.add_argument(*flags, **kwargs)  # type: ignore[arg-type]

    return add


def _add_run_options(parser: argparse.ArgumentParser, hidden: bool = False) -> None:
    """The options ``demo`` and ``sweep`` share: the workload, the checkpoints and how the run is shown.

    ``hidden``: accepted but not listed, with no default (``compare`` takes them for the old ``compare`` form,
    and tells a given one from an absent one).
    """
    from heavytail.workload import SIZES

    add = _adder(parser, hidden)

    add(
        "--text",
        default=None,
        help="train on this text file or directory of .txt/.py/.md files instead of the Python stdlib source",
    )
    add("--seed", type=int, default=0, help="seed of the initial weights and the data order (default 0)")
    add("--size", choices=list(SIZES), default="small", help="model and batch size (default small)")
    add(
        "--every",
        type=_positive_int,
        default=None,
        help="steps per checkpoint (default: steps / 20, about 20 checkpoints)",
    )
    add("--no-probe", action="store_true", help="do not run the noise probe at checkpoints")
    add(
        "--threads",
        type=_positive_int,
        default=None,
        help="torch intra-op threads, the same for every run (default: 1 for tiny and small; for "
        "medium one per core, or 1 when the machine is busy)",
    )
    add("--quiet", action="store_true", help="no progress bar")


def _add_sweep_options(parser: argparse.ArgumentParser, hidden: bool = False) -> None:
    """``sweep``'s own options (``hidden`` as in :func:`_add_run_options`; ``--out`` is then compare's)."""
    from heavytail.compare import DEFAULT_COMPARE_STEPS
    from heavytail.demo import DEFAULT_LR, OPTIMIZERS

    lr_table = ", ".join(f"{k} {v:g}" for k, v in DEFAULT_LR.items())

    add = _adder(parser, hidden)

    add(
        "--optimizers",
        default=",".join(OPTIMIZERS),
        help=f"comma-separated, from {', '.join(OPTIMIZERS)} (default all four)",
    )
    add(
        "--steps",
        type=_positive_int,
        default=DEFAULT_COMPARE_STEPS,
        help=f"optimizer steps per run (default {DEFAULT_COMPARE_STEPS})",
    )
    if not hidden:
        add("-o", "--out", default="heavytail_runs/compare", help="output directory (default heavytail_runs/compare)")
    add(
        "--lr",
        default=None,
        metavar="NAME=LR,...",
        help=f"learning rates to override, e.g. adamw=3e-4,lion=1e-4 (defaults: {lr_table})",
    )
    add(
        "--seeds",
        default=None,
        metavar="K,K,...",
        help="run the sweep once per seed into OUT/seed<K>/ and write OUT/summary.json with each figure's mean, "
        "standard deviation and range across seeds (instead of --seed)",
    )
    _add_run_options(parser, hidden=hidden)


# Options of the old ``heavytail compare`` (now ``sweep``) that ``compare`` of run directories has no use for.
_SWEEP_ONLY = ("optimizers", "steps", "lr", "seeds", "text", "seed", "size", "every", "no_probe", "threads", "quiet")

RUN_DIR_HELP = (
    "a run directory (with metrics.jsonl), or a trainer's output directory holding one (OUT/heavytail, or the "
    "one run found up to 3 levels down)"
)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``heavytail`` command (documented in docs/cli.md)."""
    from heavytail.demo import DEFAULT_LR, DEFAULT_STEPS, OPTIMIZERS

    parser = argparse.ArgumentParser(
        prog="heavytail",
        description="Heavy-tail statistics of gradients and optimizer denominators: a demo training run, an "
        "optimizer sweep, and summaries, HTML reports and comparisons of run directories.",
    )
    parser.add_argument("--version", action="version", version=f"heavytail {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    lr_table = ", ".join(f"{k} {v:g}" for k, v in DEFAULT_LR.items())

    demo = sub.add_parser(
        "demo",
        help="train a small GPT on the Python stdlib source with the monitor on, and write its report",
        description="Train the embedded workload (a small GPT on the Python standard library's source, word "
        "tokens; offline) with the monitor and the noise probe on, write the run directory and its HTML report, "
        "and print a summary: heaviest-tailed layers, noise tail indices, alerts.",
    )
    demo.add_argument(
        "--steps", type=_positive_int, default=DEFAULT_STEPS, help=f"optimizer steps (default {DEFAULT_STEPS})"
    )
    demo.add_argument(
        "--out",
        default="heavytail_runs/demo",
        help="run directory (default heavytail_runs/demo; a previous run's files there are replaced)",
    )
    demo.add_argument("--optimizer", choices=list(OPTIMIZERS), default="adamw", help="optimizer (default adamw)")
    demo.add_argument(
        "--lr", type=_positive_float, default=None, help=f"learning rate (default per optimizer: {lr_table})"
    )
    _add_run_options(demo)

    summary = sub.add_parser(
        "summary",
        help="print what a run directory holds: status, loss, heaviest-tailed layers, ratios, alerts",
        description="Print a plain-text summary of any run directory: the run's name, steps and wall time, "
        "whether it finished, the loss, the heaviest-tailed layers (lowest median grad/hill_alpha), the noise "
        "tail indices, the largest denominator ratio and where it was read, and the alerts by rule.",
    )
    summary.add_argument("run_dir", metavar="RUN_DIR", help=RUN_DIR_HELP)
    summary.add_argument("--top", type=_positive_int, default=5, help="heaviest-tailed layers to list (default 5)")

    report = sub.add_parser(
        "report",
        help="write the HTML report of a run directory (--watch: rewrite it as the run goes on)",
        description="Write the self-contained HTML report of a heavytail run directory and print its path, the "
        "run's status, its alerts by rule and its heaviest-tailed layers. With --watch, write it again whenever "
        "new records arrive, until the run finishes or Ctrl-C.",
    )
    report.add_argument("run_dir", metavar="RUN_DIR", help=RUN_DIR_HELP)
    report.add_argument("-o", "--out", default=None, help="output file (default RUN_DIR/report.html)")
    report.add_argument(
        "--watch",
        action="store_true",
        help="rewrite the report whenever metrics.jsonl, alerts.jsonl or meta.json change, until meta.json says "
        "the run finished (Ctrl-C stops it sooner); the page reloads itself meanwhile",
    )
    report.add_argument(
        "--interval",
        type=_positive_float,
        default=2.0,
        help="with --watch: seconds between looks at the run directory (default 2)",
    )

    compare = sub.add_parser(
        "compare",
        help="compare run directories side by side: a table here and one HTML page",
        description="Compare existing run directories (any trainer, any optimizer): print a table of each run's "
        "figures side by side and what makes the comparison fair (same model, steps, interval, seed), and write "
        "one HTML page with the runs side by side on shared colour scales. A directory that holds several runs "
        "(a sweep's output) adds them all. To train runs to compare, see `heavytail sweep`.",
    )
    compare.add_argument("run_dirs", nargs="*", metavar="RUN_DIR", help=RUN_DIR_HELP)
    compare.add_argument(
        "-o", "--out", default=None, help="the HTML page to write (default compare.html in the current directory)"
    )
    _add_sweep_options(compare, hidden=True)

    sweep = sub.add_parser(
        "sweep",
        help="train the demo workload under several optimizers with everything else equal, and compare them",
        description="Train the demo workload once per optimizer from the same initial weights, on the same data "
        "order, seed and step budget, each monitored into OUT/<optimizer>/; write OUT/summary.json and one "
        "HTML page OUT/compare.html with the optimizers side by side.",
    )
    _add_sweep_options(sweep)
    return parser


def _demo(args: argparse.Namespace) -> int:
    from heavytail.demo import run_demo

    progress = None if args.quiet else sys.stderr
    result = run_demo(
        steps=args.steps,
        out=args.out,
        text=args.text,
        seed=args.seed,
        size=args.size,
        every=args.every,
        optimizer=args.optimizer,
        lr=args.lr,
        probe=not args.no_probe,
        progress=progress,
        threads=args.threads,
    )
    print(result.summary)
    return EXIT_OK


def _sweep(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from heavytail.compare import parse_lrs, parse_optimizers, parse_seeds, run_compare

    optimizers = parse_optimizers(args.optimizers)
    lrs = parse_lrs(args.lr)
    extra = [k for k in lrs if k not in optimizers]
    if extra:
        raise ValueError(f"--lr names {extra[0]!r}, which is not in --optimizers {','.join(optimizers)}")
    common = dict(
        steps=args.steps,
        lrs=lrs,
        size=args.size,
        every=args.every,
        text=args.text,
        probe=not args.no_probe,
        progress=None if args.quiet else sys.stderr,
        threads=args.threads,
        command="heavytail " + " ".join(shlex.quote(a) for a in argv),
    )
    seeds = getattr(args, "seeds", None)
    if seeds is not None:
        if any(a == "--seed" or a.startswith("--seed=") for a in argv):
            raise ValueError("give --seed or --seeds, not both")
        return _sweep_seeds(optimizers, parse_seeds(seeds), args, common)
    start = time.perf_counter()
    result = run_compare(optimizers, out=args.out, seed=args.seed, **common)
    seconds = time.perf_counter() - start
    print(f"Compared {', '.join(optimizers)}: {args.steps} steps each, {seconds:.0f}s in all.")
    width = max(len(n) for n in optimizers)
    for name, s in result.summary["optimizers"].items():
        loss = s["final_loss"]
        alpha = s["overall"].get("grad/hill_alpha", float("nan"))
        shadow = s["overall"].get("shadow999/ratio_max", float("nan"))
        val = s.get("val_loss", float("nan"))
        print(
            f"  {name.ljust(width)}  lr {s['lr']:<8g} val loss {val:.4f}  final loss {loss:.4f}  "
            f"median grad alpha {alpha:.3g}  "
            f"median shadow999 ratio {shadow:.3g}  alerts {s['alerts']}"
        )
    print(f"Summary: {result.summary_path}")
    print(f"Report:  {result.report}")
    return EXIT_OK


def _sweep_seeds(optimizers: Sequence[str], seeds: Sequence[int], args: argparse.Namespace, common: dict) -> int:
    from heavytail.compare import run_seeds

    start = time.perf_counter()
    result = run_seeds(optimizers, seeds, out=args.out, **common)
    seconds = time.perf_counter() - start
    print(
        f"Compared {', '.join(optimizers)} over seeds {','.join(map(str, seeds))}: {args.steps} steps each, "
        f"{seconds:.0f}s in all. Mean ± standard deviation across seeds:"
    )
    width = max(len(n) for n in optimizers)

    def pm(figure: dict) -> str:
        mean, std = figure.get("mean"), figure.get("std")
        if mean is None or not math.isfinite(mean):
            return "-"
        return f"{mean:.4g} ± {std:.2g}" if std is not None and math.isfinite(std) else f"{mean:.4g}"

    for name, s in result.summary["optimizers"].items():
        alpha = s["overall"].get("grad/hill_alpha", {})
        print(
            f"  {name.ljust(width)}  lr {s['lr']:<8g} val loss {pm(s['val_loss'])}  final loss {pm(s['final_loss'])}  "
            f"median grad alpha {pm(alpha)}  alerts {pm(s['alerts'])}"
        )
    print(f"Summary: {result.summary_path}")
    for seed, r in result.per_seed.items():
        print(f"Report:  {r.report} (seed {seed})")
    return EXIT_OK


def _locate(path: str) -> Path:
    """The run directory ``path`` names (``heavytail.report.find_run_dir``), saying which when it is not ``path``."""
    from heavytail.report import find_run_dir

    found = find_run_dir(path)
    if found != Path(path):
        _note(f"using the run in {found}")
    return found


def _summary(args: argparse.Namespace) -> int:
    from heavytail.report import load_run, summary_text

    run = load_run(_locate(args.run_dir))
    print(summary_text(run, top=args.top))
    return EXIT_OK


def _report(args: argparse.Namespace) -> int:
    from heavytail.report import load_run, write_report
    from heavytail.report.summary import report_lines

    if args.watch:
        return _watch(args)
    run = load_run(_locate(args.run_dir))
    path = write_report(run, args.out)
    print(f"Report:  {path}")
    print("\n".join(report_lines(run)))
    return EXIT_OK


def _watch(args: argparse.Namespace) -> int:
    from heavytail.report import NoRunYet, watch_report
    from heavytail.report.stats import run_status
    from heavytail.report.summary import alert_counts

    given = Path(args.run_dir)
    state = {"said": False, "last": None}

    def on_render(run: Run, report: Path) -> None:
        if not state["said"]:
            state["said"] = True
            if run.path != given:
                _note(f"using the run in {run.path}")
            print(
                f"Watching {run.path} every {args.interval:g} s: the report is rewritten as records arrive, until "
                "the run finishes (Ctrl-C stops it sooner).",
                flush=True,
            )
        status = run_status(run)
        state["last"] = (report, status)
        clock = time.strftime("%H:%M:%S")
        print(
            f"[{clock}] step {status.last_step:,} ({len(run.steps):,} checkpoint{'s' if len(run.steps) != 1 else ''}), "
            f"alerts {alert_counts(run)}: "
            f"{report}",
            flush=True,
        )
        if status.complete:
            print(f"The run {status.text()}. Report: {report}", flush=True)

    def on_wait(exc: NoRunYet) -> None:
        print(f"Waiting for records ({exc}); Ctrl-C to stop.", flush=True)

    try:
        watch_report(args.run_dir, args.out, interval=args.interval, on_render=on_render, on_wait=on_wait)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        if state["last"] is not None:
            report, status = state["last"]
            print(f"Stopped watching; the report shows step {status.last_step:,}: {report}")
        else:
            print("Stopped watching before any record arrived.")
    return EXIT_OK


def _run_labels(runs: Sequence[Run]) -> list[str]:
    """Each run's name; runs that share one get their path below the runs' common folder after it."""
    names = [r.name for r in runs]
    paths = [r.path.resolve() for r in runs]
    common = Path(os.path.commonpath(paths)) if len(paths) > 1 else None
    labels = []
    for run, path in zip(runs, paths):
        if names.count(run.name) > 1:
            where = path.relative_to(common) if common is not None and path != common else path
            labels.append(f"{run.name} ({where})")
        else:
            labels.append(run.name)
    return labels


def _compare(args: argparse.Namespace, argv: Sequence[str], parser: argparse.ArgumentParser) -> int:
    from heavytail.report import compare_text, find_runs, load_run, write_compare_report
    from heavytail.report.rundir import INTEGRATION_DIR

    if not args.run_dirs:
        # The old form, `heavytail compare --optimizers ...`, trained the runs: users' scripts still call it.
        _warn(
            "`heavytail compare` without run directories is the old name of `heavytail sweep` (train the demo "
            "workload under several optimizers) and will be removed; run `heavytail sweep` instead. `heavytail "
            "compare RUN_DIR RUN_DIR ...` now compares existing run directories."
        )
        at = argv.index("compare")
        return _sweep(parser.parse_args([*argv[:at], "sweep", *argv[at + 1 :]]), argv)
    given = [f"--{name.replace('_', '-')}" for name in _SWEEP_ONLY if hasattr(args, name)]
    if given:
        parser.error(
            f"compare: {', '.join(given)} train runs, which `heavytail sweep` does; `heavytail compare` takes "
            "run directories and -o only"
        )
    dirs: list[Path] = []
    for text in args.run_dirs:
        path = Path(text)
        runs = find_runs(path) if path.is_dir() else []
        if len(runs) > 1 and path not in runs and (path / INTEGRATION_DIR) not in runs:
            _note(f"{path} holds {len(runs)} runs; comparing them all: {', '.join(str(r) for r in runs)}")
            found = runs
        else:
            found = [_locate(text)]
        dirs += [d for d in found if d.resolve() not in {x.resolve() for x in dirs}]
    runs = [load_run(d) for d in dirs]
    labels = _run_labels(runs)
    loaded = dict(zip(labels, runs))
    out = write_compare_report(loaded, args.out if args.out is not None else "compare.html")
    width = max(len(n) for n in labels)
    print(f"Compared {len(runs)} run{'s' if len(runs) != 1 else ''}:")
    for label, run in loaded.items():
        print(f"  {label.ljust(width)}  {run.path}")
    print()
    print(compare_text(loaded))
    print()
    print(f"Report: {out}")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``heavytail`` command; returns the exit status (``python -m heavytail`` and the console script).

    Expected failures (an unreadable run directory, a bad input file, an impossible setting, an unwritable
    output) print one line ``heavytail: error: ...`` on stderr and return non-zero: 2 for a run directory that
    cannot be read and for bad arguments (argparse's convention), 1 for the rest. Ctrl-C returns 130. Anything
    else is a bug and surfaces with its traceback; ``HEAVYTAIL_DEBUG=1`` shows the traceback of the expected
    ones too. Warnings (a run directory without meta.json, a cut last line) print as one line
    ``heavytail: warning: ...``.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        return _run(args, argv, parser)


def _run(args: argparse.Namespace, argv: Sequence[str], parser: argparse.ArgumentParser) -> int:
    from heavytail.report import RunDirError

    commands = {
        "demo": lambda: _demo(args),
        "sweep": lambda: _sweep(args, argv),
        "compare": lambda: _compare(args, argv, parser),
        "summary": lambda: _summary(args),
        "report": lambda: _report(args),
    }
    try:
        status = commands[args.command]()
        # A pipe's output is block-buffered: a reader that went away shows at this flush, not only in the
        # interpreter's last one (which would end the process with status 120 and a message).
        sys.stdout.flush()
        return status
    except BrokenPipeError:
        # The reader went away (`heavytail summary DIR | head`): what it did not read was not wanted. Python
        # would report the failed flush of stdout at exit; point stdout at nothing first.
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return EXIT_ERROR
    except RunDirError as exc:
        if os.environ.get("HEAVYTAIL_DEBUG"):
            raise
        _error(str(exc))
        return EXIT_RUN_DIR
    except (ValueError, OSError) as exc:
        if os.environ.get("HEAVYTAIL_DEBUG"):
            raise
        _error(_one_line(exc))
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(file=sys.stderr)
        _error("interrupted")
        return 130


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    if isinstance(exc, OSError) and exc.filename is not None and str(exc.filename) not in text:
        text = f"{exc.filename}: {text}"
    return text or type(exc).__name__


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
    print(f"heavytail: warning: {' '.join(str(message).split())}", file=sys.stderr)


def _note(message: str) -> None:
    print(f"heavytail: {message}", file=sys.stderr)


def _warn(message: str) -> None:
    print(f"heavytail: warning: {message}", file=sys.stderr)


def _error(message: str) -> None:
    print(f"heavytail: error: {message}", file=sys.stderr)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
