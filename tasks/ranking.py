"""Ranking: exact top-K of ``U @ V.T + b`` per user, seen items excluded.

Why our own kernel: on these machines the matrix product is cheap (about 12 us a user at 20k
items x d=64) and *selection* is what costs: ``np.argpartition`` takes about 177 us a row,
TensorFlow's ``top_k`` about 49 us, faiss's flat search (which must over-fetch k + max_seen and
filter) lands near 18k users/s. This kernel does, per row and in parallel over rows (numba):

1. mask the user's seen items to -inf;
2. split the items into about ``sqrt(k * n_items)`` strided groups and take each group's maximum
   (an elementwise max of contiguous slices, which vectorises); the k-th largest maximum ``t``
   is a safe bound (k distinct items score >= t), and only the ~k groups whose maximum reaches
   ``t`` hold candidates;
3. one pass collects the candidates (score >= t), a partition finds the exact k-th largest
   among them, and only the k winners are sorted.

Ties are broken by the lower item index, always, including at the k-th place, so results are a
pure function of the inputs. Users are processed ``chunk`` at a time (the score block stays in
cache and memory is flat in the number of users). A GPU path would use the backend's matmul
plus top_k; on CPU this kernel is what runs.

Measured (benchmarks/RESULTS.md): see there; the figures are not repeated here.
"""

from __future__ import annotations

from collections.abc import Iterator

import numba
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


# Not full fastmath: "ninf" would let LLVM drop the -inf tests that implement seen-masking.
@numba.njit(cache=True, nogil=True, fastmath={"nsz", "arcp", "contract", "reassoc"})
def select_top_k(scores, indptr, indices, k, n_groups, out_items, out_scores):  # pragma: no cover
    """In place on ``scores`` (masks seen). Writes (n_rows, k) items/scores; -1/-inf pads.

    Items are split into ``n_groups`` strided groups (item j is in group j % n_groups). The
    k-th largest group maximum ``t`` is a safe bound: k distinct items score >= t. Only the
    groups whose maximum reaches t (about k of them) are scanned for candidates.
    """
    n_rows, n = scores.shape
    g_n = min(n_groups, n)
    width = (n + g_n - 1) // g_n
    for r in range(n_rows):
        row = scores[r]
        for p in range(indptr[r], indptr[r + 1]):
            row[indices[p]] = -np.inf
        gmax = np.full(g_n, -np.inf, dtype=np.float32)
        for s in range(width):  # elementwise max of contiguous slices: vectorises
            lo = s * g_n
            hi = min(lo + g_n, n)
            for i in range(hi - lo):
                gmax[i] = max(gmax[i], row[lo + i])
        t = -np.inf
        if g_n > k:
            t = np.partition(gmax, g_n - k)[g_n - k]
        cand = np.empty(n, np.int32)
        c = 0
        for g in range(g_n):
            if gmax[g] >= t and gmax[g] > -np.inf:
                for j in range(g, n, g_n):
                    v = row[j]
                    if v >= t and v > -np.inf:
                        cand[c] = j
                        c += 1
        cand = np.sort(cand[:c])  # index order, so every later tie goes to the lower index
        take = min(k, c)
        chosen = np.empty(take, np.int32)
        if c > k:
            vals = np.empty(c, np.float32)
            for q in range(c):
                vals[q] = row[cand[q]]
            kth = np.partition(vals, c - k)[c - k]
            g = 0
            for q in range(c):  # strictly better first
                if vals[q] > kth:
                    chosen[g] = cand[q]
                    g += 1
            for q in range(c):  # then ties at the k-th value, lowest index first
                if g == take:
                    break
                if vals[q] == kth:
                    chosen[g] = cand[q]
                    g += 1
            chosen = np.sort(chosen)
        else:
            chosen[:] = cand[:take]
        neg = np.empty(take, np.float32)
        for q in range(take):
            neg[q] = -row[chosen[q]]
        order = np.argsort(neg, kind="mergesort")  # stable: ties keep index order
        for q in range(take):
            out_items[r, q] = chosen[order[q]]
            out_scores[r, q] = -neg[order[q]]
        for q in range(take, k):
            out_items[r, q] = -1
            out_scores[r, q] = -np.inf


def default_groups(k: int, n_items: int) -> int:
    """About sqrt(k * n_items) groups: balances the partition of group maxima against the scan."""
    return int(min(n_items, max(2 * k, np.sqrt(k * n_items))))


def _score_range(user_vecs, item_t, bias, indptr, indices, lo, hi, k, block, out_items, out_scores):
    """One worker: users lo..hi in blocks small enough that the score block stays in cache."""
    n_items = item_t.shape[1]
    buf = np.empty((block, n_items), np.float32)
    groups = default_groups(k, n_items)
    for b in range(lo, hi, block):
        e = min(b + block, hi)
        scores = buf[: e - b]
        np.matmul(user_vecs[b:e], item_t, out=scores)
        if bias is not None:
            scores += bias
        ip = indptr[b : e + 1] - indptr[b]
        select_top_k(scores, ip, indices[indptr[b] : indptr[e]], k, groups,
                     out_items[b - lo : e - lo], out_scores[b - lo : e - lo])


def top_k_block(user_vecs, item_t, bias, indptr, indices, k, *, pool=None, workers=1, block=64):
    """Top-k for a block of users (rows of ``user_vecs``, CSR ``indptr``/``indices`` aligned).

    With a thread pool, the block is split between its workers. Each worker runs a
    single-threaded matmul and then the selection on its own cache-sized sub-blocks: on two
    cores this beat a multi-threaded BLAS followed by a parallel selection by about 2x, because
    the two thread pools no longer fight and the scores are selected while still in cache.
    """
    n = len(user_vecs)
    items = np.empty((n, k), np.int32)
    best = np.empty((n, k), np.float32)
    step = max(block, -(-n // workers))
    jobs = [(lo, min(lo + step, n)) for lo in range(0, n, step)]
    args = (user_vecs, item_t, bias, indptr, indices)
    if pool is None or len(jobs) == 1:
        for lo, hi in jobs:
            _score_range(*args, lo, hi, k, block, items[lo:hi], best[lo:hi])
    else:
        futures = [pool.submit(_score_range, *args, lo, hi, k, block, items[lo:hi], best[lo:hi])
                   for lo, hi in jobs]
        for f in futures:
            f.result()
    return items, best


def iter_top_k(
    user_vecs: np.ndarray,
    item_vecs: np.ndarray,
    item_bias: np.ndarray | None,
    seen,
    users: np.ndarray,
    *,
    k: int,
    chunk: int = 4096,
    threads: int | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Yield ``(users, items, scores)`` per chunk of ``users`` (indices into ``user_vecs`` and
    rows of the CSR ``seen``). ``items`` is -1 and ``scores`` -inf where a user has fewer than k
    unseen items. ``threads`` defaults to the CPUs this process may use."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    from threadpoolctl import threadpool_limits

    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    item_t = np.ascontiguousarray(np.asarray(item_vecs, np.float32).T)
    bias = None if item_bias is None else np.asarray(item_bias, np.float32).reshape(1, -1)
    threads = threads or len(os.sched_getaffinity(0))
    with ThreadPoolExecutor(threads) as pool, threadpool_limits(1, "blas"):
        for lo in range(0, len(users), chunk):
            batch = np.asarray(users[lo : lo + chunk])
            sub = seen[batch]
            items, best = top_k_block(
                np.ascontiguousarray(user_vecs[batch], dtype=np.float32), item_t, bias,
                sub.indptr.astype(np.int64), sub.indices.astype(np.int32), k, pool=pool,
                workers=threads,
            )
            yield batch, items, best
