"""Where ``train.ease.window`` and ``window_weight`` come from: EASE with an order-local
co-occurrence window against plain EASE, on validation splits carved from MovieLens-100K's
training input only (issue 16).

    .venv/bin/python benchmarks/window_valid.py [--ml100k DIR] [--seeds 1 2 3]
        [--protocols random temporal]

For each protocol and seed: the benchmark's 80% / 20% split (bench_protocol.carve, the same
seeds); **the 20% test part is never read**. From the 80%, a validation split is carved the
same way (12.5% of it, seed + 777), every variant is fitted on the rest and scored on it
(full ranking, NDCG@10, bench_models.score_table). Each variant's figure is its best over the
``--lambdas`` grid on that validation split, as the run's own search does.

Variants (the Gram matrix EASE solves; nothing else changes):

- ``plain``: ``X'X``;
- ``tri w=W c=C``: ``X'X + C * models.window_gram(window=W)``, the shipped kernel (triangular,
  ``1 - d / (W + 1)`` for pairs ``d <= W`` events apart in the user's order, the user count on
  the diagonal; positive semi-definite);
- ``exp tau=T c=C``: ``X'X + C * E``, ``E`` summing ``exp(-d / T)`` over pairs ``d <= 5 T``
  apart, no diagonal (the first kernel tried; not positive semi-definite: a small ``l2`` can
  fail the Cholesky solve).

Prints the machine (CPU vectors, BLAS) and a table of valid NDCG@10 per variant and seed, with
the gain over plain EASE. The data is read from ``--ml100k`` and never copied into the repo;
without it the script says so and exits 0.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_models as bm  # noqa: E402 - the shared helpers, next to this file
import bench_protocol as bp  # noqa: E402

VALID_SEED_OFFSET = 777
VALID_FRACTION = 0.125
LAMBDAS = [100.0, 300.0, 1000.0, 3000.0]
TRI = [(20, 1.0), (20, 3.0), (40, 1.0), (40, 3.0), (80, 1.0), (80, 3.0)]
EXP = [(10, 3.0), (20, 3.0), (40, 3.0)]


def _ease(gram: np.ndarray, lam: float) -> np.ndarray:
    p = np.linalg.inv(gram + lam * np.eye(len(gram)))
    b = -p / np.diag(p)
    np.fill_diagonal(b, 0.0)
    return b


def _ndcg(scores, x, users, items, held) -> float:
    return bp._score(bm.top_k_lists(scores, x, users, items, 10), held)["ndcg_at_10"]


def _ranks(fit: pd.DataFrame, users, items):
    from nightrec.ml import models

    return models.pair_ranks(pd.Index(users).get_indexer(fit["u"]),
                             pd.Index(items).get_indexer(fit["i"]), fit["t"].to_numpy(),
                             n_users=len(users), n_items=len(items))


def _exp_gram(ranks, n_items: int, tau: float) -> np.ndarray:
    """``E``: exp(-d / tau) over each user's pairs up to 5 tau apart, both orders, no diagonal."""
    r = ranks.tocsr()
    users = np.repeat(np.arange(r.shape[0]), np.diff(r.indptr))
    order = np.lexsort((-r.data, users))
    seq, users = r.indices[order].astype(np.int64), users[order]
    flat = np.zeros(n_items * n_items)
    for d in range(1, int(5 * tau) + 1):
        same = users[d:] == users[:-d]
        keys = seq[d:][same] * n_items + seq[:-d][same]
        flat += np.exp(-d / tau) * np.bincount(keys, minlength=n_items * n_items)
    e = flat.reshape(n_items, n_items)
    return e + e.T


def variants(fit: pd.DataFrame, held: pd.DataFrame) -> dict[str, tuple[float, float]]:
    """``{variant: (best valid NDCG@10, its lambda)}`` on one carve."""
    from nightrec.ml import models

    users, items, x = bm.interaction_matrix(fit)
    g = x.T @ x
    ranks = _ranks(fit, users, items)
    grams = {"plain": g}
    for w, c in TRI:
        grams[f"tri w={w} c={c:g}"] = g + c * models.window_gram(ranks, None, window=w)
    for tau, c in EXP:
        grams[f"exp tau={tau} c={c:g}"] = g + c * _exp_gram(ranks, len(items), tau)
    out = {}
    for name, gram in grams.items():
        best = (-1.0, None)
        for lam in LAMBDAS:
            try:
                value = _ndcg(x @ _ease(gram, lam), x, users, items, held)
            except np.linalg.LinAlgError:
                continue
            best = max(best, (value, lam))
        out[name] = best
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ml100k", type=Path, default=Path(os.environ.get(
        "NIGHTREC_ML100K", bm.ROOT.parent / "shared" / "data" / "ml-100k")))
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--protocols", nargs="+", choices=["random", "temporal"],
                        default=["random", "temporal"])
    args = parser.parse_args(argv)
    if not (args.ml100k / "u.data").exists():
        print(f"MovieLens-100K not found at {args.ml100k}; nothing to measure")
        return {}
    from nightrec.dev import bench_scoring

    print(bench_scoring.machine())
    print(f"commit {bp._git('log', '-1', '--format=%h')}; valid = {VALID_FRACTION:g} of the 80% "
          f"(seed + {VALID_SEED_OFFSET}); the 20% test part is never read; lambdas {LAMBDAS}")
    ratings = pd.read_csv(args.ml100k / "u.data", sep="\t", names=["u", "i", "r", "t"])
    results = {}
    for protocol in args.protocols:
        seeds = args.seeds if protocol == "random" else args.seeds[:1]
        for seed in seeds:
            eighty, _test = bp.carve(ratings, protocol, seed, bp.TEST_FRACTION)
            del _test  # never read
            fit, held = bp.carve(eighty, protocol, seed + VALID_SEED_OFFSET, VALID_FRACTION)
            results[(protocol, seed)] = variants(fit, held)
    names = list(next(iter(results.values())))
    cols = list(results)
    print("\n| variant | " + " | ".join(f"{p} {s}" for p, s in cols) + " |")
    print("|---|" + "---|" * len(cols))
    for name in names:
        cells = []
        for key in cols:
            value, lam = results[key][name]
            base = results[key]["plain"][0]
            cells.append(f"{value:.4f} ({value / base - 1:+.1%}, l2 {lam:g})")
        print(f"| {name} | " + " | ".join(cells) + " |")
    return {f"{p}-{s}": v for (p, s), v in results.items()}


if __name__ == "__main__":
    main()
