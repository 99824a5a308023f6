"""Step 8, score: every user against every item, seen items excluded, top-K, as Parquet parts.

Scores with a model dict: the run's own ``full`` refit, a registered model (re-score, a pinned
``model_version``, the champion when the gate refused), or :func:`popularity_model` (the
popularity fallback). Embeddings are read with numpy only (no deep-learning import).

**Seen set.** ``seen_uri`` is ds's seen table (tasks/seen.py: every interaction up to ds with
valid ids, including rows clean quarantined for their value or by policy), mapped by external id
onto the model's items. Nothing in it is ever recommended to its user; its items the model does
not know cannot be recommended by that model anyway.

**Users.** The users scored are the model's users plus every user of the seen table, so a
re-score with a model fitted on an older ds covers today's new users too:

- a user the model knows keeps the model's vector (a factor model's user vector is not refitted,
  even if the user's seen set grew since; an item-item model's user vector is the user's seen
  row, so it always uses the whole seen set);
- a factor model's new user is *folded in*: the ridge solution of :func:`nightrec.ml.models.fold_in`
  (``score.fold_in_l2``) over their seen items the model knows;
- an item-item model's new user is scored from their seen row, as every user is;
- a user none of whose seen items the model knows (and, for a factor model, unknown to it) gets
  the most popular of the model's items by count in the seen table, seen items excluded (their
  ``score`` is that count).

Every scored user gets a list of ``min(top_k, unseen items)`` items.

Sharded over users, for Airflow's dynamic task mapping (one mapped task per shard):

- ``plan`` computes the sorted union of the model's and the seen table's user ids, splits it into
  ``score.shards`` contiguous ranges and returns one small spec per shard: positions ``[lo, hi)``
  and the range's first and last ``user_id``, never id lists (it also empties the run's staging
  folder). It reads the ``user_id`` columns only, one row group at a time (:func:`distinct_ids`):
  memory is the distinct ids, not the pairs;
- ``run_shard`` reads only its range, checks it holds the ``hi - lo`` users the plan counted, and
  scores them into its own folder
  ``staging/recommendations/ds=<ds>/<run_key>/shard-NNNNN/part-NNNNN.parquet``, which it empties
  first: a retried shard rewrites only its own parts, under the same keys, and nothing else;
- ``collect`` checks that every shard of the plan reported, and lists all parts in shard order.

**What a shard reads** (:class:`ObjectFile`: ranged GETs of the byte ranges read, all of one
object version), so its memory is flat in the total number of users:

- of the seen table, the row groups whose ``user_id`` statistics overlap its range (the table is
  sorted by ``user_id``), then exactly its rows: :func:`read_seen`;
- of the model's ``users.parquet``, the row groups that can hold its range (all of them when
  the file is not in id order; clean's indices put it in id order), one at a time, keeping only
  its users: :func:`model_users_in_range`;
- of ``embeddings.npz`` (``np.savez``: members stored uncompressed), the item members whole and,
  of ``user``, only its known users' rows, located from the zip directory and the ``.npy``
  header and fetched as coalesced ranges: :func:`read_embeddings`. (Reading ``user`` whole was
  ``n_users x d x 4`` bytes a shard: 512 MB at 2M users and d = 64);
- for cold users, the seen table's item counts (tasks/seen.py :func:`seen.item_counts`), not a
  pass over its item column.

``run_shard`` returns what it read (requests, bytes, row groups, rows) under ``reads``.

Contiguous ``user_id`` ranges rather than a user hash: the published table is sorted by
``user_id``, so the shards' parts concatenate into it as they are, and each part covers one
``user_id`` range that a point lookup can find from the manifest alone. The cost per user is the
same for every user (all items are scored), so equal ranges balance as well as a hash would.

Each part holds whole users, rows sorted by ``(user_id, rank)``, with row groups of about
``publish.row_group_size`` rows cut at user boundaries (a user's rows are in one row group, so a
point lookup reads one), zstd, column statistics and page CRCs on. Only publish makes parts
visible to readers.
"""

from __future__ import annotations

import io
import itertools
import logging
import os
import struct
import zipfile
from collections.abc import Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from scipy import sparse

from nightrec.core import schema, settings
from nightrec.core.records import Evaluated, ModelChoice, RescorePlan, Scored, Seen
from nightrec.ml import models, ranking
from nightrec.store import layout, storage
from nightrec.tasks.publish import arrow_schema

PARAMS = ["score.top_k", "score.user_chunk", "score.shards", "score.fold_in_l2",
          "publish.rows_per_part", "publish.row_group_size"]
# Read granularity of ObjectFile and read_embeddings: layout of requests, not tunables.
TAIL_BYTES = 64 * 1024  # read first from an object's end: a Parquet footer or a zip's directory
HEADER_BYTES = 4096  # read at a zip member's start: its local header and the .npy header
# wanted rows of an .npy member closer than this are read through in one request: a request's
# latency (~10 ms on S3) buys about this many bytes
GAP_BYTES = 1024**2
READ_BYTES = 16 * 1024**2  # the most one request of a member fetches (and holds at a time)
POPULARITY_SOURCE = "popularity_fallback"
log = logging.getLogger(__name__)
COLUMNS = [schema.USER_ID, schema.RANK, schema.ITEM_ID, schema.SCORE, schema.MODEL_VERSION,
           schema.DS]


def recommendations_frame(
    users: np.ndarray, items: np.ndarray, scores: np.ndarray, *, user_ids: np.ndarray,
    item_ids: np.ndarray, model_version: str, ds: str,
) -> pd.DataFrame:
    """Long table from (n, K) top-K arrays; empty slots (item -1) are dropped."""
    k = items.shape[1]
    valid = items.reshape(-1) >= 0
    rank = np.tile(np.arange(1, k + 1, dtype=np.int32), len(users))[valid]
    return pd.DataFrame(
        {
            schema.USER_ID: np.repeat(user_ids[users], k)[valid],
            schema.RANK: rank,
            schema.ITEM_ID: item_ids[items.reshape(-1)[valid]],
            schema.SCORE: scores.reshape(-1)[valid].astype(np.float32),
            schema.MODEL_VERSION: model_version,
            schema.DS: ds,
        }
    )


def ids_by_index(uri: str, idx_col: str, id_col: str) -> np.ndarray:
    """External ids in index order (position i holds the id of index i)."""
    table = storage.read_parquet(uri, columns=[idx_col, id_col]).sort_values(idx_col)
    if not np.array_equal(table[idx_col].to_numpy(), np.arange(len(table))):
        raise ValueError(f"{uri}: {idx_col} is not 0..n-1")
    return table[id_col].to_numpy(dtype=str)


class ObjectFile(io.RawIOBase):
    """A read-only, seekable file over one object (``s3://`` or a local path) that fetches only
    the byte ranges read: for pyarrow's ``ParquetFile`` (footer, then the column chunks of the
    row groups asked for) and ``zipfile``.

    The last :data:`TAIL_BYTES` come in one request on the first read there and are kept (a
    Parquet footer, a zip directory). Every S3 request is conditional on the ETag of the HEAD
    that opened the file, so all bytes are of one version (a change raises PreconditionFailed).
    ``requests`` and ``bytes_read`` count what was fetched. Use as a context manager.
    """

    def __init__(self, uri: str):
        super().__init__()
        self.uri, self.pos, self.requests, self.bytes_read = uri, 0, 0, 0
        self._local = None
        if storage.is_s3(uri):
            found = storage.head(uri)
            if found is None:
                raise FileNotFoundError(f"no object {uri}")
            self.etag, self.size = found["etag"], int(found["bytes"])
        else:
            self._local = open(uri, "rb")  # noqa: SIM115 - closed by close()
            self.etag, self.size = None, os.fstat(self._local.fileno()).st_size
        self._tail_start, self._tail = max(0, self.size - TAIL_BYTES), None

    def close(self) -> None:
        if self._local is not None:
            self._local.close()
            self._local = None
        super().close()

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

    def _fetch(self, start: int, end: int) -> bytes:
        if end <= start:
            return b""
        if self._local is not None:
            self._local.seek(start)
            data = self._local.read(end - start)
        else:
            data = storage.read_range(self.uri, start, end - start, if_match=self.etag)
        if len(data) != end - start:
            raise OSError(f"{self.uri}: read {len(data)} bytes at {start}, not {end - start}")
        self.requests += 1
        self.bytes_read += len(data)
        return data

    def read(self, n: int = -1) -> bytes:
        end = self.size if n is None or n < 0 else min(self.size, self.pos + n)
        if end <= self.pos:
            return b""
        if end > self._tail_start and self._tail is None:
            self._tail = self._fetch(self._tail_start, self.size)
        if end > self._tail_start:
            out = (self._fetch(self.pos, self._tail_start)
                   + self._tail[max(0, self.pos - self._tail_start) : end - self._tail_start])
        else:
            out = self._fetch(self.pos, end)
        self.pos += len(out)
        return out

    def readinto(self, buf) -> int:
        data = self.read(len(buf))
        buf[: len(data)] = data
        return len(data)


def _tally(reads: dict | None, f: ObjectFile, **counts: int) -> None:
    """Add ``f``'s requests and bytes, and ``counts``, into ``reads`` (when given)."""
    if reads is not None:
        for key, n in {"requests": f.requests, "bytes": f.bytes_read, **counts}.items():
            reads[key] = reads.get(key, 0) + int(n)


def _row_groups_in(metadata, column: str, first: str, last: str) -> list[int]:
    """The row groups whose ``column`` statistics overlap ``[first, last]`` (a group without
    statistics always does)."""
    j = metadata.schema.names.index(column)
    out = []
    for i in range(metadata.num_row_groups):
        st = metadata.row_group(i).column(j).statistics
        if st is None or not st.has_min_max or (st.min <= last and st.max >= first):
            out.append(i)
    return out


def _in_range(ids, first: str, last: str) -> pa.Array:
    return pc.and_(pc.greater_equal(ids, pa.scalar(first, pa.string())),
                   pc.less_equal(ids, pa.scalar(last, pa.string())))


def read_seen(uri: str, columns: list[str], *, first: str | None = None,
              last: str | None = None, reads: dict | None = None) -> pa.Table:
    """Columns of a seen table (as strings), only users in ``[first, last]`` (inclusive) when
    given. The table is sorted by user_id (tasks/seen.py), so only the row groups whose
    statistics overlap the range are fetched (ranged reads of their column chunks), then cut to
    the range exactly. ``reads``: counts of requests, bytes, row groups and rows fetched."""
    read = list(columns) if first is None or schema.USER_ID in columns else [*columns,
                                                                             schema.USER_ID]
    with ObjectFile(uri) as f:
        pf = pq.ParquetFile(f, pre_buffer=True)
        groups = (list(range(pf.metadata.num_row_groups)) if first is None
                  else _row_groups_in(pf.metadata, schema.USER_ID, first, last))
        table = (pf.read_row_groups(groups, columns=read) if groups
                 else pf.schema_arrow.empty_table().select(read))
        _tally(reads, f, row_groups=len(groups), rows=table.num_rows)
    table = table.cast(pa.schema([(c, pa.string() if c in (schema.USER_ID, schema.ITEM_ID)
                                   else table.schema.field(c).type) for c in read]))
    if first is not None:
        table = table.filter(_in_range(table.column(schema.USER_ID), first, last))
    return table.select(columns)


def distinct_ids(uri: str, column: str, *, reads: dict | None = None) -> pa.Array:
    """The distinct values of one string column of a Parquet object, sorted: read one row
    group (and only that column's chunks) at a time, so memory is one row group plus the
    distinct values, whatever the number of rows."""
    parts = []
    with ObjectFile(uri) as f:
        pf = pq.ParquetFile(f)
        for i in range(pf.metadata.num_row_groups):
            parts.append(pc.unique(pf.read_row_group(i, columns=[column]).column(column)
                                   .cast(pa.string())))
        _tally(reads, f, row_groups=pf.metadata.num_row_groups)
    return sorted_union(*parts)


def model_users_in_range(uri: str, first: str, last: str, *,
                         reads: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The users of a model's ``users.parquet`` with ids in ``[first, last]``: their ids
    (object array, sorted) and ``user_idx`` (int64, the rows of the model's ``user``).

    Reads the row groups whose ``user_id`` statistics overlap the range, one at a time, keeping
    only the users in it: memory is one row group plus the range's users. Raises if an index is
    outside ``0 .. rows - 1`` or an id repeats.
    """
    ids, idx = [], []
    with ObjectFile(uri) as f:
        pf = pq.ParquetFile(f)
        n_rows = pf.metadata.num_rows
        groups = _row_groups_in(pf.metadata, schema.USER_ID, first, last)
        for i in groups:
            t = pf.read_row_group(i, columns=[schema.USER_IDX, schema.USER_ID])
            u = t.column(schema.USER_ID).cast(pa.string())
            keep = _in_range(u, first, last)
            ids.append(pc.filter(u, keep))
            idx.append(pc.filter(t.column(schema.USER_IDX), keep).cast(pa.int64()))
        _tally(reads, f, row_groups=len(groups))
    ids_a = pa.chunked_array(ids, pa.string())
    idx_a = pa.chunked_array(idx, pa.int64())
    order = pc.sort_indices(ids_a)
    out_ids = pc.take(ids_a, order).to_numpy(zero_copy_only=False).astype(object)
    out_idx = pc.take(idx_a, order).to_numpy().astype(np.int64)
    if len(out_idx) and (out_idx.min() < 0 or out_idx.max() >= n_rows):
        raise ValueError(f"{uri}: {schema.USER_IDX} outside 0..{n_rows - 1}")
    if len(out_ids) > 1 and (out_ids[1:] == out_ids[:-1]).any():
        raise ValueError(f"{uri}: a {schema.USER_ID} repeats")
    return out_ids, out_idx


def read_embeddings(uri: str, *, user_rows: np.ndarray | None = None,
                    reads: dict | None = None, only: tuple[str, ...] | None = None
                    ) -> dict[str, np.ndarray]:
    """The arrays of an ``embeddings.npz`` (only the members named in ``only`` when given); of
    ``user``, only rows ``user_rows`` (int, in that order) when given.

    ``np.savez`` stores each ``.npy`` member uncompressed, so a member's data sits at a known
    offset: the zip directory (the object's tail) gives the member's local header, which with
    the ``.npy`` header gives the data's offset, shape and dtype. The wanted rows are fetched as
    ranges (rows closer than :data:`GAP_BYTES` in one range, at most :data:`READ_BYTES` a
    request, only the wanted rows kept): one range when they are contiguous, as a shard's are
    when the model's users are in id order. Other members are read whole. A compressed member
    (``np.savez_compressed``) is read whole through ``zipfile`` and then indexed.
    """
    out = {}
    with ObjectFile(uri) as f, zipfile.ZipFile(f) as zf:
        for info in zf.infolist():
            name = info.filename.removesuffix(".npy")
            if only is not None and name not in only:
                continue
            rows = user_rows if name == "user" else None
            if info.compress_type != zipfile.ZIP_STORED:
                arr = np.lib.format.read_array(zf.open(info), allow_pickle=False)
                out[name] = arr if rows is None else arr[np.asarray(rows, np.int64)]
                continue
            offset, shape, fortran, dtype = _npy_member(f, info)
            if rows is None or fortran or not shape:
                arr = _npy_whole(f, offset, shape, fortran, dtype)
                out[name] = arr if rows is None else arr[np.asarray(rows, np.int64)]
            else:
                out[name] = _npy_rows(f, offset, shape, dtype, np.asarray(rows, np.int64))
        _tally(reads, f)
    return out


def _npy_member(f: ObjectFile, info: zipfile.ZipInfo):
    """``(data offset, shape, fortran_order, dtype)`` of a stored ``.npy`` zip member."""
    f.seek(info.header_offset)
    head = f.read(HEADER_BYTES)
    if head[:4] != b"PK\x03\x04":
        raise ValueError(f"{f.uri}: no zip local header for {info.filename}")
    name_len, extra_len = struct.unpack("<HH", head[26:30])
    start = 30 + name_len + extra_len
    major = head[start + 6] if len(head) > start + 6 else 0
    size_len = 2 if major == 1 else 4
    header_end = start + 8 + size_len + int.from_bytes(head[start + 8 : start + 8 + size_len],
                                                       "little")
    if header_end > len(head):  # a long .npy header: read on
        head += f.read(header_end - len(head))
    buf = io.BytesIO(head[start:header_end])
    version = np.lib.format.read_magic(buf)
    read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                   else np.lib.format.read_array_header_2_0)
    shape, fortran, dtype = read_header(buf)
    if dtype.hasobject:
        raise ValueError(f"{f.uri}: {info.filename} holds Python objects")
    return info.header_offset + header_end, tuple(shape), bool(fortran), dtype


def _read_into(f: ObjectFile, start: int, out: memoryview) -> None:
    for pos in range(0, len(out), READ_BYTES):
        f.seek(start + pos)
        part = out[pos : pos + READ_BYTES]
        if f.readinto(part) != len(part):
            raise OSError(f"{f.uri}: short read at {start + pos}")


def _npy_whole(f: ObjectFile, offset: int, shape: tuple, fortran: bool,
               dtype: np.dtype) -> np.ndarray:
    flat = np.empty(int(np.prod(shape, dtype=np.int64)) * dtype.itemsize, np.uint8)
    _read_into(f, offset, memoryview(flat))
    return flat.view(dtype).reshape(shape, order="F" if fortran else "C")


def _npy_rows(f: ObjectFile, offset: int, shape: tuple, dtype: np.dtype,
              rows: np.ndarray) -> np.ndarray:
    """Rows ``rows`` of a C-order member, fetched as coalesced ranges of wanted rows."""
    if len(rows) and (rows.min() < 0 or rows.max() >= shape[0]):
        raise IndexError(f"{f.uri}: rows outside 0..{shape[0] - 1}")
    want = np.unique(rows)
    row_shape = shape[1:]
    row_bytes = dtype.itemsize * int(np.prod(row_shape, dtype=np.int64))
    got = np.empty((len(want), *row_shape), dtype)
    if len(want) and row_bytes:
        gaps = (np.diff(want) - 1) * row_bytes
        bounds = [0, *(np.flatnonzero(gaps > GAP_BYTES) + 1).tolist(), len(want)]
        per_read = max(1, READ_BYTES // row_bytes)
        for a, b in itertools.pairwise(bounds):
            r0, end = int(want[a]), int(want[b - 1]) + 1
            while r0 < end:
                r1 = min(end, r0 + per_read)
                block = np.empty((r1 - r0) * row_bytes, np.uint8)
                _read_into(f, offset + r0 * row_bytes, memoryview(block))
                block = block.view(dtype).reshape((r1 - r0, *row_shape))
                i0, i1 = np.searchsorted(want, [r0, r1])
                got[i0:i1] = block[want[i0:i1] - r0]
                r0 = int(want[i1]) if i1 < b else end
    return got[np.searchsorted(want, rows)]


def sorted_union(*id_arrays) -> pa.Array:
    """The distinct ids of all arrays, sorted (code point order: Python's, and Arrow's)."""
    chunks = []
    for a in id_arrays:
        if isinstance(a, pa.ChunkedArray):
            chunks.extend(a.chunks)
        elif isinstance(a, pa.Array):
            chunks.append(a)
        else:
            chunks.append(pa.array(np.asarray(a, dtype=object), pa.string()))
    ids = pa.chunked_array([c.cast(pa.string()) for c in chunks], pa.string())
    unique = pc.unique(ids)
    return pc.take(unique, pc.sort_indices(unique))


def _positions(values, ids) -> np.ndarray:
    """Each value's position in ``ids`` (-1 where absent), in Arrow: the seen pairs' ids never
    become Python strings (a 1M-user shard's ~50M pairs as str objects took ~8 GB at 100M)."""
    ids = ids if isinstance(ids, (pa.Array, pa.ChunkedArray)) else pa.array(
        np.asarray(ids, dtype=object), pa.string())
    if isinstance(values, pa.ChunkedArray) and values.num_chunks == 0:
        return np.array([], dtype=np.int64)
    at = pc.index_in(values.cast(pa.string()), value_set=ids.cast(pa.string()))
    return pc.fill_null(at, -1).to_numpy(zero_copy_only=False).astype(np.int64)


def seen_rows(seen: pa.Table, user_ids, item_ids: np.ndarray) -> sparse.csr_matrix:
    """CSR (len(user_ids) x len(item_ids)) of the seen pairs; items the model does not know drop
    out (it cannot recommend them); a user not in ``user_ids`` is an error."""
    u = _positions(seen.column(schema.USER_ID), user_ids)
    i = _positions(seen.column(schema.ITEM_ID), item_ids)
    if (u < 0).any():
        raise ValueError("seen pairs of users outside the shard")
    keep = i >= 0
    return ranking.seen_matrix(pd.DataFrame({"u": u[keep], "i": i[keep]}), n_users=len(user_ids),
                               n_items=len(item_ids), user_col="u", item_col="i")


def seen_ranks(seen: pa.Table, user_ids, item_ids: np.ndarray) -> sparse.csr_matrix:
    """The recency ranks (``models.pair_ranks``'s form) of the seen pairs over the model's
    items, from the table's ``recency_rank`` column (the seen step ranks each user's pairs:
    no sort here)."""
    from nightrec.tasks import seen as seen_step

    u = _positions(seen.column(schema.USER_ID), user_ids)
    i = _positions(seen.column(schema.ITEM_ID), item_ids)
    rank = seen.column(seen_step.RECENCY).to_numpy(zero_copy_only=False).astype(np.float32)
    keep = (i >= 0) & (u >= 0)
    m = sparse.csr_matrix((rank[keep], (u[keep], i[keep])), shape=(len(user_ids), len(item_ids)))
    m.sort_indices()
    return m


def has_recency(seen_uri: str) -> bool:
    """Whether a seen table carries the pairs' recency ranks (tables written before issue 16
    do not: a recency-weighted model then scores with 0/1 rows, as before)."""
    from nightrec.tasks import seen as seen_step

    with ObjectFile(seen_uri) as f:
        return seen_step.RECENCY in pq.ParquetFile(f).schema_arrow.names


def user_inputs(emb: dict, seen: sparse.csr_matrix, model_rows: np.ndarray, *,
                fold_in_l2: float, ranks: sparse.csr_matrix | None = None):
    """``(user_vecs, item_vecs, item_bias, cold, folded)`` for the users that are ``seen``'s rows.

    ``model_rows``: each user's index in the model, -1 for a user it does not know. ``cold``
    (bool per user): nothing to score the user with (no model vector and none of their seen items
    known to the model), so they get popular items; ``folded``: new users of a factor model whose
    vector :func:`nightrec.ml.models.fold_in` solved from their seen items.
    """
    has_seen = np.diff(seen.indptr) > 0
    if models.is_hybrid(emb):  # a blend of an item-item and a factor model: both inputs
        known = model_rows >= 0
        folded = ~known & has_seen
        factor = np.zeros((len(model_rows), emb["user"].shape[1]), np.float32)
        factor[known] = emb["user"][model_rows[known]]
        if folded.any():  # the factor part's new users, folded in as for a factor model
            # (on its unweighted item vectors, no prior), then weighted as the blend's users
            weight = float(np.asarray(emb.get("factor_weight", [1.0])).reshape(-1)[0])
            factor[folded] = weight * models.fold_in(
                emb["item"], np.zeros(emb["item"].shape[0], np.float32), seen[folded],
                l2=fold_in_l2)
        user_vecs, item_vecs, bias = models.hybrid_inputs(emb, seen, factor, ranks)
        return user_vecs, item_vecs, bias, ~has_seen & ~known, folded
    if models.is_item_item(emb):
        # the seen row (recency-weighted with ``ranks`` when the model asks) is the user
        # vector, for known and new users alike
        user_vecs, item_vecs, bias = models.scoring_inputs(emb, seen, ranks)
        return user_vecs, item_vecs, bias, ~has_seen, np.zeros(len(has_seen), bool)
    known = model_rows >= 0
    folded = ~known & has_seen
    user_vecs = np.zeros((len(model_rows), emb["user"].shape[1]), np.float32)
    user_vecs[known] = emb["user"][model_rows[known]]
    if folded.any():
        user_vecs[folded] = models.fold_in(emb["item"], emb["item_bias"], seen[folded],
                                           l2=fold_in_l2)
    return user_vecs, emb["item"], emb["item_bias"], ~known & ~has_seen, folded


def popular_bias(seen_uri: str, item_ids: np.ndarray) -> np.ndarray:
    """float32 per item of ``item_ids``: its rows in the seen table (one per user who
    interacted with it; 0 for an item it lacks), from the table's item counts
    (tasks/seen.py :func:`item_counts`). Exact up to 2^24 users an item."""
    from nightrec.tasks import seen as seen_step

    counts = seen_step.item_counts(seen_uri)
    pos = pd.Index(counts[schema.ITEM_ID]).get_indexer(np.asarray(item_ids, dtype=object))
    n = counts[seen_step.COUNT].to_numpy(np.float32)
    return np.where(pos >= 0, n[np.maximum(pos, 0)] if len(n) else 0, 0).astype(np.float32)


def score_users(
    user_vecs, item_vecs: np.ndarray, item_bias: np.ndarray, seen: sparse.csr_matrix,
    cold: np.ndarray, popular: np.ndarray | None, *, top_k: int, user_chunk: int,
    item_index: np.ndarray | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Yield ``(rows, items, scores)`` per ``user_chunk`` rows of ``seen``, in row order: warm rows
    ranked by the model, ``cold`` rows by ``popular`` (one count per item), seen items excluded
    for both, ties to the lower item index (nightrec/ml/ranking.py). ``item_index``: a head
    item-item model's items (``models.item_index``): its vectors cover those columns only, and
    its warm rows are ranked over them (mapped back to item indices)."""
    n = seen.shape[0]
    warm_seen = seen if item_index is None else seen[:, item_index]
    if cold.any() and popular is None:
        raise ValueError("cold users need popular item counts")
    no_vecs = np.zeros((n, 1), np.float32)
    no_items = np.zeros((seen.shape[1], 1), np.float32)
    # items packed once per shard, not once per chunk (iter_top_k runs per chunk and kind);
    # sparse user rows (an item-item model) take the sparse path, which packs nothing
    panels = None if sparse.issparse(user_vecs) else ranking.pack_items(item_vecs)
    kinds = ((user_vecs, item_vecs, item_bias, panels),
             (no_vecs, no_items, popular, ranking.pack_items(no_items)))
    for lo in range(0, n, max(1, user_chunk)):
        rows = np.arange(lo, min(n, lo + max(1, user_chunk)))
        items = np.empty((len(rows), top_k), np.int32)
        scores = np.empty((len(rows), top_k), np.float32)
        for warm, mask, (vecs, ivecs, bias, panels) in zip(
                (True, False), (~cold[rows], cold[rows]), kinds, strict=True):
            if mask.any():
                for batch, it, sc in ranking.iter_top_k(vecs, ivecs, bias,
                                                        warm_seen if warm else seen, rows[mask],
                                                        k=top_k, chunk=len(rows),
                                                        panels=panels):
                    if warm and item_index is not None:
                        it = np.where(it >= 0, item_index[np.maximum(it, 0)], -1)
                    items[batch - lo], scores[batch - lo] = it, sc
        yield rows, items, scores




def shard_ranges(n_users: int, *, shards: int) -> list[tuple[int, int]]:
    """Contiguous ``[lo, hi)`` ranges covering ``0..n_users``, sizes differing by at most one.

    ``shards``: int >= 1; fewer ranges when there are fewer users (never an empty shard, but
    always at least one range).
    """
    if not isinstance(shards, int) or shards < 1:
        raise ValueError(f"shards must be an int >= 1, got {shards!r}")
    n = max(1, min(shards, n_users))
    bounds = [i * n_users // n for i in range(n + 1)]
    return list(itertools.pairwise(bounds))


def row_group_bounds(user_ids: np.ndarray, *, row_group_size: int) -> list[tuple[int, int]]:
    """``[lo, hi)`` row ranges of about ``row_group_size`` rows, each cut where the user changes.

    ``user_ids`` must be grouped by user (sorted). No user is ever split over two row groups, so
    a group can exceed ``row_group_size`` by up to one user's rows.
    """
    n = len(user_ids)
    if n == 0:
        return []
    changes = np.flatnonzero(user_ids[1:] != user_ids[:-1]) + 1
    starts = np.concatenate([[0], changes, [n]])
    bounds, lo = [], 0
    while lo < n:
        j = int(np.searchsorted(starts, lo + max(1, row_group_size)))  # first start >= target
        hi = int(starts[min(j, len(starts) - 1)])
        bounds.append((lo, hi))
        lo = hi
    return bounds


def part_bytes(frame: pd.DataFrame, *, row_group_size: int) -> bytes:
    """One part as Parquet bytes: row groups cut at user boundaries, stats and page CRCs on."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(frame[COLUMNS], schema=arrow_schema(), preserve_index=False)
    buf = io.BytesIO()
    sorting = [pq.SortingColumn(0), pq.SortingColumn(1)]  # user_id, then rank
    with pq.ParquetWriter(buf, table.schema, compression="zstd", write_statistics=True,
                          write_page_checksum=True, sorting_columns=sorting) as writer:
        ids = frame[schema.USER_ID].to_numpy(dtype=str)
        for lo, hi in row_group_bounds(ids, row_group_size=row_group_size):
            writer.write_table(table.slice(lo, hi - lo), row_group_size=hi - lo)
    return buf.getvalue()


def _digest(*parts: str) -> str:
    return storage.sha256("|".join(parts).encode())


def scorable(user_ids):
    """``user_ids`` (numpy or Arrow) without the tombstones of users erased on request
    (``nightrec forget``): a model keeps their rows (zeroed) so its indices stay valid, but they
    get no list."""
    if len(user_ids) == 0:
        return user_ids
    if isinstance(user_ids, pa.Array | pa.ChunkedArray):
        return pc.filter(user_ids, pc.invert(pc.starts_with(user_ids, schema.FORGOTTEN_PREFIX)))
    return user_ids[~np.char.startswith(user_ids.astype(str), schema.FORGOTTEN_PREFIX)]


def plan(ds: str, model: dict, seen_uri: str, run_key: str, params: dict | None = None,
         top_k: int | None = None, shards: int | None = None) -> list[dict]:
    """One spec per shard (small dicts for XCom). Empties the run's staging folder first, so a
    re-planned run starts clean.

    The users are the sorted union of the model's users and the seen table's; each spec names
    its share as positions ``users: [lo, hi)`` in that order and the ``user_ids: [first, last]``
    it spans (None for the one empty shard when there are no users at all).
    """
    p = settings.step_params(PARAMS, params)
    k = int(top_k or p["score.top_k"])
    n_shards = int(shards or p["score.shards"])
    union = sorted_union(scorable(distinct_ids(model["users"], schema.USER_ID)),
                         distinct_ids(seen_uri, schema.USER_ID))
    storage.delete(storage.list_uris(layout.staging_prefix(ds, run_key)))
    ranges = shard_ranges(len(union), shards=n_shards)
    return [
        {"ds": settings.check_ds(ds), "run_key": run_key, "shard": i, "shards": len(ranges),
         "users": [lo, hi],
         "user_ids": [union[lo].as_py(), union[hi - 1].as_py()] if hi > lo else None,
         "model": model, "seen": seen_uri, "top_k": k}
        for i, (lo, hi) in enumerate(ranges)
    ]


def shard_users(spec: dict, model_user_ids: np.ndarray, *,
                reads: dict | None = None, recency: bool = False
                ) -> tuple[np.ndarray, pa.Table]:
    """The shard's users (sorted ids, object array) and its seen pairs; raises if the range does
    not hold the ``hi - lo`` users the plan counted (the model or the seen table changed).
    ``model_user_ids``: the model's user ids (those outside the range are ignored: pass
    :func:`model_users_in_range`'s); ``reads``: what :func:`read_seen` fetched."""
    lo, hi = spec["users"]
    if not spec.get("user_ids"):
        empty = pa.schema([(schema.USER_ID, pa.string()), (schema.ITEM_ID, pa.string())])
        return np.array([], dtype=object), empty.empty_table()
    first, last = spec["user_ids"]
    from nightrec.tasks import seen as seen_step

    seen = read_seen(spec["seen"], [schema.USER_ID, schema.ITEM_ID]
                     + ([seen_step.RECENCY] if recency else []), first=first, last=last,
                     reads=reads)
    in_range = scorable(model_user_ids[(model_user_ids >= first) & (model_user_ids <= last)])
    users = sorted_union(in_range, seen.column(schema.USER_ID)).to_numpy(zero_copy_only=False)
    if len(users) != hi - lo:
        raise RuntimeError(
            f"shard {spec['shard']}: user_ids {first!r}..{last!r} hold {len(users)} users, the "
            f"plan counted {hi - lo}: the model or the seen table changed since plan; re-plan")
    return users, seen


def run_shard(spec: dict, params: dict | None = None) -> dict:
    """Score one shard's users into its own staging folder; returns its parts, counts and what
    it read (``reads``: requests, bytes, row groups, rows per object; module docstring)."""
    p = settings.step_params(PARAMS, params)
    ds, model, shard = spec["ds"], spec["model"], int(spec["shard"])
    reads: dict[str, dict] = {"seen": {}, "model_users": {}, "embeddings": {}}
    item_ids = ids_by_index(model["items"], schema.ITEM_IDX, schema.ITEM_ID)
    in_model, in_model_rows = np.array([], dtype=object), np.array([], np.int64)
    if spec.get("user_ids"):
        in_model, in_model_rows = model_users_in_range(model["users"], *spec["user_ids"],
                                                       reads=reads["model_users"])
    # a recency-weighted item-item model ranks each user's seen items by time
    recency = (models.recency_half_life(read_embeddings(
        model["embeddings"], only=("recency_half_life",))) is not None
               and has_recency(spec["seen"]))
    users, seen_pairs = shard_users(spec, in_model, reads=reads["seen"], recency=recency)
    seen = seen_rows(seen_pairs, users, item_ids)
    ranks = seen_ranks(seen_pairs, users, item_ids) if recency and len(users) else None
    del seen_pairs
    at = pd.Index(in_model).get_indexer(users)
    known = at >= 0
    # emb["user"] holds only the known users' rows, in user order: model_rows index it
    emb = read_embeddings(model["embeddings"], user_rows=in_model_rows[at[known]],
                          reads=reads["embeddings"])
    model_rows = np.full(len(users), -1, np.int64)
    model_rows[known] = np.arange(int(known.sum()))
    user_vecs, item_vecs, bias, cold, folded = user_inputs(
        emb, seen, model_rows, fold_in_l2=float(p["score.fold_in_l2"]), ranks=ranks)
    ranks = None
    popular = popular_bias(spec["seen"], item_ids) if cold.any() else None
    prefix = layout.shard_prefix(ds, spec["run_key"], shard)
    storage.delete(storage.list_uris(prefix))  # a retried shard starts from its own empty folder
    parts, rows, buffer, buffered = [], 0, [], 0
    rows_per_part, rg_size = int(p["publish.rows_per_part"]), int(p["publish.row_group_size"])

    def flush() -> None:
        nonlocal buffer, buffered, rows
        if not buffer:
            return
        frame = pd.concat(buffer, ignore_index=True)
        uri = layout.shard_part_uri(ds, spec["run_key"], shard, len(parts))
        storage.write_bytes(uri, part_bytes(frame, row_group_size=rg_size))
        parts.append(uri)
        rows += len(frame)
        buffer, buffered = [], 0

    for batch, items, scores in score_users(
        user_vecs, item_vecs, bias, seen, cold, popular, top_k=int(spec["top_k"]),
        user_chunk=int(p["score.user_chunk"]), item_index=models.item_index(emb),
    ):
        frame = recommendations_frame(batch, items, scores, user_ids=users, item_ids=item_ids,
                                      model_version=model["model_version"], ds=ds)
        buffer.append(frame)
        buffered += len(frame)
        if buffered >= rows_per_part:
            flush()
    flush()
    counts = {"known": int((model_rows >= 0).sum()), "folded_in": int(folded.sum()),
              "popular": int(cold.sum())}
    log.info("score shard %d: %d users (%s), %d rows; read %s", shard, len(users), counts, rows,
             reads)
    return {"ds": ds, "run_key": spec["run_key"], "shard": shard, "shards": int(spec["shards"]),
            "parts": parts, "rows": rows, "users": len(users), "user_kinds": counts,
            "model": model, "top_k": int(spec["top_k"]), "seen": spec["seen"], "reads": reads}


def collect(results: list[dict], specs: list[dict] | None = None) -> Scored:
    """Merge the shards' results into what publish takes; refuses an incomplete set of shards.

    ``specs``: where the model, ``top_k`` and seen set come from (default: the results, which
    carry them). ``source``/``source_reason`` come from the model dict (``model`` unless it says
    otherwise: a fallback's dict does), for publish to write into the manifest.
    """
    results = sorted(results, key=lambda r: r["shard"])
    if not results:
        raise ValueError("no shard results to collect")
    n, run_key, ds = results[0]["shards"], results[0]["run_key"], results[0]["ds"]
    got = [r["shard"] for r in results]
    if got != list(range(n)) or {(r["run_key"], r["ds"]) for r in results} != {(run_key, ds)}:
        raise ValueError(f"shards of run {run_key} ds={ds}: expected 0..{n - 1}, got {got}")
    spec = (specs or results)[0]
    model = spec["model"]
    kinds = [r["user_kinds"] for r in results if r.get("user_kinds")]
    return Scored(
        ds=ds, run_key=run_key, shards=n,
        parts=[u for r in results for u in r["parts"]],
        rows=sum(r["rows"] for r in results), users=sum(r["users"] for r in results),
        user_kinds={k: sum(c[k] for c in kinds) for k in kinds[0]} if kinds else None,
        top_k=int(spec["top_k"]), staging=layout.staging_prefix(ds, run_key),
        seen=spec["seen"], model_version=model["model_version"],
        data_version=model["data_version"], metrics=model.get("metrics"),
        source=model.get("source") or "model", source_reason=model.get("source_reason"))


def fallback(evaluated: Evaluated, seen: Seen) -> ModelChoice:
    """The ``fallback`` task (the gate refused): the champion, re-scored on today's seen items,
    or with no champion yet the popularity model of the seen table."""
    from nightrec.tasks import registry

    why = f"the gate refused the new model: {evaluated.gate['reason']}"
    version = registry.champion()  # read once: the model scored is the one named here
    if version:
        model = {**registry.model_uris(version), "source": "champion_fallback",
                 "source_reason": why}
    else:
        model = {**popularity_model(evaluated.ds, seen.seen), "source": "popularity_fallback",
                 "source_reason": why + "; there is no champion yet"}
    return ModelChoice(ds=evaluated.ds, model=model)


def rescore_ds(ds: str | None, event_ds: list[str]) -> str:
    """The ds a re-score publishes: the ``ds`` param, else the newest champion asset event's,
    else the latest published table's."""
    from nightrec.core import settings
    from nightrec.table.reader import RecommendationReader

    return settings.check_ds(ds or (event_ds[-1] if event_ds else
                                    RecommendationReader().latest_ds()))


def rescore_plan(ds: str, model_version: str | None) -> RescorePlan | None:
    """What a re-score of ``ds`` scores: ``model_version`` (else the champion) and ds's seen
    table; None when ds's table is already published by that model and none was pinned."""
    from nightrec.tasks import registry
    from nightrec.tasks import seen as seen_step

    model = registry.resolve(model_version)
    version = model["model_version"]
    current = (storage.read_json(layout.manifest_uri(ds))
               if storage.exists(layout.manifest_uri(ds)) else {})
    if current.get("model_version") == version and not model_version:
        log.info("ds=%s is already published by %s: nothing to do", ds, version)
        return None
    model = {**model, "source": "champion_rescore",
             "source_reason": f"re-score with {version} (rescore_recommendations)"}
    return RescorePlan(ds=ds, model=model, seen=seen_step.build(ds))


def popularity_model(ds: str, seen_uri: str, reason: str | None = None) -> dict:
    """The popularity baseline as a factor model, for the fallback when the gate refuses and no
    champion exists: every user of the seen table (zero vector, d = 1) and every item of it, with
    ``item_bias`` = the number of users who interacted with the item. Scored like any model, each
    user gets the most popular items they have not seen, ties to the lower item index (items are
    numbered in item_id order, so: the lower item_id).

    Writes ``runs/ds=<ds>/fallback/{embeddings.npz, users.parquet, items.parquet}``; returns the
    model dict, ``model_version`` ``popular-YYYYMMDD-<8 hex>``, ``data_version`` a hash of the
    seen table's ETag, ``source: popularity_fallback`` and ``source_reason`` (``reason``).
    """
    from nightrec.tasks import seen as seen_step

    settings.check_ds(ds)
    users = distinct_ids(seen_uri, schema.USER_ID).to_numpy(zero_copy_only=False)
    table = seen_step.item_counts(seen_uri)  # sorted by item_id, as sorted_union sorts
    items = table[schema.ITEM_ID].to_numpy(dtype=object)
    counts = table[seen_step.COUNT].to_numpy(np.float32)
    emb = {"user": np.zeros((len(users), 1), np.float32),
           "item": np.zeros((len(items), 1), np.float32), "item_bias": counts}
    out = {name: layout.run_uri(ds, "fallback", f"{name}.{ext}") for name, ext in (
        ("embeddings", "npz"), ("users", "parquet"), ("items", "parquet"))}
    buf = io.BytesIO()
    np.savez(buf, **emb)
    storage.write_bytes(out["embeddings"], buf.getvalue())
    storage.write_parquet(pd.DataFrame({schema.USER_IDX: np.arange(len(users), dtype=np.int32),
                                        schema.USER_ID: pd.Series(users, dtype=object)}),
                          out["users"])
    storage.write_parquet(pd.DataFrame({schema.ITEM_IDX: np.arange(len(items), dtype=np.int32),
                                        schema.ITEM_ID: pd.Series(items, dtype=object)}),
                          out["items"])
    etag = (storage.head(seen_uri) or {}).get("etag") or ""
    data_version = _digest(seen_uri, etag)[:32]
    version = f"popular-{ds.replace('-', '')}-{_digest('popular', data_version)[:8]}"
    return {**out, "model_version": version, "data_version": data_version,
            "source": POPULARITY_SOURCE, "source_reason": reason,
            "metrics": None}


def run(ds: str, model: dict, seen_uri: str, run_key: str, params: dict | None = None,
        top_k: int | None = None, shards: int | None = None) -> Scored:
    """Every shard in this process, one after another (what the DAG does with mapped tasks).

    ``model``: ``embeddings``, ``users``, ``items`` URIs and ``model_version``/``data_version``
    (a fresh training run's, a registered one: tasks/registry.py, or :func:`popularity_model`).
    ``seen_uri``: ds's seen table (tasks/seen.py), excluded from each user's recommendations;
    its users are scored too.
    """
    specs = plan(ds, model, seen_uri, run_key, params, top_k=top_k, shards=shards)
    return collect([run_shard(s, params) for s in specs], specs)
