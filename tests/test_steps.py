"""Pure-function tests of the step cores, on tiny hand-built inputs with known answers."""

from __future__ import annotations

import gzip

import numpy as np
import pandas as pd
import pytest

from tasks import augment, clean, ingest, ranking, sample_data, split
from tasks.metrics import all_metrics, hit_matrix, ndcg_at_k, recall_at_k

DS = "2026-11-28"
T0 = 1_780_000_000  # 2026-05-28


def _clean(raw, **kw):
    args = {"ds": DS, "min_rating": 0.5, "max_rating": 5.0, "min_timestamp": "1995-01-01",
            "min_user_interactions": 1, "min_item_interactions": 1}
    args.update(kw)
    return clean.clean_interactions(raw, **args)


def test_ingest_reads_udata_csv_parquet_and_gzip():
    udata = b"196\t242\t3\t881250949\n186\t302\t3\t891717742\n"
    csv = b"userId,movieId,timestamp\n1,10,100\n"
    frame = pd.DataFrame({"user": [5], "item": ["a"], "rating": [4.0], "ts": [7]})
    files = {"a.data": udata, "b.csv.gz": gzip.compress(csv),
             "c.parquet": sample_data_parquet(frame), "d.dat": b"1::2::5::978300760\n"}
    df = ingest.ingest_files(files)
    assert list(df[["user_id", "item_id", "rating", "timestamp"]].itertuples(index=False)) == [
        ("196", "242", "3", "881250949"), ("186", "302", "3", "891717742"),
        ("1", "10", None, "100"), ("5", "a", "4.0", "7"), ("1", "2", "5", "978300760")]
    assert df["raw_row"].tolist() == [0, 1, 0, 0, 0]


def sample_data_parquet(frame):
    from tasks import storage

    return storage.parquet_bytes(frame)


def test_ingest_refuses_files_without_ids():
    with pytest.raises(ingest.IngestError, match="item_id"):
        ingest.ingest_files({"x.csv": b"user_id,bar\n1,2\n"})
    with pytest.raises(ingest.IngestError, match="2 columns"):
        ingest.ingest_files({"x.csv": b"1,2\n"})
    with pytest.raises(ingest.IngestError, match="no files"):
        ingest.ingest_files({})


def test_clean_quarantines_each_bad_row_with_its_reason_and_loses_nothing():
    raw = ingest.ingest_files({"x.csv": (
        "user_id,item_id,rating,timestamp\n"
        f"1,a,4,{T0}\n"          # good
        f",a,4,{T0}\n"           # missing user
        f"2,b,x,{T0}\n"          # unparseable rating
        f"2,c,inf,{T0}\n"        # not finite
        f"2,d,9,{T0}\n"          # rating out of range
        "2,e,3,100\n"            # before 1995
        f"2,f,3,{T0 + 400 * 86400}\n"  # after the run date
        f"1,a,5,{T0 + 10}\n"     # duplicate of row 0, later: wins
        f"3,z,,{T0}\n"           # implicit (no rating) is fine
    ).encode()})
    good, quarantine, stats = _clean(raw)
    assert stats["raw_rows"] == len(good) + len(quarantine) == 9
    assert dict(zip(quarantine["raw_row"], quarantine["reason"])) == {
        0: "duplicate_event", 1: "missing_field", 2: "unparseable_value", 3: "not_finite",
        4: "rating_out_of_range", 5: "timestamp_out_of_range", 6: "timestamp_out_of_range"}
    assert stats["invalid_rows"] == 6
    assert good[["user_id", "item_id", "rating"]].values.tolist()[0] == ["1", "a", 5.0]
    assert np.isnan(good.loc[good.user_id == "3", "rating"]).all()


def test_clean_detects_millisecond_timestamps_per_file():
    raw = ingest.ingest_files({"ms.csv": f"user_id,item_id,timestamp\n1,a,{T0 * 1000}\n".encode(),
                               "s.csv": f"user_id,item_id,timestamp\n2,a,{T0}\n".encode()})
    good, _, _ = _clean(raw)
    assert good["timestamp"].tolist() == [T0, T0]


def test_kcore_iterates_until_stable():
    df = pd.DataFrame({"user_id": ["u1", "u1", "u2", "u2", "u3"],
                       "item_id": ["a", "b", "a", "b", "c"]})
    keep = clean.kcore(df, min_user=2, min_item=2)
    assert keep.tolist() == [True, True, True, True, False]


def test_split_holds_out_each_users_latest_events_without_leakage():
    rows = [(u, i, 1000 * u + i) for u in range(3) for i in range(10)] + [(9, 0, 5), (9, 1, 6)]
    df = pd.DataFrame(rows, columns=["user_idx", "item_idx", "timestamp"])
    parts = split.split_interactions(df, valid_fraction=0.1, test_fraction=0.2,
                                     min_user_events_for_holdout=5)
    assert [len(parts[p]) for p in ("train", "valid", "test")] == [23, 3, 6]
    assert set(parts["test"]["item_idx"]) == {8, 9}
    assert set(parts["train"][parts["train"].user_idx == 9]["item_idx"]) == {0, 1}
    for u, t in parts["test"].groupby("user_idx"):
        tr = parts["train"][parts["train"].user_idx == u]
        assert tr["timestamp"].max() < t["timestamp"].min()
        assert not set(tr["item_idx"]) & set(t["item_idx"])


def test_label_interactions_implicit_and_threshold():
    df = pd.DataFrame({"rating": [5.0, 2.0, np.nan]})
    out = augment.label_interactions(df, positive_min_rating=3.0, weight_by_rating=True,
                                     max_rating=5.0)
    assert out["label"].tolist() == [1, 0, 1]
    assert out["weight"].tolist() == pytest.approx([1.0, 0.4, 1.0])


def test_top_k_excludes_seen_breaks_ties_by_index_and_pads():
    users = np.eye(2, dtype=np.float32)
    items = np.array([[1, 0], [1, 0], [0, 1], [0.5, 0]], dtype=np.float32)
    seen = ranking.seen_matrix(pd.DataFrame({"u": [0], "i": [1]}), n_users=2, n_items=4,
                               user_col="u", item_col="i")
    (_, recs, scores), = ranking.iter_top_k(users, items, None, seen, np.arange(2), k=4)
    assert recs[0].tolist() == [0, 3, 2, -1]  # item 1 was seen
    assert recs[1].tolist() == [2, 0, 1, 3]  # 0, 1 and 3 tie at 0: lower index first
    assert np.isneginf(scores[0, 3])


def test_top_k_matches_float64_brute_force():
    rng = np.random.default_rng(0)
    u, v = rng.normal(size=(50, 8)), rng.normal(size=(200, 8))
    seen = ranking.seen_matrix(pd.DataFrame({"u": rng.integers(0, 50, 300),
                                             "i": rng.integers(0, 200, 300)}),
                               n_users=50, n_items=200, user_col="u", item_col="i")
    got = np.concatenate([r for _, r, _ in ranking.iter_top_k(u, v, None, seen, np.arange(50),
                                                              k=10, chunk=7)])
    full = u @ v.T
    full[seen.toarray() > 0] = -np.inf
    want = np.argsort(-full, axis=1, kind="stable")[:, :10]
    assert (got == want).all()


def test_metrics_golden_values():
    perfect = np.array([[1, 2, 9]])
    assert all_metrics(perfect, [{1, 2}], [2])["ndcg_at_2"] == 1.0
    assert all_metrics(perfect, [{1, 2}], [2])["recall_at_2"] == 1.0
    none = all_metrics(np.array([[7, 8, 9]]), [{1}], [3])
    assert all(v == 0.0 for v in none.values())
    hits = hit_matrix(np.array([[5, 1, 6]]), [{1, 2}])
    n_rel = np.array([2])
    # one hit at rank 2: DCG = 1/log2(3); IDCG = 1 + 1/log2(3)
    assert ndcg_at_k(hits, n_rel, 3) == pytest.approx((1 / np.log2(3)) / (1 + 1 / np.log2(3)))
    assert recall_at_k(hits, n_rel, 3) == 0.5
    m = all_metrics(np.array([[5, 1, 6]]), [{1, 2}], [3])
    assert m["mrr_at_3"] == 0.5 and m["precision_at_3"] == pytest.approx(1 / 3)
    assert m["map_at_3"] == pytest.approx(0.5 / 2)


def test_sample_data_is_seeded_and_structured():
    a = sample_data.generate_sample(n_users=200, n_items=100, n_interactions=4000, seed=3)
    b = sample_data.generate_sample(n_users=200, n_items=100, n_interactions=4000, seed=3)
    c = sample_data.generate_sample(n_users=200, n_items=100, n_interactions=4000, seed=4)
    for x, y in zip(a, b):
        pd.testing.assert_frame_equal(x, y)
    assert not a[0].equals(c[0])
    inter = a[0]
    assert not inter.duplicated(["user_id", "item_id"]).any()
    counts = inter.groupby("item_id").size().sort_values(ascending=False)
    assert counts.iloc[:10].sum() > 3 * counts.iloc[-10:].sum()  # skewed popularity
    assert set(inter["rating"]) <= {1, 2, 3, 4, 5}


@pytest.mark.parametrize("k", [1, 7, 40, 64])
def test_top_k_exact_with_ties_seen_items_and_k_above_unseen(k):
    """Same items in the same order as a float64 brute force sorted by (-score, item index)."""
    rng = np.random.default_rng(k)
    n_users, n_items = 300, 60
    u = rng.integers(-2, 3, size=(n_users, 4)).astype(np.float32)  # small ints: many exact ties
    v = rng.integers(-2, 3, size=(n_items, 4)).astype(np.float32)
    bias = rng.integers(0, 2, size=n_items).astype(np.float32)
    pairs = pd.DataFrame({"u": rng.integers(0, n_users, 4000), "i": rng.integers(0, n_items, 4000)})
    seen = ranking.seen_matrix(pairs, n_users=n_users, n_items=n_items, user_col="u", item_col="i")
    got = np.concatenate([r for _, r, _ in ranking.iter_top_k(u, v, bias, seen, np.arange(n_users),
                                                              k=k, chunk=50, threads=2)])
    full = u.astype(np.float64) @ v.T.astype(np.float64) + bias
    dense_seen = seen.toarray() > 0
    for row in range(n_users):
        unseen = np.flatnonzero(~dense_seen[row])
        order = unseen[np.lexsort((unseen, -full[row, unseen]))][:k]
        want = np.full(k, -1)
        want[: len(order)] = order
        assert got[row].tolist() == want.tolist(), row


def test_align_embeddings_maps_by_external_id_and_sinks_unknown_items():
    from tasks.evaluate import align_embeddings

    emb = {"user": np.array([[1.0], [2.0]], np.float32), "item": np.array([[3.0], [4.0]], np.float32),
           "item_bias": np.array([0.5, 0.25], np.float32)}
    out = align_embeddings(emb, model_users=np.array(["a", "b"]), model_items=np.array(["x", "y"]),
                           user_ids=np.array(["b", "new"]), item_ids=np.array(["y", "z", "x"]))
    assert out["user"].ravel().tolist() == [2.0, 0.0]
    assert out["item"].ravel().tolist() == [4.0, 0.0, 3.0]
    assert out["item_bias"][[0, 2]].tolist() == [0.25, 0.5] and out["item_bias"][1] < -1e29
