"""Calibration of the noise-tail readings on noise of known law, through the public Monitor API.

Each row is one (law, coordinate scales, source; the rank source runs two processes under DDP on the CPU): the "model" is one vector P with loss (P * xi_t).sum(), so its
gradient is the drawn noise xi_t, trained by SGD with lr = 0 (heavytail/workload/noise_laws.py). The reading is
the median over seeds of the tensor's alpha (``noise/hill_alpha``, ``noise/microbatch_hill_alpha`` or
``probe/hill_alpha``), the verdict the one most seeds gave (``.../tail_class``). A row is calibrated when:

- truth light: the verdict is light;
- truth sparse: the verdict is sparse or light, and no seed reads an alpha under 2.5;
- truth alpha: the verdict is power and the median alpha is within 15% of the truth.

Each run is one checkpoint interval at the monitor's default (100 steps), so a streaming source's reading pools the
windows it folds (six of the temporal source, 24 of the micro-batch source). 21 seeds by default: one reading of a
power law spreads by a median 4-10% around the truth on the streaming sources and 8-14% on the probe (one window:
8-23%, when five seeds left a median's standard error as large as the tolerance). About 5 minutes on two cores.

    PYTHONPATH=. python benchmarks/calibration.py [--seeds 21] [--sources temporal,microbatch,probe] [--noise-window 32]
    PYTHONPATH=. python benchmarks/calibration.py --sources rank [--seeds 21]
    PYTHONPATH=. python benchmarks/calibration.py --pure [--seeds 201] [--windows N]

``--pure`` measures the estimator's own bias on each source's deviations without the Monitor (seconds for hundreds
of seeds): windows of S x W draws of each power law, taken as the sources take them (one draw around its
coordinate's median, as the temporal source; each of four micro-batches around their median; half the difference
of two ranks' draws), pooled as a checkpoint of the table's runs pools them (``PURE_WINDOWS``; ``--windows 1``: one
window, the reading before checkpoints pooled windows) and read as the monitor reads them, with the median's
standard error at the table's seed count (bootstrap). It tells a bias from the spread of a median over a few seeds.

The last line is ``calibrated=X/Y``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections import Counter

import numpy as np
import torch

from heavytail.workload.noise_laws import LAWS, SCALES, SOURCES, run_source

VERDICTS = {0: "light", 1: "power", 2: "sparse"}
TOLERANCE = 0.15
SPARSE_FLOOR = 2.5
SEEDS = 21
PREFIX = {"temporal": "noise/", "microbatch": "noise/microbatch_", "probe": "probe/", "rank": "noise/rank_"}


def reading(metrics: dict, source: str, name: str = "P") -> tuple[float, str]:
    """(alpha, verdict) of one record; a record without a verdict key (before verdicts existed) reads a null
    alpha as light and any other as power."""
    alpha = metrics.get(f"{PREFIX[source]}hill_alpha/{name}")
    alpha = math.nan if alpha is None else float(alpha)
    key = f"{PREFIX[source]}tail_class/{name}"
    if key in metrics:
        code = metrics[key]
        verdict = "none" if code is None or math.isnan(code) else VERDICTS[int(code)]
    else:
        verdict = "light" if math.isnan(alpha) or math.isinf(alpha) else "power"
    return alpha, verdict


def judge(law: str, alphas: list[float], verdicts: list[str]) -> tuple[float, str, bool]:
    """The row's median alpha, majority verdict and whether it is calibrated."""
    spec = LAWS[law]
    finite = [a for a in alphas if not math.isnan(a)]
    median = statistics.median(finite) if finite else math.nan
    verdict = Counter(verdicts).most_common(1)[0][0]
    if spec.truth == "light":
        ok = verdict == "light"
    elif spec.truth == "sparse":
        ok = verdict in ("sparse", "light") and all(a >= SPARSE_FLOOR for a in finite)
    else:
        ok = verdict == "power" and abs(median / spec.alpha - 1) <= TOLERANCE
    return median, verdict, ok


def one_reading_spread(law: str, alphas: list[float]) -> float:
    """How far one seed's reading of a power law is from the truth: the median over seeds of |alpha / truth - 1|
    (NaN for light and sparse laws)."""
    spec = LAWS[law]
    finite = [a for a in alphas if not math.isnan(a)]
    if spec.truth != "power" or not finite:
        return math.nan
    return statistics.median(abs(a / spec.alpha - 1) for a in finite)


def calibrate(
    laws=tuple(LAWS), scales=SCALES, sources=SOURCES, seeds: int = SEEDS, print_rows: bool = True, **config
) -> list[dict]:
    rows = []
    if print_rows:
        print(
            f"{'law':16s} {'scales':10s} {'source':11s} {'alpha':>7s} {'verdict':8s} {'truth':8s} ok  "
            f"{'spread':>6s}  per seed"
        )
    for law in laws:
        truth = LAWS[law].truth if LAWS[law].truth != "power" else f"{LAWS[law].alpha:g}"
        for scale in scales:
            for source in sources:
                readings = [reading(run_source(law, scale, source, seed, **config), source) for seed in range(seeds)]
                alphas, verdicts = [a for a, _ in readings], [v for _, v in readings]
                median, verdict, ok = judge(law, alphas, verdicts)
                spread = one_reading_spread(law, alphas)
                rows.append(
                    dict(law=law, scales=scale, source=source, alpha=median, verdict=verdict, ok=ok, spread=spread)
                )
                if print_rows:
                    seeds_text = " ".join(f"{a:.2f}{v[0]}" for a, v in readings)
                    spread_text = "-" if math.isnan(spread) else f"{spread:.1%}"
                    print(
                        f"{law:16s} {scale:10s} {source:11s} {median:7.2f} {verdict:8s} {truth:8s} "
                        f"{'yes' if ok else 'NO ':3s} {spread_text:>6s}  {seeds_text}",
                        flush=True,
                    )
    return rows


PURE_STRUCTURES = ("temporal", "microbatch", "rank")
PURE_WINDOWS = {"temporal": 6, "microbatch": 24, "rank": 6}
"""The full windows of 16 a checkpoint of the table's runs pools (100 steps: six windows of one draw a step,
24 of four micro-batches a step less the first step's, which the monitor does not yet see as accumulating)."""


def pure_deviations(law: str, structure: str, rng, coords: int = 256, window: int = 16):
    """``(deviations, draws)`` of shape ``(coords, window)`` as one source builds them from i.i.d. draws of ``law``."""
    spec = LAWS[law]
    if structure == "temporal":
        x = spec.draw(rng, (coords, window))
        return x - np.median(x, axis=1, keepdims=True), x
    if structure == "microbatch":  # four micro-batches a step, each around the step's median
        x = spec.draw(rng, (coords, window // 4, 4))
        return (x - np.median(x, axis=2, keepdims=True)).reshape(coords, window), x.reshape(coords, window)
    if structure == "rank":  # two ranks: each rank's gradient minus their mean
        x0, x1 = spec.draw(rng, (coords, window)), spec.draw(rng, (coords, window))
        return (x0 - x1) / 2, x0
    raise ValueError(f"unknown structure {structure!r}")


def pure_bias(law: str, structure: str, seeds: int, table_seeds: int = SEEDS, windows: int | None = None) -> dict:
    """The median of alpha / truth over ``seeds`` pure-model readings (each of ``windows`` windows pooled, as a
    checkpoint pools them: :data:`PURE_WINDOWS` by default), one reading's median |error|, and the standard error
    of a ``table_seeds``-seed median (2,000 bootstrap medians)."""
    from heavytail.estimators import noise

    windows = PURE_WINDOWS[structure] if windows is None else windows
    ratios = []
    for seed in range(seeds):
        rng = np.random.default_rng(seed)
        tally = None
        for _ in range(windows):
            dev, draws = pure_deviations(law, structure, rng)
            as_tensor = lambda a: torch.tensor(a[None], dtype=torch.float32)  # noqa: E731
            one = noise.tally(as_tensor(dev), torch.ones((1, *dev.shape), dtype=torch.bool), as_tensor(draws))
            if tally is None:  # the monitor's tally: float32 values, one window's size
                tally = noise.tally_init(1, one.top.shape[1])
            tally = noise.merge(tally, one)
        ratios.append(float(noise.read(tally, 100).alpha[0]) / LAWS[law].alpha)
    ratios = np.array(ratios)
    boot = np.random.default_rng(0)
    se = float(np.std([np.median(boot.choice(ratios, table_seeds)) for _ in range(2000)]))
    return dict(bias=float(np.median(ratios) - 1), spread=float(np.median(np.abs(ratios - 1))), se=se)


def pure_table(seeds: int, laws=None, windows: int | None = None) -> None:
    laws = [law for law in (laws or LAWS) if LAWS[law].truth == "power"]
    pooled = ", ".join(f"{s} {windows or PURE_WINDOWS[s]}" for s in PURE_STRUCTURES)
    print(
        f"pure-model readings of the pooled windows ({pooled}), {seeds} seeds: median bias / one reading's median "
        f"|error| / standard error of a {SEEDS}-seed median"
    )
    print(f"{'law':14s}" + "".join(f"{s:>26s}" for s in PURE_STRUCTURES))
    worst = 0.0
    for law in laws:
        cells = []
        for structure in PURE_STRUCTURES:
            r = pure_bias(law, structure, seeds, windows=windows)
            worst = max(worst, abs(r["bias"]))
            cells.append(f"{r['bias']:+.3f} / {r['spread']:.2f} / {r['se']:.3f}")
        print(f"{law:14s}" + "".join(f"{c:>26s}" for c in cells), flush=True)
    print(f"worst_pure_bias={worst:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=None, help=f"default {SEEDS}; 201 with --pure")
    parser.add_argument(
        "--sources",
        default=",".join(SOURCES),
        help="comma-separated, from temporal, microbatch, probe (the default: one process each) and rank (two "
        "processes under DDP, gloo, per seed: the slowest, so not in the default)",
    )
    parser.add_argument("--laws", default=",".join(LAWS))
    parser.add_argument("--scales", default=",".join(SCALES))
    parser.add_argument("--noise-window", type=int, default=None, help="MonitorConfig.noise_window (default: its own)")
    parser.add_argument("--pure", action="store_true", help="the estimator's bias on each source's pure model")
    parser.add_argument(
        "--windows",
        type=int,
        default=None,
        help="with --pure: windows pooled per reading (default: as the table's runs)",
    )
    args = parser.parse_args()
    if args.pure:
        pure_table(args.seeds or 201, laws=args.laws.split(","), windows=args.windows)
        return
    config = {} if args.noise_window is None else {"noise_window": args.noise_window}
    start = time.perf_counter()
    rows = calibrate(
        laws=args.laws.split(","),
        scales=args.scales.split(","),
        sources=args.sources.split(","),
        seeds=args.seeds or SEEDS,
        **config,
    )
    spreads = [r["spread"] for r in rows if not math.isnan(r["spread"])]
    if spreads:
        print(f"one reading's median error over the power-law rows: {min(spreads):.1%} to {max(spreads):.1%}")
    print(f"({time.perf_counter() - start:.0f} s; per seed: alpha and the verdict's initial; spread: one reading's")
    print(" median |alpha / truth - 1| over the seeds)")
    print(f"calibrated={sum(r['ok'] for r in rows)}/{len(rows)}")


if __name__ == "__main__":
    main()
