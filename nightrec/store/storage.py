"""Object-store plumbing: one boto3 client, URIs, and reads/writes of bytes, JSON and Parquet.

The client, the bucket and the endpoint are the table package's (nightrec/table/objects.py),
which the reader uses alone: one client setup for the pipeline and the readers.

A URI is either ``s3://bucket/key`` or a local path, so every step's ``run()`` works the same
under Airflow (S3) and under ``dvc repro`` (local files). A single S3 PUT is atomic: readers see
the whole object or none of it; multi-object atomicity is the publisher's job (tasks/publish.py).

Conditional requests (S3 only) are how two writers avoid overwriting each other: a PUT with
``if_none_match=True`` creates the object only if no object has the key, and one with
``if_match=<etag>`` replaces it only if it is still the version the caller read. A lost race
raises ``PreconditionFailed``. AWS S3 and SeaweedFS honour both (tests/test_publish.py checks).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from nightrec.core import settings
from nightrec.core.errors import PermanentError
from nightrec.table import objects

# The one boto3 client setup is the table package's (a reader-only install has it too); these
# names stay here for the pipeline, and ``_client.cache_clear()`` clears that one cache.
_client = objects._client
s3_client = objects.s3_client


def s3_uri(key: str, bucket: str | None = None) -> str:
    return f"s3://{bucket or settings.bucket()}/{key.lstrip('/')}"


def split_uri(uri: str) -> tuple[str, str]:
    """``s3://b/k`` -> (b, k). Raises ValueError for anything else."""
    if not uri.startswith("s3://"):
        raise ValueError(f"not an s3:// URI: {uri!r}")
    bucket, _, key = uri[5:].partition("/")
    if not bucket or not key:
        raise ValueError(f"s3 URI needs a bucket and a key: {uri!r}")
    return bucket, key


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def join(uri: str, *parts: str) -> str:
    out = uri.rstrip("/")
    for p in parts:
        out = f"{out}/{p.strip('/')}"
    return out


# one class, so a lost race raised by the reader's reads and by these is caught alike
PreconditionFailed = objects.PreconditionFailed
_LOST_RACE = objects.LOST_RACE_CODES
_MISSING = objects.MISSING_CODES
_error_code = objects.error_code


class BucketNotFound(PermanentError):
    """The bucket a step writes to does not exist (a typo in NIGHTREC_BUCKET, a wrong account)."""


def require_bucket(bucket: str) -> None:
    """Raise BucketNotFound, or PermissionError for refused credentials, each saying what to
    fix, unless ``bucket`` exists at the endpoint and these credentials may use it."""
    from botocore.exceptions import ClientError

    try:
        s3_client().head_bucket(Bucket=bucket)
    except ClientError as e:
        if _error_code(e) in _MISSING | {"NoSuchBucket"}:
            raise BucketNotFound(
                f"bucket {bucket!r} does not exist at {settings.s3_endpoint_url() or 'AWS S3'}: "
                "create it, or set NIGHTREC_BUCKET to the right one; nothing was written"
            ) from e
        if _error_code(e) in {"403", "AccessDenied", "InvalidAccessKeyId",
                              "SignatureDoesNotMatch"}:
            raise PermissionError(
                f"access to bucket {bucket!r} at {settings.s3_endpoint_url() or 'AWS S3'} was "
                f"refused ({_error_code(e)}): check the credentials (AWS_ACCESS_KEY_ID and its "
                "secret, the profile or the role); nothing was written"
            ) from e
        raise


def read_bytes(uri: str) -> bytes:
    if is_s3(uri):
        b, k = split_uri(uri)
        return s3_client().get_object(Bucket=b, Key=k)["Body"].read()
    return Path(uri).read_bytes()


def read_versioned(uri: str) -> tuple[bytes, str] | None:
    """``(data, etag)`` of an S3 object, or None when there is none (for a later ``if_match``)."""
    return objects.get_versioned(*split_uri(uri))


def read_range(uri: str, start: int, length: int, *, if_match: str | None = None) -> bytes:
    """``length`` bytes of an S3 object from ``start``; ``start < 0`` means the last ``length``.

    ``if_match``: fail with PreconditionFailed unless the object still has that ETag.
    """
    return objects.get_range(*split_uri(uri), start, length, if_match=if_match)


def head(uri: str) -> dict | None:
    """``{"etag", "bytes"}`` of an S3 object, or None when there is none."""
    return objects.head(*split_uri(uri))


def write_bytes(
    uri: str, data: bytes, *, content_type: str = "application/octet-stream",
    if_match: str | None = None, if_none_match: bool = False,
) -> str | None:
    """Write ``data`` whole; returns the new ETag (S3) or None (local).

    Local writes go through a temp file and a rename, like S3's PUT. ``if_none_match`` (create
    only) and ``if_match`` (replace only that version) are S3 conditional writes; a lost race
    raises PreconditionFailed.
    """
    if is_s3(uri):
        from botocore.exceptions import ClientError

        b, k = split_uri(uri)
        cond = {"IfMatch": if_match} if if_match else {}
        if if_none_match:
            cond["IfNoneMatch"] = "*"
        try:
            out = s3_client().put_object(Bucket=b, Key=k, Body=data, ContentType=content_type,
                                         **cond)
        except ClientError as e:
            if cond and _error_code(e) in _LOST_RACE | _MISSING:
                what = "exists already" if if_none_match else f"is no longer version {if_match}"
                raise PreconditionFailed(f"{uri} {what}") from e
            raise
        return out.get("ETag")
    if if_match or if_none_match:
        raise ValueError(f"conditional writes need an s3:// URI, got {uri!r}")
    path = Path(uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def exists(uri: str) -> bool:
    if is_s3(uri):
        from botocore.exceptions import ClientError

        b, k = split_uri(uri)
        try:
            s3_client().head_object(Bucket=b, Key=k)
            return True
        except ClientError as e:
            if _error_code(e) in _MISSING:
                return False
            raise
    return Path(uri).exists()


def list_uris(prefix_uri: str) -> list[str]:
    """Every object under a prefix (S3) or every file under a folder (local), sorted."""
    if is_s3(prefix_uri):
        b, k = split_uri(prefix_uri.rstrip("/") + "/")
        pages = s3_client().get_paginator("list_objects_v2").paginate(Bucket=b, Prefix=k)
        return sorted(f"s3://{b}/{o['Key']}" for p in pages for o in p.get("Contents", []))
    root = Path(prefix_uri)
    return sorted(str(p) for p in root.rglob("*") if p.is_file()) if root.exists() else []


def list_prefixes(prefix_uri: str) -> list[str]:
    """The "folders" directly under an S3 prefix (S3 common prefixes), as sorted URIs."""
    b, k = split_uri(prefix_uri.rstrip("/") + "/")
    pages = s3_client().get_paginator("list_objects_v2").paginate(Bucket=b, Prefix=k, Delimiter="/")
    return sorted(f"s3://{b}/{c['Prefix']}" for p in pages for c in p.get("CommonPrefixes", []))


def delete_if_match(uri: str, etag: str) -> bool:
    """Delete an S3 object only if it is still version ``etag``; False when it is not (or gone)."""
    from botocore.exceptions import ClientError

    b, k = split_uri(uri)
    try:
        s3_client().delete_object(Bucket=b, Key=k, IfMatch=etag)
    except ClientError as e:
        if _error_code(e) in _LOST_RACE | _MISSING:
            return False
        raise
    return True


def delete(uris: list[str]) -> None:
    s3 = [u for u in uris if is_s3(u)]
    for u in uris:
        if not is_s3(u):
            Path(u).unlink(missing_ok=True)
    by_bucket: dict[str, list[str]] = {}
    for u in s3:
        b, k = split_uri(u)
        by_bucket.setdefault(b, []).append(k)
    for b, keys in by_bucket.items():
        for i in range(0, len(keys), 1000):
            objs = [{"Key": k} for k in keys[i : i + 1000]]
            s3_client().delete_objects(Bucket=b, Delete={"Objects": objs, "Quiet": True})


# S3's CopyObject copies at most 5 GiB in one request; a larger object is copied part by part
# (UploadPartCopy, server-side too). Parts of that size keep a 5 TiB object under 10,000 parts
# (s3transfer raises the size further if needed).
COPY_MAX_SINGLE_BYTES = 5 * 1024**3
COPY_PART_BYTES = 512 * 1024**2
COPY_CHUNK_BYTES = 8 * 1024**2  # held at a time by a copy that streams through this process


def _quoted(etag: str) -> str:
    """An ETag as HEAD and GET give it (quoted): SeaweedFS's CopyObject answers it bare."""
    return etag if etag.startswith('"') else f'"{etag}"'


def copy(src: str, dst: str, *, if_match: str | None = None, size: int | None = None) -> str | None:
    """Copy the object ``src`` to ``dst`` without its bytes passing through memory; returns the
    new object's ETag (S3) or None (local).

    S3 to S3 is a server-side copy: CopyObject up to ``COPY_MAX_SINGLE_BYTES``, a multipart copy
    (UploadPartCopy) above, so nothing is downloaded or uploaded here. Otherwise (local to
    local, or between S3 and a local path) the bytes stream through this process,
    ``COPY_CHUNK_BYTES`` at a time. A local destination is written to a temp file and renamed,
    like an S3 write: whole or absent.

    ``if_match`` (an S3 source only): copy only if ``src`` is still that version (the one the
    caller read and checked), else PreconditionFailed and no copy. ``size``: ``src``'s size in
    bytes when known (saves a HEAD to choose between the two copies). A missing ``src`` raises
    FileNotFoundError.
    """
    if if_match and not is_s3(src):
        raise ValueError(f"if_match needs an s3:// source, got {src!r}")
    if is_s3(src) and is_s3(dst):
        return _copy_s3(src, dst, if_match=if_match, size=size)
    if is_s3(src):
        from botocore.exceptions import ClientError

        b, k = split_uri(src)
        try:
            body = s3_client().get_object(Bucket=b, Key=k, **(
                {"IfMatch": if_match} if if_match else {}))["Body"]
        except ClientError as e:
            _raise_copy_error(e, src, if_match)
            raise
        with body:
            _replace_local(dst, lambda f: shutil.copyfileobj(body, f, COPY_CHUNK_BYTES))
        return None
    if not Path(src).is_file():
        raise FileNotFoundError(f"no file {src}")
    if is_s3(dst):
        upload_from(Path(src), dst)
        return head(dst)["etag"]
    _replace_local(dst, lambda f: _copy_file(src, f))
    return None


def _copy_file(src: str, f) -> None:
    with open(src, "rb") as s:
        shutil.copyfileobj(s, f, COPY_CHUNK_BYTES)


def _replace_local(dst: str, write) -> None:
    """``write(file)`` into a temp file next to ``dst``, then rename it to ``dst``."""
    path = Path(dst)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _raise_copy_error(e: BaseException, src: str, if_match: str | None) -> None:
    if if_match and _error_code(e) in _LOST_RACE:
        raise PreconditionFailed(f"{src} is no longer version {if_match}") from e
    if _error_code(e) in _MISSING:
        raise FileNotFoundError(f"no object {src}") from e


def _copy_s3(src: str, dst: str, *, if_match: str | None, size: int | None) -> str:
    from botocore.exceptions import ClientError

    sb, sk = split_uri(src)
    db, dk = split_uri(dst)
    if size is None:
        found = head(src)
        if found is None:
            raise FileNotFoundError(f"no object {src}")
        size = found["bytes"]
    cond = {"CopySourceIfMatch": if_match} if if_match else {}
    source = {"Bucket": sb, "Key": sk}
    try:
        if size <= COPY_MAX_SINGLE_BYTES:
            out = s3_client().copy_object(Bucket=db, Key=dk, CopySource=source, **cond)
            return _quoted(out["CopyObjectResult"]["ETag"])
        from boto3.s3.transfer import TransferConfig

        s3_client().copy(source, db, dk, ExtraArgs=cond or None, Config=TransferConfig(
            multipart_threshold=COPY_MAX_SINGLE_BYTES, multipart_chunksize=COPY_PART_BYTES))
    except ClientError as e:
        _raise_copy_error(e, src, if_match)
        raise
    return head(dst)["etag"]


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri))


def json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, indent=2, sort_keys=True, default=str).encode()


def write_json(uri: str, obj: Any, *, if_match: str | None = None,
               if_none_match: bool = False) -> str | None:
    """Write ``obj`` as JSON; returns the ETag. Conditional as ``write_bytes``."""
    return write_bytes(uri, json_bytes(obj), content_type="application/json", if_match=if_match,
                       if_none_match=if_none_match)


def parquet_table(data: bytes | str | Path, columns: list[str] | None = None, *,
                  pandas_metadata: bool = False):
    """One Parquet object (its bytes, or a local file's path) as an Arrow table.

    Decoded by ``pq.ParquetFile(...).read()``, never by ``pq.read_table`` or
    ``pd.read_parquet`` (which calls it): those go through Arrow's dataset scanner, whose
    background threads can outlive a short process that has just read, and the process then
    aborts at exit (SIGABRT, "terminate called without an active exception";
    apache/arrow#39862): a CLI command, a DVC stage or a task that did its work exits -6.
    Measured with pyarrow 26.0.1: benchmarks/RESULTS.md, "Parquet reads and the exit abort".
    ``pandas_metadata``: also read the index columns the pandas metadata names, as
    ``pd.read_parquet`` does."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    source = str(data) if isinstance(data, (str, Path)) else pa.BufferReader(data)
    return pq.ParquetFile(source).read(columns=columns, use_pandas_metadata=pandas_metadata)


def parquet_frame(data: bytes | str | Path, columns: list[str] | None = None):
    """One Parquet object (its bytes, or a local file's path) as a pandas frame: what
    ``pd.read_parquet`` returns, without its exit abort (:func:`parquet_table`)."""
    return parquet_table(data, columns, pandas_metadata=True).to_pandas()


def read_parquet(uri: str, columns: list[str] | None = None):
    """One Parquet object, or a bucketed table (a prefix ending in ``/``: its parts
    concatenated in key order), as a pandas frame. For small tables: the data steps read big
    ones with the engine (nightrec/core/engine.py) from a local copy (:func:`download_table`)."""
    import pandas as pd

    if uri.endswith("/"):
        parts = [parquet_frame(read_bytes(u), columns)
                 for u in list_uris(uri) if u.endswith(".parquet")]
        if not parts:
            raise FileNotFoundError(f"no Parquet parts under {uri}")
        return pd.concat(parts, ignore_index=True)
    return parquet_frame(read_bytes(uri), columns)


def download_table(uri: str, dest: Path) -> str:
    """A Parquet object or a bucketed table (prefix ending in ``/``) into the folder ``dest``;
    returns the glob of its local Parquet files, for ``read_parquet('<glob>')`` in DuckDB."""
    dest.mkdir(parents=True, exist_ok=True)
    if uri.endswith("/"):
        files = download_prefix(uri, dest)
        if not any(f.suffix == ".parquet" for f in files):
            raise FileNotFoundError(f"no Parquet parts under {uri}")
        return str(dest / "**" / "*.parquet")
    return str(download_to(uri, dest / "table.parquet"))


def parquet_bytes(df, *, row_group_size: int | None = None) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    table = pa.Table.from_pandas(df, preserve_index=False)
    pq.write_table(table, buf, row_group_size=row_group_size, compression="zstd")
    return buf.getvalue()


def parquet_batches(pf, *, columns: list[str] | None = None, batch_rows: int):
    """Record batches of at most ``batch_rows`` rows of an open ``pyarrow.parquet.ParquetFile``,
    one row group at a time. pyarrow's ``iter_batches`` over the whole file keeps memory for
    every row group it has passed (measured on clean's input: +10 MB per 1M-row group, 1.3 GB
    of RSS by the end of 100M rows); over one row group at a time it stays flat."""
    for i in range(pf.metadata.num_row_groups):
        yield from pf.iter_batches(batch_size=batch_rows, columns=columns, row_groups=[i])


SCAN_TAIL_BYTES = 64 * 1024  # read first from an object's end: the footer, in one request
# A scan reads on in ranges of this many bytes (several row groups of a part at a time): a
# request per row group would be ~100 per part, each paying the store's latency; this bounds
# what a scan holds instead (one read, plus one row group if that is larger).
SCAN_READ_BYTES = 8 * 1024**2


class ParquetScan:
    """One Parquet object (S3 or a local file) read exactly once, front to back, one row group
    at a time, with its sha256 computed on the way: for checking a table of any size with
    memory flat in its size.

    What is held at a time: the footer (``SCAN_TAIL_BYTES``, or the footer's size if larger),
    one read of ``SCAN_READ_BYTES`` (or of one row group, if larger) and one row group's
    decoded rows. Every byte is fetched once, as ranged GETs conditional on the ETag the scan
    opened with (a HEAD), so all of it is one version and :meth:`finish`'s sha256 is that
    version's; ``etag``, ``size``, ``footer_bytes`` and ``metadata`` describe it. pyarrow
    decodes each row group from the bytes read, page CRCs verified (a damaged page fails).

    ``requests`` and ``bytes_read`` count what was fetched (``bytes_read == size`` after
    :meth:`finish`, unless a writer put row groups out of file order, which costs re-reads).
    Use as a context manager; :meth:`row_groups` once, then :meth:`finish`.
    """

    def __init__(self, uri: str, *, if_match: str | None = None):
        self.uri = uri
        self.requests = self.bytes_read = 0
        self._file = None
        if is_s3(uri):
            found = head(uri)
            if found is None:
                raise FileNotFoundError(f"no object {uri}")
            if if_match and found["etag"] != if_match:
                raise PreconditionFailed(f"{uri} is no longer version {if_match}")
            self.etag, self.size = found["etag"], found["bytes"]
        else:
            self._file = open(uri, "rb")  # noqa: SIM115 - closed by close()
            self.etag, self.size = None, os.fstat(self._file.fileno()).st_size
        try:
            self._open()
        except BaseException:
            self.close()
            raise

    def _open(self) -> None:
        import pyarrow.parquet as pq

        self._hash = hashlib.sha256()
        self._pos = 0  # bytes [0, _pos) are hashed
        self._tail_start = max(0, self.size - SCAN_TAIL_BYTES)
        self._tail = self._get(self._tail_start, self.size)
        if self.size < 12 or self._tail[-4:] != b"PAR1":
            raise ValueError(f"{self.uri} is not a Parquet file")
        self.footer_bytes = int.from_bytes(self._tail[-8:-4], "little") + 8
        if self.footer_bytes > len(self._tail):  # a footer longer than the first read
            start = max(0, self.size - self.footer_bytes)
            self._tail = self._get(start, self._tail_start) + self._tail
            self._tail_start = start
        self.metadata = pq.ParquetFile(io.BytesIO(self._tail[-self.footer_bytes:])).metadata

    def __enter__(self) -> ParquetScan:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def _get(self, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` from the store (nothing is kept)."""
        if end <= start:
            return b""
        if self._file is not None:
            self._file.seek(start)
            data = self._file.read(end - start)
        else:
            data = read_range(self.uri, start, end - start, if_match=self.etag)
        if len(data) != end - start:
            raise OSError(f"{self.uri}: read {len(data)} bytes at {start}, not {end - start} "
                          "(the object changed?)")
        self.requests += 1
        self.bytes_read += len(data)
        return data

    def _advance(self, end: int) -> bytes:
        """Bytes ``[_pos, end)``, hashed; the part in the footer read comes from it."""
        data = self._get(self._pos, min(end, self._tail_start))
        if end > self._tail_start:
            data += self._tail[max(self._pos, self._tail_start) - self._tail_start:
                               end - self._tail_start]
        self._hash.update(data)
        self._pos = max(self._pos, end)
        return data

    def span(self, i: int) -> tuple[int, int]:
        """Row group ``i``'s byte range ``[start, end)``: its column chunks, dictionary pages
        included."""
        rg = self.metadata.row_group(i)
        starts, ends = [], []
        for j in range(rg.num_columns):
            col = rg.column(j)
            start = col.data_page_offset
            if col.has_dictionary_page and col.dictionary_page_offset:
                start = min(start, col.dictionary_page_offset)
            starts.append(start)
            ends.append(start + col.total_compressed_size)
        return (min(starts), max(ends)) if starts else (self._pos, self._pos)

    def row_groups(self, columns: list[str] | None = None):
        """Each row group as a ``pyarrow.Table``, in file order; only one is held at a time.

        The bytes come in reads of ``SCAN_READ_BYTES`` (or one row group, if larger), each
        kept until the row groups in it are decoded: what is held is at most that plus one
        row group."""
        import pyarrow.parquet as pq

        buf, buf_start = b"", 0  # bytes [buf_start, _pos): read, not all decoded yet
        for i in range(self.metadata.num_row_groups):
            lo, hi = self.span(i)
            if hi > self._pos:  # drop what is before this group, read on past its end
                keep = min(max(lo, buf_start), self._pos)
                ahead = max(hi, min(self._pos + SCAN_READ_BYTES, self._tail_start))
                buf, buf_start = buf[keep - buf_start:] + self._advance(ahead), keep
            if lo >= buf_start:
                view = _ByteView(self, buf_start, buf)
            else:  # a writer that put row groups out of file order: read this one again
                view = _ByteView(self, lo, self._get(lo, hi))
            pf = pq.ParquetFile(view, metadata=self.metadata, page_checksum_verification=True)
            yield pf.read_row_group(i, columns=columns)

    def finish(self) -> str:
        """Read (and hash) whatever the row groups did not cover, up to the end; the object's
        sha256 (hex)."""
        self._advance(self.size)
        return self._hash.hexdigest()


class _ByteView(io.RawIOBase):
    """The object as a seekable file for pyarrow, serving one row group's bytes (``data`` from
    ``start``) and the footer read from memory; any other read (none, for a well-formed file)
    is fetched."""

    def __init__(self, scan: ParquetScan, start: int, data: bytes):
        super().__init__()
        self.scan, self.start, self.data, self.pos = scan, start, data, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.scan.size}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def read(self, n: int = -1) -> bytes:
        end = self.scan.size if n is None or n < 0 else min(self.scan.size, self.pos + n)
        if end <= self.pos:
            return b""
        s = self.scan
        if self.start <= self.pos and end <= self.start + len(self.data):
            out = self.data[self.pos - self.start : end - self.start]
        elif s._tail_start <= self.pos:
            out = s._tail[self.pos - s._tail_start : end - s._tail_start]
        else:
            out = s._get(self.pos, end)
        self.pos += len(out)
        return out

    def readinto(self, buf) -> int:
        data = self.read(len(buf))
        buf[: len(data)] = data
        return len(data)


def write_parquet(df, uri: str, *, row_group_size: int | None = None) -> None:
    write_bytes(uri, parquet_bytes(df, row_group_size=row_group_size))


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def download_to(uri: str, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if is_s3(uri):
        b, k = split_uri(uri)
        s3_client().download_file(b, k, str(path))
    else:
        path.write_bytes(Path(uri).read_bytes())
    return path


def upload_from(path: Path, uri: str) -> None:
    if is_s3(uri):
        b, k = split_uri(uri)
        s3_client().upload_file(str(path), b, k)
    else:
        write_bytes(uri, path.read_bytes())


def download_prefix(prefix_uri: str, dest: Path) -> list[Path]:
    """Every object under ``prefix_uri`` into ``dest``, keeping the relative keys (a bucketed
    table's ``bucket=NNN/part-0.parquet``); returns the local files, sorted. Streams to disk."""
    root = prefix_uri.rstrip("/") + "/"
    out = []
    for uri in list_uris(root):
        out.append(download_to(uri, dest / uri[len(root):]))
    return sorted(out)


def upload_tree(local_dir: Path, prefix_uri: str) -> list[str]:
    """Every file under ``local_dir`` to ``prefix_uri`` + its relative path; returns the URIs."""
    root = prefix_uri.rstrip("/") + "/"
    out = []
    for path in sorted(p for p in Path(local_dir).rglob("*") if p.is_file()):
        uri = root + path.relative_to(local_dir).as_posix()
        upload_from(path, uri)
        out.append(uri)
    return out
