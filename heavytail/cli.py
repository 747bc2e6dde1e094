"""The ``heavytail`` command: ``demo``, ``compare`` and ``report``."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
import warnings
from typing import Sequence

from heavytail import __version__

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


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    """The options ``demo`` and ``compare`` share: the workload, the checkpoints and how the run is shown."""
    from heavytail.workload import SIZES

    parser.add_argument(
        "--text",
        default=None,
        help="train on this text file or directory of .txt/.py/.md files instead of the Python stdlib source",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the initial weights and the data order (default 0)"
    )
    parser.add_argument("--size", choices=list(SIZES), default="small", help="model and batch size (default small)")
    parser.add_argument(
        "--every",
        type=_positive_int,
        default=None,
        help="steps per checkpoint (default: steps / 20, about 20 checkpoints)",
    )
    parser.add_argument("--no-probe", action="store_true", help="do not run the noise probe at checkpoints")
    parser.add_argument(
        "--threads",
        type=_positive_int,
        default=None,
        help="torch intra-op threads, the same for every run (default: 1 for tiny and small; for "
        "medium one per core, or 1 when the machine is busy)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``heavytail`` command (documented in docs/cli.md)."""
    from heavytail.compare import DEFAULT_COMPARE_STEPS
    from heavytail.demo import DEFAULT_LR, DEFAULT_STEPS, OPTIMIZERS

    parser = argparse.ArgumentParser(
        prog="heavytail",
        description="Heavy-tail statistics of gradients and optimizer denominators: a demo training run, an "
        "optimizer comparison, and HTML reports of run directories.",
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

    compare = sub.add_parser(
        "compare",
        help="train the demo workload under several optimizers with everything else equal, and compare them",
        description="Train the demo workload once per optimizer from the same initial weights, on the same data "
        "order, seed and step budget, each monitored into OUT/<optimizer>/; write OUT/summary.json and one "
        "HTML page OUT/compare.html with the optimizers side by side.",
    )
    compare.add_argument(
        "--optimizers",
        default=",".join(OPTIMIZERS),
        help=f"comma-separated, from {', '.join(OPTIMIZERS)} (default all four)",
    )
    compare.add_argument(
        "--steps",
        type=_positive_int,
        default=DEFAULT_COMPARE_STEPS,
        help=f"optimizer steps per run (default {DEFAULT_COMPARE_STEPS})",
    )
    compare.add_argument(
        "--out", default="heavytail_runs/compare", help="output directory (default heavytail_runs/compare)"
    )
    compare.add_argument(
        "--lr",
        default=None,
        metavar="NAME=LR,...",
        help=f"learning rates to override, e.g. adamw=3e-4,lion=1e-4 (defaults: {lr_table})",
    )
    _add_run_options(compare)

    report = sub.add_parser(
        "report",
        help="write the HTML report of a run directory",
        description="Write the self-contained HTML report of a heavytail run directory.",
    )
    report.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (with metrics.jsonl)")
    report.add_argument("-o", "--out", default=None, help="output file (default RUN_DIR/report.html)")
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


def _compare(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from heavytail.compare import parse_lrs, parse_optimizers, run_compare

    optimizers = parse_optimizers(args.optimizers)
    lrs = parse_lrs(args.lr)
    extra = [k for k in lrs if k not in optimizers]
    if extra:
        raise ValueError(f"--lr names {extra[0]!r}, which is not in --optimizers {','.join(optimizers)}")
    start = time.perf_counter()
    result = run_compare(
        optimizers,
        steps=args.steps,
        out=args.out,
        lrs=lrs,
        seed=args.seed,
        size=args.size,
        every=args.every,
        text=args.text,
        probe=not args.no_probe,
        progress=None if args.quiet else sys.stderr,
        threads=args.threads,
        command="heavytail " + " ".join(shlex.quote(a) for a in argv),
    )
    seconds = time.perf_counter() - start
    print(f"Compared {', '.join(optimizers)}: {args.steps} steps each, {seconds:.0f}s in all.")
    width = max(len(n) for n in optimizers)
    for name, s in result.summary["optimizers"].items():
        loss = s["final_loss"]
        alpha = s["overall"].get("grad/hill_alpha", float("nan"))
        shadow = s["overall"].get("shadow999/ratio_max", float("nan"))
        print(
            f"  {name.ljust(width)}  lr {s['lr']:<8g} final loss {loss:.4f}  median grad alpha {alpha:.3g}  "
            f"median shadow999 ratio {shadow:.3g}  alerts {s['alerts']}"
        )
    print(f"Summary: {result.summary_path}")
    print(f"Report:  {result.report}")
    return EXIT_OK


def _report(args: argparse.Namespace) -> int:
    from heavytail.report import write_report

    path = write_report(args.run_dir, args.out)
    print(f"Report: {path}")
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
        return _run(args, argv)


def _run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from heavytail.report import RunDirError

    try:
        if args.command == "demo":
            return _demo(args)
        if args.command == "compare":
            return _compare(args, argv)
        return _report(args)
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


def _error(message: str) -> None:
    print(f"heavytail: error: {message}", file=sys.stderr)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
