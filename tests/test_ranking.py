"""nightrec/ml/ranking.py: exact top-K against a float64 brute force, ties, padding, determinism."""

import numpy as np
import pandas as pd
import pytest

from nightrec.ml import ranking


def _seen(rng, n_users, n_items, per_user):
    pairs = pd.DataFrame({"u": rng.integers(0, n_users, n_users * per_user),
                          "i": rng.integers(0, n_items, n_users * per_user)})
    return ranking.seen_matrix(pairs, n_users=n_users, n_items=n_items, user_col="u",
                               item_col="i")


def _brute(u, v, bias, seen, users, k):
    """(items, scores): float64 scores sorted by (-score, item index), seen dropped, padded."""
    full = np.asarray(u, np.float64)[users] @ np.asarray(v, np.float64).T
    if bias is not None:
        full += bias
    dense = seen.toarray()[users] > 0
    items, scores = np.full((len(users), k), -1), np.full((len(users), k), -np.inf)
    for r in range(len(users)):
        unseen = np.flatnonzero(~dense[r])
        order = unseen[np.lexsort((unseen, -full[r, unseen]))][:k]
        items[r, : len(order)] = order
        scores[r, : len(order)] = full[r, order]
    return items, scores


def _run(u, v, bias, seen, users, k, **kw):
    chunks = list(ranking.iter_top_k(u, v, bias, seen, users, k=k, **kw))
    assert np.array_equal(np.concatenate([b for b, _, _ in chunks]), users)
    items = np.concatenate([i for _, i, _ in chunks])
    scores = np.concatenate([s for _, _, s in chunks])
    assert items.dtype == np.int32 and scores.dtype == np.float32
    return items, scores


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize(("n_items", "dim", "k"), [
    (60, 4, 1), (60, 4, 7), (60, 4, 64),  # 64 > unseen items of every user: padded
    (1000, 6, 100), (3000, 8, 20), (500, 300, 30),  # 300 factors: the product's k-blocks
])
def test_top_k_equals_float64_brute_force_with_ties_seen_and_padding(n_items, dim, k, with_bias):
    rng = np.random.default_rng(n_items + dim + k)
    n_users = 150
    # small integers: scores are exact in float32 and tie often, at the k-th place too
    u = rng.integers(-2, 3, size=(n_users, dim)).astype(np.float32)
    v = rng.integers(-2, 3, size=(n_items, dim)).astype(np.float32)
    bias = rng.integers(0, 3, size=n_items).astype(np.float32) if with_bias else None
    seen = _seen(rng, n_users, n_items, per_user=min(40, n_items // 3))
    users = rng.permutation(n_users)[:120]  # a subset, out of order
    got_items, got_scores = _run(u, v, bias, seen, users, k, chunk=50, threads=2)
    want_items, want_scores = _brute(u, v, bias, seen, users, k)
    assert np.array_equal(got_items, want_items)
    assert np.array_equal(got_scores, want_scores.astype(np.float32))  # -inf where padded
    if k == 64:
        assert (got_items == -1).any()


def test_ties_go_to_the_lower_index_even_at_the_kth_place():
    n_items, k = 5000, 100
    v = np.zeros((n_items, 2), np.float32)
    v[::7] = 1.0  # items 0, 7, 14, ... score 1; every other item scores 0
    u = np.ones((3, 1), np.float32) @ np.array([[1.0, 0.0]], np.float32)
    seen = _seen(np.random.default_rng(0), 3, n_items, per_user=0)
    items, scores = _run(u, v, None, seen, np.arange(3), k, threads=1)
    assert items[0].tolist() == list(range(0, 7 * k, 7))  # 715 items tie at 1: the first k
    assert (scores == 1).all()
    all_equal, _ = _run(u, np.zeros((n_items, 2), np.float32), None, seen, np.arange(3), k)
    assert all_equal[0].tolist() == list(range(k))


def test_unknown_items_with_a_huge_negative_bias_rank_last():
    """nightrec/ml/models.py gives items a model never saw a bias of about -1e30."""
    rng = np.random.default_rng(5)
    n_users, n_items, k = 40, 3000, 50
    u = rng.integers(-2, 3, size=(n_users, 8)).astype(np.float32)
    v = rng.integers(-2, 3, size=(n_items, 8)).astype(np.float32)
    # 70% unknown: some groups of the kernel hold only unknown items
    bias = np.where(rng.random(n_items) < 0.7, np.float32(-1e30), np.float32(0))
    seen = _seen(rng, n_users, n_items, per_user=20)
    users = np.arange(n_users)
    got = _run(u, v, bias, seen, users, k, threads=2)
    want = _brute(u, v, bias, seen, users, k)
    assert np.array_equal(got[0], want[0])
    assert np.array_equal(got[1], want[1].astype(np.float32))
    few, _ = _run(u, v, bias, seen, users, 1000, threads=2)  # k beyond the known items
    assert np.array_equal(few, _brute(u, v, bias, seen, users, 1000)[0])


def test_every_item_seen_or_no_items_pads_and_bad_inputs_raise():
    u, v = np.ones((2, 3), np.float32), np.ones((5, 3), np.float32)
    seen = ranking.seen_matrix(pd.DataFrame({"u": [0] * 5, "i": range(5)}), n_users=2, n_items=5,
                               user_col="u", item_col="i")
    items, scores = _run(u, v, None, seen, np.arange(2), 3)
    assert items.tolist() == [[-1, -1, -1], [0, 1, 2]]
    assert np.isneginf(scores[0]).all()
    empty = ranking.seen_matrix(pd.DataFrame({"u": [], "i": []}, dtype=int), n_users=2,
                                n_items=0, user_col="u", item_col="i")
    items, _ = _run(u, np.ones((0, 3), np.float32), None, empty, np.arange(2), 2)
    assert (items == -1).all()
    with pytest.raises(ValueError, match="k must be"):
        next(ranking.iter_top_k(u, v, None, seen, np.arange(2), k=0))
    with pytest.raises(IndexError):
        next(ranking.iter_top_k(u, v, None, seen, np.array([2]), k=1))
    with pytest.raises(ValueError, match="item_bias"):
        next(ranking.iter_top_k(u, v, np.zeros(4), seen, np.arange(2), k=1))


def test_threads_chunks_and_lazy_user_rows_give_identical_results():
    """Gaussian data: every score is the same FMA chain whatever thread, chunk or block runs it,
    so items and scores are bitwise equal; and top-k is the prefix of the full ranking."""
    rng = np.random.default_rng(7)
    n_users, n_items, dim = 300, 4000, 32
    u = rng.normal(size=(n_users, dim)).astype(np.float32)
    v = rng.normal(size=(n_items, dim)).astype(np.float32)
    bias = rng.normal(size=n_items).astype(np.float32)
    seen = _seen(rng, n_users, n_items, per_user=30)
    users = np.arange(n_users)

    class LazyRows:  # what nightrec/ml/models.py passes for item-item models: rows on demand
        def __getitem__(self, rows):
            return u[rows].astype(np.float64)

    one = _run(u, v, bias, seen, users, 50, chunk=4096, threads=1)
    for kw in ({"chunk": 37, "threads": 2}, {"chunk": 100, "threads": 3}):
        many = _run(u, v, bias, seen, users, 50, **kw)
        assert np.array_equal(one[0], many[0]) and np.array_equal(one[1], many[1])
    lazy = _run(LazyRows(), v, bias, seen, users, 50, chunk=64, threads=2)
    assert np.array_equal(one[0], lazy[0]) and np.array_equal(one[1], lazy[1])

    full_items, full_scores = _run(u, v, bias, seen, users[:40], n_items, threads=2)
    assert np.array_equal(full_items[:, :50], one[0][:40])
    assert np.array_equal(full_scores[:, :50], one[1][:40])
    ok = full_items >= 0
    s = np.where(ok, full_scores, np.finfo(np.float32).min)
    assert (np.diff(s, axis=1)[ok[:, 1:]] <= 0).all()  # non-increasing
    ties = (np.diff(s, axis=1) == 0) & ok[:, 1:]
    assert (np.diff(full_items, axis=1)[ties] > 0).all()  # equal scores: index order
    want = (u[:40].astype(np.float64) @ v.T.astype(np.float64) + bias)
    rows = np.nonzero(ok)[0]
    np.testing.assert_allclose(full_scores[ok], want[rows, full_items[ok]], rtol=1e-5, atol=1e-4)


def test_the_product_is_bitwise_the_same_at_any_vector_width():
    """The AVX2-width kernel (for CPUs without AVX-512) computes the same FMA chains."""
    rng = np.random.default_rng(3)
    u = rng.normal(size=(48, 300)).astype(np.float32)  # 300 factors: two k-blocks
    v = rng.normal(size=(1000, 300)).astype(np.float32)
    outs = []
    for mr, nv, vw in ((ranking.MR, ranking.NV, ranking.VECTOR_WIDTH), (6, 2, 8), (4, 1, 16)):
        gemm = (ranking._gemm if vw == ranking.VECTOR_WIDTH and mr == ranking.MR
                else ranking._make_gemm(mr, nv, vw, cache=False))
        panels = ranking.pack_items(v, nv * vw)
        c = np.empty((48, panels.shape[0] * nv * vw), np.float32)
        gemm(u, panels, c, ranking.KC, ranking.PANELS_PER_PASS)
        outs.append(c[:, :1000])
    assert np.array_equal(outs[0], outs[1]) and np.array_equal(outs[0], outs[2])
    np.testing.assert_allclose(outs[0], u.astype(np.float64) @ v.T.astype(np.float64),
                               rtol=1e-4, atol=1e-3)


def test_bench_scoring_cli_prints_the_figures_as_its_last_json_line():
    import json
    import subprocess
    import sys
    from pathlib import Path

    cmd = [str(Path(sys.executable).parent / "nightrec"), "bench-scoring", "--users", "3000",
           "--items", "500", "--dim", "16", "--k", "20", "--piece", "1000"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=300)
    last = json.loads(out.stdout.strip().splitlines()[-1])
    for key in ("nightrec_users_per_s", "faiss_users_per_s", "gemm_floor_users_per_s",
                "peak_rss_mb"):
        assert last[key] > 0, key
    assert last["users"] == 3000 and last["agreement_with_faiss"] == 1.0
