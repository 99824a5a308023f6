"""Exact top-K over all items for many users, with each user's seen items excluded.

Used by evaluate (on the test users) and score (on every user). Users are taken ``chunk`` at a
time, so memory is ``O(chunk * n_items)`` whatever the number of users. Within a row, ties in
score are ordered by item index. (Which of several items tied exactly at the k-th score makes the
cut is argpartition's deterministic choice, not necessarily the lowest index.)
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pandas as pd
from scipy import sparse


def seen_matrix(df: pd.DataFrame, *, n_users: int, n_items: int, user_col: str, item_col: str):
    """CSR (n_users x n_items) with a 1 where the user interacted with the item."""
    data = np.ones(len(df), dtype=np.int8)
    m = sparse.csr_matrix(
        (data, (df[user_col].to_numpy(), df[item_col].to_numpy())), shape=(n_users, n_items)
    )
    m.sum_duplicates()
    return m


def iter_top_k(
    user_vecs: np.ndarray,
    item_vecs: np.ndarray,
    item_bias: np.ndarray | None,
    seen,
    users: np.ndarray,
    *,
    k: int,
    chunk: int = 2048,
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Yield ``(users, items, scores)`` per chunk: ``items``/``scores`` are (n, k), best first.

    ``items`` is -1 and ``score`` -inf where a user has fewer than k unseen items.
    """
    n_items = item_vecs.shape[0]
    k_eff = min(k, n_items)
    item_t = np.ascontiguousarray(item_vecs.T, dtype=np.float32)
    bias = None if item_bias is None else item_bias.astype(np.float32).reshape(1, -1)
    for lo in range(0, len(users), chunk):
        batch = users[lo : lo + chunk]
        scores = user_vecs[batch].astype(np.float32) @ item_t
        if bias is not None:
            scores += bias
        sub = seen[batch]
        rows = np.repeat(np.arange(len(batch)), np.diff(sub.indptr))
        scores[rows, sub.indices] = -np.inf
        # argpartition finds the k best; lexsort then orders them by score, ties by item index.
        cand = np.argpartition(-scores, k_eff - 1, axis=1)[:, :k_eff]
        cand_scores = np.take_along_axis(scores, cand, axis=1)
        order = np.lexsort((cand, -cand_scores), axis=1)
        items = np.take_along_axis(cand, order, axis=1)
        best = np.take_along_axis(cand_scores, order, axis=1)
        items = np.where(np.isfinite(best), items, -1)
        if k_eff < k:
            pad = k - k_eff
            items = np.pad(items, ((0, 0), (0, pad)), constant_values=-1)
            best = np.pad(best, ((0, 0), (0, pad)), constant_values=-np.inf)
        yield batch, items, best
