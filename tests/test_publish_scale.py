"""Publish at scale, against the real SeaweedFS: no staged part passes through publish whole.

- Publish reads each staged byte once, as ranged GETs of a row group or the footer (never a
  whole-part GET), and uploads no part: the parts are server-side copies (CopyObject), so the
  published parts are the staged bytes, and the manifest says what they hold.
- The streaming validation cuts its batches at user boundaries, whatever the row groups, and
  still refuses a bad table (ranks out of order, a duplicated row, users out of order across
  batches) before anything is visible: the previous table and the latest pointer stay.
- ``storage.copy`` (single and multipart server-side copies, conditional on the source's
  ETag; local and mixed paths) and ``storage.ParquetScan`` on their own.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import uuid

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nightrec.store import layout, storage
from nightrec.table.reader import RecommendationReader
from nightrec.tasks import publish, score
from tests.test_publish import DS, objects, params, stage


class S3Spy:
    """Every S3 request the shared boto3 client makes: operation, key, Range, CopySource, the
    bytes a GET returned and the bytes a PUT sent."""

    def __init__(self):
        self.calls: list[dict] = []
        self._id = uuid.uuid4().hex

    def _params(self, params, model, context, **_):
        body = params.get("Body")
        call = {"op": model.name, "key": params.get("Key"), "range": params.get("Range"),
                "source": params.get("CopySource"), "if_match": params.get("CopySourceIfMatch"),
                "sent": len(body) if isinstance(body, bytes | bytearray) else None,
                "got": None}
        context["s3spy"] = call
        self.calls.append(call)

    def _after(self, parsed, context, **_):
        call = context.get("s3spy")
        if call is not None and call["op"] == "GetObject":
            call["got"] = parsed.get("ContentLength")

    def __enter__(self) -> S3Spy:
        events = storage.s3_client().meta.events
        events.register("provide-client-params.s3", self._params, unique_id=f"p{self._id}")
        events.register("after-call.s3", self._after, unique_id=f"a{self._id}")
        return self

    def __exit__(self, *exc) -> None:
        events = storage.s3_client().meta.events
        events.unregister("provide-client-params.s3", unique_id=f"p{self._id}")
        events.unregister("after-call.s3", unique_id=f"a{self._id}")

    def of(self, op: str, keys) -> list[dict]:
        return [c for c in self.calls if c["op"] == op and c["key"] in keys]


def _key(uri: str) -> str:
    return storage.split_uri(uri)[1]


def _spans(data: bytes) -> list[int]:
    """Each row group's size in bytes (its column chunks)."""
    meta = pq.ParquetFile(io.BytesIO(data)).metadata
    return [sum(meta.row_group(i).column(c).total_compressed_size
                for c in range(meta.num_columns)) for i in range(meta.num_row_groups)]


def test_publish_reads_each_staged_byte_once_by_range_and_uploads_no_part(bucket,
                                                                          monkeypatch):
    scored = stage(DS, run_key="big", model_version="mf-20260310-aaaaaaaa", n_users=4000, k=50,
                   shards=2, row_group_size=500)
    staged = {_key(u): storage.read_bytes(u) for u in scored.parts}
    table_bytes = sum(len(d) for d in staged.values())
    assert len(staged) == 2 and min(len(d) for d in staged.values()) > 900_000
    window = 128 * 1024  # the scan's reads, scaled down with the parts (8 MiB by default)
    monkeypatch.setattr(storage, "SCAN_READ_BYTES", window)
    with S3Spy() as spy:
        publish.run(scored, params=params())
    m = storage.read_json(layout.manifest_uri(DS))
    published = {p["key"] for p in m["parts"]}

    gets = spy.of("GetObject", staged)
    # every read of a staged part is a range; together they are the parts' bytes, each once
    assert gets and all(g["range"] for g in gets), [g for g in gets if not g["range"]]
    assert sum(g["got"] for g in gets) == table_bytes
    for key, data in staged.items():
        mine = [g for g in gets if g["key"] == key]
        # the footer, then a window of row groups at a time: never a whole part in one request
        assert max(g["got"] for g in mine) <= window + max(_spans(data))
        assert max(g["got"] for g in mine) < len(data) / 4
        assert len(mine) <= len(data) // window + 2
    assert storage.read_json(layout.run_uri(DS, "publish", "validation.json"))["read"] == {
        "bytes": table_bytes, "requests": len(gets)}

    # no part is uploaded, by PUT or multipart: each is one server-side copy of its staged
    # part, conditional on the version validated
    uploads = [c for c in spy.calls if c["op"] in {"PutObject", "UploadPart"}
               and (c["key"] in published or c["key"] in staged)]
    assert uploads == []
    # only small JSON was sent, besides the output checks' summary: the sampled users' top 10
    # (tasks/output_checks.py), bounded by monitor.output.sample_users, not by the table
    summary = layout.run_uri(DS, "publish", "output_summary.parquet")
    assert max(c["sent"] or 0 for c in spy.calls if c["key"] != _key(summary)) < 64 * 1024
    assert pq.read_metadata(io.BytesIO(storage.read_bytes(summary))).num_rows == 4000 * 10
    copies = spy.of("CopyObject", published)
    assert sorted(c["source"]["Key"] for c in copies) == sorted(staged)
    assert all(c["if_match"] for c in copies)
    assert spy.of("GetObject", published) == []  # publish never reads what it published
    assert len(RecommendationReader().table()) == 200_000


def test_published_parts_are_the_staged_bytes_and_the_manifest_describes_them(bucket):
    scored = stage(DS, run_key="r", model_version="mf-20260310-aaaaaaaa")
    staged = [storage.read_bytes(u) for u in scored.parts]
    publish.run(scored, params=params())
    m = storage.read_json(layout.manifest_uri(DS))
    assert len(m["parts"]) == len(staged) == 3
    for part, data in zip(m["parts"], staged, strict=True):
        uri = storage.s3_uri(part["key"])
        assert storage.read_bytes(uri) == data  # byte-identical: a copy, not a rewrite
        assert part["etag"] == storage.head(uri)["etag"]
        # what the streaming pass wrote is what describing the whole part gives
        described = {k: v for k, v in part.items() if k not in {"key", "etag"}}
        assert described == publish.describe_part(data, pq.read_table(io.BytesIO(data)))
        assert part["sha256"] == hashlib.sha256(data).hexdigest()
    assert (m["rows"], m["users"]) == (300, 60)
    assert m["publish_id"] == publish.publish_id([p["sha256"] for p in m["parts"]])
    whole = pa.concat_tables([pq.read_table(io.BytesIO(d)) for d in staged])
    assert RecommendationReader().table(DS).equals(whole)


def test_a_publish_that_fails_after_copying_leaves_nothing_and_its_retry_publishes(
        bucket, monkeypatch):
    publish.run(stage(DS, run_key="r1", model_version="mf-20260310-aaaaaaaa", seed=1),
                params=params())
    manifest, latest = (storage.read_bytes(layout.manifest_uri(DS)),
                        storage.read_bytes(layout.latest_uri()))
    before = objects(DS)
    scored = stage(DS, run_key="r2", model_version="mf-20260310-bbbbbbbb", seed=2)
    real = publish.commit_manifest

    def fail(*args, **kwargs):
        raise ConnectionError("the store went away before the commit")

    monkeypatch.setattr(publish, "commit_manifest", fail)
    with pytest.raises(ConnectionError):
        publish.run(scored, params=params())
    # the copies of the failed publish are gone; the previous table is as it was
    assert objects(DS) == before
    assert storage.read_bytes(layout.manifest_uri(DS)) == manifest
    assert storage.read_bytes(layout.latest_uri()) == latest
    assert storage.list_uris(scored.staging)  # staged parts stay for the retry
    monkeypatch.setattr(publish, "commit_manifest", real)
    out = publish.run(scored, params=params())
    assert storage.read_json(layout.latest_uri())["publish_id"] == out.publish_id
    assert set(RecommendationReader().table(DS)["model_version"].to_pylist()) == {
        "mf-20260310-bbbbbbbb"}


def test_a_staged_part_rewritten_after_validation_is_not_published(bucket, monkeypatch):
    scored = stage(DS, run_key="r", model_version="mf-20260310-aaaaaaaa")
    real = publish.validate_parts

    def validate_then_rewrite(*args, **kwargs):
        out = real(*args, **kwargs)
        _rewrite(scored.parts[1], _swap_ranks)  # other content, after it was validated
        return out

    monkeypatch.setattr(publish, "validate_parts", validate_then_rewrite)
    with pytest.raises(publish.PublishConflict, match="changed after publish validated it"):
        publish.run(scored, params=params())
    assert objects(DS) == [] and not storage.exists(layout.manifest_uri(DS))
    assert not storage.exists(layout.latest_uri()) and not storage.exists(layout.claim_uri(DS))


def _rewrite(uri: str, change) -> None:
    """Replace a staged part by ``change(its frame)``, row groups of 10 rows cut at users."""
    frame = storage.read_parquet(uri)
    storage.write_bytes(uri, score.part_bytes(change(frame.copy()), row_group_size=10))


def _swap_ranks(frame: pd.DataFrame) -> pd.DataFrame:
    frame.loc[[21, 22], "rank"] = frame.loc[[22, 21], "rank"].to_numpy()  # 1, 3, 2, 4, 5
    return frame


def _duplicate_row(frame: pd.DataFrame) -> pd.DataFrame:
    frame.iloc[22] = frame.iloc[21]  # user, rank, item twice
    return frame


def _users_out_of_order(frame: pd.DataFrame) -> pd.DataFrame:
    """The part's second half of users first: each batch sorted, the part not."""
    half = len(frame) // 2
    return pd.concat([frame.iloc[half:], frame.iloc[:half]], ignore_index=True)


@pytest.mark.parametrize(("fault", "expected"), [
    (_swap_ranks, "ranks are not 1..n in order within each user"),
    (_duplicate_row, "expect_compound_columns_to_be_unique"),
    (_users_out_of_order, "rows are not sorted by user_id"),
])
def test_streaming_validation_refuses_a_bad_part_and_leaves_the_published_table(
        bucket, monkeypatch, fault, expected):
    publish.run(stage(DS, run_key="good", model_version="mf-20260310-aaaaaaaa", seed=1),
                params=params())
    manifest, latest = (storage.read_bytes(layout.manifest_uri(DS)),
                        storage.read_bytes(layout.latest_uri()))
    before = objects(DS)
    scored = stage(DS, run_key="bad", model_version="mf-20260310-bbbbbbbb", seed=2)
    _rewrite(scored.parts[1], fault)
    monkeypatch.setattr(publish, "VALIDATE_BATCH_ROWS", 50)  # 300 rows: several batches
    with pytest.raises(publish.ContractError, match="broke its contract") as err:
        publish.run(scored, params=params())
    assert expected in str(err.value)
    report = storage.read_json(layout.run_uri(DS, "publish", "validation.json"))
    assert report["success"] is False and report["batches"] >= 5
    # nothing changed for readers: the same manifest, pointer and parts; no claim was taken
    assert storage.read_bytes(layout.manifest_uri(DS)) == manifest
    assert storage.read_bytes(layout.latest_uri()) == latest
    assert objects(DS) == before and not storage.exists(layout.claim_uri(DS))
    assert set(RecommendationReader().table()["model_version"].to_pylist()) == {
        "mf-20260310-aaaaaaaa"}


def _part_with_groups(frame: pd.DataFrame, row_group_size: int) -> bytes:
    """Parquet whose row groups ignore user boundaries (a user's rows over two groups)."""
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pandas(frame[score.COLUMNS], schema=publish.arrow_schema(),
                                        preserve_index=False),
                   buf, row_group_size=row_group_size, compression="zstd")
    return buf.getvalue()


def test_batches_end_at_user_boundaries_whatever_the_row_groups(bucket):
    scored = stage(DS, run_key="r", model_version="mf-20260310-aaaaaaaa", n_users=24)
    for uri in scored.parts:  # row groups of 7 rows: users of 5 rows straddle them
        storage.write_bytes(uri, _part_with_groups(storage.read_parquet(uri), 7))
    staged = [storage.read_bytes(u) for u in scored.parts]
    report, described, versions = publish.validate_parts(
        scored.parts, ds=DS, model_version="mf-20260310-aaaaaaaa", top_k=5, batch_rows=13)
    assert report["success"], (report["failures"], report["ranking_problems"])
    assert report["batches"] >= 6 and report["rows_checked"] == 120
    assert report["read"]["bytes"] == sum(len(d) for d in staged)
    assert described == [publish.describe_part(d, pq.read_table(io.BytesIO(d))) for d in staged]
    assert versions == [storage.head(u)["etag"] for u in scored.parts]


def test_users_out_of_order_where_one_batch_ends_are_found(bucket):
    scored = stage(DS, run_key="r", model_version="mf-20260310-aaaaaaaa", n_users=20, shards=1)
    frame = storage.read_parquet(scored.parts[0])
    users = [f"u{i:05d}" for i in (*range(8), 9, 8, *range(10, 20))]  # u00009 before u00008
    swapped = pd.concat([frame[frame["user_id"] == u] for u in users], ignore_index=True)
    storage.write_bytes(scored.parts[0], score.part_bytes(swapped, row_group_size=5))
    # the first batch ends after 10 users and holds the last (u00008) back: each batch is
    # sorted on its own, u00009 | u00008 is where they meet
    report, _, _ = publish.validate_parts(
        scored.parts, ds=DS, model_version="mf-20260310-aaaaaaaa", top_k=5, batch_rows=50)
    assert report["batches"] == 3 and not report["success"]
    assert report["ranking_problems"] == ["rows are not sorted by user_id"]


def test_a_part_of_another_schema_is_refused_from_its_footer(bucket):
    scored = stage(DS, run_key="r", model_version="mf-20260310-aaaaaaaa")
    frame = storage.read_parquet(scored.parts[2]).rename(columns={"score": "points"})
    storage.write_bytes(scored.parts[2], storage.parquet_bytes(frame))
    report, described, _ = publish.validate_parts(
        scored.parts, ds=DS, model_version="mf-20260310-aaaaaaaa", top_k=5)
    assert not report["success"]
    assert any(p.startswith("part 2 has schema") for p in report["ranking_problems"])
    assert described[2]["sha256"] is None and described[2]["rows"] == 100


def test_popular_items_come_from_the_seen_steps_counts_not_the_seen_rows(bucket):
    from nightrec.tasks import seen

    seen_uri = layout.bucket_uri(DS, "clean", "interactions", 0)
    rng = np.random.default_rng(0)
    n = 200_000  # a table well over the footer read, so that reading its rows would show
    storage.write_parquet(pd.DataFrame({"user_id": [f"u{i:06d}" for i in range(n)],
                                        "item_id": rng.integers(0, 10, n).astype(str)}),
                          seen_uri)
    # counts that disagree with the rows on purpose (same total, other items): they are used
    counts = pd.DataFrame({"item_id": ["a", "b", "c", "d"],
                           "count": np.array([n - 150, 50, 50, 50], dtype=np.int64)})
    storage.write_parquet(counts, seen.item_counts_uri(seen_uri))
    with S3Spy() as spy:
        popular = publish.popular_items(seen_uri, 3)
    assert popular == [{"item_id": "a", "interactions": n - 150},
                       {"item_id": "b", "interactions": 50},  # ties: lower item_id first
                       {"item_id": "c", "interactions": 50}]
    reads = spy.of("GetObject", {_key(seen_uri)})
    assert sum(g["got"] for g in reads) <= storage.SCAN_TAIL_BYTES < storage.head(seen_uri)[
        "bytes"]
    assert publish.popular_items(None, 3) == []


# --- storage.copy and storage.ParquetScan ----------------------------------------------------


def test_copy_is_server_side_and_conditional_on_the_source_version(bucket):
    src, dst = storage.s3_uri("a/src.bin"), storage.s3_uri("b/dst.bin")
    data = os.urandom(300_000)
    etag = storage.write_bytes(src, data)
    with S3Spy() as spy:
        got = storage.copy(src, dst, if_match=etag)
    assert storage.read_bytes(dst) == data and got == storage.head(dst)["etag"] == etag
    assert [c["op"] for c in spy.calls] == ["HeadObject", "CopyObject"]
    with pytest.raises(storage.PreconditionFailed):
        storage.copy(src, storage.s3_uri("b/other.bin"), if_match='"0123"')
    assert not storage.exists(storage.s3_uri("b/other.bin"))
    with pytest.raises(FileNotFoundError):
        storage.copy(storage.s3_uri("a/none.bin"), dst)
    with pytest.raises(FileNotFoundError):
        storage.copy(storage.s3_uri("a/none.bin"), dst, size=10)
    assert storage.read_bytes(dst) == data


def test_copy_above_the_single_request_limit_is_a_multipart_server_side_copy(bucket,
                                                                            monkeypatch):
    mib = 1024 * 1024
    monkeypatch.setattr(storage, "COPY_MAX_SINGLE_BYTES", 5 * mib)
    monkeypatch.setattr(storage, "COPY_PART_BYTES", 5 * mib)
    src, dst = storage.s3_uri("big/src.bin"), storage.s3_uri("big/dst.bin")
    data = os.urandom(11 * mib)
    etag = storage.write_bytes(src, data)
    with S3Spy() as spy:
        got = storage.copy(src, dst, if_match=etag)
    assert storage.read_bytes(dst) == data and got == storage.head(dst)["etag"]
    assert got.endswith('-3"')  # three parts
    assert sum(c["op"] == "UploadPartCopy" for c in spy.calls) == 3
    assert not any(c["op"] in {"GetObject", "PutObject", "UploadPart"} for c in spy.calls)
    with pytest.raises(storage.PreconditionFailed):
        storage.copy(src, storage.s3_uri("big/other.bin"), if_match='"0123"')
    assert not storage.exists(storage.s3_uri("big/other.bin"))


def test_copy_between_local_paths_and_s3(bucket, tmp_path):
    data = os.urandom(100_000)
    local = tmp_path / "a" / "x.bin"
    local.parent.mkdir()
    local.write_bytes(data)
    assert storage.copy(str(local), str(tmp_path / "b" / "y.bin")) is None
    assert (tmp_path / "b" / "y.bin").read_bytes() == data
    up = storage.s3_uri("local/x.bin")
    assert storage.copy(str(local), up) == storage.head(up)["etag"]
    assert storage.read_bytes(up) == data
    assert storage.copy(up, str(tmp_path / "c" / "z.bin"), if_match=storage.head(up)["etag"]) is None
    assert (tmp_path / "c" / "z.bin").read_bytes() == data
    with pytest.raises(storage.PreconditionFailed):
        storage.copy(up, str(tmp_path / "d.bin"), if_match='"0123"')
    assert not list(tmp_path.glob("*d.bin*"))  # neither the file nor a temp file
    with pytest.raises(ValueError, match="s3:// source"):
        storage.copy(str(local), up, if_match='"0123"')
    with pytest.raises(FileNotFoundError):
        storage.copy(str(tmp_path / "none.bin"), up)


@pytest.mark.parametrize("where", ["s3", "local"])
def test_parquet_scan_reads_each_byte_once_and_a_window_at_a_time(bucket, tmp_path,
                                                                   monkeypatch, where):
    # 300 row groups of 20 columns: a footer over 64 KiB, longer than the first tail read
    n, width, default_read = 300, 20, storage.SCAN_READ_BYTES
    rng = np.random.default_rng(0)
    table = pa.table({f"c{j:02d}": rng.random(n * 10) for j in range(width)})
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=10, write_page_checksum=True)
    data = buf.getvalue()
    uri = storage.s3_uri("scan/t.parquet") if where == "s3" else str(tmp_path / "t.parquet")
    storage.write_bytes(uri, data)

    def scan(read_bytes: int, columns=None):
        monkeypatch.setattr(storage, "SCAN_READ_BYTES", read_bytes)
        with storage.ParquetScan(uri) as s:
            assert s.footer_bytes > storage.SCAN_TAIL_BYTES and s.size == len(data)
            assert s.metadata.num_row_groups == n
            groups = list(s.row_groups(columns=columns))
            assert s.finish() == hashlib.sha256(data).hexdigest()
        assert pa.concat_tables(groups).equals(table.select(columns or table.column_names))
        assert s.bytes_read == len(data)  # each byte fetched once: footer, groups, the rest
        assert s.etag == (storage.head(uri)["etag"] if where == "s3" else None)
        return s.requests

    footer = pq.ParquetFile(io.BytesIO(data)).metadata.serialized_size + 8
    data_bytes = len(data) - footer
    # the tail, the rest of the footer, then the row groups in reads of the given size
    assert scan(0) == 2 + n  # one read per row group
    assert scan(data_bytes // 4 + 1, columns=["c03"]) == 2 + 4
    assert scan(default_read) == 3  # 8 MiB: all the row groups in one read


def test_parquet_scan_refuses_what_is_not_parquet_or_changed(bucket):
    uri = storage.s3_uri("scan/not.parquet")
    storage.write_bytes(uri, b"hello, world, not parquet")
    with pytest.raises(ValueError, match="not a Parquet file"):
        storage.ParquetScan(uri)
    with pytest.raises(FileNotFoundError):
        storage.ParquetScan(storage.s3_uri("scan/none.parquet"))
    good = storage.s3_uri("scan/good.parquet")
    frame = pd.DataFrame({"a": np.random.default_rng(0).random(50_000)})  # ~400 KB
    storage.write_parquet(frame, good, row_group_size=5000)
    with storage.ParquetScan(good) as scan:  # another version lands while it reads
        storage.write_parquet(frame.iloc[::-1], good, row_group_size=5000)
        with pytest.raises(storage.PreconditionFailed):
            list(scan.row_groups())
    with pytest.raises(storage.PreconditionFailed):
        storage.ParquetScan(good, if_match='"0123"')


def test_scored_rows_that_differ_from_the_parts_are_refused(bucket):
    scored = stage(DS, run_key="r", model_version="mf-20260310-aaaaaaaa")
    with pytest.raises(publish.ContractError, match="shards reported 301 rows, parts hold 300"):
        publish.run(dataclasses.replace(scored, rows=301), params=params())
    assert objects(DS) == []
