"""Full-ranking metrics over a (users x K) matrix of recommended item indices.

Inputs: ``recs`` int array (n_users, K), best first, -1 for an empty slot (fewer unseen items than
K); ``relevant`` the held-out item indices of each row, as :class:`Relevant` (CSR: what
tasks/evaluate.py builds, vectorised) or a list of sets, one per row (converted). Every metric
is first computed per user (:func:`user_metrics`, a float64 array in [0, 1] per metric) and
reported as the mean over users, each of whom must have at least one relevant item.

- ``recall_at_k``: hits in the top k / number of relevant items.
- ``precision_at_k``: hits in the top k / k.
- ``hit_rate_at_k``: share of users with at least one hit in the top k.
- ``ndcg_at_k``: DCG with gain 1 and discount 1/log2(rank+1), over the ideal DCG of
  min(|relevant|, k) hits.
- ``mrr_at_k``: 1 / rank of the first hit in the top k (0 without a hit).
- ``map_at_k``: mean over hits of precision at the hit's rank, over min(|relevant|, k).

Why vectorised: at 100k evaluated users x K = 100 a Python loop over slots with a set lookup
each took minutes; here a slot is a hit when its ``row * width + item`` int64 key is among the
sorted keys of the row's relevant items (one ``searchsorted``), in row blocks that bound memory.

:func:`bootstrap_ci` gives the percentile bootstrap interval of each metric's mean from the
per-user values (what tasks/evaluate.py reports when it ranks a sample of the test users).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

# rec slots whose keys are looked up at once in hit_matrix (its int64 temporaries: ~8 MB each)
_HIT_BLOCK_SLOTS = 1 << 20
# resample x user cells drawn at once in bootstrap_ci (its int64 temporaries: ~16 MB each)
_BOOTSTRAP_BLOCK_CELLS = 1 << 21


@dataclass(frozen=True)
class Relevant:
    """Relevant items per ranked row, CSR: row ``i``'s items are
    ``indices[indptr[i]:indptr[i + 1]]``, sorted ascending and unique (int64, >= 0)."""

    indptr: np.ndarray
    indices: np.ndarray

    def __len__(self) -> int:
        return len(self.indptr) - 1

    @property
    def n_rel(self) -> np.ndarray:
        """Relevant items per row, int64 (n_rows,)."""
        return np.diff(self.indptr)

    @classmethod
    def from_pairs(cls, rows: np.ndarray, items: np.ndarray, *, n_rows: int) -> Relevant:
        """From parallel (row, item) arrays in any order, duplicates allowed; rows in
        [0, n_rows)."""
        rows = np.asarray(rows, dtype=np.int64)
        items = np.asarray(items, dtype=np.int64)
        if rows.shape != items.shape:
            raise ValueError(f"{rows.shape} rows but {items.shape} items")
        if rows.size and (rows.min() < 0 or rows.max() >= n_rows):
            raise ValueError(f"row indices must be in [0, {n_rows})")
        if items.size and items.min() < 0:
            raise ValueError("item indices must be >= 0")
        order = np.lexsort((items, rows))
        rows, items = rows[order], items[order]
        first = np.ones(len(rows), dtype=bool)
        first[1:] = (rows[1:] != rows[:-1]) | (items[1:] != items[:-1])
        rows, items = rows[first], items[first]
        indptr = np.zeros(n_rows + 1, dtype=np.int64)
        np.cumsum(np.bincount(rows, minlength=n_rows), out=indptr[1:])
        return cls(indptr, items)

    @classmethod
    def from_sets(cls, sets: Iterable[Iterable[int]]) -> Relevant:
        """From one set (any iterable) of item indices per row: the list-of-sets input older
        callers pass."""
        rows = [sorted({int(i) for i in s}) for s in sets]
        indptr = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum([len(r) for r in rows], out=indptr[1:])
        indices = np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int64,
                              count=int(indptr[-1]))
        if indices.size and indices.min() < 0:
            raise ValueError("item indices must be >= 0")
        return cls(indptr, indices)

    def take(self, rows: np.ndarray) -> Relevant:
        """The given rows (int indices, in that order) as a new :class:`Relevant`."""
        rows = np.asarray(rows, dtype=np.int64)
        lengths = self.n_rel[rows]
        indptr = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(lengths, out=indptr[1:])
        gather = np.repeat(self.indptr[rows] - indptr[:-1], lengths) + np.arange(indptr[-1])
        return Relevant(indptr, self.indices[gather])

    def to_sets(self) -> list[set[int]]:
        return [set(self.indices[a:b].tolist()) for a, b in zip(self.indptr[:-1], self.indptr[1:])]


def as_relevant(relevant: Relevant | Iterable[Iterable[int]]) -> Relevant:
    """``relevant`` as :class:`Relevant` (a list of sets is converted)."""
    return relevant if isinstance(relevant, Relevant) else Relevant.from_sets(relevant)


def hit_matrix(recs: np.ndarray, relevant: Relevant | list[set[int]]) -> np.ndarray:
    """Boolean (n_users, K): True where the recommended item is relevant for that user; an
    empty slot (any negative index) is never a hit."""
    rel = as_relevant(relevant)
    recs = np.asarray(recs)
    if recs.ndim != 2:
        raise ValueError(f"recs must be 2-d (n_users, K), got shape {recs.shape}")
    n, k = recs.shape
    if n != len(rel):
        raise ValueError(f"{n} rows of recommendations but {len(rel)} relevant sets")
    hits = np.zeros((n, k), dtype=bool)
    if recs.size == 0 or rel.indices.size == 0:
        return hits
    # keys are row * width + item; a relevant item >= width is never recommended (a miss), and
    # is dropped so that its key cannot spill into the next row's range
    width = int(recs.max()) + 1
    if width <= 0:
        return hits
    block = max(1, _HIT_BLOCK_SLOTS // max(k, 1))
    if block * width >= 2**62:
        raise ValueError(f"item indices up to {width - 1} overflow the int64 keys")
    for lo in range(0, n, block):
        hi = min(n, lo + block)
        a, b = rel.indptr[lo], rel.indptr[hi]
        items = rel.indices[a:b]
        rows = np.repeat(np.arange(hi - lo, dtype=np.int64), np.diff(rel.indptr[lo:hi + 1]))
        keep = items < width
        # ascending: rows ascend and each row's items are sorted
        rel_keys = rows[keep] * width + items[keep]
        if rel_keys.size == 0:
            continue
        r = recs[lo:hi].astype(np.int64)
        keys = np.arange(hi - lo, dtype=np.int64)[:, None] * width + r
        pos = np.searchsorted(rel_keys, keys)
        np.minimum(pos, rel_keys.size - 1, out=pos)
        hits[lo:hi] = (rel_keys[pos] == keys) & (r >= 0)
    return hits


def _check(hits: np.ndarray, n_rel: np.ndarray, k: int) -> None:
    if k < 1 or k > hits.shape[1]:
        raise ValueError(f"k must be in [1, {hits.shape[1]}], got {k}")
    if np.any(n_rel < 1):
        raise ValueError("every evaluated user needs at least one relevant item")


def _recall(h: np.ndarray, n_rel: np.ndarray, k: int) -> np.ndarray:
    return h.sum(axis=1) / n_rel


def _precision(h: np.ndarray, n_rel: np.ndarray, k: int) -> np.ndarray:
    return h.sum(axis=1) / k


def _hit_rate(h: np.ndarray, n_rel: np.ndarray, k: int) -> np.ndarray:
    return h.any(axis=1).astype(np.float64)


def _ndcg(h: np.ndarray, n_rel: np.ndarray, k: int) -> np.ndarray:
    discount = 1.0 / np.log2(np.arange(2, k + 2))
    ideal = np.cumsum(discount)[np.minimum(n_rel, k) - 1]
    return (h * discount).sum(axis=1) / ideal


def _mrr(h: np.ndarray, n_rel: np.ndarray, k: int) -> np.ndarray:
    return np.where(h.any(axis=1), 1.0 / (np.argmax(h, axis=1) + 1), 0.0)


def _map(h: np.ndarray, n_rel: np.ndarray, k: int) -> np.ndarray:
    hf = h.astype(np.float64)
    prec = np.cumsum(hf, axis=1) / np.arange(1, k + 1)
    return (prec * hf).sum(axis=1) / np.minimum(n_rel, k)


# per-user value of each metric from the top-k columns of the hit matrix
_PER_USER = {
    "recall": _recall,
    "precision": _precision,
    "hit_rate": _hit_rate,
    "ndcg": _ndcg,
    "mrr": _mrr,
    "map": _map,
}


def _mean(name: str, hits: np.ndarray, n_rel: np.ndarray, k: int) -> float:
    _check(hits, n_rel, k)
    return float(np.mean(_PER_USER[name](hits[:, :k], n_rel, k)))


def recall_at_k(hits: np.ndarray, n_rel: np.ndarray, k: int) -> float:
    return _mean("recall", hits, n_rel, k)


def precision_at_k(hits: np.ndarray, n_rel: np.ndarray, k: int) -> float:
    return _mean("precision", hits, n_rel, k)


def hit_rate_at_k(hits: np.ndarray, n_rel: np.ndarray, k: int) -> float:
    return _mean("hit_rate", hits, n_rel, k)


def ndcg_at_k(hits: np.ndarray, n_rel: np.ndarray, k: int) -> float:
    return _mean("ndcg", hits, n_rel, k)


def mrr_at_k(hits: np.ndarray, n_rel: np.ndarray, k: int) -> float:
    return _mean("mrr", hits, n_rel, k)


def map_at_k(hits: np.ndarray, n_rel: np.ndarray, k: int) -> float:
    return _mean("map", hits, n_rel, k)


METRICS = {
    "recall": recall_at_k,
    "precision": precision_at_k,
    "hit_rate": hit_rate_at_k,
    "ndcg": ndcg_at_k,
    "mrr": mrr_at_k,
    "map": map_at_k,
}


def user_metrics(recs: np.ndarray, relevant: Relevant | list[set[int]],
                 ks: list[int]) -> dict[str, np.ndarray]:
    """``{"ndcg_at_10": array, ...}``: each metric and k per user, float64 (n_users,) in
    [0, 1], rows as in ``recs``."""
    rel = as_relevant(relevant)
    hits = hit_matrix(recs, rel)
    n_rel = rel.n_rel
    out = {}
    for k in ks:
        _check(hits, n_rel, k)
        for name, fn in _PER_USER.items():
            out[f"{name}_at_{k}"] = np.asarray(fn(hits[:, :k], n_rel, k), dtype=np.float64)
    return out


def all_metrics(recs: np.ndarray, relevant: Relevant | list[set[int]],
                ks: list[int]) -> dict[str, float]:
    """``{"ndcg_at_10": ..., "recall_at_10": ..., ...}`` for every metric and k: the means of
    :func:`user_metrics`."""
    return {name: float(np.mean(v)) for name, v in user_metrics(recs, relevant, ks).items()}


def bootstrap_ci(values: dict[str, np.ndarray], *, samples: int, level: float,
                 seed: int | np.random.SeedSequence) -> dict[str, list[float]]:
    """``{name: [lo, hi]}``: the two-sided percentile bootstrap interval, at ``level`` in (0, 1),
    of the mean of each per-user array in ``values`` (all of one length, resampled together:
    resample ``b`` draws the same users for every metric), from ``samples`` resamples drawn
    with ``np.random.default_rng(seed)``.

    Memory: never a (samples x users) float matrix; resamples are drawn in blocks of at most
    ``_BOOTSTRAP_BLOCK_CELLS`` users in all, each turned into per-user counts whose product with
    the (users x metrics) values gives the block's means.
    """
    if samples < 1:
        raise ValueError(f"bootstrap samples must be >= 1, got {samples}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"ci level must be in (0, 1), got {level}")
    names = list(values)
    if not names:
        return {}
    table = np.column_stack([np.asarray(values[n], dtype=np.float64) for n in names])
    n = len(table)
    if n == 0:
        raise ValueError("no users to bootstrap")
    rng = np.random.default_rng(seed)
    block = max(1, min(samples, _BOOTSTRAP_BLOCK_CELLS // n))
    means = np.empty((samples, len(names)))
    for lo in range(0, samples, block):
        b = min(block, samples - lo)
        draws = rng.integers(0, n, size=(b, n), dtype=np.int64)
        draws += np.arange(b, dtype=np.int64)[:, None] * n
        counts = np.bincount(draws.ravel(), minlength=b * n).reshape(b, n)
        # einsum's own loop, not BLAS: each mean's sum runs in one order whatever the block
        # size (a BLAS product's blocking changed the last bit between block sizes)
        means[lo:lo + b] = np.einsum("bn,nm->bm", counts, table) / n
    alpha = (1.0 - level) / 2.0
    lo_hi = np.quantile(means, [alpha, 1.0 - alpha], axis=0)
    return {name: [float(lo_hi[0, j]), float(lo_hi[1, j])] for j, name in enumerate(names)}
