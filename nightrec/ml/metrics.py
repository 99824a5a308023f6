"""Full-ranking metrics over a (users x K) matrix of recommended item indices.

Inputs: ``recs`` int array (n_users, K), best first, -1 for an empty slot; ``relevant`` a list of
sets (one per row) of held-out item indices. Every metric returns the mean over users with at
least one relevant item, a float in [0, 1].

- ``recall_at_k``: hits in the top k / number of relevant items.
- ``precision_at_k``: hits in the top k / k.
- ``hit_rate_at_k``: share of users with at least one hit in the top k.
- ``ndcg_at_k``: DCG with gain 1 and discount 1/log2(rank+1), over the ideal DCG of
  min(|relevant|, k) hits.
- ``mrr_at_k``: 1 / rank of the first hit in the top k (0 without a hit).
- ``map_at_k``: mean over hits of precision at the hit's rank, over min(|relevant|, k).
"""

from __future__ import annotations

import numpy as np


def hit_matrix(recs: np.ndarray, relevant: list[set[int]]) -> np.ndarray:
    """Boolean (n_users, K): True where the recommended item is relevant for that user."""
    if len(recs) != len(relevant):
        raise ValueError(f"{len(recs)} rows of recommendations but {len(relevant)} relevant sets")
    return np.array(
        [[int(i) in rel for i in row] for row, rel in zip(recs, relevant)], dtype=bool
    ).reshape(recs.shape)


def _check(hits: np.ndarray, n_rel: np.ndarray, k: int) -> None:
    if k < 1 or k > hits.shape[1]:
        raise ValueError(f"k must be in [1, {hits.shape[1]}], got {k}")
    if np.any(n_rel < 1):
        raise ValueError("every evaluated user needs at least one relevant item")


def recall_at_k(hits: np.ndarray, n_rel: np.ndarray, k: int) -> float:
    _check(hits, n_rel, k)
    return float(np.mean(hits[:, :k].sum(axis=1) / n_rel))


def precision_at_k(hits: np.ndarray, n_rel: np.ndarray, k: int) -> float:
    _check(hits, n_rel, k)
    return float(np.mean(hits[:, :k].sum(axis=1) / k))


def hit_rate_at_k(hits: np.ndarray, n_rel: np.ndarray, k: int) -> float:
    _check(hits, n_rel, k)
    return float(np.mean(hits[:, :k].any(axis=1)))


def ndcg_at_k(hits: np.ndarray, n_rel: np.ndarray, k: int) -> float:
    _check(hits, n_rel, k)
    discount = 1.0 / np.log2(np.arange(2, k + 2))
    dcg = (hits[:, :k] * discount).sum(axis=1)
    ideal = np.cumsum(discount)[np.minimum(n_rel, k) - 1]
    return float(np.mean(dcg / ideal))


def mrr_at_k(hits: np.ndarray, n_rel: np.ndarray, k: int) -> float:
    _check(hits, n_rel, k)
    h = hits[:, :k]
    first = np.argmax(h, axis=1)
    return float(np.mean(np.where(h.any(axis=1), 1.0 / (first + 1), 0.0)))


def map_at_k(hits: np.ndarray, n_rel: np.ndarray, k: int) -> float:
    _check(hits, n_rel, k)
    h = hits[:, :k].astype(float)
    prec = np.cumsum(h, axis=1) / np.arange(1, k + 1)
    return float(np.mean((prec * h).sum(axis=1) / np.minimum(n_rel, k)))


METRICS = {
    "recall": recall_at_k,
    "precision": precision_at_k,
    "hit_rate": hit_rate_at_k,
    "ndcg": ndcg_at_k,
    "mrr": mrr_at_k,
    "map": map_at_k,
}


def all_metrics(recs: np.ndarray, relevant: list[set[int]], ks: list[int]) -> dict[str, float]:
    """``{"ndcg_at_10": ..., "recall_at_10": ..., ...}`` for every metric and k."""
    hits = hit_matrix(recs, relevant)
    n_rel = np.array([len(r) for r in relevant])
    return {f"{name}_at_{k}": fn(hits, n_rel, k) for k in ks for name, fn in METRICS.items()}
