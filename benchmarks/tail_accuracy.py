"""Accuracy of the tail-index estimators and k rules on distributions with a known tail index."""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch
from scipy.stats import levy_stable

from heavytail.estimators import dedh, hill, pickands, stable_alpha

# name -> (tail index, sampler(seed, n)); the target list first, then the robustness set (--more).
DISTRIBUTIONS = {
    "pareto(1.5)": (1.5, lambda s, n: np.random.default_rng(s).pareto(1.5, n) + 1),
    "|t(2)|": (2.0, lambda s, n: np.random.default_rng(s).standard_t(2, n)),
    "|t(3)|": (3.0, lambda s, n: np.random.default_rng(s).standard_t(3, n)),
    "|stable(1.7)|": (1.7, lambda s, n: levy_stable.rvs(1.7, 0, size=n, random_state=s)),
}
MORE = {
    "|t(1)| (Cauchy)": (1.0, lambda s, n: np.random.default_rng(s).standard_t(1, n)),
    "|t(4)|": (4.0, lambda s, n: np.random.default_rng(s).standard_t(4, n)),
    "|stable(1.5)|": (1.5, lambda s, n: levy_stable.rvs(1.5, 0, size=n, random_state=s)),
    "|stable(1.9)|": (1.9, lambda s, n: levy_stable.rvs(1.9, 0, size=n, random_state=s)),
    "frechet(2)": (2.0, lambda s, n: (-np.log(np.random.default_rng(s).random(n))) ** -0.5),
    "gauss + 2% pareto(2)": (2.0, lambda s, n: _mixture(s, n, 0.02)),
    "gauss + 0.5% pareto(2)": (2.0, lambda s, n: _mixture(s, n, 0.005)),
}
GAUSSIAN = ("gaussian", lambda s, n: np.random.default_rng(s).standard_normal(n))
# --sparse: a heavy component too rare for k >= n/100 (the rare-token rows of an embedding or output layer);
# name -> (tail index, n, sampler(seed, n)).
SPARSE = {
    "gauss + 0.1% pareto(1.2)": (1.2, 1_000_000, lambda s, n: _sparse_mixture(s, n, 0.001)),
    "gauss + 0.3% pareto(1.2)": (1.2, 200_000, lambda s, n: _sparse_mixture(s, n, 0.003)),
}


def _mixture(seed: int, n: int, fraction: float) -> np.ndarray:
    """Gaussian bulk with a Pareto(2) tail on a few entries: the shape of a layer with rare huge gradients."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(n)
    tail = rng.random(n) < fraction
    x[tail] = (rng.pareto(2.0, tail.sum()) + 1) * 3 * rng.choice([-1.0, 1.0], tail.sum())
    return x


def _sparse_mixture(seed: int, n: int, fraction: float) -> np.ndarray:
    """Gaussian bulk whose entries are, with probability ``fraction``, Pareto(1.2) with x_min = 1 and a random sign.

    Above |x| ~ 5 the Gaussian has almost no mass (0.6 entries in 10^6), so the magnitudes' tail is
    ``fraction * x**-1.2`` there: a power law of index 1.2 carried by a few hundred entries.
    """
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(n)
    tail = rng.random(n) < fraction
    x[tail] = (rng.pareto(1.2, tail.sum()) + 1) * rng.choice([-1.0, 1.0], tail.sum())
    return x


def rules(n: int, generic: bool = False) -> dict:
    """Estimator rules by column name; each maps an (rows, n) float64 tensor to alpha per row.

    ``generic``: titles without the value of k, for a table whose rows have different n.
    """
    root, pct = math.isqrt(n), max(1, n // 100)
    r, p = ("sqrt(n)", "n/100") if generic else (f"sqrt(n)={root}", f"{pct}")
    return {
        "hill default": lambda x: hill(x).alpha,
        "hill sparse=False": lambda x: hill(x, sparse=False).alpha,
        "hill sparse=True": lambda x: hill(x, sparse=True).alpha,
        f"hill k={r}": lambda x: hill(x, root).alpha,
        f"hill k=n/100{'' if generic else '=' + p}": lambda x: hill(x, pct).alpha,
        f"dedh k={p}": lambda x: dedh(x, pct),
        f"pickands k={p}": lambda x: pickands(x, pct),
        "stable (blocks)*": stable_alpha,
    }


def estimate(sampler, seeds: int, n: int, columns: dict, chunk: int = 16) -> dict[str, np.ndarray]:
    out: dict[str, list[np.ndarray]] = {name: [] for name in columns}
    out["k"] = []
    for start in range(0, seeds, chunk):
        x = torch.from_numpy(np.stack([sampler(s, n) for s in range(start, min(seeds, start + chunk))]))
        for name, rule in columns.items():
            out[name].append(rule(x).double().numpy())
        out["k"].append(hill(x).k.double().numpy())
    return {name: np.concatenate(v) for name, v in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, default=100, help="independent samples per distribution")
    parser.add_argument("--n", type=int, default=100_000, help="values per sample")
    parser.add_argument("--more", action="store_true", help="add the robustness set (Cauchy, t(4), mixtures, ...)")
    parser.add_argument(
        "--sparse", action="store_true", help="add sparse heavy tails (0.1%% / 0.3%% Pareto(1.2) in a Gaussian bulk)"
    )
    args = parser.parse_args()

    columns = rules(args.n)
    dists = {**DISTRIBUTIONS, **(MORE if args.more else {})}
    width = max(len(c) for c in columns) + 2
    print(f"median |alpha_hat / alpha - 1| over {args.seeds} seeds, n = {args.n:,}")
    print(f"{'distribution':24s}" + "".join(f"{c:>{width}s}" for c in columns) + f"{'default k (median)':>20s}")
    start = time.perf_counter()
    for name, (alpha, sampler) in dists.items():
        est = estimate(sampler, args.seeds, args.n, columns)
        cells = []
        for col in columns:
            if col.startswith("stable") and name.startswith(("pareto", "frechet")):
                cells.append("-")  # one-sided data: outside the symmetric stable model
                continue
            target = min(alpha, 2.0) if col.startswith("stable") else alpha
            cells.append(f"{np.median(np.abs(est[col] / target - 1)):.1%}")
        print(f"{name:24s}" + "".join(f"{c:>{width}s}" for c in cells) + f"{np.median(est['k']):>20.0f}", flush=True)

    est = estimate(GAUSSIAN[1], args.seeds, args.n, columns)
    print("\ngaussian (no power-law tail): median alpha_hat [share of seeds with alpha_hat > 4; stable: = 2]")
    cells = []
    for col in columns:
        share = np.mean(est[col] >= 2.0) if col.startswith("stable") else np.mean(est[col] > 4)
        cells.append(f"{np.median(est[col]):.3g} [{share:.0%}]")
    print(f"{'gaussian':24s}" + "".join(f"{c:>{width}s}" for c in cells) + f"{np.median(est['k']):>20.0f}")
    if args.sparse:
        print("\nsparse heavy tails, each at its own n: median |alpha_hat / alpha - 1| [default k (median)]")
        print(f"{'distribution':24s}{'n':>10s}" + "".join(f"{c:>{width}s}" for c in rules(0, True)))
        for name, (alpha, n, sampler) in SPARSE.items():
            est = estimate(sampler, args.seeds, n, rules(n, True))
            cells = [f"{np.median(np.abs(v / alpha - 1)):.1%}" for col, v in est.items() if col != "k"]
            cells[0] += f" [{np.median(est['k']):.0f}]"
            print(f"{name:24s}{n:>10,}" + "".join(f"{c:>{width}s}" for c in cells), flush=True)

    print("\n* stable: Mohammadi et al. block-sum estimator on the signed data; its target is min(alpha, 2)")
    print("  (finite-variance data is in the Gaussian domain); '-' = one-sided data, outside its model.")
    print(f"({time.perf_counter() - start:.0f} s on {torch.get_num_threads()} CPU threads)")


if __name__ == "__main__":
    main()
