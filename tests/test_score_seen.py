"""Seen items and the users a score covers (issue 12, items 3 and 7), against the real SeaweedFS.

- tasks/seen.py: the seen table is the clean table plus the quarantine rows that are real
  interactions of valid ids (quarantined for their value or by policy), and nothing else;
- tasks/score.py: such a quarantined item is never recommended to its user; a re-score with a
  model that does not know today's users still gives each a list (fold-in for a factor model,
  the seen row for an item-item model, popular items when the model knows none of their items);
  the popularity fallback model ranks by count in the seen table, seen items excluded.
"""

from __future__ import annotations

import io
import re

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from nightrec.core import schema, settings
from nightrec.ml import models
from nightrec.store import layout, storage
from nightrec.tasks import clean, ingest, score, seen

DS = "2026-11-28"
T0 = 1_780_000_000  # 2026-05-28
CATALOGUE = [f"i{j}" for j in range(1, 9)]  # i9 is not in it


def raw_csv() -> str:
    rows = [
        ("a", "i1", "4", T0), ("a", "i2", "4", T0 + 1),
        ("a", "i3", "9", T0 + 2),  # rating_out_of_range: a did meet i3
        ("a", "i1", "3", T0 - 5),  # duplicate_event (older): the pair is in the clean table
        ("b", "i1", "4", T0), ("b", "i2", "5", T0),
        ("b", "i4", "abc", T0),  # unparseable_value
        ("b", "i5", "nan", T0),  # not_finite
        ("c", "i1", "4", T0), ("c", "i2", "4", T0),
        ("c", "i6", "4", 99_999_999_999),  # timestamp_out_of_range (year 5138)
        ("  c ", " i7", "11", T0),  # rating_out_of_range, ids with blanks: stripped as clean does
        ("lonely", "i1", "4", T0),  # below_k_core (one event, min_user_interactions 2)
        ("bad id!", "i1", "4", T0),  # unparseable_id: excluded
        ("c", "i9", "4", T0),  # item_not_in_catalogue: excluded
        ("e", "", "4", T0),  # missing_field: excluded
    ]
    lines = ["user_id,item_id,rating,timestamp", *(",".join(map(str, r)) for r in rows)]
    lines.insert(5, "x,y")  # wrong_field_count: excluded
    return "\n".join(lines) + "\n"


def write_clean_outputs() -> dict:
    """ingest + clean's cores on raw_csv(), written where clean.run writes them."""
    raw = ingest.ingest_files({"x.csv": raw_csv().encode()})
    interactions, quarantine, stats = clean.clean_interactions(
        raw, ds=DS, min_rating=0.5, max_rating=5.0, min_timestamp="1995-01-01",
        min_user_interactions=2, min_item_interactions=1, catalogue=CATALOGUE)
    storage.delete(storage.list_uris(layout.bucketed_prefix(DS, "clean", "interactions")))
    storage.write_parquet(interactions, layout.bucket_uri(DS, "clean", "interactions", 0))
    storage.write_parquet(quarantine, layout.run_uri(DS, "clean", "quarantine.parquet"))
    return stats


def pairs(uri: str) -> set[tuple[str, str]]:
    df = storage.read_parquet(uri)
    assert list(df.columns) == [schema.USER_ID, schema.ITEM_ID, schema.TIMESTAMP, seen.RECENCY]
    assert not df[[schema.USER_ID, schema.ITEM_ID]].duplicated().any()
    return set(zip(df[schema.USER_ID], df[schema.ITEM_ID], strict=True))


def test_seen_table_adds_value_and_policy_quarantine_rows_of_valid_ids_only(bucket):
    stats = write_clean_outputs()
    assert stats["by_reason"] == {
        "below_k_core": 1, "duplicate_event": 1, "item_not_in_catalogue": 1, "missing_field": 1,
        "not_finite": 1, "rating_out_of_range": 2, "timestamp_out_of_range": 1,
        "unparseable_id": 1, "unparseable_value": 1, "wrong_field_count": 1}
    uri = seen.build(DS)
    assert uri == layout.run_uri(DS, "seen", "interactions.parquet")
    assert pairs(uri) == {
        ("a", "i1"), ("a", "i2"), ("a", "i3"),
        ("b", "i1"), ("b", "i2"), ("b", "i4"), ("b", "i5"),
        ("c", "i1"), ("c", "i2"), ("c", "i6"), ("c", "i7"),
        ("lonely", "i1"),
    }
    df = storage.read_parquet(uri)
    assert df[schema.USER_ID].is_monotonic_increasing  # sorted: shards read their range only
    # each pair's latest clean timestamp (a's i1: T0, not the older duplicate's T0 - 5); a pair
    # only the quarantine knows has none (its value or time was what was wrong)
    ts = df.set_index([schema.USER_ID, schema.ITEM_ID])[schema.TIMESTAMP]
    assert ts[("a", "i1")] == T0 and ts[("a", "i2")] == T0 + 1
    assert pd.isna(ts[("a", "i3")]) and pd.isna(ts[("c", "i6")])
    # recency ranks per user, latest first, untimed last: a's i2 (T0 + 1), i1 (T0), i3 (none)
    rank = df.set_index([schema.USER_ID, schema.ITEM_ID])[seen.RECENCY]
    assert [rank[("a", i)] for i in ("i2", "i1", "i3")] == [1, 2, 3]
    info = storage.read_json(layout.run_uri(DS, "seen", "stats.json"))
    assert info["pairs_only_in_quarantine"] == 6


def write_model(prefix: str, emb: dict, users: list[str], items: list[str], version: str) -> dict:
    buf = io.BytesIO()
    np.savez(buf, **emb)
    storage.write_bytes(prefix + "embeddings.npz", buf.getvalue())
    storage.write_parquet(pd.DataFrame({"user_idx": np.arange(len(users)), "user_id": users}),
                          prefix + "users.parquet")
    storage.write_parquet(pd.DataFrame({"item_idx": np.arange(len(items)), "item_id": items}),
                          prefix + "items.parquet")
    return {"embeddings": prefix + "embeddings.npz", "users": prefix + "users.parquet",
            "items": prefix + "items.parquet", "model_version": version,
            "data_version": "d" * 32}


def recommendations(scored) -> dict[str, list[str]]:
    frames = [pd.read_parquet(io.BytesIO(storage.read_bytes(u))) for u in scored.parts]
    table = pd.concat(frames, ignore_index=True)
    assert table[schema.USER_ID].is_monotonic_increasing
    return {u: g.sort_values(schema.RANK)[schema.ITEM_ID].tolist()
            for u, g in table.groupby(schema.USER_ID)}


def test_an_item_quarantined_for_its_rating_is_not_recommended_to_its_user(bucket):
    write_clean_outputs()
    seen_uri = seen.build(DS)
    items = CATALOGUE
    v = np.zeros((len(items), 2), np.float32)
    v[items.index("i3")] = [5.0, 0.0]  # a's vector points at i3: its best item by far
    v[items.index("i4")] = [0.0, 5.0]  # b's at i4 (quarantined: unparseable rating)
    emb = {"user": np.array([[1, 0], [0, 1], [0, 0]], np.float32), "item": v,
           "item_bias": np.zeros(len(items), np.float32)}
    model = write_model(storage.s3_uri("models/mf-20261128-0000aaaa/"), emb, ["a", "b", "c"],
                        items, "mf-20261128-0000aaaa")
    clean_uri = layout.bucket_uri(DS, "clean", "interactions", 0)  # the one bucket
    before = recommendations(score.run(DS, model, clean_uri, "old", top_k=3))
    assert before["a"][0] == "i3" and before["b"][0] == "i4"  # what the clean table let through
    recs = recommendations(score.run(DS, model, seen_uri, "new", top_k=3))
    assert "i3" not in recs["a"] and "i4" not in recs["b"] and "i5" not in recs["b"]
    assert "i6" not in recs["c"] and "i7" not in recs["c"]
    for user, items_seen in {"a": {"i1", "i2", "i3"}, "c": {"i1", "i2", "i6", "i7"}}.items():
        assert not items_seen & set(recs[user])
    assert recs["lonely"]  # a user only the quarantine knows is scored too (folded in)
    assert "i1" not in recs["lonely"]


# A model fitted before today: it knows user m1 and items p0..p4, q0..q4 (two clusters).
ITEMS = [f"p{j}" for j in range(5)] + [f"q{j}" for j in range(5)]
TODAY = {  # the seen table of today: n1, n2, x1, x2 are new; z9 is an item the model never saw
    "m1": ["q3", "q4"], "n1": ["p0", "p1"], "n2": ["z9"], "x1": ["p4", "q3", "q4"], "x2": ["q4"],
}


def write_seen(pairs_by_user: dict[str, list[str]]) -> str:
    rows = [(u, i) for u, its in sorted(pairs_by_user.items()) for i in sorted(its)]
    table = pa.table({schema.USER_ID: [u for u, _ in rows], schema.ITEM_ID: [i for _, i in rows]})
    uri = layout.run_uri(DS, "seen", "interactions.parquet")
    storage.write_bytes(uri, seen.table_bytes(table))
    return uri


def factor_model() -> dict:
    v = np.array([[2.0, 0.0]] * 5 + [[0.0, 2.0]] * 5, np.float32)
    bias = np.array([0.0] * 5 + [0.3] * 5, np.float32)  # q slightly more popular a priori
    emb = {"user": np.array([[0.0, 1.0]], np.float32), "item": v, "item_bias": bias}
    return write_model(storage.s3_uri("models/mf-20261101-0000bbbb/"), emb, ["m1"], ITEMS,
                       "mf-20261101-0000bbbb")


def item_item_model() -> dict:
    cluster = np.repeat([0, 1], 5)
    b = (cluster[:, None] == cluster[None, :]).astype(np.float32)
    np.fill_diagonal(b, 0.0)
    emb = {"item_item": b, "item_bias": np.zeros(10, np.float32)}
    return write_model(storage.s3_uri("models/ease-20261101-0000cccc/"), emb, ["m1"], ITEMS,
                       "ease-20261101-0000cccc")


@pytest.mark.parametrize("kind", ["factor", "item_item"])
def test_a_rescore_covers_new_users_fold_in_seen_row_and_popular_for_the_unknown(bucket, kind):
    seen_uri = write_seen(TODAY)
    model = factor_model() if kind == "factor" else item_item_model()
    out = score.run(DS, model, seen_uri, "rescore", top_k=3, shards=2)
    recs = recommendations(out)
    assert sorted(recs) == sorted(TODAY)  # the model knew only m1
    assert (out.users, out.shards) == (5, 2)
    assert out.user_kinds == {"known": 1, "folded_in": 3 if kind == "factor" else 0,
                                 "popular": 1}
    for user, items in recs.items():
        assert not set(items) & set(TODAY[user]), user  # no seen item, ever
    assert recs["m1"] == ["q0", "q1", "q2"]  # known: the model's vector (or seen row)
    assert recs["n1"] == ["p2", "p3", "p4"]  # new: from p0, p1 (fold-in / seen row)
    assert recs["x2"] == ["q0", "q1", "q2"]
    # n2's only item is unknown to the model: the most seen items (q4 3 users, q3 2, then the
    # lowest index of those seen once: p0), not the model's own preference
    assert recs["n2"] == ["q4", "q3", "p0"]
    if kind == "factor":  # the fold-in: one Newton step of the softmax likelihood from u = 0
        l2 = settings.load_params()["score"]["fold_in_l2"]
        emb = dict(np.load(io.BytesIO(storage.read_bytes(model["embeddings"]))))
        v, b = emb["item"].astype(float), emb["item_bias"].astype(float)
        p0 = np.exp(b) / np.exp(b).sum()
        vbar = p0 @ v
        cov = ((v - vbar) * p0[:, None]).T @ (v - vbar)
        u = np.linalg.solve(2 * cov + 2 * l2 * np.eye(2), v[0] + v[1] - 2 * vbar)  # p0, p1
        table = pd.concat([pd.read_parquet(io.BytesIO(storage.read_bytes(x)))
                           for x in out.parts])
        got = table[table[schema.USER_ID] == "n1"][schema.SCORE].to_numpy()
        np.testing.assert_allclose(got, [u @ v[2] + b[2]] * 3, rtol=1e-5)


def test_popularity_model_ranks_by_seen_count_without_seen_items(bucket):
    seen_uri = write_seen(TODAY)
    model = score.popularity_model(DS, seen_uri, reason="gate refused; no champion")
    assert re.fullmatch(r"^[a-z][a-z0-9]{0,15}-[0-9]{8}-[0-9a-f]{8}$", model["model_version"])
    assert model["model_version"].startswith("popular-20261128-")
    assert model["source"] == "popularity_fallback"
    assert model["embeddings"].startswith(layout.run_uri(DS, "fallback"))
    assert score.popularity_model(DS, seen_uri)["model_version"] == model["model_version"]
    items = score.ids_by_index(model["items"], schema.ITEM_IDX, schema.ITEM_ID)
    assert items.tolist() == sorted({i for its in TODAY.values() for i in its})
    out = score.run(DS, model, seen_uri, "fallback", top_k=3)
    assert (out.source, out.source_reason) == ("popularity_fallback",
                                                     "gate refused; no champion")
    assert out.model_version == model["model_version"]
    counts = pd.Series([i for its in TODAY.values() for i in its]).value_counts()
    recs = recommendations(out)
    assert sorted(recs) == sorted(TODAY)
    for user, got in recs.items():
        unseen = counts.drop(TODAY[user], errors="ignore").reset_index()
        unseen.columns = ["item", "n"]
        want = unseen.sort_values(["n", "item"], ascending=[False, True])["item"][:3].tolist()
        assert got == want, user
    assert recs["n1"] == ["q4", "q3", "p4"]


def test_collect_passes_source_through_and_defaults_to_model():
    result = {"ds": DS, "run_key": "r", "shard": 0, "shards": 1, "parts": [], "rows": 0,
              "users": 0}
    spec = {"top_k": 5, "seen": "s3://b/s",
            "model": {"model_version": "m", "data_version": "d"}}
    assert score.collect([result], [spec]).source == "model"
    spec["model"].update(source="champion_fallback", source_reason="gate: below popularity")
    out = score.collect([result], [spec])
    assert (out.source, out.source_reason) == ("champion_fallback",
                                                     "gate: below popularity")


def test_seen_pairs_are_distinct_per_bucket_and_sorted_over_all_buckets(tmp_path):
    """write_seen takes the distinct pairs one user-hash bucket at a time (memory: a bucket) and
    sorts them all at once: the result is the distinct union of clean and qualifying quarantine
    pairs, whichever bucket a quarantined user hashes to, in (user_id, item_id) order."""
    from nightrec.core import engine

    n = 3
    rng = np.random.default_rng(5)
    users = [f"u{k}" for k in range(40)]
    clean_pairs = {(u, f"i{j}") for u in users for j in rng.choice(30, 6, replace=False)}
    frame = pd.DataFrame(sorted(clean_pairs), columns=[schema.USER_ID, schema.ITEM_ID])
    frame[schema.TIMESTAMP] = rng.integers(1_700_000_000, 1_800_000_000, len(frame))
    frame["bucket"] = [engine.bucket_of(u, n) for u in frame[schema.USER_ID]]
    assert frame["bucket"].nunique() == n
    for b in range(n):
        folder = tmp_path / "clean" / f"bucket={b:03d}"
        folder.mkdir(parents=True)
        frame[frame["bucket"] == b].drop(columns="bucket").to_parquet(folder / "part-0.parquet")
    quarantine = pd.DataFrame({
        schema.USER_ID: ["u1", "u1", "u2", "new", "new", "u3"],
        schema.ITEM_ID: [sorted(clean_pairs)[6][1], "q1", "q1", "q2", "q2", "q3"],
        schema.REASON: [schema.REASON_DUPLICATE, schema.REASON_KCORE, schema.REASON_DUPLICATE,
                        schema.REASON_TIMESTAMP_RANGE, schema.REASON_DUPLICATE,
                        schema.REASON_MISSING_FIELD],  # the last does not name a pair
    })
    quarantine[schema.USER_ID] = quarantine[schema.USER_ID].where(
        quarantine[schema.USER_ID] != "u1", sorted(clean_pairs)[6][0])
    out = tmp_path / "seen.parquet"
    with engine.connect("seen", {"resources": {"memory_gb": 0.25, "threads": 1}}) as con:
        stats = seen.write_seen(con, str(tmp_path / "clean" / "bucket=*" / "*.parquet"),
                                [pa.Table.from_pandas(quarantine)], out,
                                id_pattern=r"^[\pL\pN_][\pL\pN_.:@/=-]*$", max_id_length=256)
    got = pd.read_parquet(out)
    want = sorted(clean_pairs | set(zip(quarantine[schema.USER_ID][:5],
                                        quarantine[schema.ITEM_ID][:5])))
    assert list(zip(got[schema.USER_ID], got[schema.ITEM_ID])) == want
    # a clean pair keeps its timestamp (the quarantine's duplicate of one adds none)
    clean_ts = frame.set_index([schema.USER_ID, schema.ITEM_ID])[schema.TIMESTAMP]
    got_ts = got.set_index([schema.USER_ID, schema.ITEM_ID])[schema.TIMESTAMP]
    assert (got_ts[clean_ts.index] == clean_ts).all()
    assert got_ts.drop(clean_ts.index).isna().all()
    # the seen step's ranks are models.pair_ranks's (what evaluate and train compute), item ids
    # ordered as augment indexes them (sorted)
    items = sorted(got[schema.ITEM_ID].unique())
    users_all = sorted(got[schema.USER_ID].unique())
    want_ranks = models.pair_ranks(
        pd.Index(users_all).get_indexer(got[schema.USER_ID]),
        pd.Index(items).get_indexer(got[schema.ITEM_ID]),
        got[schema.TIMESTAMP].fillna(-1).astype(np.int64).to_numpy(), n_users=len(users_all),
        n_items=len(items))
    got_ranks = score.seen_ranks(pa.Table.from_pandas(got), np.array(users_all, dtype=object),
                                 np.array(items, dtype=object))
    assert (got_ranks != want_ranks).nnz == 0
    assert stats["clean_rows"] == len(clean_pairs)
    assert stats["pairs"] == len(want) == len(clean_pairs) + 3
    assert stats["users"] == len(users) + 1


def test_a_recency_weighted_item_item_model_scores_the_latest_seen_items_most(bucket):
    """Score reads the seen table's recency ranks for a model with a recency half-life: a user
    who met q items long ago and a p item lately gets q items first; with the same seen pairs
    and no ranks (a table from before they were kept), 0/1 rows, as before."""
    b = np.zeros((10, 10), np.float32)
    b[0, 5:] = 1.0  # p0 points at the q items
    b[6, 1:5] = 0.9  # q1 at the p items, a little less
    b[7, 1:5] = 0.9  # and q2
    emb = {"item_item": b, "item_bias": np.zeros(10, np.float32),
           "recency_half_life": np.array([1.0], np.float32)}
    model = write_model(storage.s3_uri("models/ease-20261101-0000dddd/"), emb, ["u"], ITEMS,
                        "ease-20261101-0000dddd")
    uri = layout.run_uri(DS, "seen", "interactions.parquet")
    table = pa.table({schema.USER_ID: ["u", "u", "u"], schema.ITEM_ID: ["p0", "q1", "q2"],
                      schema.TIMESTAMP: pa.array([T0 + 100, T0, T0 + 1], pa.int64()),
                      seen.RECENCY: pa.array([1, 3, 2], pa.int32())})
    storage.write_bytes(uri, seen.table_bytes(table))
    recs = recommendations(score.run(DS, model, uri, "recency", top_k=3))
    # p0 is the latest (weight 1), q2 0.5, q1 0.25: q items 1 each, p1..p4 0.675 each
    assert recs["u"] == ["q0", "q3", "q4"]
    storage.write_bytes(uri, seen.table_bytes(table.drop_columns([schema.TIMESTAMP,
                                                                  seen.RECENCY])))
    recs = recommendations(score.run(DS, model, uri, "flat", top_k=3))
    assert recs["u"] == ["p1", "p2", "p3"]  # 0/1 rows: p items 1.8, q items 1
