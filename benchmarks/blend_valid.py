"""Would a wider blend reach issue 16's random-protocol bar? Score blends of EASE with its
co-occurrence window (the shipped search's usual choice) and other cheap candidates, judged on
validation splits carved from MovieLens-100K's training input only (issue 16).

    .venv/bin/python benchmarks/blend_valid.py [--ml100k DIR] [--seeds 1 2 3]

For each protocol and seed: the benchmark's 80% / 20% split (bench_protocol.carve); **the 20%
test part is never read**. From the 80%, the validation split of window_valid.py (12.5%, seed +
777). The valid users are cut in two random halves: every choice (each candidate's
hyperparameters from a small grid, then a greedy forward blend of per-user standardised scores
starting from EASE with window 5, up to three more terms, weights from a grid; a candidate
may be added again, which adds to its weight) is made on one
half and measured on the other, both ways, so the printed gain is not the figure it was chosen
on. Candidates: EASE plain and with window 5 (l2 100 / 300 / 1000), iALS (implicit, 64 / 128
factors, reg 1 / 10, alpha 1 / 5, 15 iterations), RP3beta (alpha 1, beta 0.2 / 0.4), and a
user-user EASE (``B_u = EASE(X X')``, scores ``B_u X``; l2 100 / 300 / 1000), which nightrec does
not ship (users x users: it does not scale past a few ten thousand users).

Prints the machine, then per run and half: each candidate's NDCG@10 on the other half relative
to EASE window 5, the blend chosen, and its ratio to EASE window 5 on the other half. Without
``--ml100k`` data it says so and exits 0.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_models as bm  # noqa: E402 - the shared helpers, next to this file
from window_valid import (  # noqa: E402
    _ease,
    ml100k_arg,
    ratings_or_none,
    valid_carve,
)

DISCOUNT = 1.0 / np.log2(np.arange(2, 12))
WEIGHTS = [0.1, 0.2, 0.35, 0.5, 0.75, 1.0]


def ndcg_per_user(scores: np.ndarray, x: np.ndarray, held: np.ndarray) -> np.ndarray:
    """NDCG@10 per row (NaN for a row with nothing held out), seen items excluded."""
    s = np.where(x > 0, -np.inf, scores)
    top = np.argpartition(-s, 10, axis=1)[:, :10]
    top = np.take_along_axis(top, np.argsort(-np.take_along_axis(s, top, 1), axis=1), 1)
    dcg = (np.take_along_axis(held, top, 1) * DISCOUNT).sum(1)
    n = np.minimum(held.sum(1), 10).astype(int)
    ideal = np.cumsum(np.r_[0.0, DISCOUNT])[n]
    return np.where(n > 0, dcg / np.where(n > 0, ideal, 1.0), np.nan)


def standardise(s: np.ndarray) -> np.ndarray:
    s = s - s.mean(1, keepdims=True)
    return s / (s.std(1, keepdims=True) + 1e-12)


def ials_scores(x: np.ndarray, factors: int, reg: float, alpha: float, seed: int) -> np.ndarray:
    import scipy.sparse as sp
    from implicit.cpu.als import AlternatingLeastSquares
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1, "blas"):
        m = AlternatingLeastSquares(factors=factors, regularization=reg, alpha=alpha,
                                    iterations=15, random_state=seed)
        m.fit(sp.csr_matrix(x.astype(np.float32)), show_progress=False)
    return np.asarray(m.user_factors, np.float64) @ np.asarray(m.item_factors, np.float64).T


def grids(fit: pd.DataFrame, x: np.ndarray, users, items, seed: int) -> dict[str, dict]:
    import scipy.sparse as sp

    from nightrec.ml import models

    g = x.T @ x
    u, i = pd.Index(users).get_indexer(fit["u"]), pd.Index(items).get_indexer(fit["i"])
    gw = g + models.window_gram(u, i, fit["t"].to_numpy(), n_items=len(items), head=None,
                                window=5)
    gu = x @ x.T
    xs = sp.csr_matrix(x)
    return {
        "ease_w5": {lam: x @ _ease(gw, lam) for lam in (100, 300, 1000)},
        "ease": {lam: x @ _ease(g, lam) for lam in (100, 300, 1000)},
        "ials": {(f, r, a): ials_scores(x, f, r, a, seed)
                 for f in (64, 128) for r in (1.0, 10.0) for a in (1.0, 5.0)},
        "rp3beta": {b: x @ models.fit_rp3beta(xs, alpha=1.0, beta=b)["item_item"]
                    for b in (0.2, 0.4)},
        "user_ease": {lam: _ease(gu, lam) @ x for lam in (100, 300, 1000)},
    }


def choose_and_measure(cands: dict[str, dict], x, held, pick, other) -> dict:
    """Choices on the rows ``pick``, figures on the rows ``other``."""
    def mean(s, rows):
        return float(np.nanmean(ndcg_per_user(s[rows], x[rows], held[rows])))

    best = {name: standardise(grid[max(grid, key=lambda k: mean(grid[k], pick))])
            for name, grid in cands.items()}
    base = mean(best["ease_w5"], other)
    blend, terms, on_pick = best["ease_w5"].copy(), ["ease_w5"], mean(best["ease_w5"], pick)
    for _ in range(3):
        found = None
        for name, s in best.items():
            if name in ("ease_w5", "ease"):
                continue
            for w in WEIGHTS:
                value = mean(blend + w * s, pick)
                if value > on_pick and (found is None or value > found[0]):
                    found = (value, name, w)
        if found is None:
            break
        on_pick, name, w = found
        blend = blend + w * best[name]
        terms.append(f"{name} x{w:g}")
    return {"single": {n: mean(s, other) / base for n, s in best.items()},
            "blend": " + ".join(terms), "blend_ratio": mean(blend, other) / base}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ml100k_arg(parser)
    args = parser.parse_args(argv)
    ratings = ratings_or_none(args.ml100k, ", cut in two halves")
    if ratings is None:
        return {}
    out = {}
    runs = [("random", s) for s in args.seeds] + [("temporal", args.seeds[0])]
    for protocol, seed in runs:
        fit, valid = valid_carve(ratings, protocol, seed)
        users, items, x = bm.interaction_matrix(fit)
        held = np.zeros_like(x)
        hu, hi = pd.Index(users).get_indexer(valid["u"]), pd.Index(items).get_indexer(valid["i"])
        ok = (hu >= 0) & (hi >= 0)
        held[hu[ok], hi[ok]] = 1.0
        half = np.random.default_rng(seed).random(len(users)) < 0.5
        started = time.perf_counter()
        cands = grids(fit, x, users, items, seed)
        fit_s = time.perf_counter() - started
        for name, (pick, other) in {"A->B": (half, ~half), "B->A": (~half, half)}.items():
            r = choose_and_measure(cands, x, held, pick, other)
            out[f"{protocol}-{seed} {name}"] = r
            singles = ", ".join(f"{n} {v:.3f}" for n, v in r["single"].items())
            print(f"{protocol} {seed} {name} (fits {fit_s:.0f} s): {singles}; blend "
                  f"{r['blend']}: **{r['blend_ratio']:.3f}**", flush=True)
    return out


if __name__ == "__main__":
    main()
