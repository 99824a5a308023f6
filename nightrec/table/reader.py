"""Read the published recommendations, the way downstream services should.

```python
reader = RecommendationReader()
reader.for_user("196")            # one user's rows from the latest table, by rank (pyarrow.Table)
reader.table(ds="2026-11-28")     # a whole given day's table (pyarrow.Table; .to_pandas())
for batch in reader.iter_batches():  # the whole latest table, one part (RecordBatch) at a time
    ...
table = reader.open()             # one table pinned: lookups and iteration see the same version
table.for_user("196"); table.stats
```

Results are Arrow: this package needs only the standard library, pyarrow and boto3
(``pip install ./reader``), so a reader-only install has no pandas; call ``.to_pandas()`` where
pandas is installed. Keys, formats and checks are the table contract's (contract.py); objects
are read with objects.py's client (``S3_ENDPOINT_URL``, ``NIGHTREC_BUCKET``, the AWS chain).

Everything goes through ``_latest.json`` and the manifest, so a reader only ever reads the parts
of one committed manifest: never a table still being written, never two tables mixed. Whole
parts are checked against the manifest's sha256. A single-user lookup reads only what it needs:
the manifest's per-part ``min_user_id``/``max_user_id`` pick the one part, the part's Parquet
footer (one range request, then cached per part) gives each row group's ``user_id`` min/max, and
only the row groups that can hold the user are fetched, in one byte range conditional on the
part's ETag, with their Parquet page CRCs verified. Every read decodes on the calling thread: the
reader starts no Arrow thread, so a short script cannot abort at exit (:meth:`iter_parts`).

Parts are content-addressed and never rewritten. A newer publish of the same ds retires the
parts the new manifest does not list (``_retired.json``) and they are deleted
``publish.reader_grace_s`` seconds later, so a table opened from the old manifest keeps working
for at least that long. A read that finds a listed part gone (or changed) raises
``TableChanged``; ``table()`` and ``for_user()`` then start again from the pointer (a few times),
an iterator cannot (it has already handed out rows), so it raises.
"""

from __future__ import annotations

import bisect
import hashlib
import io
import threading
from collections import OrderedDict
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from nightrec.table import contract, objects

RETRIES = 3
FOOTER_READ = 64 * 1024  # what pyarrow reads from a file's end to find its footer


class TableNotFound(LookupError):
    pass


class TableChanged(RuntimeError):
    """A part the manifest lists is gone or different: a newer publish replaced the table."""


class _Stats:
    """Requests and bytes fetched from the store, and row groups decoded (thread-safe)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests = self.bytes = self.row_groups = 0

    def add(self, *, requests: int = 0, nbytes: int = 0, row_groups: int = 0) -> None:
        with self._lock:
            self.requests += requests
            self.bytes += nbytes
            self.row_groups += row_groups

    def as_dict(self) -> dict:
        return {"requests": self.requests, "bytes": self.bytes, "row_groups": self.row_groups}


class _RangeFile(io.RawIOBase):
    """A read-only, seekable view of one S3 object that fetches only the byte ranges read.

    ``tail``: on the first read that falls in the last ``tail`` bytes, those are fetched in one
    request and kept (the Parquet footer). Every request is conditional on ``etag``.
    """

    def __init__(self, bucket: str, key: str, size: int, etag: str | None, stats: _Stats,
                 tail: int = 0):
        super().__init__()
        self.bucket, self.key, self.size, self.etag, self.stats = bucket, key, size, etag, stats
        self.tail_len = min(tail, size)
        self.held: list[tuple[int, bytes]] = []  # ranges fetched once and kept: (start, bytes)
        self.pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def _fetch(self, start: int, length: int) -> bytes:
        try:
            data = objects.get_range(self.bucket, self.key, start, length, if_match=self.etag)
        except objects.PreconditionFailed as e:
            raise TableChanged(f"{self.key} changed since its manifest was read") from e
        except Exception as e:
            if objects.is_missing(e):
                raise TableChanged(f"{self.key} is gone: a newer publish replaced it") from e
            raise
        self.stats.add(requests=1, nbytes=len(data))
        return data

    def read(self, n: int = -1) -> bytes:
        end = self.size if n is None or n < 0 else min(self.size, self.pos + n)
        if end <= self.pos:
            return b""
        tail_start = self.size - self.tail_len
        if self.tail_len and self.pos >= tail_start and not self._holding(self.pos, end):
            self.hold(tail_start, self.size)
        for start, data in self.held:
            if start <= self.pos and end <= start + len(data):
                out = data[self.pos - start : end - start]
                break
        else:
            out = self._fetch(self.pos, end - self.pos)
        self.pos += len(out)
        return out

    def _holding(self, start: int, end: int) -> bool:
        return any(s <= start and end <= s + len(d) for s, d in self.held)

    def hold(self, start: int, end: int) -> None:
        """Fetch bytes ``[start, end)`` in one request and serve every later read inside
        them from memory (a lookup's row groups, so that pyarrow's column-by-column reads cost
        one request without its read-ahead, which runs on Arrow's I/O threads)."""
        if not self._holding(start, end):
            self.held.append((start, self._fetch(start, end - start)))

    def readinto(self, buf) -> int:
        data = self.read(len(buf))
        buf[: len(data)] = data
        return len(data)


def _chunk_start(chunk) -> int:
    """Where a column chunk starts: its dictionary page when it has one, as Arrow computes
    it (a writer that records a dictionary offset of 0, or one past the data page, is not
    trusted)."""
    start = chunk.data_page_offset
    dictionary = chunk.dictionary_page_offset if chunk.has_dictionary_page else None
    return dictionary if dictionary and 0 < dictionary < start else start


class _Footer:
    """One part's Parquet metadata and its row groups' user_id min/max."""

    def __init__(self, metadata):
        self.metadata = metadata
        col = metadata.schema.names.index(contract.USER_ID)
        self.ranges, self.spans = [], []
        for i in range(metadata.num_row_groups):
            group = metadata.row_group(i)
            st = group.column(col).statistics
            ok = st is not None and st.has_min_max
            self.ranges.append((st.min, st.max) if ok else None)
            chunks = [group.column(c) for c in range(group.num_columns)]
            starts = [_chunk_start(c) for c in chunks]
            self.spans.append((min(starts), max(s + c.total_compressed_size
                                                for s, c in zip(starts, chunks, strict=True))))

    def row_groups_for(self, user_id: str) -> list[int]:
        return [i for i, r in enumerate(self.ranges) if r is None or r[0] <= user_id <= r[1]]

    def span(self, groups: list[int]) -> tuple[int, int]:
        """The bytes ``[start, end)`` that hold the column chunks of ``groups``: one range,
        so groups that are not adjacent (only when a part has no ``user_id`` statistics) bring
        the groups between them too. A read outside it is still served (one more request)."""
        return min(self.spans[g][0] for g in groups), max(self.spans[g][1] for g in groups)


class FooterCache:
    """Parquet footers by part key (parts never change content, so entries never go stale)."""

    def __init__(self, max_parts: int = 512):
        self.max_parts = max_parts
        self._items: OrderedDict[str, _Footer] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> _Footer | None:
        with self._lock:
            found = self._items.get(key)
            if found is not None:
                self._items.move_to_end(key)
            return found

    def put(self, key: str, footer: _Footer) -> None:
        with self._lock:
            self._items[key] = footer
            self._items.move_to_end(key)
            while len(self._items) > self.max_parts:
                self._items.popitem(last=False)


class PublishedTable:
    """One committed table (one manifest): point lookups, iteration, the whole table, as Arrow.

    Thread-safe; ``stats`` counts what it fetched (requests, bytes, row groups decoded).
    ``manifest``: a manifest as :func:`contract.parse_manifest` returns it.
    """

    def __init__(self, manifest: dict, *, bucket: str, footers: FooterCache | None = None):
        self.manifest = manifest
        self.bucket = bucket
        self.footers = footers or FooterCache()
        self.stats = _Stats()
        self.parts = manifest["parts"]
        ranged = all(p.get("max_user_id") is not None or not p["rows"] for p in self.parts)
        # format 1 manifests have no per-part user range: every part may hold any user
        self._maxes = [p.get("max_user_id") or "" for p in self.parts] if ranged else None

    @property
    def ds(self) -> str:
        return self.manifest["ds"]

    @property
    def publish_id(self) -> str | None:
        return self.manifest.get("publish_id")

    @property
    def model_version(self) -> str:
        return self.manifest["model_version"]

    def parts_for(self, user_id: str) -> list[dict]:
        """The parts whose user range holds ``user_id`` (at most one in a format-2 table)."""
        if self._maxes is None:
            return list(self.parts)
        i = bisect.bisect_left(self._maxes, user_id)
        return [p for p in self.parts[i : i + 1]
                if p["rows"] and p["min_user_id"] <= user_id <= p["max_user_id"]]

    def _footer(self, part: dict, f: _RangeFile) -> _Footer:
        key = f"{self.bucket}/{part['key']}:{part.get('etag')}"
        found = self.footers.get(key)
        if found is None:
            found = _Footer(pq.ParquetFile(f).metadata)
            self.footers.put(key, found)
        return found

    def _range_file(self, part: dict) -> _RangeFile:
        # pyarrow reads the last 64 KiB first, then the rest of a longer footer: one request
        tail = max(int(part.get("footer_bytes") or 0), FOOTER_READ)
        return _RangeFile(self.bucket, part["key"], int(part["bytes"]), part.get("etag"),
                          self.stats, tail)

    def warm(self, max_parts: int | None = None) -> int:
        """Fetch the footers of the first ``max_parts`` parts (default: as many as the cache
        holds), so that no lookup pays for them; returns how many were fetched."""
        todo = [p for p in self.parts if p["rows"]][: max_parts or self.footers.max_parts]
        for part in todo:
            self._footer(part, self._range_file(part))
        return len(todo)

    def lookup(self, user_id: str) -> pa.Table:
        """One user's rows as an Arrow table (sorted by rank; empty when the user has none)."""
        user_id = str(user_id)
        found = []
        for part in self.parts_for(user_id):
            f = self._range_file(part)
            footer = self._footer(part, f)
            groups = footer.row_groups_for(user_id)
            if not groups:
                continue
            f.hold(*footer.span(groups))
            pf = pq.ParquetFile(f, metadata=footer.metadata, page_checksum_verification=True,
                                pre_buffer=False)
            t = pf.read_row_groups(groups, use_threads=False)
            self.stats.add(row_groups=len(groups))
            found.append(t.filter(pc.equal(t[contract.USER_ID], user_id)))
        if not found:
            return contract.arrow_schema().empty_table()
        out = pa.concat_tables(found)
        return out.sort_by(contract.RANK) if len(found) > 1 else out

    for_user = lookup

    def _part_bytes(self, part: dict) -> bytes:
        try:
            data = objects.get(self.bucket, part["key"])
        except Exception as e:
            if objects.is_missing(e):
                raise TableChanged(f"{part['key']} is gone: a newer publish replaced it") from e
            raise
        self.stats.add(requests=1, nbytes=len(data))
        if hashlib.sha256(data).hexdigest() != part["sha256"]:
            raise OSError(f"{part['key']}: checksum differs from the manifest")
        return data

    def iter_parts(self) -> Iterator[pa.Table]:
        """The whole table, one part (at most ``publish.rows_per_part`` rows) at a time, each
        checked against the manifest's sha256.

        Each part is decoded on the calling thread (``pq.ParquetFile(pa.BufferReader(...))
        .read(use_threads=False)``), as :meth:`lookup` reads its row groups: the reader starts
        no Arrow thread, so a short script that reads and exits cannot abort at exit (Arrow's
        pool threads can still be joinable then: SIGABRT, "terminate called without an active
        exception", apache/arrow#39862); benchmarks/RESULTS.md, "Parquet reads and the exit
        abort"."""
        for part in self.parts:
            yield pq.ParquetFile(pa.BufferReader(self._part_bytes(part))).read(use_threads=False)

    def iter_batches(self) -> Iterator[pa.RecordBatch]:
        """:meth:`iter_parts`, each part as one RecordBatch (empty parts skipped)."""
        for t in self.iter_parts():
            if t.num_rows:
                yield t.combine_chunks().to_batches()[0]

    def read(self) -> pa.Table:
        """The whole table in memory, every part checksum-verified."""
        tables = list(self.iter_parts())
        if not tables:
            return contract.arrow_schema().empty_table()
        return pa.concat_tables(tables)

    def popular(self, k: int) -> list[dict]:
        """The manifest's most popular items (for unknown users), at most ``k``."""
        return list(self.manifest.get("popular") or [])[:k]


class RecommendationReader:
    """The published tables of one bucket (default ``NIGHTREC_BUCKET``), read through the latest
    pointer or a ds's manifest. Every method that returns rows returns Arrow."""

    def __init__(self, bucket: str | None = None, *, footer_cache_parts: int = 512):
        self.bucket = bucket or objects.bucket()
        self.footers = FooterCache(footer_cache_parts)

    def latest(self) -> dict:
        """The latest pointer: ``{"ds", "manifest", "publish_id", "model_version", ...}``."""
        found = objects.get_versioned(self.bucket, contract.latest_key())
        if found is None:
            raise TableNotFound(f"nothing has been published yet (no {contract.latest_key()})")
        return contract.parse_pointer(found[0])

    def latest_ds(self) -> str:
        return self.latest()["ds"]

    def version(self, ds: str | None = None) -> str | None:
        """A cheap token that changes whenever what ``open(ds)`` would return changes: the ETag
        of the latest pointer (or of ds's manifest). None when there is nothing yet."""
        key = contract.manifest_key(ds) if ds else contract.latest_key()
        found = objects.head(self.bucket, key)
        return found["etag"] if found else None

    def manifest(self, ds: str | None = None) -> dict:
        """ds's manifest (default: the one the latest pointer names), checked
        (``contract.parse_manifest``; ContractViolation when it breaks the contract)."""
        ds = contract.check_ds(ds) if ds else self.latest_ds()
        found = objects.get_versioned(self.bucket, contract.manifest_key(ds))
        if found is None:
            raise TableNotFound(f"no published table for ds={ds}")
        return contract.parse_manifest(found[0], ds=ds)

    def open(self, ds: str | None = None) -> PublishedTable:
        """The table of ``ds`` (default: the latest), pinned to its current manifest."""
        return PublishedTable(self.manifest(ds), bucket=self.bucket, footers=self.footers)

    def _retrying(self, ds: str | None, fn):
        for attempt in range(RETRIES):
            try:
                return fn(self.open(ds))
            except TableChanged:
                if attempt == RETRIES - 1:
                    raise
        raise AssertionError("unreachable")

    def table(self, ds: str | None = None) -> pa.Table:
        """The whole table of ``ds`` (default latest) in memory, every part checksum-verified."""
        return self._retrying(ds, PublishedTable.read)

    def iter_batches(self, ds: str | None = None) -> Iterator[pa.RecordBatch]:
        """The whole table, one part (one RecordBatch) at a time, bounded memory; TableChanged
        if it is replaced mid-way (start again)."""
        return self.open(ds).iter_batches()

    def for_user(self, user_id: str, ds: str | None = None) -> pa.Table:
        """One user's rows, by rank (empty when the user has none)."""
        return self._retrying(ds, lambda t: t.lookup(user_id))
