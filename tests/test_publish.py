"""Publishing and reading against the real SeaweedFS (never moto: it needs real conditional puts).

The manifest contract, two concurrent publishers of one ds, a stale publisher fenced off, claims
and retries, retention, and the readers: a point lookup reads only the row group it needs, and a
reader polling the latest pointer during publishes never sees a partial or mixed table. Each
test has a bucket of its own (the latest pointer and retention are per bucket).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import io
import json
import threading

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nightrec.core import schema, settings
from nightrec.core.records import Published
from nightrec.store import layout, storage
from nightrec.table import contract
from nightrec.table.reader import RecommendationReader, TableChanged
from nightrec.tasks import output_checks, publish, score


@pytest.fixture
def serial_validation(monkeypatch):
    """Great Expectations is not thread-safe; real publishers are separate processes. Threads in
    these tests validate one at a time and race for everything else."""
    lock, real = threading.Lock(), publish.validate_table

    def validate(*args, **kwargs):
        with lock:
            return real(*args, **kwargs)

    monkeypatch.setattr(publish, "validate_table", validate)


def params(**publish_keys) -> dict:
    base = settings.load_params()
    return {**base, "publish": {**base["publish"], **publish_keys}}


def stage(ds: str, *, run_key: str, model_version: str, n_users: int = 60, k: int = 5,
          shards: int = 3, row_group_size: int = 10, seed: int = 0,
          user_ids: list[str] | None = None, shuffle_lists: bool = False,
          score_scale: float = 1.0) -> dict:
    """A synthetic scored table staged the way score's shards write it; collect()'s record.

    ``user_ids``: the users (default ``u00000``.. ``n_users`` of them). A user's list (its
    items) depends on the user alone, as a model's would from one night to the next (so
    publish's output checks against the previous table pass); the scores, hence the parts'
    bytes, on ``seed``. ``shuffle_lists``: each user gets another user's list (a mis-joined id
    map); ``score_scale`` multiplies every score."""
    rng = np.random.default_rng(seed)
    if user_ids is not None:
        n_users = len(user_ids)
    user_ids = np.array(sorted(user_ids) if user_ids is not None
                        else [f"u{i:05d}" for i in range(n_users)])
    seen_uri = layout.bucket_uri(ds, "clean", "interactions", 0)
    seen = pd.DataFrame({schema.USER_ID: np.repeat(user_ids, 2),
                         schema.ITEM_ID: [f"i{j}" for j in rng.integers(0, 9, 2 * n_users)]})
    storage.write_parquet(seen, seen_uri)
    results = []
    for shard, (lo, hi) in enumerate(score.shard_ranges(n_users, shards=shards)):
        users = user_ids[lo:hi]
        items = np.array([np.random.default_rng(int(h)).permutation(100)[:k] for h in
                          output_checks.user_hash(users) % (2**32)], dtype=np.int64
                         ).reshape(len(users), k) + 10
        if shuffle_lists and len(users) > 1:
            items = np.roll(items, 1, axis=0)
        frame = pd.DataFrame({
            schema.USER_ID: np.repeat(users, k),
            schema.RANK: np.tile(np.arange(1, k + 1, dtype=np.int32), len(users)),
            schema.ITEM_ID: [f"i{j}" for j in items.reshape(-1)],
            schema.SCORE: (score_scale * -np.sort(-rng.random((len(users), k)), axis=1))
            .reshape(-1).astype(np.float32),
            schema.MODEL_VERSION: model_version, schema.DS: ds,
        })
        uri = layout.shard_prefix(ds, run_key, shard) + "part-00000.parquet"
        storage.write_bytes(uri, score.part_bytes(frame, row_group_size=row_group_size))
        results.append({"ds": ds, "run_key": run_key, "shard": shard, "shards": shards,
                        "parts": [uri], "rows": len(frame), "users": hi - lo})
    spec = {"model": {"model_version": model_version, "data_version": "d" * 32}, "top_k": k,
            "seen": seen_uri}
    return score.collect(results, [spec])


def objects(ds: str) -> list[str]:
    return [u for u in storage.list_uris(layout.recs_prefix(ds)) if u.endswith(".parquet")]


def partitions() -> set[str]:
    """ds folders holding objects (SeaweedFS also lists emptied folders, AWS does not)."""
    return {layout.ds_of_prefix(u) for u in storage.list_prefixes(layout.recs_root())
            if storage.list_uris(u)}


def listed(manifest: dict) -> list[str]:
    return sorted(storage.s3_uri(p["key"]) for p in manifest["parts"])


def retired(ds: str) -> set[str]:
    """The keys ds's ``_retired.json`` lists (parts a republish replaced, not yet deleted)."""
    found = storage.read_versioned(layout.retired_parts_uri(ds))
    return {k for e in json.loads(found[0])["entries"] for k in e["keys"]} if found else set()


def live_objects(ds: str) -> list[str]:
    """ds's parts that are not retired: exactly what its manifest lists, after a publish."""
    gone = {storage.s3_uri(k) for k in retired(ds)}
    return [u for u in objects(ds) if u not in gone]


DS = "2026-03-10"


def _together(n: int, fn) -> list:
    """Run ``fn(i)`` for i in 0..n-1 on n threads released at once; their results (or errors)."""
    barrier, out = threading.Barrier(n), [None] * n

    def one(i):
        barrier.wait()
        try:
            out[i] = fn(i)
        except Exception as e:  # noqa: BLE001 - the test inspects it
            out[i] = e

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    return out


def test_create_if_absent_has_one_winner_under_a_race_and_stale_replaces_fail(bucket):
    for trial in range(2):  # SeaweedFS takes 1-3 s to settle each such race
        uri = storage.s3_uri(f"race-{trial}.json")
        got = _together(6, lambda i, uri=uri: storage.write_json(uri, {"i": i}, if_none_match=True))
        assert sum(isinstance(g, str) for g in got) == 1, got
        assert all(isinstance(g, storage.PreconditionFailed) for g in got if not isinstance(g, str))
    etag = storage.head(uri)["etag"]
    new = storage.write_json(uri, {"i": "next"}, if_match=etag)
    with pytest.raises(storage.PreconditionFailed):
        storage.write_json(uri, {}, if_match=etag)  # a replace of a version that is gone
    assert storage.delete_if_match(uri, etag) is False and storage.exists(uri)
    assert storage.delete_if_match(uri, new) and not storage.exists(uri)


def test_racing_pointer_moves_for_different_ds_end_at_the_latest_ds(bucket):
    days = [f"2026-03-{d:02d}" for d in range(1, 7)]
    etags = {ds: storage.write_json(layout.manifest_uri(ds), {"ds": ds}) for ds in days}
    order = [3, 0, 5, 1, 4, 2]  # thread i moves the pointer to days[order[i]]

    def move(i):
        ds = days[order[i]]
        return publish.move_latest(ds, {"ds": ds}, manifest_etag=etags[ds], owner=f"w{i}")

    got = _together(6, move)
    assert all(isinstance(g, bool) for g in got), got
    assert storage.read_json(layout.latest_uri()) == {"ds": days[-1]}
    assert got[order.index(5)] is True and not storage.exists(layout.latest_lock_uri())


def test_publish_writes_the_table_contract(bucket):
    scored = stage(DS, run_key="run-a", model_version="mf-20260310-aaaaaaaa")
    out = publish.run(scored, params=params())
    m = storage.read_json(layout.manifest_uri(DS))
    assert out.manifest == layout.manifest_uri(DS) and out.publish_id == m["publish_id"]
    assert (m["ds"], m["rows"], m["users"], m["top_k"]) == (DS, 300, 60, 5)
    assert m["model_version"] == "mf-20260310-aaaaaaaa" and m["data_version"] == "d" * 32
    assert m["schema"] == publish.SCHEMA and m["sorted_by"] == ["user_id", "rank"]
    assert dt.datetime.fromisoformat(m["created_at"]).tzinfo is not None
    assert m["publisher"] == "run-a" and len(m["popular"]) == 5
    assert (m["source"], m["source_reason"]) == ("model", None)
    assert listed(m) == objects(DS) and len(m["parts"]) == 3
    # the keys and formats are the contract's (nightrec/table/contract.py), which readers check
    assert [p["key"] for p in m["parts"]] == [contract.part_key(DS, m["publish_id"], n)
                                              for n in range(3)]
    assert contract.parse_manifest(storage.read_bytes(layout.manifest_uri(DS)), ds=DS) == m
    assert m["format_version"] == contract.MANIFEST_FORMAT_VERSION
    previous_max = ""
    for part in m["parts"]:
        data = storage.read_bytes(storage.s3_uri(part["key"]))
        assert (len(data), storage.sha256(data)) == (part["bytes"], part["sha256"])
        pf = pq.ParquetFile(io.BytesIO(data))
        assert pf.metadata.num_row_groups == part["row_groups"] == 10  # 2 users of 5 rows each
        groups = [set(pf.read_row_group(i)["user_id"].to_pylist()) for i in range(10)]
        assert sum(len(g) for g in groups) == len(set().union(*groups)) == part["users"]
        assert pf.schema_arrow.equals(publish.arrow_schema())
        users = pf.read()["user_id"].to_pylist()
        assert (min(users), max(users)) == (part["min_user_id"], part["max_user_id"])
        assert part["min_user_id"] > previous_max
        previous_max = part["max_user_id"]
    latest = contract.parse_pointer(storage.read_bytes(layout.latest_uri()))
    assert (latest["ds"], latest["publish_id"]) == (DS, m["publish_id"])
    assert set(latest) == set(contract.POINTER_FIELDS)
    assert not storage.exists(layout.claim_uri(DS))
    assert storage.list_uris(scored.staging) == []
    table = RecommendationReader().table()  # Arrow, in the contract's schema
    assert table.schema.equals(contract.arrow_schema()) and table.column_names == score.COLUMNS
    assert len(table) == 300 and table.to_pandas()["user_id"].is_monotonic_increasing


def test_the_contract_refuses_a_manifest_a_reader_must_not_follow():
    part = {"key": contract.part_key(DS, "0" * 12, 0), "etag": '"e"', "bytes": 10, "rows": 2,
            "min_user_id": "a", "max_user_id": "b", "sha256": "0" * 64}
    good = {"format_version": 2, "ds": DS, "model_version": "m", "rows": 2, "publish_id": "0" * 12,
            "parts": [part]}
    assert contract.parse_manifest(json.dumps(good).encode(), ds=DS) == good
    elsewhere = [f"recommendations/ds=2026-03-11/part-{'0' * 12}-00000.parquet",
                 "state/forgotten/users.parquet", f"recommendations/ds={DS}/../x.parquet",
                 f"recommendations/ds={DS}/sub/part.parquet"]
    bad = [{**good, "format_version": 3}, {**good, "ds": "2026-02-30"},
           {**good, "rows": 3}, {**good, "parts": [{**part, "sha256": "x"}]},
           *({**good, "parts": [{**part, "key": key}]} for key in elsewhere)]
    for manifest in bad:
        with pytest.raises(contract.ContractViolation):
            contract.parse_manifest(json.dumps(manifest).encode())
    with pytest.raises(contract.ContractViolation, match="not 2026-03-11"):
        contract.parse_manifest(json.dumps(good).encode(), ds="2026-03-11")
    with pytest.raises(contract.ContractViolation):
        contract.parse_pointer(b'{"ds": "../x"}')
    with pytest.raises(ValueError):
        contract.part_key(DS, "../../x", 0)


def test_two_concurrent_publishers_of_one_ds_exactly_one_wins(bucket, serial_validation,
                                                              monkeypatch):
    staged = {who: stage(DS, run_key=f"run-{who}", model_version=f"mf-20260310-{who * 8}",
                         n_users=40 if who == "a" else 50, seed=ord(who)) for who in "ab"}
    barrier, real_claim = threading.Barrier(2, timeout=60), publish.claim_ds

    def claim_then_wait(*args, **kwargs):  # both try to claim before either goes on
        try:
            return real_claim(*args, **kwargs)
        finally:
            barrier.wait()

    monkeypatch.setattr(publish, "claim_ds", claim_then_wait)
    outcome = {}

    def publisher(who):
        try:
            outcome[who] = publish.run(staged[who], params=params())
        except publish.PublishConflict as e:
            outcome[who] = e

    threads = [threading.Thread(target=publisher, args=(w,)) for w in "ab"]
    [t.start() for t in threads]
    [t.join() for t in threads]
    winners = [w for w, o in outcome.items() if isinstance(o, Published)]
    assert len(winners) == 1, outcome
    winner, loser = winners[0], ({"a", "b"} - set(winners)).pop()
    message = str(outcome[loser])
    assert f"ds={DS} is being published by run-{winner}" in message
    assert f"this publisher (run-{loser}) stopped before writing anything" in message
    m = storage.read_json(layout.manifest_uri(DS))
    assert m["publisher"] == f"run-{winner}" and listed(m) == objects(DS)
    assert storage.read_json(layout.latest_uri())["publish_id"] == m["publish_id"]
    table = RecommendationReader().table().to_pandas()
    assert set(table["model_version"]) == {f"mf-20260310-{winner * 8}"}
    assert len(table) == staged[winner].rows
    assert not storage.exists(layout.claim_uri(DS))
    # The loser changed nothing and its staged table is still there for its retry.
    assert storage.list_uris(staged[loser].staging)


def test_a_stale_publisher_whose_claim_was_taken_over_cannot_commit(bucket, monkeypatch):
    a = stage(DS, run_key="run-a", model_version="mf-20260310-aaaaaaaa", seed=1)
    b = stage(DS, run_key="run-b", model_version="mf-20260310-bbbbbbbb", n_users=30, seed=2)
    real_commit = publish.commit_manifest

    def commit(ds, manifest, *, expected):
        if manifest["publisher"] == "run-a":  # A stalled past its claim; B came and published
            publish.run(b, params=params())
        return real_commit(ds, manifest, expected=expected)

    monkeypatch.setattr(publish, "commit_manifest", commit)
    with pytest.raises(publish.PublishConflict, match="another publisher committed a manifest"):
        publish.run(a, params=params(claim_ttl_s=0))  # A's claim expires at once
    m = storage.read_json(layout.manifest_uri(DS))
    # A's parts, never listed by a committed manifest, were deleted by B's publish at once
    assert m["publisher"] == "run-b" and listed(m) == objects(DS) and not retired(DS)
    assert storage.read_json(layout.latest_uri())["publish_id"] == m["publish_id"]
    assert set(RecommendationReader().table()["model_version"].to_pylist()) == {
        "mf-20260310-bbbbbbbb"}
    assert not storage.exists(layout.claim_uri(DS))


def test_a_live_claim_stops_others_but_not_the_same_runs_retry(bucket):
    now = dt.datetime.now(dt.UTC)
    claim = {"ds": DS, "owner": "run-crashed", "token": "t", "claimed_at": now.isoformat(),
             "expires_at": (now + dt.timedelta(hours=1)).isoformat()}
    storage.write_json(layout.claim_uri(DS), claim)
    with pytest.raises(publish.PublishConflict, match="being published by run-crashed"):
        publish.run(stage(DS, run_key="run-other", model_version="mf-20260310-cccccccc"),
                    params=params())
    assert not storage.exists(layout.manifest_uri(DS)) and objects(DS) == []
    out = publish.run(stage(DS, run_key="run-crashed", model_version="mf-20260310-cccccccc"),
                      params=params())  # the crashed run's retry takes its own claim over
    assert out.latest_moved and not storage.exists(layout.claim_uri(DS))
    storage.write_json(layout.claim_uri(DS), {**claim, "expires_at": now.isoformat()})
    publish.run(stage(DS, run_key="run-other", model_version="mf-20260310-dddddddd"),
                params=params())  # an expired claim is taken over by anyone
    assert storage.read_json(layout.manifest_uri(DS))["publisher"] == "run-other"


def test_retention_keeps_n_days_and_never_the_latest_and_backfill_keeps_latest(bucket):
    p = params(retention_days=2)

    def put(ds, mv="mf-20260310-aaaaaaaa"):
        return publish.run(stage(ds, run_key="r", model_version=mv, n_users=6), params=p)

    days = ["2026-03-01", "2026-03-02", "2026-03-03"]
    for ds in days:
        put(ds)
    assert partitions() == {"2026-03-02", "2026-03-03"}
    assert storage.list_uris(layout.staging_ds_prefix("2026-03-01")) == []
    backfill = put("2026-03-01")  # older than the window: published, latest stays, kept for now
    assert backfill.latest_moved is False and backfill.expired == []
    assert storage.read_json(layout.latest_uri())["ds"] == "2026-03-03"
    assert len(RecommendationReader().table("2026-03-01")) == 30
    assert put("2026-03-04").expired == ["2026-03-01", "2026-03-02"]
    assert partitions() == {"2026-03-03", "2026-03-04"}


def test_point_lookup_reads_only_the_row_group_that_holds_the_user(bucket):
    scored = stage(DS, run_key="r", model_version="mf-20260310-aaaaaaaa", n_users=4000, k=50,
                   shards=2, row_group_size=500)
    publish.run(scored, params=params())
    reader = RecommendationReader()
    full = reader.table().to_pandas()
    table = reader.open()
    part = table.manifest["parts"][1]
    assert part["row_groups"] == 200 and part["bytes"] > 500_000
    rows = table.for_user("u03001").to_pandas()
    expected = full[full["user_id"] == "u03001"].reset_index(drop=True)
    pd.testing.assert_frame_equal(rows, expected)
    meta = pq.ParquetFile(io.BytesIO(storage.read_bytes(storage.s3_uri(part["key"])))).metadata
    group = meta.row_group(100)  # u03000..u03009, 500 rows
    assert {meta.row_group(100).column(0).statistics.min,
            group.column(0).statistics.max} == {"u03000", "u03009"}
    stats = table.stats.as_dict()
    tail = max(part["footer_bytes"], 64 * 1024)
    # one request for the footer, one for the row group: nothing else of the part's ~1 MB
    assert stats["requests"] == 2 and stats["row_groups"] == 1, stats
    group_bytes = sum(group.column(c).total_compressed_size for c in range(group.num_columns))
    assert stats["bytes"] <= tail + group_bytes + 1024, (stats, tail, group_bytes)
    assert stats["bytes"] < part["bytes"] / 5
    table.for_user("u03555")  # same part: footer cached, one more range request
    assert table.stats.as_dict()["requests"] == 3
    assert table.for_user("nobody").num_rows == 0 and table.stats.as_dict()["requests"] == 3


def test_iterator_yields_the_whole_table_part_by_part(bucket):
    publish.run(stage(DS, run_key="r", model_version="mf-20260310-aaaaaaaa"), params=params())
    batches = list(RecommendationReader().iter_batches())
    assert len(batches) == 3 and sum(b.num_rows for b in batches) == 300
    assert pa.Table.from_batches(batches).equals(RecommendationReader().table(DS))


def test_a_reader_polling_during_publishes_never_sees_a_partial_or_mixed_table(bucket):
    days = ["2026-03-10", "2026-03-10", "2026-03-11", "2026-03-11", "2026-03-12"]
    staged = [stage(ds, run_key=f"run-{i}", model_version=f"mf-20260310-{i:08d}",
                    n_users=300 + 40 * i, shards=3, row_group_size=50, seed=i)
              for i, ds in enumerate(days)]
    publish.run(staged[0], params=params())
    done, seen, bad, restarts = threading.Event(), set(), [], [0]

    def poll():
        reader = RecommendationReader()
        while not done.is_set():
            try:
                t = reader.open()
                df = t.read().to_pandas()
                one = t.for_user(f"u{len(seen) % 300:05d}").to_pandas()
            except TableChanged:
                restarts[0] += 1
                continue
            m = t.manifest
            if (len(df) != m["rows"] or df["user_id"].nunique() != m["users"]
                    or set(df["model_version"]) != {m["model_version"]}
                    or set(df["ds"]) != {m["ds"]} or set(one["model_version"]) != {m["model_version"]}
                    or not df["user_id"].is_monotonic_increasing):
                bad.append(m["publish_id"])
            seen.add(m["publish_id"])

    reader_thread = threading.Thread(target=poll)
    reader_thread.start()
    try:
        for ds, scored in zip(days[1:], staged[1:], strict=True):
            publish.run(scored, params=params())
    finally:
        done.set()
        reader_thread.join()
    assert bad == []
    assert len(seen) >= 3, seen  # it did read while the table changed under it
    assert storage.read_json(layout.latest_uri())["ds"] == "2026-03-12"


def test_reader_raises_table_not_found_before_anything_is_published(bucket):
    from nightrec.table.reader import TableNotFound

    with pytest.raises(TableNotFound):
        RecommendationReader().for_user("1")
    with pytest.raises(TableNotFound):
        RecommendationReader().table(DS)


def test_publish_refuses_a_table_with_a_user_split_over_two_parts(bucket):
    scored = stage(DS, run_key="r", model_version="mf-20260310-aaaaaaaa", shards=2)
    first = storage.read_parquet(scored.parts[0])
    storage.write_bytes(scored.parts[1], score.part_bytes(
        pd.concat([first.tail(2), storage.read_parquet(scored.parts[1])]),
        row_group_size=10))
    scored = dataclasses.replace(scored, rows=scored.rows + 2)
    with pytest.raises(publish.ContractError, match="split over parts 0 and 1"):
        publish.run(scored, params=params())
    assert not storage.exists(layout.latest_uri())


def test_manifest_popular_items_are_the_most_interacted(bucket):
    publish.run(stage(DS, run_key="r", model_version="mf-20260310-aaaaaaaa"), params=params())
    seen = storage.read_parquet(layout.bucket_uri(DS, "clean", "interactions", 0))
    counts = seen["item_id"].value_counts()
    popular = storage.read_json(layout.manifest_uri(DS))["popular"]
    assert [p["interactions"] for p in popular] == sorted(counts.to_numpy(), reverse=True)[:5]
    assert json.dumps(popular)  # plain JSON


@pytest.mark.parametrize("fault", ["wrong_credential", "missing_bucket"])
def test_s3_errors_fail_publish_clearly_and_leave_the_published_table(bucket, monkeypatch,
                                                                      fault):
    from nightrec.core.errors import PermanentError

    publish.run(stage("2026-03-09", run_key="before",
                                    model_version="mf-20260309-aaaaaaaa"))
    latest_before = storage.read_bytes(layout.latest_uri())
    scored = stage(DS, run_key="run-b", model_version="mf-20260310-bbbbbbbb")
    with monkeypatch.context() as m:
        if fault == "wrong_credential":
            m.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret-" + "0" * 24)
            error, expected = PermissionError, "refused .* check the credentials"
        else:  # SeaweedFS would create the bucket on the first PUT; publish checks first
            missing = f"no-such-bucket-{bucket[-6:]}"
            m.setenv("NIGHTREC_BUCKET", missing)
            error, expected = PermanentError, f"bucket '{missing}' does not exist .* NIGHTREC_BUCKET"
        with pytest.raises(error, match=expected):
            publish.run(scored)
        if fault == "missing_bucket":
            assert missing not in {b["Name"] for b in storage.s3_client().list_buckets()["Buckets"]}
    # the store as readers see it: the earlier table, whole; nothing of DS, no claim left behind
    assert storage.read_bytes(layout.latest_uri()) == latest_before
    assert storage.list_uris(layout.recs_prefix(DS)) == []
    assert len(RecommendationReader().table()) == 60 * 5
    # with the fault gone, the same staged table publishes
    assert publish.run(scored).rows == 60 * 5


def test_manifest_says_what_produced_the_table(bucket):
    scored = stage(DS, run_key="r", model_version="mf-20260310-aaaaaaaa")
    reason = "gate refused the new model: ndcg@10 0.028 < popularity 0.029"
    publish.run(dataclasses.replace(scored, source="champion_fallback", source_reason=reason),
                params=params())
    m = storage.read_json(layout.manifest_uri(DS))
    assert (m["source"], m["source_reason"]) == ("champion_fallback", reason)


def test_a_publisher_whose_claim_lapsed_deletes_nothing_of_the_rival_that_took_over(
        bucket, monkeypatch, caplog):
    a = stage(DS, run_key="run-a", model_version="mf-20260310-aaaaaaaa", seed=1)
    b = stage(DS, run_key="run-b", model_version="mf-20260310-bbbbbbbb", n_users=30, seed=2)
    real_move = publish.move_latest

    def move(ds, record, *, manifest_etag, owner):
        moved = real_move(ds, record, manifest_etag=manifest_etag, owner=owner)
        if owner == "run-a":  # A committed, then stalled past its claim; B took over, published
            publish.run(b, params=params())
        return moved

    monkeypatch.setattr(publish, "move_latest", move)
    with caplog.at_level("WARNING", logger="nightrec.tasks.publish"):
        publish.run(a, params=params(claim_ttl_s=0))  # A's claim expires at once
    m = storage.read_json(layout.manifest_uri(DS))
    assert m["publisher"] == "run-b" and all(storage.exists(u) for u in listed(m))
    table = RecommendationReader().table().to_pandas()
    assert set(table["model_version"]) == {"mf-20260310-bbbbbbbb"} and len(table) == 150
    assert "is no longer run-a's" in caplog.text  # A skipped its sweep and said so
    # A's own table, which B replaced, is retired (for readers still holding it), not deleted
    assert len(retired(DS)) == 3 and listed(m) == live_objects(DS)
    assert storage.list_uris(a.staging)  # A could not verify its claim: it deleted nothing
    assert not storage.exists(layout.claim_uri(DS))


def test_a_republish_retires_the_old_parts_for_the_grace_period_then_a_later_publish_deletes(
        bucket):
    import time

    from nightrec.table.reader import PublishedTable

    p = params(reader_grace_s=1)
    publish.run(stage(DS, run_key="r1", model_version="mf-20260310-aaaaaaaa", seed=1),
                params=p)
    old = RecommendationReader().open()  # a reader holding the first manifest
    old_rows = old.read()
    publish.run(stage(DS, run_key="r2", model_version="mf-20260310-bbbbbbbb", n_users=30,
                          seed=2), params=p)
    old_keys = {part["key"] for part in old.manifest["parts"]}
    assert retired(DS) == old_keys and len(live_objects(DS)) == 3
    record = storage.read_json(layout.retired_parts_uri(DS))
    (entry,) = record["entries"]
    after = dt.datetime.fromisoformat(entry["delete_after"])
    assert after - dt.datetime.fromisoformat(entry["retired_at"]) >= dt.timedelta(seconds=1)
    assert record["ds"] == DS and entry["replaced_by"] != old.publish_id
    # within the grace period the old manifest still reads: whole parts and range reads
    assert old.read().equals(old_rows)
    cold = PublishedTable(old.manifest, bucket=bucket)  # no cached footer: range reads only
    assert len(cold.for_user("u00042")) == 5 and cold.stats.as_dict()["row_groups"] == 1
    assert set(RecommendationReader().table(DS)["model_version"].to_pylist()) == {
        "mf-20260310-bbbbbbbb"}

    time.sleep(max(0.0, (after - dt.datetime.now(dt.UTC)).total_seconds()) + 0.2)
    publish.run(stage("2026-03-11", run_key="r3",
                                    model_version="mf-20260311-cccccccc"), params=p)
    assert not any(storage.exists(storage.s3_uri(k)) for k in old_keys)
    assert not storage.exists(layout.retired_parts_uri(DS)) and not storage.exists(
        layout.claim_uri(DS))  # the later publish swept DS under DS's claim, then released it
    assert listed(storage.read_json(layout.manifest_uri(DS))) == objects(DS)
    with pytest.raises(TableChanged):
        PublishedTable(old.manifest, bucket=bucket).read()
    assert len(RecommendationReader().table(DS)) == 150


def test_with_no_grace_a_republish_deletes_the_parts_it_replaced_itself(bucket):
    p = params(reader_grace_s=0)
    publish.run(stage(DS, run_key="r1", model_version="mf-20260310-aaaaaaaa", seed=1),
                params=p)
    publish.run(stage(DS, run_key="r2", model_version="mf-20260310-bbbbbbbb", seed=2),
                params=p)
    assert listed(storage.read_json(layout.manifest_uri(DS))) == objects(DS)
    assert not storage.exists(layout.retired_parts_uri(DS))


def test_republishing_identical_content_never_deletes_the_parts_listed_again(bucket):
    p = params(reader_grace_s=0)
    first = stage(DS, run_key="r1", model_version="mf-20260310-aaaaaaaa", seed=1)
    publish.run(first, params=p)
    publish.run(stage(DS, run_key="r2", model_version="mf-20260310-bbbbbbbb", seed=2),
                params=params())  # retires the first table's parts for 900 s
    again = stage(DS, run_key="r3", model_version="mf-20260310-aaaaaaaa", seed=1)
    publish.run(again, params=p)  # the same parts, the same keys, listed again
    m = storage.read_json(layout.manifest_uri(DS))
    assert listed(m) == live_objects(DS) and not retired(DS) & {pt["key"] for pt in m["parts"]}
    assert len(RecommendationReader().table(DS)) == 300


def test_retention_deletes_a_whole_expired_partition_with_its_retired_parts(bucket):
    old = "2026-03-01"
    publish.run(stage(old, run_key="r1", model_version="mf-20260301-aaaaaaaa", seed=1),
                params=params(retention_days=1))
    publish.run(stage(old, run_key="r2", model_version="mf-20260301-bbbbbbbb", seed=2),
                params=params(retention_days=1))  # a republish: old parts retired for 900 s
    assert storage.exists(layout.retired_parts_uri(old)) and len(objects(old)) == 6
    out = publish.run(stage(DS, run_key="r3", model_version="mf-20260310-cccccccc"),
                      params=params(retention_days=1))
    assert out.expired == [old]
    assert storage.list_uris(layout.recs_prefix(old)) == []  # parts, _retired.json, claim
    assert partitions() == {DS}


def test_parts_replaced_by_a_publish_that_dies_after_its_commit_keep_their_grace(bucket,
                                                                                 monkeypatch):
    publish.run(stage(DS, run_key="r1", model_version="mf-20260310-aaaaaaaa", seed=1),
                params=params())
    first = {pt["key"] for pt in storage.read_json(layout.manifest_uri(DS))["parts"]}

    def die(*args, **kwargs):
        raise SystemExit("killed right after the commit")

    with monkeypatch.context() as m:
        m.setattr(publish, "settle_partition", die)
        with pytest.raises(SystemExit):
            publish.run(stage(DS, run_key="r2", model_version="mf-20260310-bbbbbbbb",
                                  seed=2), params=params())
    assert storage.read_json(layout.manifest_uri(DS))["publisher"] == "r2"  # it did commit
    assert retired(DS) == first  # recorded before the commit
    (entry,) = storage.read_json(layout.retired_parts_uri(DS))["entries"]
    grace = settings.load_params()["publish"]["reader_grace_s"]
    left = dt.datetime.fromisoformat(entry["delete_after"]) - dt.datetime.now(dt.UTC)
    assert left.total_seconds() > grace
    # the next publish takes them for retired parts, not for parts nobody listed
    publish.run(stage(DS, run_key="r3", model_version="mf-20260310-cccccccc", seed=3),
                params=params())
    assert all(storage.exists(storage.s3_uri(k)) for k in first) and first <= retired(DS)
