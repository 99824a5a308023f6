"""Pure-function tests of the step cores, on tiny hand-built inputs with known answers."""

from __future__ import annotations

import gzip

import numpy as np
import pandas as pd
import pytest

from nightrec.dev import sample_data
from nightrec.ml import ranking
from nightrec.ml.metrics import all_metrics, hit_matrix, ndcg_at_k, recall_at_k
from nightrec.tasks import augment, clean, ingest, split

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
    frame = pd.DataFrame({"user": [5], "item": ["a"], "rating": [4.5], "ts": [7]})
    files = {"a.data": udata, "b.csv.gz": gzip.compress(csv),
             "c.parquet": sample_data_parquet(frame), "d.dat": b"1::2::5::978300760\n",
             "_SUCCESS": b""}
    df = ingest.ingest_files(files)
    rows = df[["user_id", "item_id", "rating", "timestamp"]].astype(object)
    assert rows.where(rows.notna(), None).values.tolist() == [
        ["196", "242", "3", "881250949"], ["186", "302", "3", "891717742"],
        ["1", "10", None, "100"], ["5", "a", "4.5", "7"], ["1", "2", "5", "978300760"]]
    assert df["raw_row"].tolist() == [1, 2, 2, 1, 1]  # text: line number (header = 1)
    assert df["source_file"].tolist() == ["a.data", "a.data", "b.csv.gz", "c.parquet", "d.dat"]


def sample_data_parquet(frame):
    from nightrec.store import storage

    return storage.parquet_bytes(frame)


def test_ingest_refuses_files_without_ids():
    with pytest.raises(ingest.IngestError, match="no column for item_id, timestamp"):
        ingest.ingest_files({"x.csv": b"user_id,bar\n1,2\n"})
    with pytest.raises(ingest.IngestError, match="x.csv line 1: 2 field"):
        ingest.ingest_files({"x.csv": b"1,2\n"})
    with pytest.raises(ingest.IngestError, match="no files"):
        ingest.ingest_files({})


def test_ingest_numbers_lines_around_ragged_and_blank_ones_in_small_blocks():
    lines = ["user_id,item_id,timestamp"] + [
        f"{i},{i}" if i % 7 == 0 else ("" if i % 11 == 0 else f"{i},x,{i}") for i in range(1, 400)]
    df = ingest.ingest_files({"f.csv": ("\r\n".join(lines) + "\r\n").encode()},
                             block_bytes=256)
    good = df[df["parse_error"].isna()]
    assert (good["user_id"].astype(int) + 1 == good["raw_row"]).all()  # line i + 1 holds user i
    ragged = df[df["parse_error"] == "wrong_field_count"]
    assert ragged["raw_row"].tolist() == [i + 1 for i in range(7, 400, 7)]
    assert ragged["raw_text"].iloc[0] == "7,7"
    assert df["raw_row"].is_monotonic_increasing
    n_blank = len([i for i in range(1, 400) if i % 11 == 0 and i % 7])
    assert len(df) == 399 - n_blank


def _clean(raw, **kw):
    args = {"ds": DS, "min_rating": 0.5, "max_rating": 5.0, "min_timestamp": "1995-01-01",
            "min_user_interactions": 1, "min_item_interactions": 1}
    args.update(kw)
    return clean.clean_interactions(raw, **args)


def test_clean_quarantines_each_bad_row_with_its_reason_and_loses_nothing():
    raw = ingest.ingest_files({"x.csv": (
        "user_id,item_id,rating,timestamp\n"
        f"1,a,4,{T0}\n"          # line 2: good
        f",a,4,{T0}\n"           # missing user
        f"2,b,x,{T0}\n"          # unparseable rating
        f"2,c,inf,{T0}\n"        # not finite
        f"2,d,9,{T0}\n"          # rating out of range
        "2,e,3,100\n"            # before 1995
        f"2,f,3,{T0 + 400 * 86400}\n"  # after the run date
        f"1,a,5,{T0 + 10}\n"     # duplicate of line 2, later: wins
        f"3,z,,{T0}\n"           # empty rating in a file with ratings
        f"-4,z,3,{T0}\n"         # id not matching clean.id_pattern
        f"4,z,3\n"               # a field short
        f"user_id,item_id,rating,timestamp\n"  # the header again
    ).encode()})
    good, quarantine, stats = _clean(raw)
    assert stats["raw_rows"] == len(good) + len(quarantine) == 12
    assert dict(zip(quarantine["raw_row"], quarantine["reason"])) == {
        2: "duplicate_event", 3: "missing_field", 4: "unparseable_value", 5: "not_finite",
        6: "rating_out_of_range", 7: "timestamp_out_of_range", 8: "timestamp_out_of_range",
        10: "missing_field", 11: "unparseable_id", 12: "wrong_field_count",
        13: "repeated_header"}
    assert stats["invalid_rows"] == 10
    assert quarantine.loc[quarantine.raw_row == 12, "raw_text"].tolist() == ["4,z,3"]
    assert good[["user_id", "item_id", "rating"]].values.tolist() == [["1", "a", 5.0]]


def test_clean_implicit_feedback_iso_timestamps_and_catalogue():
    raw = ingest.ingest_files({"x.csv": (
        b"user,item,time\n"
        b"u1,i1,2026-05-28T10:00:00Z\n"
        b"u1,i2,2026-05-28 12:00:00+02:00\n"
        b"u1,i3,yesterday\n"
        b"u2,i9,2026-05-28\n"
    )})
    good, quarantine, _ = _clean(raw, catalogue=["i1", "i2", "i3"])
    assert good["timestamp"].tolist() == [1_779_962_400, 1_779_962_400]
    assert good["rating"].isna().all()  # no rating column: implicit feedback
    assert dict(zip(quarantine["raw_row"], quarantine["reason"])) == {
        4: "unparseable_value", 5: "item_not_in_catalogue"}


def test_clean_detects_timestamp_units_per_file():
    raw = ingest.ingest_files({"ms.csv": f"user_id,item_id,timestamp\n1,a,{T0 * 1000}\n".encode(),
                               "s.csv": f"user_id,item_id,timestamp\n2,a,{T0}\n".encode(),
                               "us.csv": f"user_id,item_id,timestamp\n3,a,{T0 * 10**6}\n".encode()})
    good, _, stats = _clean(raw)
    assert good["timestamp"].tolist() == [T0, T0, T0]
    assert stats["timestamp_units"] == {"ms.csv": "ms", "s.csv": "s", "us.csv": "us"}
    good, quarantine, _ = _clean(raw, timestamp_unit="s")  # forced: ms and us are the far future
    assert good["user_id"].tolist() == ["2"] and len(quarantine) == 2


def test_clean_dedupe_latest_wins_then_later_in_snapshot_and_kcore_is_counted():
    raw = ingest.ingest_files({
        "a.csv": f"user_id,item_id,rating,timestamp\n1,x,1,{T0}\n1,x,2,{T0 + 5}\n".encode(),
        "b.csv": f"user_id,item_id,rating,timestamp\n1,x,3,{T0 + 5}\n1,y,4,{T0}\n".encode(),
        "c.csv": f"user_id,item_id,rating,timestamp\n2,x,5,{T0}\n".encode()})
    good, quarantine, stats = _clean(raw, min_user_interactions=2)
    assert good[["user_id", "item_id", "rating"]].values.tolist() == [["1", "y", 4.0],
                                                                      ["1", "x", 3.0]]
    got = sorted(zip(quarantine["source_file"], quarantine["raw_row"], quarantine["reason"]))
    assert got == [("a.csv", 2, "duplicate_event"), ("a.csv", 3, "duplicate_event"),
                   ("c.csv", 2, "below_k_core")]
    assert stats["k_core"]["removed_rows"] == 1
    assert stats["by_file"]["a.csv"] == {"rows": 2, "quarantined": {"duplicate_event": 2}}


def test_kcore_iterates_until_stable():
    df = pd.DataFrame({"user_id": ["u1", "u1", "u2", "u2", "u3"],
                       "item_id": ["a", "b", "a", "b", "c"]})
    keep = clean.kcore(df, min_user=2, min_item=2)
    assert keep.tolist() == [True, True, True, True, False]


def test_split_holds_out_each_users_latest_events_without_leakage():
    rows = [(u, i, 1000 * u + i) for u in range(3) for i in range(10)] + [(9, 0, 5), (9, 1, 6)]
    df = pd.DataFrame(rows, columns=["user_idx", "item_idx", "timestamp"])
    parts = split.split_interactions(df, method="leave_last_fraction", valid_fraction=0.1,
                                     test_fraction=0.2, min_user_events_for_holdout=5)
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


# --- score shards and the published table (tasks/score.py, tasks/publish.py) ---


def test_shard_ranges_cover_every_user_once_in_order():
    from nightrec.tasks.score import shard_ranges

    assert shard_ranges(10, shards=4) == [(0, 2), (2, 5), (5, 7), (7, 10)]
    assert shard_ranges(3, shards=8) == [(0, 1), (1, 2), (2, 3)]  # never an empty shard
    assert shard_ranges(0, shards=4) == [(0, 0)]
    for bad in (0, -1, 2.5):
        with pytest.raises(ValueError):
            shard_ranges(10, shards=bad)


def test_row_groups_are_cut_at_user_boundaries():
    from nightrec.tasks.score import row_group_bounds

    users = np.array(["a"] * 3 + ["b"] * 3 + ["c"] * 3 + ["d"] * 7 + ["e"])
    assert row_group_bounds(users, row_group_size=6) == [(0, 6), (6, 16), (16, 17)]
    assert row_group_bounds(users, row_group_size=1) == [(0, 3), (3, 6), (6, 9), (9, 16),
                                                          (16, 17)]
    assert row_group_bounds(users, row_group_size=100) == [(0, 17)]
    assert row_group_bounds(np.array([], dtype=str), row_group_size=5) == []


def test_collect_refuses_a_missing_or_foreign_shard():
    from nightrec.tasks.score import collect

    def result(shard, run_key="r"):
        return {"ds": "2026-11-28", "run_key": run_key, "shard": shard, "shards": 3,
                "parts": [f"s3://b/p{shard}"], "rows": 10, "users": 2}

    spec = {"model": {"model_version": "m", "data_version": "d"}, "top_k": 5, "seen": "s3://b/s"}
    out = collect([result(2), result(0), result(1)], [spec])
    assert out.parts == ["s3://b/p0", "s3://b/p1", "s3://b/p2"]
    assert (out.rows, out.users, out.shards) == (30, 6, 3)
    with pytest.raises(ValueError, match="expected 0..2, got \\[0, 2\\]"):
        collect([result(0), result(2)], [spec])
    with pytest.raises(ValueError):
        collect([result(0), result(1), result(2, run_key="other")], [spec])


def test_retention_keeps_n_days_up_to_the_latest_and_never_the_latest():
    from nightrec.tasks.publish import expired_partitions

    days = ["2026-11-01", "2026-11-20", "2026-11-21", "2026-11-22", "2026-11-30"]
    assert expired_partitions(days, latest="2026-11-22", keep_days=2) == ["2026-11-01",
                                                                          "2026-11-20"]
    # keep_days=1 keeps only the latest; a newer partition the pointer never reached stays too
    assert expired_partitions(days, latest="2026-11-22", keep_days=1,
                              protect=("2026-11-01",)) == ["2026-11-20", "2026-11-21"]
    with pytest.raises(ValueError):
        expired_partitions(days, latest="2026-11-22", keep_days=0)


def test_check_parts_finds_a_user_split_over_two_parts():
    from nightrec.tasks.publish import check_parts

    a = {"rows": 4, "min_user_id": "a", "max_user_id": "c"}
    assert check_parts([a, {"rows": 4, "min_user_id": "d", "max_user_id": "f"}]) == []
    assert check_parts([a, {"rows": 4, "min_user_id": "c", "max_user_id": "f"}]) == [
        "user 'c' is split over parts 0 and 1"]


def test_the_timestamp_unit_from_streaming_counts_is_the_median_s_unit():
    """Clean picks a file's timestamp unit from its median without holding the values: per
    threshold, how many exceed it and the nearest values on each side. Same unit as
    ``np.median`` on every case, the two middle values straddling a threshold included."""
    import duckdb

    rng = np.random.default_rng(7)
    cases = [
        [1.7e9] * 3,                                   # seconds
        [1.7e12, 1.7e12 + 1],                          # ms
        [1.7e15, 1.7e9, 1.7e15],                       # us, odd
        [1.7e18, 1.7e18, 1.7e9, 1.7e9],                # ns/s half and half: mean is ns
        [1e11 - 10, 1e11 + 5],                         # mean below 1e11: s
        [1e11 - 5, 1e11 + 10],                         # mean above: ms
        [1e14, 1e14],                                  # equal to the bound is not above it
        list(rng.choice([1.7e9, 1.7e12, 1.7e15], 1001)),
        list(rng.choice([1.7e9, 1.7e12], 1000)),
        [],
    ]
    files = [f"f{k}" for k in range(len(cases))]
    con = duckdb.connect()
    rows = [(float(t), False, k) for k, case in enumerate(cases) for t in case]
    rows += [(float("nan"), False, 0), (5e20, True, 1)]   # NaN and ISO text do not count
    con.execute("CREATE TABLE v (ts DOUBLE, ts_iso BOOLEAN, file INTEGER)")
    con.executemany("INSERT INTO v VALUES (?, ?, ?)", rows)
    got = clean.timestamp_units_sql(con, "v", files)
    want = {f: clean.timestamp_unit(np.asarray(c, dtype=float)) for f, c in zip(files, cases)}
    assert got == want
    assert [got[f] for f in files[:7]] == ["s", "ms", "us", "ns", "s", "ms", "ms"]
    assert clean.timestamp_units_sql(con, "v", files, "ms") == {f: "ms" for f in files}
