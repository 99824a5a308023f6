"""Scoring throughput: nightrec's exact top-K kernel vs faiss IndexFlatIP and the GEMM floor.

    .venv/bin/python benchmarks/bench_scoring.py --users 200000 --items 20000 --dim 64 --k 100

or ``nightrec.dev.bench_scoring.main(argv) -> dict``. Random Gaussian embeddings and ~``--seen`` seen
items per user (Poisson, uniform items), all seeded. Every method runs in the same process on
the same data, interleaved piece by piece (the order rotates per piece), so noise from other
processes falls on all of them alike; throughput is users over the method's summed time.

Memory is flat in ``--users``: the users are generated ``--piece`` at a time from a seeded
stream per piece (piece ``i`` is the same data whatever ``--users`` is), the seen matrix is
built per piece, and results are dropped; ``peak_rss_mb`` is the process's high-water mark
(``ru_maxrss``), so compare sizes in separate processes.

Methods (each over the same users, ``--threads`` threads):

- ``nightrec``: ``nightrec.ml.ranking.iter_top_k`` (seen items excluded, exact, ties to the lower
  index), ``--chunk`` users per chunk.
- ``faiss``: ``IndexFlatIP.search`` of ``k + max_seen`` per ``--chunk`` users (max over that
  chunk: the least over-fetch that is still exact), then the seen items are dropped with a
  reused dense mask in numpy and the first k unseen kept, in rank order.
- ``gemm_floor``: numpy's sgemm (OpenBLAS), scores only, 512 users a call, nothing selected.
- ``nightrec_gemm``: the product half of nightrec's kernel alone, same threading as nightrec.

Prints one line per method and, last, one JSON object (the returned dict).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from scipy import sparse

MASK_ROWS = 512  # rows of the reused dense seen mask of the faiss filter (512 x items bool)


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def make_items(items: int, dim: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(0,)))
    return rng.normal(size=(items, dim)).astype(np.float32)


def make_piece(index: int, users: int, items: int, dim: int, seen: int, seed: int):
    """Piece ``index``: (users x dim) float32 vectors and the (users x items) seen CSR."""
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(1, index)))
    u = rng.normal(size=(users, dim)).astype(np.float32)
    counts = rng.poisson(seen, size=users)
    indptr = np.concatenate([[0], np.cumsum(counts)])
    cols = rng.integers(0, items, size=int(indptr[-1]), dtype=np.int32)
    m = sparse.csr_matrix((np.ones(cols.size, np.int8), cols, indptr), shape=(users, items))
    m.sum_duplicates()
    return u, m


def run_nightrec(u, v, seen, k: int, chunk: int, threads: int) -> float:
    from nightrec.ml.ranking import iter_top_k

    t = time.perf_counter()
    for _ in iter_top_k(u, v, None, seen, np.arange(len(u)), k=k, chunk=chunk, threads=threads):
        pass
    return time.perf_counter() - t


def nightrec_top_k(u, v, seen, k: int, chunk: int, threads: int) -> np.ndarray:
    from nightrec.ml.ranking import iter_top_k

    chunks = iter_top_k(u, v, None, seen, np.arange(len(u)), k=k, chunk=chunk, threads=threads)
    return np.concatenate([items for _, items, _ in chunks])


class FaissTopK:
    """Exact top-k with seen items excluded, the faiss way: over-fetch, then filter."""

    def __init__(self, v: np.ndarray, threads: int):
        import faiss

        faiss.omp_set_num_threads(threads)
        self.index = faiss.IndexFlatIP(v.shape[1])
        self.index.add(v)
        self.mask = np.zeros((MASK_ROWS, v.shape[0]), bool)

    def top_k(self, u, seen, k: int) -> np.ndarray:
        fetch = min(k + int(np.diff(seen.indptr).max(initial=0)), self.index.ntotal)
        _, found = self.index.search(u, fetch)
        out = np.empty((len(u), k), np.int64)
        for lo in range(0, len(u), MASK_ROWS):
            sub = seen[lo : lo + MASK_ROWS]
            rows = np.repeat(np.arange(sub.shape[0]), np.diff(sub.indptr))
            mask = self.mask[: sub.shape[0]]
            mask[rows, sub.indices] = True
            f = found[lo : lo + MASK_ROWS]
            drop = np.take_along_axis(mask, np.maximum(f, 0), axis=1) | (f < 0)
            mask[rows, sub.indices] = False
            order = np.argsort(drop, axis=1, kind="stable")[:, :k]  # unseen first, rank order
            kept = np.take_along_axis(f, order, axis=1)
            kept[np.take_along_axis(drop, order, axis=1)] = -1
            out[lo : lo + MASK_ROWS] = kept
        return out

    def run(self, u, seen, k: int, chunk: int) -> float:
        t = time.perf_counter()
        for lo in range(0, len(u), chunk):
            self.top_k(u[lo : lo + chunk], seen[lo : lo + chunk], k)
        return time.perf_counter() - t


class GemmFloor:
    """numpy's sgemm, scores only, ``block`` users a call, BLAS on ``threads`` threads."""

    def __init__(self, v: np.ndarray, threads: int, block: int = 512):
        self.vt = np.ascontiguousarray(v.T)
        self.out = np.empty((block, v.shape[0]), np.float32)
        self.threads, self.block = threads, block

    def run(self, u) -> float:
        from threadpoolctl import threadpool_limits

        with threadpool_limits(self.threads, "blas"):
            t = time.perf_counter()
            for lo in range(0, len(u), self.block):
                part = u[lo : lo + self.block]
                np.matmul(part, self.vt, out=self.out[: len(part)])
            return time.perf_counter() - t


class NightrecGemm:
    """The product half of nightrec/ml/ranking.py alone: same blocks, threads and work sharing."""

    def __init__(self, v: np.ndarray, threads: int):
        from nightrec.ml import ranking

        self.r = ranking
        self.panels = ranking.pack_items(v)
        self.threads = threads
        rows = -(-ranking.BLOCK // ranking.MR) * ranking.MR
        self.c = [np.empty((rows, self.panels.shape[0] * ranking.NR), np.float32)
                  for _ in range(threads)]
        self.pool = ThreadPoolExecutor(threads)

    def run(self, u) -> float:
        r = self.r
        block = max(r.MR, r.BLOCK // r.MR * r.MR)
        n = len(u) // r.MR * r.MR  # whole tiles only: the floor, not the padding
        blocks, lock = iter(range(0, n, block)), threading.Lock()

        def work(c):
            while True:
                with lock:
                    lo = next(blocks, None)
                if lo is None:
                    return
                r._gemm(u[lo : min(lo + block, n)], self.panels, c, r.KC, r.PANELS_PER_PASS)

        t = time.perf_counter()
        for f in [self.pool.submit(work, c) for c in self.c]:
            f.result()
        return (time.perf_counter() - t) * len(u) / max(n, 1)


def tree_rss(proc) -> int:
    """Resident bytes of a psutil process and all its descendants (0 when it is gone): what a
    benchmark charges a stage whose work runs in children (DVC, Airflow's task runners)."""
    import psutil

    try:
        procs = [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def machine() -> str:
    """The CPU's vector width the kernel dispatched on (AVX-512 or AVX2) and the BLAS in use:
    what every benchmark prints, because two machines of one kind differ."""
    from nightrec.ml import ranking

    width = "AVX-512" if ranking.VECTOR_WIDTH == 16 else "AVX2"
    return f"CPU vectors {width} (kernel width {ranking.VECTOR_WIDTH}); BLAS {_blas_arch()}"


def _blas_arch() -> str:
    from threadpoolctl import threadpool_info

    return ", ".join(f"{i.get('prefix')} {i.get('version')} {i.get('architecture')}"
                     for i in threadpool_info() if i.get("user_api") == "blas")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench-scoring", description=__doc__.split("\n")[0])
    p.add_argument("--users", type=int, default=200_000)
    p.add_argument("--items", type=int, default=20_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--seen", type=int, default=50, help="mean seen items per user (Poisson)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="0: the CPUs this process may use")
    p.add_argument("--chunk", type=int, default=4096, help="users per iter_top_k / faiss call")
    p.add_argument("--piece", type=int, default=50_000, help="users generated at a time")
    p.add_argument("--skip-faiss", action="store_true")
    p.add_argument("--skip-gemm", action="store_true", help="skip both GEMM-only measurements")
    args = p.parse_args(argv)
    for name in ("users", "items", "dim", "k", "chunk", "piece"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    if args.seen < 0 or args.threads < 0:
        p.error("--seen and --threads must be >= 0")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    threads = args.threads or len(os.sched_getaffinity(0))
    from nightrec.ml import ranking

    v = make_items(args.items, args.dim, args.seed)
    methods = {"nightrec": lambda u, s: run_nightrec(u, v, s, args.k, args.chunk, threads)}
    faiss_top_k = None
    if not args.skip_faiss:
        faiss_top_k = FaissTopK(v, threads)
        methods["faiss"] = lambda u, s: faiss_top_k.run(u, s, args.k, args.chunk)
    if not args.skip_gemm:
        floor, own = GemmFloor(v, threads), NightrecGemm(v, threads)
        methods["gemm_floor"] = lambda u, s: floor.run(u)
        methods["nightrec_gemm"] = lambda u, s: own.run(u)

    # warm-up (JIT, thread pools) and an agreement check on one small sample
    u, s = make_piece(0, min(args.users, 2048), args.items, args.dim, args.seen, args.seed)
    for run in methods.values():
        run(u[:512], s[:512])
    agreement = None
    if faiss_top_k is not None:
        ours = nightrec_top_k(u, v, s, args.k, args.chunk, threads)
        theirs = faiss_top_k.top_k(u, s, args.k)
        agreement = float(np.mean([len(np.intersect1d(a[a >= 0], b[b >= 0])) / args.k
                                   for a, b in zip(ours, theirs)]))
    del u, s
    rss_before = _rss_mb()

    seconds = dict.fromkeys(methods, 0.0)
    names = list(methods)
    for i, lo in enumerate(range(0, args.users, args.piece)):
        u, s = make_piece(i, min(args.piece, args.users - lo), args.items, args.dim, args.seen,
                          args.seed)
        for name in names[i % len(names):] + names[: i % len(names)]:
            seconds[name] += methods[name](u, s)
        del u, s

    def rate(name):
        return round(args.users / seconds[name]) if name in seconds else None

    result = {
        "users": args.users, "items": args.items, "dim": args.dim, "k": args.k,
        "seen": args.seen, "seed": args.seed, "threads": threads, "chunk": args.chunk,
        "cpus": len(os.sched_getaffinity(0)),
        "nightrec_users_per_s": rate("nightrec"),
        "faiss_users_per_s": rate("faiss"),
        "gemm_floor_users_per_s": rate("gemm_floor"),
        "nightrec_gemm_users_per_s": rate("nightrec_gemm"),
        "ratio_vs_faiss": (round(seconds["faiss"] / seconds["nightrec"], 2)
                           if "faiss" in seconds else None),
        "agreement_with_faiss": None if agreement is None else round(agreement, 5),
        "seconds": {name: round(t, 3) for name, t in seconds.items()},
        "vector_width": ranking.VECTOR_WIDTH,
        "blas": _blas_arch(),
        "rss_after_warmup_mb": round(rss_before),
        "peak_rss_mb": round(_rss_mb()),
    }
    labels = {
        "nightrec": "nightrec iter_top_k (exact, seen excluded)",
        "faiss": "faiss IndexFlatIP k+max_seen, then filter",
        "gemm_floor": "numpy sgemm floor (scores only)",
        "nightrec_gemm": "nightrec product alone (scores only)",
    }
    for name in names:
        extra = ""
        if name == "nightrec" and result["ratio_vs_faiss"]:
            extra = f"  ({result['ratio_vs_faiss']}x faiss)"
        print(f"{labels[name]:>44}: {rate(name):>9,} users/s{extra}")
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
