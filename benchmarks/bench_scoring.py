"""Scoring throughput: nightrec's top-K kernel vs faiss IndexFlatIP and the GEMM floor, in one run.

    .venv/bin/python benchmarks/bench_scoring.py --users 200000 --items 20000 --dim 64 --k 100

Random Gaussian embeddings, ~``--seen`` seen items per user (Poisson), seeded. Prints one line
per method and, last, one JSON object. faiss must over-fetch ``k + max_seen`` and then drop the
seen items (done here with numpy, vectorised) to give the same answer.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time

import numpy as np
from scipy import sparse


def make_data(users: int, items: int, dim: int, seen: int, seed: int):
    rng = np.random.default_rng(seed)
    u = rng.normal(size=(users, dim)).astype(np.float32)
    v = rng.normal(size=(items, dim)).astype(np.float32)
    counts = rng.poisson(seen, size=users)
    rows = np.repeat(np.arange(users), counts)
    cols = rng.integers(0, items, size=rows.size)
    m = sparse.csr_matrix((np.ones(rows.size, np.int8), (rows, cols)), shape=(users, items))
    m.sum_duplicates()
    return u, v, m


def bench_nightrec(u, v, seen, k: int) -> float:
    from tasks.ranking import iter_top_k

    list(iter_top_k(u[:256], v, None, seen[:256], np.arange(256), k=k))  # JIT warm-up
    t = time.perf_counter()
    for _ in iter_top_k(u, v, None, seen, np.arange(len(u)), k=k):
        pass
    return len(u) / (time.perf_counter() - t)


def bench_faiss(u, v, seen, k: int, chunk: int = 4096) -> float:
    import faiss

    index = faiss.IndexFlatIP(v.shape[1])
    index.add(v)
    fetch = k + int(np.diff(seen.indptr).max())
    t = time.perf_counter()
    for lo in range(0, len(u), chunk):
        _, found = index.search(u[lo : lo + chunk], fetch)
        sub = seen[lo : lo + chunk]
        rows = np.repeat(np.arange(sub.shape[0]), np.diff(sub.indptr))
        mask = np.zeros((sub.shape[0], v.shape[0]), bool)
        mask[rows, sub.indices] = True
        keep = ~np.take_along_axis(mask, found, axis=1)
        order = np.argsort(~keep, axis=1, kind="stable")[:, :k]  # first k unseen, rank order
        np.take_along_axis(found, order, axis=1)
    return len(u) / (time.perf_counter() - t)


def bench_gemm(u, v, chunk: int = 512) -> float:
    vt = np.ascontiguousarray(v.T)
    out = np.empty((chunk, v.shape[0]), np.float32)
    t = time.perf_counter()
    for lo in range(0, len(u), chunk):
        block = u[lo : lo + chunk]
        np.matmul(block, vt, out=out[: len(block)])
    return len(u) / (time.perf_counter() - t)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--users", type=int, default=200_000)
    parser.add_argument("--items", type=int, default=20_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--seen", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    u, v, seen = make_data(args.users, args.items, args.dim, args.seen, args.seed)
    result = {
        "users": args.users, "items": args.items, "dim": args.dim, "k": args.k,
        "cpus": len(os.sched_getaffinity(0)),
        "nightrec_users_per_s": round(bench_nightrec(u, v, seen, args.k)),
        "faiss_users_per_s": round(bench_faiss(u, v, seen, args.k)),
        "gemm_floor_users_per_s": round(bench_gemm(u, v)),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }
    for key in ("nightrec_users_per_s", "faiss_users_per_s", "gemm_floor_users_per_s"):
        print(f"{key:>24}: {result[key]:>8,}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
