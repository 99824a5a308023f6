"""iALS: implicit alternating least squares with conjugate-gradient solves, in ``keras.ops``.

The model of Hu, Koren and Volinsky (2008), solved as in Takács et al. (2011) and in
``implicit``'s ``AlternatingLeastSquares`` (its named peer in benchmarks/bench_dag.py and
benchmarks/bench_models.py): user vectors X (n_users, d) and item vectors Y (n_items, d) minimise

    sum_{(u,i) observed} c_ui (1 - x_u . y_i)^2  +  sum_{(u,i) not observed} (x_u . y_i)^2
      +  regularization * (|X|^2 + |Y|^2)

with confidence ``c_ui = alpha * w_ui`` (``w`` augment's sample weight, 1 by default) and weight 1
on every unobserved pair, so ``alpha`` is the ratio of the two (Rendle et al. 2021, "Revisiting
the Performance of iALS", call its inverse the unobserved weight). One iteration solves every user
with Y fixed, then every item with X fixed. A user's normal equations are

    (Y^T Y + regularization I + sum_{i in S_u} (c_ui - 1) y_i y_i^T) x_u = sum_{i in S_u} c_ui y_i

Their left side is never formed per user (n_users x d x d floats: 32 GB at 2M users): each
iteration runs ``cg_steps`` conjugate-gradient steps from the previous x_u, and a step needs only
``A p = p (Y^T Y + reg I) + sum_i (c_ui - 1)(y_i . p) y_i``, one gather of the user's item rows
and one segment sum. So an iteration costs O(nnz d cg_steps + (n_users + n_items) d^2), linear in
events and in users. Users are solved in chunks of at most ``chunk_nnz`` events (the gathered
rows, chunk_nnz x d floats, are the only per-chunk memory), so memory is the two CSR index arrays
(8 bytes per event), the two factor tables and one chunk: flat in nothing, but without a
per-user or a dense (users x items) term.

Everything numeric runs through ``keras.ops``: under TensorFlow on a GPU (or JAX / PyTorch with
``KERAS_BACKEND``) the gathers, segment sums and CG updates run on the device. The index
bookkeeping (CSR building: scipy's counting sort; chunk bounds) is numpy. Seeded: the initial factors come from
``numpy.random.default_rng(seed)`` (uniform [0, 0.01), implicit's initialisation), and the
solves are deterministic given them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Csr:
    """Rows (users, or items for the transpose) as CSR: ``indptr`` (n_rows + 1,) int64,
    ``indices`` (nnz,) int32 column ids, ``conf`` (nnz,) float32 confidences (``None``: every
    confidence is ``uniform``)."""

    indptr: np.ndarray
    indices: np.ndarray
    conf: np.ndarray | None
    uniform: float = 1.0

    @property
    def n_rows(self) -> int:
        return len(self.indptr) - 1


def build_csr(rows: np.ndarray, cols: np.ndarray, conf: np.ndarray | None, *, n_rows: int,
              uniform: float = 1.0, n_cols: int | None = None) -> Csr:
    """CSR of ``(rows, cols)`` pairs, duplicates summed into one confidence (a user who met an
    item twice is one observed pair with the confidences added; ``conf=None`` counts them).

    scipy's COO-to-CSR conversion: a counting sort by row, O(pairs + rows), with int32 indices,
    where a lexsort of int64 keys took ~40 bytes a pair of scratch (3 GB at 81M pairs)."""
    import scipy.sparse as sp

    rows, cols = np.asarray(rows), np.asarray(cols)
    if len(rows) and (rows.min() < 0 or rows.max() >= n_rows):
        raise ValueError(f"row index out of [0, {n_rows})")
    if n_cols is None:
        n_cols = int(cols.max()) + 1 if len(cols) else 0
    data = (np.ones(len(rows), np.float32) if conf is None else np.asarray(conf, np.float32))
    m = sp.coo_array((data, (rows.astype(np.int32, copy=False), cols.astype(np.int32, copy=False))),
                     shape=(n_rows, max(n_cols, 1))).tocsr()  # sums duplicates
    m.sort_indices()
    summed = m.data
    if conf is None:
        summed = None if len(summed) == len(rows) else summed * np.float32(uniform)
    return Csr(m.indptr.astype(np.int64), m.indices.astype(np.int32, copy=False),
               None if summed is None else summed.astype(np.float32, copy=False), float(uniform))


def transpose(m: Csr, *, n_cols: int) -> Csr:
    """The same pairs with rows and columns swapped (items x users): a counting sort (scipy)."""
    import scipy.sparse as sp

    data = np.ones(len(m.indices), np.float32) if m.conf is None else m.conf
    t = sp.csr_array((data, m.indices, m.indptr), shape=(m.n_rows, max(n_cols, 1))).T.tocsr()
    t.sort_indices()
    return Csr(t.indptr[: n_cols + 1].astype(np.int64), t.indices.astype(np.int32, copy=False),
               None if m.conf is None else t.data, m.uniform)


def pairs(user_idx: np.ndarray, item_idx: np.ndarray, weight: np.ndarray | None, *,
          n_users: int, n_items: int, alpha: float) -> tuple[Csr, Csr]:
    """The observed pairs by user and by item, with confidences ``alpha * weight`` (duplicates
    summed): what :func:`fit` solves over."""
    conf = None if weight is None or np.all(weight == 1) else alpha * np.asarray(weight, np.float32)
    by_user = build_csr(user_idx, item_idx, conf, n_rows=n_users, uniform=alpha, n_cols=n_items)
    return by_user, transpose(by_user, n_cols=n_items)


def chunks(indptr: np.ndarray, *, chunk_nnz: int) -> list[tuple[int, int]]:
    """Row ranges ``[lo, hi)`` of at most ``chunk_nnz`` entries each (a row with more than that
    is a chunk of its own), covering every row."""
    n = len(indptr) - 1
    out, lo = [], 0
    while lo < n:
        hi = int(np.searchsorted(indptr, indptr[lo] + chunk_nnz, side="right")) - 1
        hi = min(max(hi, lo + 1), n)
        out.append((lo, hi))
        lo = hi
    return out


def solve(x: np.ndarray, y: np.ndarray, m: Csr, *, regularization: float, cg_steps: int,
          chunk_nnz: int = 1_000_000) -> np.ndarray:
    """``cg_steps`` conjugate-gradient steps on every row's normal equations (module docstring),
    starting from ``x`` (n_rows, d); ``y`` (n_cols, d) fixed. Returns the new rows, float32."""
    from keras import ops

    from nightrec.ml import models

    models.keras_module()
    d = y.shape[1]
    yt = ops.convert_to_tensor(y, dtype="float32")
    gram = ops.matmul(ops.transpose(yt), yt) + regularization * ops.eye(d, dtype="float32")
    out = np.empty((m.n_rows, d), np.float32)
    for lo, hi in chunks(m.indptr, chunk_nnz=chunk_nnz):
        a, b = int(m.indptr[lo]), int(m.indptr[hi])
        n_rows = hi - lo
        seg = np.repeat(np.arange(n_rows, dtype=np.int32), np.diff(m.indptr[lo:hi + 1]))
        seg_t = ops.convert_to_tensor(seg)
        cols = ops.take(yt, ops.convert_to_tensor(m.indices[a:b]), axis=0)  # (nnz, d)
        conf = (np.full(b - a, m.uniform, np.float32) if m.conf is None else m.conf[a:b])
        conf_t = ops.convert_to_tensor(conf, dtype="float32")
        extra = ops.expand_dims(conf_t - 1.0, 1)  # (nnz, 1): c - 1, the observed pairs' excess

        def apply(p, cols=cols, seg_t=seg_t, extra=extra, n_rows=n_rows):
            dots = ops.sum(cols * ops.take(p, seg_t, axis=0), axis=1, keepdims=True)
            return ops.matmul(p, gram) + ops.segment_sum(extra * dots * cols, seg_t,
                                                         num_segments=n_rows)

        rhs = ops.segment_sum(ops.expand_dims(conf_t, 1) * cols, seg_t, num_segments=n_rows)
        xc = ops.convert_to_tensor(x[lo:hi], dtype="float32")
        r = rhs - apply(xc)
        p = r
        rs_old = ops.sum(r * r, axis=1, keepdims=True)
        for _ in range(cg_steps):
            ap = apply(p)
            pap = ops.sum(p * ap, axis=1, keepdims=True)
            step = ops.where(pap > 0, rs_old / ops.where(pap > 0, pap, 1.0), 0.0)
            xc = xc + step * p
            r = r - step * ap
            rs_new = ops.sum(r * r, axis=1, keepdims=True)
            p = r + ops.where(rs_old > 0, rs_new / ops.where(rs_old > 0, rs_old, 1.0), 0.0) * p
            rs_old = rs_new
        out[lo:hi] = ops.convert_to_numpy(xc)
    return out


def _numba_kernel():
    """The CPU kernel: implicit's per-row CG loop (``least_squares_cg``), compiled with numba
    and parallel over rows. Built on first use (numba compiles in ~2 s; cached on disk)."""
    global _KERNEL
    if _KERNEL is None:
        import numba

        @numba.njit(parallel=True, fastmath=True, cache=True)
        def cg_rows(indptr, indices, conf, uniform, has_conf, x, y, gram, cg_steps):  # pragma: no cover
            n, d = x.shape
            for u in numba.prange(n):
                xu = x[u].copy()
                r = np.empty(d, np.float32)
                ap = np.empty(d, np.float32)
                for k in range(d):  # r = b - A x, the (Y^T Y + reg I) part
                    acc = np.float32(0.0)
                    for q in range(d):
                        acc += gram[k, q] * xu[q]
                    r[k] = -acc
                for j in range(indptr[u], indptr[u + 1]):
                    i = indices[j]
                    c = conf[j] if has_conf else uniform
                    s = np.float32(0.0)
                    for k in range(d):
                        s += y[i, k] * xu[k]
                    coef = c - (c - 1.0) * s
                    for k in range(d):
                        r[k] += coef * y[i, k]
                p = r.copy()
                rs_old = np.float32(0.0)
                for k in range(d):
                    rs_old += r[k] * r[k]
                for _ in range(cg_steps):
                    if rs_old < 1e-20:
                        break
                    for k in range(d):
                        acc = np.float32(0.0)
                        for q in range(d):
                            acc += gram[k, q] * p[q]
                        ap[k] = acc
                    for j in range(indptr[u], indptr[u + 1]):
                        i = indices[j]
                        c = conf[j] if has_conf else uniform
                        s = np.float32(0.0)
                        for k in range(d):
                            s += y[i, k] * p[k]
                        s *= c - 1.0
                        for k in range(d):
                            ap[k] += s * y[i, k]
                    pap = np.float32(0.0)
                    for k in range(d):
                        pap += p[k] * ap[k]
                    if pap <= 0:
                        break
                    step = rs_old / pap
                    rs_new = np.float32(0.0)
                    for k in range(d):
                        xu[k] += step * p[k]
                        r[k] -= step * ap[k]
                        rs_new += r[k] * r[k]
                    for k in range(d):
                        p[k] = r[k] + rs_new / rs_old * p[k]
                    rs_old = rs_new
                x[u] = xu

        _KERNEL = cg_rows
    return _KERNEL


_KERNEL = None


def gram_f64(y: np.ndarray, *, block_rows: int = 65_536) -> np.ndarray:
    """``y^T y`` in float64, summed over blocks of ``block_rows`` rows: the whole table cast
    to float64 at once (and numpy's cast of the other operand) was 2 x 8 bytes a factor, a
    1.5 GB spike every iteration at 2M users x 64 factors (benchmarks/RESULTS.md)."""
    g = np.zeros((y.shape[1], y.shape[1]), np.float64)
    for lo in range(0, len(y), block_rows):
        block = np.asarray(y[lo:lo + block_rows], np.float64)
        g += block.T @ block
    return g


def solve_numba(x: np.ndarray, y: np.ndarray, m: Csr, *, regularization: float,
                cg_steps: int, in_place: bool = False) -> np.ndarray:
    """:func:`solve` on the CPU with the numba kernel (same steps, same result to float32
    round-off): TensorFlow's CPU gathers and segment sums ran ~10x slower than ``implicit``
    (benchmarks/RESULTS.md), a per-row loop keeps each row's items in cache. ``in_place``:
    the rows are updated in ``x`` (a C-contiguous float32 array; each row's solve reads only
    that row of ``x``), which :func:`fit` uses to hold one user table, not two (0.5 GB at 2M
    users x 64 factors)."""
    y = np.ascontiguousarray(y, np.float32)
    gram = (gram_f64(y) + regularization * np.eye(y.shape[1])).astype(np.float32)
    if in_place and not (x.dtype == np.float32 and x.flags.c_contiguous and x.flags.writeable):
        raise ValueError("solve_numba(in_place=True) needs a writeable C-contiguous float32 x")
    out = x if in_place else np.array(x, np.float32, order="C", copy=True)
    conf = m.conf if m.conf is not None else np.zeros(1, np.float32)
    _numba_kernel()(m.indptr, m.indices, conf, np.float32(m.uniform), m.conf is not None, out, y,
                    gram, int(cg_steps))
    return out


KERNELS = ("auto", "keras", "numba")


def pick_kernel(kernel: str) -> str:
    """``keras`` (the ``keras.ops`` path of :func:`solve`) or ``numba`` (:func:`solve_numba`);
    ``auto``: keras when the Keras backend sees a GPU, numba on CPU."""
    if kernel not in KERNELS:
        raise ValueError(f"train.ials.kernel must be one of {KERNELS}, got {kernel!r}")
    if kernel != "auto":
        return kernel
    return "keras" if gpu_count() else "numba"


GPU_DEVICE_FILES = ("/dev/nvidia[0-9]*", "/dev/kfd", "/dev/dxg")  # CUDA, ROCm, WSL


def gpu_count() -> int:
    """GPUs the Keras backend sees (TensorFlow, JAX or PyTorch). A machine with none of
    ``GPU_DEVICE_FILES`` has none, and is answered without importing the backend: importing
    TensorFlow costs ~0.5 GB resident for the rest of the process (measured), which a CPU run
    that fits no Keras model (EASE by LAPACK, iALS by numba) should not pay."""
    import glob

    if not any(glob.glob(pattern) for pattern in GPU_DEVICE_FILES):
        return 0
    from nightrec.ml import models

    backend = models.keras_module().backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        return len(tf.config.list_physical_devices("GPU"))
    if backend == "jax":
        import jax

        return len([d for d in jax.devices() if d.platform == "gpu"])
    if backend == "torch":
        import torch

        return torch.cuda.device_count()
    return 0


def warm_up(kernel: str = "auto") -> None:
    """Compile the numba kernel (or load it from numba's cache) with a one-iteration fit of a
    3 x 3 log, when ``kernel`` resolves to numba. Cold, ~20 s on 2 busy cores; from the cache
    0.7 s (3 s under load): train calls this before its time budget starts, so iALS's share
    goes to iterations."""
    if pick_kernel(kernel) == "numba":
        idx = np.arange(3)
        fit(idx, (idx + 1) % 3, None, n_users=3, n_items=3, factors=4, iterations=1,
            regularization=1.0, alpha=1.0, cg_steps=1, seed=0, kernel="numba")


def fit(user_idx: np.ndarray, item_idx: np.ndarray, weight: np.ndarray | None, *,
        n_users: int, n_items: int, factors: int, iterations: int, regularization: float,
        alpha: float, cg_steps: int, seed: int, chunk_nnz: int = 1_000_000,
        init: dict[str, np.ndarray] | None = None, deadline: float | None = None,
        callback: Callable[[int, dict], None] | None = None,
        kernel: str = "auto", data: tuple[Csr, Csr] | None = None) -> tuple[dict, dict]:
    """Fit iALS on the observed ``(user_idx, item_idx)`` pairs with sample weights ``weight``
    (None: all 1). Returns ``(weights, history)``: weights in the factor-model export of
    nightrec/ml/models.py (``user``, ``item``, ``item_bias`` zeros); history with seconds per
    iteration and why it stopped.

    ``init``: a factor export aligned to these indices (``models.align``), copied where it knows
    a user or item (warm start); the rest starts seeded random. ``deadline`` (``time.monotonic``
    seconds): no iteration starts that would, at the mean pace so far, end after it (at least
    one always runs). ``callback(iteration, history)`` after each iteration. ``kernel``: see
    :func:`pick_kernel`. ``data``: the pairs as :func:`pairs` built them with this ``alpha``
    (then ``user_idx``, ``item_idx`` and ``weight`` are not read): fits of several
    regularizations on one log build them once.
    """
    if factors < 1 or iterations < 1 or cg_steps < 1:
        raise ValueError("train.ials factors, iterations and cg_steps must be >= 1")
    if regularization <= 0 or alpha <= 0:
        raise ValueError(f"train.ials regularization and alpha must be > 0, got "
                         f"{regularization}, {alpha}")
    started = time.perf_counter()
    kernel = pick_kernel(kernel)
    by_user, by_item = data if data is not None else pairs(
        user_idx, item_idx, weight, n_users=n_users, n_items=n_items, alpha=alpha)
    rng = np.random.default_rng(seed)
    x = (rng.random((n_users, factors), dtype=np.float32) * np.float32(0.01))
    y = (rng.random((n_items, factors), dtype=np.float32) * np.float32(0.01))
    warm = 0
    if init is not None:
        for table, key, known in ((x, "user", np.any(init["user"] != 0, axis=1)),
                                  (y, "item", np.any(init["item"] != 0, axis=1))):
            if init[key].shape[1] != factors:
                raise ValueError(f"warm start: champion {key} dim {init[key].shape[1]} != "
                                 f"train.ials.factors {factors}")
            table[known] = init[key][known]
            warm += int(known.sum())
    history = {"kernel": kernel, "iteration_s": [], "pairs": int(len(by_user.indices)),
               "setup_s": round(time.perf_counter() - started, 3), "warm_start_rows": warm}
    stop = "iterations"
    for it in range(iterations):
        if it and deadline is not None:
            pace = float(np.mean(history["iteration_s"]))
            if time.monotonic() + pace > deadline:
                stop = f"time budget: {it} of {iterations} iterations (~{pace:.1f} s each)"
                break
        t0 = time.perf_counter()
        if kernel == "numba":
            x = solve_numba(x, y, by_user, regularization=regularization, cg_steps=cg_steps,
                            in_place=True)
            y = solve_numba(y, x, by_item, regularization=regularization, cg_steps=cg_steps,
                            in_place=True)
        else:
            x = solve(x, y, by_user, regularization=regularization, cg_steps=cg_steps,
                      chunk_nnz=chunk_nnz)
            y = solve(y, x, by_item, regularization=regularization, cg_steps=cg_steps,
                      chunk_nnz=chunk_nnz)
        history["iteration_s"].append(round(time.perf_counter() - t0, 3))
        log.info("ials iteration %d/%d: %.1f s", it + 1, iterations, history["iteration_s"][-1])
        if callback is not None:
            callback(it, history)
    history["iterations"] = len(history["iteration_s"])
    history["stopped"] = stop
    return {"user": x, "item": y, "item_bias": np.zeros(n_items, np.float32)}, history


def loss(weights: dict, user_idx: np.ndarray, item_idx: np.ndarray, *, alpha: float,
         regularization: float) -> float:
    """The objective of the module docstring (weights all 1), computed exactly in float64: for
    tests and small problems only (it forms the dense users x items score matrix)."""
    x = weights["user"].astype(np.float64)
    y = weights["item"].astype(np.float64)
    s = x @ y.T
    p = np.zeros_like(s)
    p[user_idx, item_idx] = 1.0
    c = np.where(p > 0, alpha, 1.0)
    return float((c * (p - s) ** 2).sum() + regularization * ((x ** 2).sum() + (y ** 2).sum()))
