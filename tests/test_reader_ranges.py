"""The reader's point lookup at the byte level: which ranges it fetches from a part, and that
it returns the right rows, against an in-memory object store (a narrow unit test: the same
lookups against the real SeaweedFS are in tests/test_publish.py)."""

from __future__ import annotations

import hashlib
import io
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from nightrec.table import contract, objects, reader


def _part(users: list[str], k: int, row_group_size: int, pad: int = 0) -> bytes:
    rows = [(u, r) for u in users for r in range(1, k + 1)]
    cols = {"user_id": [u for u, _ in rows], "rank": [r for _, r in rows],
            "item_id": [f"i{(hash(u) + r) % 997:04d}{'x' * pad}" for u, r in rows],
            "score": [1.0 / r for _, r in rows], "model_version": ["m"] * len(rows),
            "ds": ["2026-01-01"] * len(rows)}
    table = pa.table(cols).cast(contract.arrow_schema())
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=row_group_size, write_page_checksum=True)
    return buf.getvalue()


@pytest.fixture
def store(monkeypatch):
    """``{key: bytes}`` served by objects.get_range; ``store.calls`` lists each (start, length)."""
    data, calls = {}, []

    def get_range(bucket, key, start, length, *, if_match=None):
        calls.append((start, length))
        return data[key][start : start + length]

    monkeypatch.setattr(objects, "get_range", get_range)
    return SimpleNamespace(data=data, calls=calls)


def _table(store, body: bytes) -> reader.PublishedTable:
    store.data["p.parquet"] = body
    meta = pq.ParquetFile(io.BytesIO(body)).metadata
    users = pq.read_table(io.BytesIO(body), columns=["user_id"])["user_id"]
    part = {"key": "p.parquet", "bytes": len(body), "etag": "e", "rows": meta.num_rows,
            "footer_bytes": int.from_bytes(body[-8:-4], "little") + 8,  # as publish records
            "row_groups": meta.num_row_groups, "sha256": hashlib.sha256(body).hexdigest(),
            "min_user_id": pc.min(users).as_py(), "max_user_id": pc.max(users).as_py()}
    return reader.PublishedTable({"ds": "2026-01-01", "parts": [part]}, bucket="b")


def _expected(body: bytes, user: str) -> pa.Table:
    t = pq.ParquetFile(io.BytesIO(body)).read()
    return t.filter(pc.equal(t["user_id"], user))


def test_a_user_across_two_row_groups_costs_one_range(store):
    # (that no read starts a thread is checked in a fresh process: tests/test_reader_install.py)
    # 6 rows per user, 4 rows per group: u001's rows sit in groups 1 and 2; padded so that the
    # part's data is far larger than its footer read
    body = _part([f"u{i:03d}" for i in range(400)], k=6, row_group_size=4, pad=200)
    tail = max(int.from_bytes(body[-8:-4], "little") + 8, reader.FOOTER_READ)
    assert len(body) - tail > 4 * reader.FOOTER_READ  # the groups read lie outside the tail
    table = _table(store, body)
    got = table.for_user("u001")
    assert got.equals(_expected(body, "u001")) and got.num_rows == 6
    footer, span = store.calls
    assert footer == (len(body) - tail, tail)
    meta = pq.ParquetFile(io.BytesIO(body)).metadata
    groups = [meta.row_group(g) for g in (1, 2)]
    needed = sum(g.column(c).total_compressed_size for g in groups for c in range(g.num_columns))
    assert span[1] == needed  # exactly the two groups' column chunks, adjacent
    assert table.for_user("u399").equals(_expected(body, "u399"))  # the last group
    assert len(store.calls) == 3  # footer cached: one range more


def test_a_small_part_is_read_from_its_tail_alone(store):
    body = _part(["a", "b", "c"], k=3, row_group_size=3)
    table = _table(store, body)
    assert table.for_user("b").equals(_expected(body, "b"))
    assert store.calls == [(0, len(body))]  # the whole object, once, as the footer read


def test_a_read_outside_what_is_held_is_still_served():
    f = reader._RangeFile("b", "k", 100, None, reader._Stats())
    body = bytes(range(100))
    f._fetch = lambda start, length: body[start : start + length]
    f.hold(10, 20)
    f.seek(15)
    assert f.read(5) == body[15:20]  # inside the held range
    assert f.read(5) == body[20:25]  # past its end: fetched
    f.seek(5)
    assert f.read(10) == body[5:15]  # straddles its start: fetched


@pytest.mark.parametrize("dictionary, has, expected", [
    (4, True, 4),        # a dictionary page before the data: the chunk starts there
    (0, True, 100),      # a writer's offset 0 is not a dictionary page's place
    (None, False, 100),  # no dictionary page
    (150, True, 100),    # past the data page: not trusted
])
def test_a_chunk_starts_where_arrow_says(dictionary, has, expected):
    chunk = SimpleNamespace(data_page_offset=100, dictionary_page_offset=dictionary,
                            has_dictionary_page=has)
    assert reader._chunk_start(chunk) == expected
