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
  ``1 - d / (W + 1)`` for items ``d`` positions apart in the user's order, a position per
  distinct timestamp: events of the same second share one; positive semi-definite);
- ``index-order w=W c=C``: the first version (commit c91f461), the same kernel over each
  user's events one position each, ties broken by item index (``models.pair_ranks``' order).
  On MovieLens-100K half the events share their second with another of the user's, so part
  of its pairs followed the item ids: kept here to show what that did on validation.

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
TRI = [(5, 1.0), (10, 1.0), (20, 1.0), (40, 1.0), (5, 0.3), (10, 0.3), (20, 0.3), (40, 0.3)]
INDEX_ORDER = [(20, 1.0)]


def _ease(gram: np.ndarray, lam: float) -> np.ndarray:
    p = np.linalg.inv(gram + lam * np.eye(len(gram)))
    b = -p / np.diag(p)
    np.fill_diagonal(b, 0.0)
    return b


def _ndcg(scores, x, users, items, held) -> float:
    return bp._score(bm.top_k_lists(scores, x, users, items, 10), held)["ndcg_at_10"]


def _index_order_gram(fit: pd.DataFrame, users, items, window: int) -> np.ndarray:
    """c91f461's kernel: one position per event in ``models.pair_ranks``' order (ties by item
    index), ``1 - d / (window + 1)`` for pairs ``d <= window`` apart, the user count on the
    diagonal."""
    from nightrec.ml import models

    r = models.pair_ranks(pd.Index(users).get_indexer(fit["u"]),
                          pd.Index(items).get_indexer(fit["i"]), fit["t"].to_numpy(),
                          n_users=len(users), n_items=len(items)).tocsr()
    owner = np.repeat(np.arange(r.shape[0]), np.diff(r.indptr))
    order = np.lexsort((-r.data, owner))
    seq, owner = r.indices[order].astype(np.int64), owner[order]
    n = len(items)
    flat = np.zeros(n * n)
    for d in range(1, window + 1):
        same = owner[d:] == owner[:-d]
        keys = seq[d:][same] * n + seq[:-d][same]
        flat += (1.0 - d / (window + 1)) * np.bincount(keys, minlength=n * n)
    w = flat.reshape(n, n)
    w = w + w.T
    w[np.diag_indices(n)] += np.bincount(seq, minlength=n)
    return w


def ml100k_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ml100k", type=Path, default=Path(os.environ.get(
        "NIGHTREC_ML100K", bm.ROOT.parent / "shared" / "data" / "ml-100k")))
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])


def ratings_or_none(ml100k: Path, carve_note: str = "") -> pd.DataFrame | None:
    """MovieLens-100K's events (read where they are, never copied), after printing the
    machine, the commit and how the valid split is carved (``carve_note`` appended); None (and
    a line saying so) when the data is absent."""
    if not (ml100k / "u.data").exists():
        print(f"MovieLens-100K not found at {ml100k}; nothing to measure")
        return None
    from nightrec.dev import bench_scoring

    print(bench_scoring.machine())
    print(f"commit {bp._git('log', '-1', '--format=%h')}; valid = {VALID_FRACTION:g} of the 80% "
          f"(seed + {VALID_SEED_OFFSET}){carve_note}; the 20% test part is never read")
    return pd.read_csv(ml100k / "u.data", sep="\t", names=["u", "i", "r", "t"])


def valid_carve(ratings: pd.DataFrame, protocol: str, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(fit, valid)``: bench_protocol's 80% for ``protocol`` and ``seed``, carved again into
    a validation split; the 20% test part is never read."""
    eighty, _test = bp.carve(ratings, protocol, seed, bp.TEST_FRACTION)
    del _test  # never read
    return bp.carve(eighty, protocol, seed + VALID_SEED_OFFSET, VALID_FRACTION)


def variants(fit: pd.DataFrame, held: pd.DataFrame) -> dict[str, tuple[float, float]]:
    """``{variant: (best valid NDCG@10, its lambda)}`` on one carve."""
    from nightrec.ml import models

    users, items, x = bm.interaction_matrix(fit)
    g = x.T @ x
    u = pd.Index(users).get_indexer(fit["u"])
    i = pd.Index(items).get_indexer(fit["i"])
    grams = {"plain": g}
    for w, c in TRI:
        grams[f"tri w={w} c={c:g}"] = g + c * models.window_gram(
            u, i, fit["t"].to_numpy(), n_items=len(items), head=None, window=w)
    for w, c in INDEX_ORDER:
        grams[f"index-order w={w} c={c:g}"] = g + c * _index_order_gram(fit, users, items, w)
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
    ml100k_arg(parser)
    parser.add_argument("--protocols", nargs="+", choices=["random", "temporal"],
                        default=["random", "temporal"])
    args = parser.parse_args(argv)
    ratings = ratings_or_none(args.ml100k)
    if ratings is None:
        return {}
    print(f"lambdas {LAMBDAS}")
    results = {}
    for protocol in args.protocols:
        seeds = args.seeds if protocol == "random" else args.seeds[:1]
        for seed in seeds:
            results[(protocol, seed)] = variants(*valid_carve(ratings, protocol, seed))
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
