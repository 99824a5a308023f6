"""Scoring at scale (issue "Train, evaluate, score and publish at 100M"), against the real SeaweedFS.

- a score shard reads only its own users: the seen table's row groups of its user_id range, the
  model's ``users.parquet`` row groups of that range, and of ``embeddings.npz`` the item members
  and only its known users' rows of ``user`` (tasks/score.py);
- :func:`score.read_embeddings` gives exactly the rows a whole ``np.load`` gives;
- :func:`seen.item_counts` is the seen table's per-item row count, from the counts object the
  seen step writes or, without it, from the table itself;
- an item-item model scored from sparse user rows (nightrec/ml/ranking.py) gives the dense
  path's top-K, bit for bit, ties and seen items included.
"""

from __future__ import annotations

import hashlib
import io
import time

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from scipy import sparse

from nightrec.core import schema
from nightrec.ml import models, ranking
from nightrec.store import layout, storage
from nightrec.tasks import score, seen

DS = "2026-12-01"
N_USERS, N_ITEMS, DIM, PER_USER, K = 20_000, 50, 32, 5, 5
SHARD = N_USERS // 4
SEEN_GROUP, MODEL_GROUP = 1000, 2000  # rows per row group of the seen table, of users.parquet


def write_seen_table(pairs: pd.DataFrame) -> str:
    """A seen table as tasks/seen.py lays it out: sorted by (user_id, item_id)."""
    table = pa.Table.from_pandas(pairs.sort_values([schema.USER_ID, schema.ITEM_ID]),
                                 preserve_index=False)
    uri = layout.run_uri(DS, "seen", "interactions.parquet")
    storage.write_bytes(uri, seen.table_bytes(table))
    return uri


def write_factor_model(user_ids: np.ndarray, item_ids: np.ndarray, rng) -> tuple[dict, dict]:
    """A factor model whose users.parquet is in id order (as clean's indices make it), in row
    groups of MODEL_GROUP users."""
    emb = {"user": rng.normal(size=(len(user_ids), DIM)).astype(np.float32),
           "item": rng.normal(size=(len(item_ids), DIM)).astype(np.float32),
           "item_bias": rng.normal(size=len(item_ids)).astype(np.float32)}
    prefix = storage.s3_uri("models/mf-20261201-0000dddd/")
    buf = io.BytesIO()
    np.savez(buf, **emb)
    storage.write_bytes(prefix + "embeddings.npz", buf.getvalue())
    storage.write_parquet(pd.DataFrame({schema.USER_IDX: np.arange(len(user_ids)),
                                        schema.USER_ID: user_ids}),
                          prefix + "users.parquet", row_group_size=MODEL_GROUP)
    storage.write_parquet(pd.DataFrame({schema.ITEM_IDX: np.arange(len(item_ids)),
                                        schema.ITEM_ID: item_ids}), prefix + "items.parquet")
    model = {"embeddings": prefix + "embeddings.npz", "users": prefix + "users.parquet",
             "items": prefix + "items.parquet", "model_version": "mf-20261201-0000dddd",
             "data_version": "d" * 32}
    return model, emb


def test_each_shard_reads_only_its_users_rows_of_the_seen_table_and_the_model(bucket,
                                                                              monkeypatch):
    monkeypatch.setattr(seen, "ROW_GROUP_ROWS", SEEN_GROUP)  # 100 row groups of seen pairs
    rng = np.random.default_rng(11)
    # long ids that do not compress away, so the table is large beside a footer read (64 KB)
    user_ids = np.array(sorted(f"user-{hashlib.sha1(str(i).encode()).hexdigest()}"
                               for i in range(N_USERS)), dtype=object)
    item_ids = np.array([f"i{j:03d}" for j in range(N_ITEMS)], dtype=object)
    pairs = pd.DataFrame({
        schema.USER_ID: np.repeat(user_ids, PER_USER),
        schema.ITEM_ID: np.concatenate([item_ids[rng.choice(N_ITEMS, PER_USER, replace=False)]
                                        for _ in range(N_USERS)]),
    })
    seen_uri = write_seen_table(pairs)
    model, emb = write_factor_model(user_ids, item_ids, rng)
    specs = score.plan(DS, model, seen_uri, "scale", top_k=K, shards=4)
    assert [s["users"][1] - s["users"][0] for s in specs] == [SHARD] * 4

    seen_bytes = storage.head(seen_uri)["bytes"]
    user_bytes = N_USERS * DIM * 4
    item_bytes = N_ITEMS * (DIM + 1) * 4
    results = []
    for spec in specs:
        out = score.run_shard(spec)
        results.append(out)
        reads, own_rows = out["reads"], SHARD * PER_USER
        # seen: its rows, plus at most the two row groups it shares with its neighbours
        assert own_rows <= reads["seen"]["rows"] <= own_rows + 2 * SEEN_GROUP
        assert reads["seen"]["row_groups"] <= own_rows // SEEN_GROUP + 2 < 100
        assert reads["seen"]["bytes"] < seen_bytes / 2
        # model users: the row groups that can hold its users, not all 10
        assert reads["model_users"]["row_groups"] <= SHARD // MODEL_GROUP + 2
        # embeddings: the item members, its users' rows of `user` (one range: users are in id
        # order), the zip directory and headers (the tail), never the other shards' rows
        fixed = score.TAIL_BYTES + 3 * score.HEADER_BYTES
        assert reads["embeddings"]["bytes"] <= item_bytes + SHARD * DIM * 4 + fixed
        assert reads["embeddings"]["bytes"] < user_bytes / 2
        assert out["user_kinds"] == {"known": SHARD, "folded_in": 0, "popular": 0}

    # and the lists are the model's: top-K of u.v + b over each user's unseen items
    table = pd.concat([pd.read_parquet(io.BytesIO(storage.read_bytes(u)))
                       for r in results for u in r["parts"]], ignore_index=True)
    assert table[schema.USER_ID].is_monotonic_increasing
    scores = emb["user"] @ emb["item"].T + emb["item_bias"]
    item_pos = {i: j for j, i in enumerate(item_ids)}
    for u in rng.choice(N_USERS, 200, replace=False):
        s = scores[u].copy()
        s[[item_pos[i] for i in pairs[schema.ITEM_ID].iloc[u * PER_USER:(u + 1) * PER_USER]]] = (
            -np.inf)
        want = item_ids[np.argsort(-s, kind="stable")[:K]].tolist()
        got = table[table[schema.USER_ID] == user_ids[u]].sort_values(schema.RANK)
        assert got[schema.ITEM_ID].tolist() == want

    # plan reads the user_id column only: not the item_id column chunks
    reads: dict = {}
    ids = score.distinct_ids(seen_uri, schema.USER_ID, reads=reads)
    assert ids.to_pylist() == user_ids.tolist()
    assert reads["bytes"] < seen_bytes


@pytest.mark.parametrize("where", ["s3", "local"])
def test_read_embeddings_rows_equal_those_of_the_whole_load(where, request, tmp_path,
                                                            monkeypatch):
    # a small tail, ranges and requests, so a few rows of 40 bytes take several of each
    monkeypatch.setattr(score, "TAIL_BYTES", 512)
    monkeypatch.setattr(score, "GAP_BYTES", 3 * 40)
    monkeypatch.setattr(score, "READ_BYTES", 7 * 40)
    rng = np.random.default_rng(3)
    emb = {"user": rng.normal(size=(500, 10)).astype(np.float32),
           "item": rng.normal(size=(30, 10)).astype(np.float32),
           "item_bias": rng.normal(size=30).astype(np.float32),
           "fortran": np.asfortranarray(rng.normal(size=(6, 4)))}
    buf = io.BytesIO()
    np.savez(buf, **emb)
    if where == "s3":
        request.getfixturevalue("bucket")
        uri = storage.s3_uri("models/x/embeddings.npz")
    else:
        uri = str(tmp_path / "embeddings.npz")
    storage.write_bytes(uri, buf.getvalue())
    full = dict(np.load(io.BytesIO(buf.getvalue())))
    cases = [rng.choice(500, 60, replace=False),  # scattered, out of order
             np.array([7, 7, 3, 499, 0]),  # repeats, both ends
             np.arange(120, 180),  # contiguous
             np.array([], np.int64)]
    for rows in cases:
        got = score.read_embeddings(uri, user_rows=rows)
        assert sorted(got) == sorted(full)
        assert np.array_equal(got["user"], full["user"][rows])
        assert got["user"].dtype == np.float32 and got["user"].shape == (len(rows), 10)
        for name in ("item", "item_bias", "fortran"):
            assert np.array_equal(got[name], full[name])
    whole = score.read_embeddings(uri)
    assert all(np.array_equal(whole[n], full[n]) for n in full)

    def user_requests(rows) -> tuple[int, int]:
        """Requests and bytes that reading ``rows`` of ``user`` adds to reading none."""
        none, some = {}, {}
        score.read_embeddings(uri, user_rows=np.array([], np.int64), reads=none)
        score.read_embeddings(uri, user_rows=np.asarray(rows), reads=some)
        return some["requests"] - none["requests"], some["bytes"] - none["bytes"]

    assert user_requests(np.arange(120, 180)) == (-(-60 // 7), 60 * 40)  # one range, 7 a GET
    assert user_requests([0, 250, 499]) == (3, 3 * 40)  # far apart: a range each
    assert user_requests([10, 13, 11]) == (1, 4 * 40)  # a gap of one row is read through
    with pytest.raises(IndexError):
        score.read_embeddings(uri, user_rows=np.array([500]))
    # np.savez_compressed: no offsets to read at, so read whole, then indexed
    buf = io.BytesIO()
    np.savez_compressed(buf, **emb)
    storage.write_bytes(uri, buf.getvalue())
    got = score.read_embeddings(uri, user_rows=cases[0])
    assert np.array_equal(got["user"], full["user"][cases[0]])


def write_clean(pairs: pd.DataFrame) -> None:
    """``pairs`` as a clean table (which always has timestamps: the seen table keeps each
    pair's latest)."""
    pairs = pairs.assign(**{schema.TIMESTAMP: np.arange(len(pairs), dtype=np.int64)})
    storage.write_parquet(pairs, layout.bucket_uri(DS, "clean", "interactions", 0))
    storage.write_parquet(pd.DataFrame({"user_id": [], "item_id": [], "reason": []}, dtype=str),
                          layout.run_uri(DS, "clean", "quarantine.parquet"))


def test_item_counts_are_the_seen_tables_value_counts_with_or_without_the_counts_object(
        bucket, monkeypatch):
    monkeypatch.setattr(seen, "ROW_GROUP_ROWS", 500)
    rng = np.random.default_rng(5)
    pairs = pd.DataFrame({
        schema.USER_ID: [f"u{i}" for i in rng.integers(0, 900, 12000)],
        schema.ITEM_ID: [f"i{j}" for j in rng.zipf(1.5, 12000) % 400],
    }).drop_duplicates(ignore_index=True)
    write_clean(pairs)
    seen_uri = seen.build(DS)
    counts_uri = seen.item_counts_uri(seen_uri)
    assert counts_uri == layout.run_uri(DS, "seen", "item_counts.parquet")
    table = storage.read_parquet(seen_uri)
    want = (table[schema.ITEM_ID].value_counts().rename_axis(schema.ITEM_ID)
            .reset_index(name=seen.COUNT).sort_values(schema.ITEM_ID, ignore_index=True))

    def check(got: pd.DataFrame) -> None:
        assert list(got.columns) == [schema.ITEM_ID, seen.COUNT]
        assert got[seen.COUNT].dtype == np.int64
        assert got[schema.ITEM_ID].tolist() == want[schema.ITEM_ID].tolist()  # item_id order
        assert got[seen.COUNT].tolist() == want[seen.COUNT].tolist()

    written = storage.read_parquet(counts_uri)
    assert written[seen.COUNT].sum() == len(table)
    check(seen.item_counts(seen_uri))
    # a seen table written before the counts were: counted from the table, row group by group
    storage.delete([counts_uri])
    assert pq_row_groups(seen_uri) > 1
    check(seen.item_counts(seen_uri))
    # counts that do not match the table (another version's) are not used
    storage.write_parquet(written.head(3), counts_uri)
    check(seen.item_counts(seen_uri))
    # score's cold-user popularity reads them, aligned to the model's items
    bias = score.popular_bias(seen_uri, np.array(["i1", "nope", "i2"]))
    n = dict(zip(want[schema.ITEM_ID], want[seen.COUNT], strict=True))
    assert bias.tolist() == [n["i1"], 0.0, n["i2"]]


def pq_row_groups(uri: str) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(io.BytesIO(storage.read_bytes(uri))).metadata.num_row_groups


@pytest.mark.parametrize("integer_weights", [False, True])
def test_sparse_item_item_scoring_equals_the_dense_path(integer_weights):
    rng = np.random.default_rng(17)
    n_users, n_items, k = 700, 1500, 40
    if integer_weights:  # small integers: exact sums, many ties, at the k-th place too
        b = rng.integers(-2, 3, size=(n_items, n_items)).astype(np.float32)
    else:
        b = rng.normal(size=(n_items, n_items)).astype(np.float32)
    np.fill_diagonal(b, 0.0)
    emb = {"item_item": b, "item_bias": rng.integers(0, 2, n_items).astype(np.float32)}
    pairs = pd.DataFrame({"u": rng.integers(0, n_users, n_users * 12),
                          "i": rng.integers(0, n_items, n_users * 12)})
    seen_m = ranking.seen_matrix(pairs, n_users=n_users, n_items=n_items, user_col="u",
                                 item_col="i")
    users = rng.permutation(n_users)[:600]
    user_vecs, item_vecs, bias = models.scoring_inputs(emb, seen_m)
    assert sparse.issparse(user_vecs)
    assert np.shares_memory(item_vecs, b)  # B is read in place, not packed or copied

    def top_k(vecs, **kw):
        t = time.perf_counter()
        chunks = list(ranking.iter_top_k(vecs, item_vecs, bias, seen_m, users, k=k, **kw))
        return (np.concatenate([c[1] for c in chunks]), np.concatenate([c[2] for c in chunks]),
                time.perf_counter() - t)

    items, scores, t_sparse = top_k(user_vecs, chunk=128, threads=2)
    want_items, want_scores, t_dense = top_k(models.InteractionRows(seen_m), chunk=128,
                                             threads=2)
    print(f"item-item top-{k}, {len(users)} users x {n_items} items: sparse {t_sparse:.3f} s, "
          f"dense {t_dense:.3f} s")
    assert np.array_equal(items, want_items)
    assert np.array_equal(scores, want_scores)
    assert not (sparse.csr_matrix(seen_m)[users].toarray()[
        np.arange(len(users))[:, None], items] > 0).any()  # no seen item, ever
    # the result does not depend on chunk or threads
    again, again_scores, _ = top_k(user_vecs, chunk=37, threads=1)
    assert np.array_equal(again, items) and np.array_equal(again_scores, scores)


def test_a_head_item_item_model_scores_over_its_head_and_cold_users_over_everything():
    """EASE fitted on the catalogue's head (train.ease.max_items): a shard ranks warm users over
    the head, maps positions back to item indices, and ranks cold users by popularity over every
    item; the same lists as evaluate's ranking of the same users."""
    from nightrec.tasks import evaluate

    rng = np.random.default_rng(11)
    x = (rng.random((40, 25)) < 0.3).astype(np.float64)
    x[-3:] = 0.0  # three users with nothing seen: cold
    emb = models.fit_ease(sparse.csr_matrix(x), l2=3.0, dropout=0.0, max_items=8)
    head = models.item_index(emb)
    seen_m = sparse.csr_matrix(x, dtype=np.float32)
    user_vecs, item_vecs, bias, cold, _ = score.user_inputs(
        emb, seen_m, np.arange(40), fold_in_l2=1.0)
    assert cold.sum() == 3
    popular = np.arange(25, dtype=np.float32)  # item 24 the most popular
    rows = list(score.score_users(user_vecs, item_vecs, bias, seen_m, cold, popular, top_k=6,
                                  user_chunk=16, item_index=head))
    items = np.concatenate([it for _, it, _ in rows])
    warm = np.flatnonzero(~cold)
    assert np.array_equal(items[warm], evaluate.recommend(emb, seen_m, warm, k=6))
    assert np.all(np.isin(items[warm][items[warm] >= 0], head))
    assert np.array_equal(items[cold][0], np.arange(24, 18, -1))  # popularity, every item
