"""Per-step wall time of mf_softmax training: Keras Adam vs RowAdam, as the user table grows.

    .venv/bin/python benchmarks/bench_mf_step.py [--users 200000 2000000] [--steps 20]

The model is ``nightrec.ml.models.build_mf`` (embedding_dim 64, 100k items) trained with the
sampled softmax as ``tasks/train.py`` feeds it: ``(users, candidates (b, 1 + 4), log_q)`` with
batch 8192, the positive first. Users and items of each batch are drawn uniformly (seeded). For
every ``n_users`` it times ``--steps`` ``train_on_batch`` calls after ``--warmup`` (tracing
included there) for each configuration ``optimizer:lookup``, in the same process, and prints
the mean and median milliseconds per step. ``train_on_batch`` returns the loss to numpy, so
each timed step has finished.

- ``adam:keras``: what tasks/train.py runs today. Keras Adam rewrites the whole user table, its
  m and its v every step.
- ``rowadam:keras``: RowAdam (nightrec/ml/sparse_optim.py) with Keras' Embedding lookup. RowAdam
  touches only the batch's rows, but its sparse ops put the table in TF's copy-on-read mode, and
  Keras' lookup (a dense read of the table, then a gather) then copies the whole table per step.
- ``rowadam:row``: RowAdam with ``sparse_optim.RowEmbedding`` (a gather on the variable itself):
  nothing in a step is O(n_users). The benchmark swaps ``keras.layers.Embedding`` for
  RowEmbedding while ``build_mf`` runs, until build_mf uses it itself.

The CPU's vector extensions and the BLAS numpy uses are printed first (TensorFlow's CPU kernels
are its own Eigen/oneDNN, not that BLAS).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nightrec.ml import models  # noqa: E402

CONFIGS = ["adam:keras", "rowadam:keras", "rowadam:row"]


def cpu_features() -> str:
    """``avx512f``/``avx2``/... from /proc/cpuinfo (Linux), the best first."""
    try:
        flags = next(line.split(":", 1)[1].split() for line in
                     Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return "unknown (no /proc/cpuinfo flags)"
    wanted = ("avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_tile", "avx2", "fma")
    found = [f for f in wanted if f in flags]
    return " ".join(found) or "no AVX2 or AVX-512"


def blas_info() -> str:
    from threadpoolctl import threadpool_info

    return "; ".join(f"{i.get('internal_api')} {i.get('version')} ({i.get('threading_layer')}, "
                     f"{i.get('num_threads')} threads, {i.get('architecture')})"
                     for i in threadpool_info()) or "none found"


@contextlib.contextmanager
def _embedding_class(lookup: str):
    """``keras.layers.Embedding`` is RowEmbedding inside (``lookup == "row"``)."""
    keras = models.keras_module()
    from nightrec.ml import sparse_optim

    saved = keras.layers.Embedding
    if lookup == "row":
        keras.layers.Embedding = sparse_optim.RowEmbedding
    try:
        yield
    finally:
        keras.layers.Embedding = saved


def time_steps(*, n_users: int, n_items: int, dim: int, batch: int, n_neg: int, optimizer: str,
               lookup: str, steps: int, warmup: int, seed: int) -> list[float]:
    """Seconds per step, ``steps`` of them, after ``warmup`` untimed steps."""
    keras = models.keras_module()
    from nightrec.ml import sparse_optim

    with _embedding_class(lookup):
        model = models.build_mf(n_users=n_users, n_items=n_items, embedding_dim=dim, l2=1e-4,
                                seed=seed)
    if (lookup == "row") != isinstance(model.user, sparse_optim.RowEmbedding):
        raise RuntimeError(f"build_mf's user table is {type(model.user).__name__}, "
                           f"not the lookup {lookup!r} asked for")
    opt = (sparse_optim.RowAdam if optimizer == "rowadam" else keras.optimizers.Adam)(1e-3)
    model.compile(optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(seed)
    y = np.zeros(batch, np.int32)
    w = np.ones(batch, np.float32)
    lq = np.full((batch, 1 + n_neg), -np.log(n_items), np.float32)

    def step():
        users = rng.integers(0, n_users, batch, dtype=np.int32)
        cand = rng.integers(0, n_items, (batch, 1 + n_neg), dtype=np.int32)
        t0 = time.perf_counter()
        model.train_on_batch((users, cand, lq), y, sample_weight=w)
        return time.perf_counter() - t0

    for _ in range(warmup):
        step()
    out = [step() for _ in range(steps)]
    model = opt = None  # free the tables before the next configuration
    keras.backend.clear_session()
    gc.collect()
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=int, nargs="+", default=[200_000, 2_000_000])
    ap.add_argument("--items", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8192)
    ap.add_argument("--neg", type=int, default=4)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS + ["adam:row"],
                    help="optimizer:lookup")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    keras = models.keras_module()
    import tensorflow as tf

    print(f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} logical cores, "
          f"vector extensions: {cpu_features()}")
    print(f"blas (numpy): {blas_info()}")
    print(f"keras {keras.__version__} ({keras.backend.backend()}), tensorflow {tf.__version__}, "
          f"devices: {[d.name for d in tf.config.list_logical_devices()]}")
    print(f"items {args.items}, dim {args.dim}, batch {args.batch}, 1 + {args.neg} candidates, "
          f"{args.steps} timed steps after {args.warmup}")
    print(f"{'n_users':>10} {'optimizer:lookup':>16} {'mean ms':>9} {'median ms':>10} "
          f"{'min ms':>8}")
    for n_users in args.users:
        for config in args.configs:
            optimizer, lookup = config.split(":")
            s = np.asarray(time_steps(n_users=n_users, n_items=args.items, dim=args.dim,
                                      batch=args.batch, n_neg=args.neg, optimizer=optimizer,
                                      lookup=lookup, steps=args.steps, warmup=args.warmup,
                                      seed=args.seed)) * 1e3
            print(f"{n_users:>10} {config:>16} {s.mean():>9.1f} {np.median(s):>10.1f} "
                  f"{s.min():>8.1f}", flush=True)


if __name__ == "__main__":
    main()
