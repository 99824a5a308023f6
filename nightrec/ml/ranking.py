"""Ranking: exact top-K of ``U @ V.T + b`` per user, seen items excluded.

Why our own kernel. Measured on the development machine (2 cores, AMD EPYC Zen 5 with AVX-512;
benchmarks/RESULTS.md has the dated end-to-end figures), at 20k items x d=64, k=100, per user and
core:

* **The matrix product.** The OpenBLAS that numpy ships (0.3.31) picks its Haswell (AVX2) sgemm
  on this CPU: about 22 us a user. The register-blocked micro-kernel below (LLVM vector IR
  through a numba intrinsic: an ``MR x NR`` tile of scores stays in vector registers for the
  whole dot product, one FMA per factor) takes about 10 us with 512-bit vectors. Users need no
  packing; items are packed once per call into ``NR``-wide panels; factors come in blocks of
  ``KC`` so wide vectors (item-item models, d = n_items) stay cache-friendly.
* **The selection.** ``np.argpartition`` and a sort of the k take about 50 us a row; the
  previous version of this kernel about 27 us, 14 of them in numba's ``np.partition`` of ~1,400
  group maxima; faiss's flat search must over-fetch ``k + max_seen`` and filter. The selection
  below takes about 5 us:

  1. the user's seen items are set to -inf (``seen`` is read in place: no CSR slicing);
  2. the bias is added, and one vectorised pass over ``G`` (about ``sqrt(k * n_items)``)
     strided groups (item ``j`` in group ``j % G``) keeps each group's maximum, second maximum
     and the position of its (first) maximum;
  3. a bisection on the group maxima finds ``t`` with at least ``k`` of them ``>= t``, so ``k``
     distinct unseen items score ``>= t``: a safe bound. It runs on order-preserving int32 keys
     of the floats (vectorised counts, at most 32 steps whatever the range: unknown items carry
     a bias near -1e30) and stops once at most ``k + k/8`` groups pass;
  4. only the passing groups give candidates: a group whose second maximum is below ``t`` gives
     just its maximum (most of them), the others are scanned. A candidate is a 64-bit key
     ``(order-preserving score bits, descending) << 32 | item`` (``-0.0`` as ``+0.0``), so one
     integer order is "higher score first, then lower item index";
  5. the ``c`` candidates (about ``k + 10``) are ranked by counting (branch-free, vectorised)
     when ``c <= 512``, else (many ties) the ``k`` smallest keys go through a heap.

Exact and deterministic: every score is the same sequential fused multiply-add chain over the
``d`` factors, then ``+ b``, whatever the block, chunk, thread or vector width that computes it;
ties go to the lower item index, always, including at the k-th place; results are a pure
function of the inputs, bitwise identical for any ``threads`` and ``chunk``. No fast-math flags
at all (the FMA is explicit): -inf implements the seen-masking.

Threads: each worker takes blocks of ``BLOCK`` users from a shared counter (a core slowed by
another process does not hold the others at a barrier) and multiplies and selects them in one
nogil numba call, in its own reused score block (``BLOCK x n_items`` float32). Memory is flat in
the number of users: ``user_vecs`` is read and results are returned ``chunk`` users at a time.
A GPU path would use the backend's matmul plus top_k; on CPU this kernel is what runs.

**Sparse user rows** (an item-item model: the user vector is the user's 0/1 seen row, ``d =
n_items``). A dense row makes the product ``n_items^2`` per user, nearly all of it multiplying
zeros. Given ``user_vecs`` as a scipy sparse matrix, each user's scores are instead the sum of the
item vectors' columns at the user's stored entries (for EASE: the rows of ``B`` of the items the
user has seen), ``nnz_u * n_items`` per user, by :func:`_sparse_rows`, and the selection is the
one above. The same numbers: per score it is the same fused multiply-add chain in the same
(column) order, minus the terms whose factor is 0, which leave a finite sum unchanged; so the
top-K, ties and seen-masking are those of the dense path (tests/test_score_scale.py compares).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np
import pandas as pd
from llvmlite import ir
from numba import types
from numba.extending import intrinsic
from scipy import sparse

PANELS_PER_PASS = 8  # item panels (NR items each) kept hot while all of a block's users use them
KC = 256  # factors per pass of the product (only matters for wide vectors: item-item models)


def seen_matrix(df: pd.DataFrame, *, n_users: int, n_items: int, user_col: str, item_col: str):
    """CSR (n_users x n_items) with a 1 where the user interacted with the item."""
    data = np.ones(len(df), dtype=np.int8)
    m = sparse.csr_matrix(
        (data, (df[user_col].to_numpy(), df[item_col].to_numpy())), shape=(n_users, n_items)
    )
    m.sum_duplicates()
    return m


# ---------------------------------------------------------------------------------------------
# The matrix product: an MR x (NV * VW) tile of scores in vector registers.


def _vector_width() -> int:
    """16 floats when numba compiles for a CPU with AVX-512, else 8 (AVX2; narrower targets
    split the vectors, still correct)."""
    features = numba.config.CPU_FEATURES
    if features is None:
        if numba.config.CPU_NAME not in (None, "host"):
            return 8
        import llvmlite.binding as llvm

        return 16 if llvm.get_host_cpu_features().get("avx512f") else 8
    return 16 if "+avx512f" in features else 8


def _make_tile(mr: int, nv: int, vw: int, *, accumulate: bool):
    """An intrinsic ``tile(ub, u0, k0, panel, c, c0)``: for u < mr, j < nv * vw,
    ``c[u0 + u, c0 + j]`` = a fused multiply-add chain over k = 0 .. kc-1, in order, of
    ``ub[u0 + u, k0 + k] * panel[k, j]``, starting from 0 (or from ``c`` itself when
    ``accumulate``). ``panel`` is (kc, nv * vw), kc >= 1; all arrays C-contiguous."""

    @intrinsic
    def tile(typingctx, ub, u0, k0, panel, c, c0):
        sig = types.void(ub, u0, k0, panel, c, c0)

        def codegen(context, builder, signature, args):
            ub_v, u0_v, k0_v, panel_v, c_v, c0_v = args
            u_arr = context.make_array(signature.args[0])(context, builder, ub_v)
            p_arr = context.make_array(signature.args[3])(context, builder, panel_v)
            c_arr = context.make_array(signature.args[4])(context, builder, c_v)
            f32, i64, i32 = ir.FloatType(), ir.IntType(64), ir.IntType(32)
            vec = ir.VectorType(f32, vw)
            vptr = vec.as_pointer()

            def const(x):
                return ir.Constant(i64, x)

            def c_ptr(u, v):
                row = builder.mul(builder.add(u0_v, const(u)), builder.extract_value(c_arr.shape, 1))
                at = builder.add(builder.add(row, c0_v), const(v * vw))
                return builder.bitcast(builder.gep(c_arr.data, [at]), vptr)

            ld_u = builder.extract_value(u_arr.shape, 1)
            kc = builder.extract_value(p_arr.shape, 0)
            name = f"llvm.fma.v{vw}f32"
            fma = builder.module.globals.get(name) or ir.Function(
                builder.module, ir.FunctionType(vec, [vec, vec, vec]), name=name
            )
            splat = ir.Constant(ir.VectorType(i32, vw), [0] * vw)
            undef = ir.Constant(vec, ir.Undefined)
            start = [builder.load(c_ptr(u, v), align=4) if accumulate
                     else ir.Constant(vec, [0.0] * vw) for u in range(mr) for v in range(nv)]
            pre = builder.block
            loop = builder.append_basic_block("tile_loop")
            done = builder.append_basic_block("tile_done")
            builder.branch(loop)
            builder.position_at_end(loop)
            k = builder.phi(i64)
            k.add_incoming(const(0), pre)
            acc = []
            for value in start:
                phi = builder.phi(vec)
                phi.add_incoming(value, pre)
                acc.append(phi)
            row = builder.mul(k, const(nv * vw))
            b = [builder.load(builder.bitcast(builder.gep(
                p_arr.data, [builder.add(row, const(v * vw))]), vptr), align=4)
                for v in range(nv)]
            col = builder.add(k0_v, k)
            new = []
            for u in range(mr):
                at = builder.add(builder.mul(builder.add(u0_v, const(u)), ld_u), col)
                x = builder.load(builder.gep(u_arr.data, [at]), align=4)
                xs = builder.shuffle_vector(
                    builder.insert_element(undef, x, ir.Constant(i32, 0)), undef, splat)
                new.extend(builder.call(fma, [xs, b[v], acc[u * nv + v]]) for v in range(nv))
            k_next = builder.add(k, const(1))
            end = builder.block
            k.add_incoming(k_next, end)
            for phi, value in zip(acc, new):
                phi.add_incoming(value, end)
            builder.cbranch(builder.icmp_signed("<", k_next, kc), loop, done)
            builder.position_at_end(done)
            for u in range(mr):
                for v in range(nv):
                    builder.store(new[u * nv + v], c_ptr(u, v), align=4)
            return context.get_dummy_value()

        return sig, codegen

    return tile


def _make_gemm(mr: int, nv: int, vw: int, *, cache: bool):
    """A numba ``gemm(ub, panels, c, kc, panels_per_pass)``: ``c[:, :n_pad] = ub @ items.T``
    with ``ub`` (rows, d), rows a multiple of mr, and ``panels`` (n_panels, d, nv * vw) the
    items packed by :func:`pack_items`."""
    tile = _make_tile(mr, nv, vw, accumulate=False)
    tile_acc = _make_tile(mr, nv, vw, accumulate=True)

    @numba.njit(cache=cache, nogil=True)
    def gemm(ub, panels, c, kc, panels_per_pass):  # pragma: no cover
        rows = ub.shape[0]
        n_panels, d, nr = panels.shape
        if d == 0:
            c[:rows] = 0
            return
        for k0 in range(0, d, kc):  # k-blocks keep a panel slice in L1 when d is large
            k1 = min(k0 + kc, d)
            for p0 in range(0, n_panels, panels_per_pass):
                p1 = min(p0 + panels_per_pass, n_panels)
                for u0 in range(0, rows, mr):
                    for p in range(p0, p1):
                        if k0 == 0:
                            tile(ub, u0, k0, panels[p, k0:k1], c, p * nr)
                        else:
                            tile_acc(ub, u0, k0, panels[p, k0:k1], c, p * nr)

    return gemm


VECTOR_WIDTH = _vector_width()
MR, NV = (8, 2) if VECTOR_WIDTH == 16 else (6, 2)  # accumulators + loads fit the registers
NR = NV * VECTOR_WIDTH
BLOCK = 8 * MR  # users per worker call: the score block is BLOCK x n_items float32
_gemm = _make_gemm(MR, NV, VECTOR_WIDTH, cache=True)


def pack_items(item_vecs: np.ndarray, nr: int = NR) -> np.ndarray:
    """(n_panels, d, nr) float32: panel p holds items p*nr .. p*nr+nr-1 (zero-padded)."""
    v = np.asarray(item_vecs, np.float32)
    n, d = v.shape
    n_panels = -(-n // nr)
    padded = np.zeros((n_panels * nr, d), np.float32)
    padded[:n] = v
    return np.ascontiguousarray(padded.reshape(n_panels, nr, d).transpose(0, 2, 1))


@intrinsic
def _fma(typingctx, a, b, c):
    """``a * b + c`` rounded once (float32): what the tile's vector FMA does per lane."""
    sig = types.float32(types.float32, types.float32, types.float32)

    def codegen(context, builder, signature, args):
        f32 = ir.FloatType()
        fma = builder.module.globals.get("llvm.fma.f32") or ir.Function(
            builder.module, ir.FunctionType(f32, [f32, f32, f32]), name="llvm.fma.f32")
        return builder.call(fma, args)

    return sig, codegen


@numba.njit(cache=True, nogil=True)
def _sparse_rows(users, u_indptr, u_indices, u_data, weights, c):  # pragma: no cover
    """``c[r, :n] = x_u @ weights`` for user ``u = users[r]``, ``x_u`` the CSR row (indices
    sorted) and ``weights`` (d, n) C-contiguous: row ``k`` of ``weights`` is added, scaled by
    ``x_u[k]``, for each stored ``k`` in order, one FMA per element (it vectorises)."""
    n = weights.shape[1]
    for r in range(users.shape[0]):
        row = c[r, :n]
        row[:] = 0
        u = users[r]
        for p in range(u_indptr[u], u_indptr[u + 1]):
            x = u_data[p]
            w = weights[u_indices[p]]
            for j in range(n):
                row[j] = _fma(x, w[j], row[j])


# ---------------------------------------------------------------------------------------------
# The selection.


@numba.njit(cache=True, nogil=True)
def _add_into(seg, b):  # pragma: no cover
    for i in range(seg.shape[0]):
        seg[i] += b[i]


@numba.njit(cache=True, nogil=True)
def _track(seg, s, gm, g2, gi):  # pragma: no cover
    """Fold slice ``s`` of a row into the running group maximum, second maximum and slice of
    the (first) maximum: elementwise, so it vectorises."""
    for i in range(seg.shape[0]):
        v = seg[i]
        g = gm[i]
        g2[i] = max(g2[i], min(g, v))
        gi[i] = s if v > g else gi[i]
        gm[i] = max(g, v)


@numba.njit(cache=True, nogil=True)
def _count_less(keys, x):  # pragma: no cover
    c = 0
    for i in range(keys.shape[0]):
        c += keys[i] < x
    return c


@numba.njit(cache=True, nogil=True)
def _sift_down(h, i, end):  # pragma: no cover
    """Restore the max-heap ``h[:end]`` below position ``i``."""
    x = h[i]
    while True:
        child = 2 * i + 1
        if child >= end:
            break
        if child + 1 < end and h[child + 1] > h[child]:
            child += 1
        if h[child] <= x:
            break
        h[i] = h[child]
        i = child
    h[i] = x


@numba.njit(cache=True, nogil=True)
def _smallest_sorted(keys, heap):  # pragma: no cover
    """``heap`` := the ``len(heap)`` smallest of ``keys`` (distinct), ascending."""
    m = heap.shape[0]
    heap[:] = keys[:m]
    for i in range(m // 2 - 1, -1, -1):
        _sift_down(heap, i, m)
    for p in range(m, keys.shape[0]):
        if keys[p] < heap[0]:
            heap[0] = keys[p]
            _sift_down(heap, 0, m)
    for end in range(m - 1, 0, -1):
        heap[0], heap[end] = heap[end], heap[0]
        _sift_down(heap, 0, end)


@numba.njit(cache=True, nogil=True, inline="always")
def _key(bits, j):  # pragma: no cover
    """Ascending int64 order = descending score, then ascending item index."""
    if bits == -2147483648:  # -0.0 ties with +0.0
        bits = 0
    s = np.int64(bits) if bits >= 0 else np.int64(bits ^ 0x7FFFFFFF)
    return ((-s) << 32) + j


@numba.njit(cache=True, nogil=True)
def _order_keys(dst, bits):  # pragma: no cover
    """int32 keys in the order of the floats whose bit patterns are ``bits`` (-0.0 just below
    +0.0, -inf lowest of all but NaN)."""
    for i in range(bits.shape[0]):
        b = bits[i]
        dst[i] = b if b >= 0 else b ^ 0x7FFFFFFF


@numba.njit(cache=True, nogil=True)
def _count_ge_int(keys, t):  # pragma: no cover
    c = 0
    for i in range(keys.shape[0]):
        c += keys[i] >= t
    return c


@numba.njit(cache=True, nogil=True)
def _key_range(keys, floor):  # pragma: no cover
    """(max of ``keys``, min of those above ``floor``; int32 max if none): vectorises."""
    hi = np.int32(-(2**31))
    lo = np.int32(2**31 - 1)
    for i in range(keys.shape[0]):
        x = keys[i]
        hi = max(hi, x)
        lo = min(lo, x if x > floor else np.int32(2**31 - 1))
    return hi, lo


NEG_INF_KEY = np.int32(np.array([-np.inf], np.float32).view(np.int32)[0] ^ 0x7FFFFFFF)


@numba.njit(cache=True, nogil=True)
def _threshold(gm, k, slack, tmp):  # pragma: no cover
    """A ``t`` with at least ``k`` of the group maxima ``gm`` >= t (-inf when there is none),
    as high as a few steps of bisection make it. The bisection runs on order-preserving integer
    keys (``tmp``: int32, as long as ``gm``): at most 32 steps whatever the range of values
    (an item bias of -1e30 for unknown items stretches it)."""
    ninf = np.float32(-np.inf)
    n = gm.shape[0]
    if n <= k:
        return ninf
    keys = tmp[:n]
    _order_keys(keys, gm.view(np.int32))
    hi, lo = _key_range(keys, NEG_INF_KEY)
    if _count_ge_int(keys, lo) < k:  # fewer than k groups hold an item above -inf
        return ninf
    if _count_ge_int(keys, hi) >= k:
        lo = hi
    else:
        while hi - lo > 1:  # invariant: count(keys >= lo) >= k > count(keys >= hi)
            mid = np.int32((np.int64(lo) + np.int64(hi)) >> 1)
            c = _count_ge_int(keys, mid)
            if c >= k:
                lo = mid
                if c <= k + slack:
                    break
            else:
                hi = mid
    tmp[0] = lo if lo >= 0 else lo ^ 0x7FFFFFFF  # back to the float's bits
    return tmp[:1].view(np.float32)[0]


@numba.njit(cache=True, nogil=True)
def _select_rows(scores, n, bias, users, indptr, indices, k, n_groups, gmax, keys, groups,
                 out_items, out_scores):  # pragma: no cover
    """Per row r of ``scores[:, :n]`` (user ``users[r]``; in place: masks seen, adds bias):
    the top k into ``out_items[r]``/``out_scores[r]``, -1/-inf padded."""
    ninf = np.float32(-np.inf)
    low = np.int64(0xFFFFFFFF)
    g_n = n_groups
    gm, g2 = gmax[:g_n], gmax[g_n : 2 * g_n]
    tmp, gi = gmax[2 * g_n : 3 * g_n].view(np.int32), gmax[3 * g_n : 4 * g_n].view(np.int32)
    slack = max(1, k // 8)
    for r in range(out_items.shape[0]):
        row = scores[r, :n]
        bits = row.view(np.int32)
        u = users[r]
        for p in range(indptr[u], indptr[u + 1]):
            row[indices[p]] = ninf
        if bias.shape[0] == n:
            _add_into(row, bias)
        gm[:] = row[:g_n]
        g2[:] = ninf
        gi[:] = 0
        for s in range(1, -(-n // g_n)):
            _track(row[s * g_n : min(s * g_n + g_n, n)], s, gm, g2, gi)
        t = _threshold(gm, k, slack, tmp)
        c = 0
        if t > ninf:
            n_pass = 0
            for g in range(g_n):  # branch-free list of the groups that reach t
                groups[n_pass] = g
                n_pass += gm[g] >= t
            for q in range(n_pass):
                g = groups[q]
                if g2[g] < t:  # the group's maximum is its only candidate
                    j = g + gi[g] * g_n
                    keys[c] = _key(bits[j], j)
                    c += 1
                    continue
                for j in range(g, n, g_n):
                    if row[j] >= t:
                        keys[c] = _key(bits[j], j)
                        c += 1
        else:
            for j in range(n):
                if row[j] > ninf:
                    keys[c] = _key(bits[j], j)
                    c += 1
        take = min(k, c)
        if c <= 512:
            cand = keys[:c]
            for p in range(c):
                x = cand[p]
                rank = _count_less(cand, x)  # keys are distinct: ranks are 0 .. c-1
                if rank < take:
                    out_items[r, rank] = x & low
        else:  # many ties: the take smallest keys through a max-heap, then heap-sorted
            heap = keys[n : n + take]
            _smallest_sorted(keys[:c], heap)
            for q in range(take):
                out_items[r, q] = heap[q] & low
        for q in range(take):
            out_scores[r, q] = row[out_items[r, q]]
        for q in range(take, k):
            out_items[r, q] = -1
            out_scores[r, q] = ninf


@numba.njit(cache=True, nogil=True)
def _score_block(ub, users, panels, n, bias, indptr, indices, k, n_groups, c, gmax, keys, groups,
                 out_items, out_scores):  # pragma: no cover
    """Users ``users`` (their vectors: the first ``len(users)`` rows of ``ub``, which has a
    multiple of MR rows; their seen items: rows of the CSR ``indptr``/``indices``): multiply,
    then select into ``out_items``/``out_scores``."""
    _gemm(ub, panels, c, KC, PANELS_PER_PASS)
    _select_rows(c, n, bias, users, indptr, indices, k, n_groups, gmax, keys, groups,
                 out_items, out_scores)


@numba.njit(cache=True, nogil=True)
def _score_block_sparse(users, u_indptr, u_indices, u_data, weights, n, bias, indptr, indices, k,
                        n_groups, c, gmax, keys, groups, out_items,
                        out_scores):  # pragma: no cover
    """:func:`_score_block` for sparse user rows: :func:`_sparse_rows`, then the selection."""
    _sparse_rows(users, u_indptr, u_indices, u_data, weights, c)
    _select_rows(c, n, bias, users, indptr, indices, k, n_groups, gmax, keys, groups,
                 out_items, out_scores)


def default_groups(k: int, n_items: int) -> int:
    """About sqrt(k * n_items) groups: balances the group-maxima bisection against the scan."""
    return int(min(n_items, max(2 * k, np.sqrt(k * n_items))))


class _Scratch:
    """One worker's buffers, reused for every block."""

    def __init__(self, block: int, d: int, n_pad: int, n_items: int, n_groups: int, k: int):
        rows = -(-block // MR) * MR
        self.ub = np.zeros((rows, d), np.float32)
        self.c = np.empty((rows, n_pad), np.float32)
        self.gmax = np.empty(4 * n_groups, np.float32)
        self.keys = np.empty(n_items + k, np.int64)
        self.groups = np.empty(max(n_groups, 1), np.int64)


def iter_top_k(
    user_vecs,
    item_vecs: np.ndarray,
    item_bias: np.ndarray | None,
    seen,
    users: np.ndarray,
    *,
    k: int,
    chunk: int = 4096,
    threads: int | None = None,
    panels: np.ndarray | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Yield ``(users, items, scores)`` per chunk of ``users`` (indices into ``user_vecs`` and
    rows of the CSR ``seen``). ``items`` (int32) is -1 and ``scores`` (float32) -inf where a user
    has fewer than k unseen items. ``threads`` defaults to the CPUs this process may use.

    ``user_vecs``: dense, it only needs ``user_vecs[index_array]`` to give the rows as a 2-D
    array (it is read one chunk at a time); or a scipy sparse matrix (n_users x d), scored by
    the sparse path (module docstring), which reads ``item_vecs.T`` as it is when that is
    C-contiguous (pass the transpose of a C-contiguous (d, n_items) matrix: no copy) and never
    packs. ``panels``: ``pack_items(item_vecs)`` when the caller already packed them (a caller
    that calls this many times with the same dense user vectors packs them once)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    item_vecs = np.asarray(item_vecs, np.float32)
    n_items, d = item_vecs.shape
    bias = (np.empty(0, np.float32) if item_bias is None
            else np.ascontiguousarray(np.asarray(item_bias, np.float32).reshape(-1)))
    if bias.size not in (0, n_items):
        raise ValueError(f"item_bias has {bias.size} values for {n_items} items")
    seen = seen.tocsr() if sparse.issparse(seen) else sparse.csr_matrix(seen)
    if seen.shape[1] != n_items:
        raise ValueError(f"seen has {seen.shape[1]} columns for {n_items} items")
    indptr, indices = seen.indptr, seen.indices
    users = np.asarray(users, np.int64)
    threads = max(1, threads or len(os.sched_getaffinity(0)))
    n_groups = default_groups(k, n_items)
    if sparse.issparse(user_vecs):
        rows = _canonical_rows(user_vecs, d)
        weights = item_vecs.T if item_vecs.T.flags.c_contiguous else np.ascontiguousarray(
            item_vecs.T)
        scratch = [_Scratch(BLOCK, 0, n_items, n_items, n_groups, k) for _ in range(threads)]

        def block(s: _Scratch, batch, vecs, items, best):
            _score_block_sparse(batch, rows.indptr, rows.indices, rows.data, weights, n_items,
                                bias, indptr, indices, k, n_groups, s.c, s.gmax, s.keys, s.groups,
                                items, best)
    else:
        panels = pack_items(item_vecs) if panels is None else panels
        scratch = [_Scratch(BLOCK, d, panels.shape[0] * NR, n_items, n_groups, k)
                   for _ in range(threads)]

        def block(s: _Scratch, batch, ub, items, best):
            if len(batch) % MR:  # the tile multiplies MR users at a time: pad with zeros
                padded = -(-len(batch) // MR) * MR
                s.ub[: len(batch)] = ub
                s.ub[len(batch) : padded] = 0
                ub = s.ub[:padded]
            _score_block(ub, batch, panels, n_items, bias, indptr, indices, k, n_groups,
                         s.c, s.gmax, s.keys, s.groups, items, best)

    def work(s: _Scratch, batch, vecs, items, best, blocks, lock):
        while True:
            with lock:
                lo = next(blocks, None)
            if lo is None:
                return
            hi = min(lo + BLOCK, len(batch))
            block(s, batch[lo:hi], None if vecs is None else vecs[lo:hi], items[lo:hi],
                  best[lo:hi])

    with ThreadPoolExecutor(threads) as pool:
        for lo in range(0, len(users), chunk):
            batch = users[lo : lo + chunk]
            if len(batch) and (batch.min() < 0 or batch.max() >= seen.shape[0]):
                raise IndexError(f"users must be rows of seen (0 .. {seen.shape[0] - 1})")
            vecs = None
            if not sparse.issparse(user_vecs):
                vecs = np.ascontiguousarray(user_vecs[batch], dtype=np.float32)
                if vecs.shape != (len(batch), d):
                    raise ValueError(
                        f"user vectors {vecs.shape} do not match items {(n_items, d)}")
            elif len(batch) and batch.max() >= user_vecs.shape[0]:
                raise IndexError(f"users must be rows of user_vecs (0 .. {user_vecs.shape[0] - 1})")
            items = np.empty((len(batch), k), np.int32)
            best = np.empty((len(batch), k), np.float32)
            if n_items == 0:
                items[:] = -1
                best[:] = -np.inf
            else:
                blocks, lock = iter(range(0, len(batch), BLOCK)), threading.Lock()
                futures = [pool.submit(work, s, batch, vecs, items, best, blocks, lock)
                           for s in scratch]
                for f in futures:
                    f.result()
            yield batch, items, best


def warm_up() -> None:
    """Compile the kernels of both paths (dense and sparse user rows) on a tiny input, or load
    them from numba's on-disk cache. A cold compile costs ~16 s on 2 cores (0.6 s from the
    cache): train calls this before its time budget starts, so the first candidate's share is
    not spent compiling (it was: a first run on a fresh install under load fitted 1 of EASE's
    points, a rerun all of them)."""
    rng = np.random.default_rng(0)
    items = rng.random((2 * NR, 8), dtype=np.float32)
    seen = sparse.csr_matrix(np.eye(MR, 2 * NR, dtype=np.float32))
    dense = rng.random((MR, 8), dtype=np.float32)
    for vecs in (dense, sparse.csr_matrix(dense)):
        for _ in iter_top_k(vecs, items, None, seen, np.arange(MR), k=3, threads=1):
            pass


def _canonical_rows(user_vecs, d: int) -> sparse.csr_matrix:
    """``user_vecs`` as a float32 CSR with sorted column indices and no duplicates (the order
    of each user's FMA chain); the matrix itself when it already is one."""
    rows = user_vecs if user_vecs.format == "csr" else sparse.csr_matrix(user_vecs)
    if rows.shape[1] != d:
        raise ValueError(f"user vectors have {rows.shape[1]} columns for {d} factors")
    if rows.dtype != np.float32 or not rows.has_canonical_format:
        rows = sparse.csr_matrix(rows, dtype=np.float32, copy=True)
        rows.sum_duplicates()
    return rows
