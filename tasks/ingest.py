"""Step 1, ingest: read the day's raw snapshot, whatever its format, into one raw-string table.

Nothing is judged here: every data row comes out with its fields as the raw text, and clean
decides what is bad and says why. Ingest fails (``IngestError``, not retried) only when a *file*
cannot be read as a table at all; the message names the file, the line and the rule. The rules
(README "Input formats" has the user-facing version):

- **Files.** Every object under ``raw/interactions/ds=<ds>/``, in name order. Names starting
  with ``_`` or ``.`` (``_SUCCESS``, ``.crc``) are markers, skipped and listed as ignored.
- **Formats.** gzip is recognised by its magic bytes, whatever the name. Parquet by its magic
  ``PAR1`` (or a ``.parquet`` name); delimited text by a ``.csv .tsv .data .dat .txt .base .test``
  suffix or none. Anything else is refused. Text must be UTF-8 (a BOM is dropped); a file with a
  NUL byte in its first 64 KiB, or whose first non-blank line is not UTF-8, is refused as binary.
- **Delimiter.** ``ingest.delimiter``, or sniffed from the first non-blank line: ``::`` (ML-1M
  ``ratings.dat``), tab, comma, semicolon, pipe, the first one present.
- **Header.** The first non-blank line is a header when one of its fields is a user or item
  column name (``schema.COLUMN_ALIASES``: ``userId``, ``movieId``, ``item``, ``ts``...). A header
  must name user, item and timestamp columns (rating is optional: without it the file is
  implicit feedback); other columns are ignored; two columns meaning the same thing are refused.
  Without a header a line has 3 fields (user, item, timestamp) or 4 (user, item, rating,
  timestamp: MovieLens ``u.data`` and ``ratings.dat``).
- **Rows.** Read in blocks of ``ingest.block_bytes`` (text, pyarrow's streaming CSV reader) or
  batches of ``ingest.batch_rows`` (Parquet), written out batch by batch: memory is bounded by the
  block, not the file. A line with the wrong number of fields becomes a row with ``parse_error``
  ``wrong_field_count`` and its text in ``raw_text``; a field that is not UTF-8 gives
  ``invalid_encoding`` (its bytes backslash-escaped). Lines with every field empty (blank lines)
  are not events: they are counted per file as ``blank_lines``, not passed on.
- **Values** stay text, so clean's quarantine shows what the file said. From Parquet: integers and
  decimals as digits; a float id is written as an integer when it is one (and below 2**53,
  where floats are exact), else marked ``unparseable_id``; date/time types become unix seconds; a
  null rating in a file that has a rating column becomes "" (a missing field, not implicit).
- **Where from.** ``source_file`` (the name under the ds prefix) and ``raw_row``: the 1-based
  line number in a text file (the header is line 1), or the 1-based row number in a Parquet file.
  A truncated gzip or unreadable file stops ingest with "<file> after line N", N being the last
  line read whole (the reader works a block ahead, so the break may lie further on).

Outputs: ``runs/ds=<ds>/ingest/interactions.parquet`` (``schema.RAW_COLUMNS``, all text but
``raw_row``), ``files.json`` (per file: format, delimiter, header, rows, blank lines, ragged
lines) and, when given, the ``items``/``users`` side tables as Parquet.
"""

from __future__ import annotations

import argparse
import gzip
import io
import logging
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from nightrec.core import schema, settings
from nightrec.core.errors import PermanentError
from nightrec.core.records import Ingested
from nightrec.store import layout, storage

PARAMS = ["ingest.delimiter", "ingest.block_bytes", "ingest.batch_rows"]
ALIASES = schema.COLUMN_ALIASES
TEXT_SUFFIXES = {".csv", ".tsv", ".data", ".dat", ".txt", ".base", ".test", ""}
DELIMITERS = ["::", "\t", ",", ";", "|"]
DEFAULT_BLOCK_BYTES = 16 << 20
DEFAULT_BATCH_ROWS = 1_000_000
SNIFF_BYTES = 64 << 10
_GZIP_MAGIC = b"\x1f\x8b"
_PARQUET_MAGIC = b"PAR1"
_BOM = b"\xef\xbb\xbf"
_UNIT = "\x1f"  # stands in for '::' (pyarrow's CSV reader takes a one-character delimiter)
_EXACT_FLOAT = 2.0**53
_RAW_SCHEMA = pa.schema(
    [(c, pa.string()) for c in schema.INTERACTION_COLUMNS]
    + [(schema.SOURCE_FILE, pa.string()), (schema.RAW_ROW, pa.int64()),
       (schema.PARSE_ERROR, pa.string()), (schema.RAW_TEXT, pa.string())]
)
log = logging.getLogger(__name__)


class IngestError(PermanentError, ValueError):
    """A file (or the whole snapshot) cannot be read as a table; the message names the rule."""


@dataclass
class FileInfo:
    """What ingest made of one raw file (written to ``files.json``)."""

    name: str
    format: str = ""  # "text" or "parquet"
    gzip: bool = False
    delimiter: str | None = None
    header: list[str] | None = None  # the header's fields, or None for a headerless file
    rows: int = 0  # rows passed on, ragged and badly encoded ones included
    blank_lines: int = 0
    wrong_field_count: int = 0
    invalid_encoding: int = 0
    columns: dict[str, str] = field(default_factory=dict)  # schema column -> the file's column


def canonical_column(name: str) -> str | None:
    """The schema column an input column name means (``"userId"`` -> ``"user_id"``), or None."""
    n = str(name).strip().strip('"').strip().lower().replace(" ", "_")
    for target, names in ALIASES.items():
        if n in names:
            return target
    return None


def _alias_rule() -> str:
    return "; ".join(f"{k}: {', '.join(v)}" for k, v in ALIASES.items())


def map_columns(names: list[str], *, where: str) -> dict[str, int]:
    """Schema column -> position in ``names``. Refuses missing or doubly-named columns."""
    found: dict[str, int] = {}
    for pos, n in enumerate(names):
        target = canonical_column(n)
        if target is None:
            continue
        if target in found:
            raise IngestError(
                f"{where}: columns {names[found[target]]!r} and {n!r} both mean {target}; "
                "rule: each schema column is named once"
            )
        found[target] = pos
    missing = [c for c in (schema.USER_ID, schema.ITEM_ID, schema.TIMESTAMP) if c not in found]
    if missing:
        raise IngestError(
            f"{where}: no column for {', '.join(missing)} among {names}; rule: the header names "
            f"user, item and timestamp columns (rating optional), as one of [{_alias_rule()}]"
        )
    return found


def sniff_delimiter(first_line: str) -> str | None:
    """The first of ``::``, tab, comma, semicolon, pipe that occurs in the line, else None."""
    for d in DELIMITERS:
        if d in first_line:
            return d
    return None


# --- opening ----------------------------------------------------------------------------------

Source = bytes | Path


def _raw_stream(src: Source) -> pa.NativeFile:
    return pa.BufferReader(src) if isinstance(src, bytes) else pa.OSFile(str(src))


def _stream(src: Source, gz: bool) -> pa.NativeFile:
    raw = _raw_stream(src)
    return pa.CompressedInputStream(raw, "gzip") if gz else raw


def _read_head(src: Source, gz: bool, name: str) -> bytes:
    try:
        with _stream(src, gz) as s:
            return s.read(SNIFF_BYTES)
    except OSError as e:
        raise IngestError(
            f"{name}: corrupt gzip stream at its start ({e}); rule: a .gz file is a complete gzip"
        ) from e


class _Replacing(io.RawIOBase):
    """A read-only stream that replaces one byte string by another (for the '::' delimiter)."""

    def __init__(self, inner: pa.NativeFile, old: bytes, new: bytes):
        self._inner, self._old, self._new, self._carry = inner, old, new, b""

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        while True:
            chunk = self._inner.read(size if size and size > 0 else 1 << 20)
            data, self._carry = self._carry + chunk, b""
            if chunk and data.endswith(self._old[:1]) and not data.endswith(self._old):
                data, self._carry = data[:-1], data[-1:]  # maybe the first half of a '::'
            if data or not chunk:  # b"" only at the end of the stream
                return data.replace(self._old, self._new)

    def readinto(self, b) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)


# --- text -------------------------------------------------------------------------------------


def _first_line(head: bytes, name: str) -> tuple[int, str] | None:
    """(0-based index, text) of the head's first non-blank line; refuses binary data.

    Binary: a NUL byte anywhere in the head, or a first line that is not UTF-8. Later lines
    with bad bytes are rows with ``invalid_encoding``, not a refused file.
    """
    nul = head.find(b"\x00")
    if nul >= 0:
        raise IngestError(
            f"{name} line {_line_of(head, nul)}: NUL byte at offset {nul}; this is binary data, "
            "not text; rule: text inputs are UTF-8 CSV/TSV"
        )
    lines = _LINE_SPLIT.split(head.removeprefix(_BOM))
    complete = lines if len(head) < SNIFF_BYTES or len(lines) == 1 else lines[:-1]
    for idx, raw in enumerate(complete):
        if not raw.strip():
            continue
        try:
            return idx, raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise IngestError(
                f"{name} line {idx + 1}: invalid UTF-8 at byte {e.start} of the line; this is "
                "binary data or another encoding; rule: text inputs are UTF-8 CSV/TSV"
            ) from e
    if len(head) == SNIFF_BYTES:
        raise IngestError(f"{name}: the first {SNIFF_BYTES} bytes hold no complete non-blank "
                          "line; rule: text inputs are lines of delimited fields")
    return None


def _line_of(data: bytes, offset: int) -> int:
    return data[:offset].count(b"\n") + 1


_LINE_SPLIT = re.compile(rb"\r\n|\n|\r")


def _layout_text(head: bytes, name: str, delimiter: str | None, info: FileInfo):
    """From the head of a file: (skip_rows, delimiter, column names, {schema col: name})."""
    found_first = _first_line(head, name)
    if found_first is None:
        return None
    first_idx, first = found_first
    where = f"{name} line {first_idx + 1}"
    sep = delimiter or sniff_delimiter(first)
    fields = first.split(sep) if sep else [first]
    info.delimiter = sep
    names = [f.strip().strip('"') for f in fields]
    if any(canonical_column(f) in (schema.USER_ID, schema.ITEM_ID) for f in names):
        found = map_columns(names, where=f"{where} (header)")
        info.header = names
        cols = [f"c{i}" for i in range(len(names))]
        return first_idx + 1, sep, cols, {k: cols[v] for k, v in found.items()}
    positional = {
        3: [schema.USER_ID, schema.ITEM_ID, schema.TIMESTAMP],
        4: [schema.USER_ID, schema.ITEM_ID, schema.RATING, schema.TIMESTAMP],
    }.get(len(fields))
    if positional is None:
        how = f"from ingest.delimiter {sep!r}" if delimiter else (
            f"sniffed {sep!r}" if sep else f"none of {DELIMITERS} found")
        raise IngestError(
            f"{where}: {len(fields)} field(s) and no header (delimiter {how}); rule: a file "
            "without a header has 3 fields (user, item, timestamp) or 4 (user, item, rating, "
            "timestamp) per line; with a header its first line names the columns"
        )
    cols = [f"c{i}" for i in range(len(fields))]
    return first_idx, sep, cols, {c: cols[i] for i, c in enumerate(positional)}


def _utf8(col: pa.Array) -> tuple[pa.Array, np.ndarray | None]:
    """Binary -> string. Invalid UTF-8 values come back backslash-escaped, flagged in a mask."""
    try:
        return col.cast(pa.string()), None
    except pa.ArrowInvalid:
        out, bad = [], np.zeros(len(col), dtype=bool)
        for i, v in enumerate(col.to_pylist()):
            if v is None:
                out.append(None)
                continue
            try:
                out.append(v.decode("utf-8"))
            except UnicodeDecodeError:
                out.append(v.decode("utf-8", "backslashreplace"))
                bad[i] = True
        return pa.array(out, pa.string()), bad


def _line_numbers(n: int, start: int, skipped: np.ndarray) -> np.ndarray:
    """Physical line numbers of ``n`` parsed rows from line ``start`` on, around ``skipped``.

    ``skipped``: sorted line numbers >= start that the parser handed to the invalid-row handler
    (so they are not among the parsed rows).
    """
    k = np.arange(n, dtype=np.int64)
    free_before = skipped - start - np.arange(len(skipped), dtype=np.int64)
    return start + k + np.searchsorted(free_before, k, side="right")


def _raw_batch(
    fields: dict[str, pa.Array], n: int, *, source: str, rows: np.ndarray,
    parse_error: pa.Array | None = None, raw_text: pa.Array | None = None,
) -> pa.RecordBatch:
    null = pa.nulls(n, pa.string())
    arrays = [fields.get(c, null) for c in schema.INTERACTION_COLUMNS]
    arrays += [pa.array([source] * n, pa.string()), pa.array(rows, pa.int64()),
               parse_error if parse_error is not None else null,
               raw_text if raw_text is not None else null]
    return pa.RecordBatch.from_arrays(arrays, schema=_RAW_SCHEMA)


def _ragged_batch(bad: list[tuple[int, str]], *, source: str, sep: str) -> pa.RecordBatch:
    text = [t.replace(_UNIT, "::") if sep == "::" else t for _, t in bad]
    n = len(bad)
    return _raw_batch({}, n, source=source, rows=np.array([r for r, _ in bad], dtype=np.int64),
                      parse_error=pa.array([schema.REASON_FIELD_COUNT] * n, pa.string()),
                      raw_text=pa.array(text, pa.string()))


def _iter_text(
    name: str, src: Source, gz: bool, info: FileInfo, *, delimiter: str | None, block_bytes: int
) -> Iterator[pa.RecordBatch]:
    import pyarrow.csv as pcsv

    info.format = "text"
    head = _read_head(src, gz, name)
    plan = _layout_text(head, name, delimiter, info)
    if plan is None:
        return
    skip, sep, cols, mapping = plan
    pending: list[tuple[int, str]] = []

    def on_bad_row(row) -> str:
        pending.append((row.number if row.number is not None else -1, row.text))
        return "skip"

    stream = _stream(src, gz)
    if sep == "::":
        stream = _Replacing(stream, b"::", _UNIT.encode())
    next_line = skip + 1
    last_good = 0
    try:
        reader = pcsv.open_csv(
            stream,
            read_options=pcsv.ReadOptions(column_names=cols, skip_rows=skip,
                                          block_size=block_bytes, use_threads=False),
            parse_options=pcsv.ParseOptions(delimiter=_UNIT if sep == "::" else sep,
                                            invalid_row_handler=on_bad_row,
                                            ignore_empty_lines=False),
            convert_options=pcsv.ConvertOptions(column_types={c: pa.binary() for c in cols}),
        )
    except pa.ArrowInvalid as e:
        if "skip" in str(e) and len(head) < block_bytes:
            return  # a header and no newline after it: no rows
        raise _text_error(name, gz, skip, e) from e
    except OSError as e:
        raise _text_error(name, gz, skip, e) from e
    info.columns = {k: (info.header[cols.index(v)] if info.header else v) for k, v in
                    mapping.items()}
    try:
        for batch in reader:
            pending.sort()
            skipped = np.array([r for r, _ in pending if r >= next_line], dtype=np.int64)
            lines = _line_numbers(batch.num_rows, next_line, skipped)
            if batch.num_rows:
                next_line = int(lines[-1]) + 1
            emit = [p for p in pending if p[0] < next_line]
            pending[:] = [p for p in pending if p[0] >= next_line]
            parts = [_ragged_batch(emit, source=name, sep=sep)] if emit else []
            info.wrong_field_count += len(emit)
            blank = np.ones(batch.num_rows, dtype=bool)
            for c in cols:
                blank &= pc.fill_null(pc.equal(pc.binary_length(batch.column(c)), 0),
                                      True).to_numpy(zero_copy_only=False)
            info.blank_lines += int(blank.sum())
            if not blank.all():
                keep = ~blank
                sub = batch.filter(pa.array(keep))
                fields, bad_enc = {}, np.zeros(sub.num_rows, dtype=bool)
                for target, col in mapping.items():
                    text, bad = _utf8(sub.column(col))
                    fields[target] = text
                    if bad is not None:
                        bad_enc |= bad
                perr = None
                if bad_enc.any():
                    info.invalid_encoding += int(bad_enc.sum())
                    perr = pa.array(np.where(bad_enc, schema.REASON_ENCODING, None), pa.string())
                last_good = int(lines[keep][-1])
                parts.append(_raw_batch(fields, sub.num_rows, source=name, rows=lines[keep],
                                        parse_error=perr))
            if parts:
                yield _in_file_order(parts, info)
    except (OSError, pa.ArrowInvalid) as e:
        raise _text_error(name, gz, max([last_good, *(r for r, _ in pending)]), e) from e
    if pending:
        info.wrong_field_count += len(pending)
        yield _in_file_order([_ragged_batch(sorted(pending), source=name, sep=sep)], info)


def _text_error(name: str, gz: bool, last_line: int, e: Exception) -> IngestError:
    gz_broken = gz and any(w in str(e).lower() for w in ("compress", "gzip", "zlib", "inflate"))
    what = "truncated or corrupt gzip stream" if gz_broken else "unreadable text"
    return IngestError(f"{name} after line {last_line}: {what} ({e}); rule: every file is "
                       "complete, readable delimited text")


def _in_file_order(parts: list[pa.RecordBatch], info: FileInfo) -> pa.RecordBatch:
    table = pa.Table.from_batches(parts, schema=_RAW_SCHEMA)
    if len(parts) > 1:
        table = table.sort_by(schema.RAW_ROW)
    info.rows += table.num_rows
    return table.combine_chunks().to_batches()[0] if table.num_rows else parts[0]


# --- parquet ----------------------------------------------------------------------------------


def _parquet_text(arr: pa.Array, *, is_id: bool, is_time: bool) -> tuple[pa.Array, np.ndarray]:
    """One Parquet column as text (see the module rules); returns (text, unparseable-id mask)."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    none = np.zeros(len(arr), dtype=bool)
    t = arr.type
    if is_time and pa.types.is_timestamp(t):
        scale = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}[t.unit]
        secs = pc.divide(pc.cast(arr, pa.int64()), scale)
        return pc.cast(secs, pa.string()), none
    if is_time and pa.types.is_date(t):
        days = pc.cast(pc.cast(arr, pa.date32()), pa.int32())
        return pc.cast(pc.multiply(pc.cast(days, pa.int64()), 86400), pa.string()), none
    if is_id and pa.types.is_floating(t):
        x = arr.to_numpy(zero_copy_only=False).astype("float64")
        exact = np.isfinite(x) & (np.floor(x) == x) & (np.abs(x) < _EXACT_FLOAT)
        valid = ~np.asarray(arr.is_null().to_numpy(zero_copy_only=False))
        text = np.where(exact, np.where(exact, x, 0).astype(np.int64).astype(str),
                        pc.cast(arr, pa.string()).to_numpy(zero_copy_only=False))
        return pa.array(np.where(valid, text, None), pa.string()), valid & ~exact
    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        text, bad = _utf8(arr.cast(pa.binary()))
        return text, none if bad is None else bad
    if pa.types.is_null(t):
        return pa.nulls(len(arr), pa.string()), none
    return pc.cast(arr, pa.string()), none


def _iter_parquet(
    name: str, path: Source, info: FileInfo, *, batch_rows: int
) -> Iterator[pa.RecordBatch]:
    import pyarrow.parquet as pq

    info.format = "parquet"
    try:
        pf = pq.ParquetFile(pa.BufferReader(path) if isinstance(path, bytes) else str(path))
    except (OSError, pa.ArrowException) as e:
        raise IngestError(f"{name}: not a readable Parquet file ({e}); rule: Parquet files "
                          "must be complete") from e
    names = pf.schema_arrow.names
    mapping = {k: names[v] for k, v in map_columns(names, where=f"{name} (Parquet schema)").items()}
    info.columns = dict(mapping)
    row = 1
    try:
        batches = storage.parquet_batches(pf, columns=list(mapping.values()),
                                          batch_rows=batch_rows)
        for batch in batches:
            fields, bad_id, bad_enc = {}, np.zeros(batch.num_rows, bool), np.zeros(
                batch.num_rows, bool)
            for target, col in mapping.items():
                is_id = target in (schema.USER_ID, schema.ITEM_ID)
                text, bad = _parquet_text(batch.column(col), is_id=is_id,
                                          is_time=target == schema.TIMESTAMP)
                if pa.types.is_binary(batch.schema.field(col).type):
                    bad_enc |= bad
                else:
                    bad_id |= bad
                if target == schema.RATING:
                    text = pc.fill_null(text, "")  # the file has ratings: null means missing
                fields[target] = text
            perr = np.where(bad_enc, schema.REASON_ENCODING,
                            np.where(bad_id, schema.REASON_UNPARSEABLE_ID, None))
            info.invalid_encoding += int(bad_enc.sum())
            n = batch.num_rows
            info.rows += n
            yield _raw_batch(fields, n, source=name, rows=np.arange(row, row + n),
                             parse_error=pa.array(perr, pa.string()))
            row += n
    except (OSError, pa.ArrowException) as e:
        raise IngestError(f"{name} after row {row - 1}: unreadable Parquet ({e}); rule: Parquet "
                          "files must be complete") from e


# --- files and snapshots ------------------------------------------------------------------------


def is_ignored(name: str) -> bool:
    """Marker files (``_SUCCESS``, ``.part.crc``...) are not data."""
    return PurePosixPath(name).name.startswith(("_", "."))


def iter_file(
    name: str, src: Source, *, delimiter: str | None = None,
    block_bytes: int = DEFAULT_BLOCK_BYTES, batch_rows: int = DEFAULT_BATCH_ROWS,
    info: FileInfo | None = None, workdir: Path | None = None,
) -> Iterator[pa.RecordBatch]:
    """Raw batches (``schema.RAW_COLUMNS``) of one file, given as bytes or a local path."""
    info = info if info is not None else FileInfo(name)
    with _raw_stream(src) as f:
        info.gzip = f.read(2) == _GZIP_MAGIC
    head = _read_head(src, info.gzip, name)
    suffixes = [s.lower() for s in PurePosixPath(name).suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    kind = suffixes[-1] if suffixes else ""
    if head[:4] == _PARQUET_MAGIC or kind == ".parquet":
        if info.gzip:
            src = _gunzip(src, name, workdir)
        yield from _iter_parquet(name, src, info, batch_rows=batch_rows)
        return
    if kind not in TEXT_SUFFIXES:
        raise IngestError(
            f"{name}: unknown format {kind!r}; rule: Parquet, or delimited text named "
            f"{sorted(s for s in TEXT_SUFFIXES if s)} or without a suffix, optionally gzipped"
        )
    yield from _iter_text(name, src, info.gzip, info, delimiter=delimiter,
                          block_bytes=block_bytes)


def _gunzip(src: Source, name: str, workdir: Path | None) -> Source:
    """Parquet needs random access: a gzipped Parquet file is unpacked first (to disk if big)."""
    try:
        if isinstance(src, bytes):
            return gzip.decompress(src)
        out = (workdir or src.parent) / (src.name + ".unpacked")
        with gzip.open(src, "rb") as fin, open(out, "wb") as fout:
            shutil.copyfileobj(fin, fout, 1 << 20)
        return out
    except (OSError, EOFError) as e:
        raise IngestError(f"{name}: truncated or corrupt gzip stream ({e}); rule: a .gz file is "
                          "a complete gzip") from e


def iter_snapshot(
    files: Mapping[str, Source], infos: list[FileInfo] | None = None, **kwargs
) -> Iterator[pa.RecordBatch]:
    """Raw batches of every data file, files in name order; ``infos`` collects a FileInfo each."""
    if not files:
        raise IngestError("the snapshot has no files")
    infos = infos if infos is not None else []
    for name in sorted(files):
        if is_ignored(name):
            continue
        info = FileInfo(name)
        infos.append(info)
        yield from iter_file(name, files[name], info=info, **kwargs)


def _check_not_empty(infos: list[FileInfo], where: str) -> None:
    if not infos:
        raise IngestError(f"{where}: no data files (only markers such as _SUCCESS)")
    if sum(i.rows for i in infos) == 0:
        what = "; ".join(f"{i.name}: " + ("header only" if i.header else "empty")
                         + (f", {i.blank_lines} blank lines" if i.blank_lines else "")
                         for i in infos)
        raise IngestError(f"{where}: no data rows in any file ({what}); rule: a snapshot "
                          "holds at least one event")


def ingest_files(
    files: Mapping[str, bytes], *, delimiter: str | None = None,
    block_bytes: int = DEFAULT_BLOCK_BYTES, batch_rows: int = DEFAULT_BATCH_ROWS,
) -> pd.DataFrame:
    """Pure core: ``{file name: bytes}`` -> one raw-string frame (``schema.RAW_COLUMNS``)."""
    infos: list[FileInfo] = []
    batches = list(iter_snapshot(files, infos, delimiter=delimiter, block_bytes=block_bytes,
                                 batch_rows=batch_rows))
    _check_not_empty(infos, "the snapshot")
    return pa.Table.from_batches(batches, schema=_RAW_SCHEMA).to_pandas()


def read_side_table(data: bytes) -> pd.DataFrame:
    """Items or users (CSV or Parquet, optionally gzipped), all values as strings."""
    if data[:2] == _GZIP_MAGIC:
        data = gzip.decompress(data)
    if data[:4] == _PARQUET_MAGIC:
        df = storage.parquet_frame(data).astype("string")
    else:
        df = pd.read_csv(io.BytesIO(data), dtype=str, keep_default_na=False, na_values=[""],
                         encoding="utf-8-sig")
    df.columns = [canonical_column(c) or str(c).strip() for c in df.columns]
    return df


def _object_name(uri: str, prefix: str) -> str:
    return uri[len(prefix):] if uri.startswith(prefix) else PurePosixPath(uri).name


def run(ds: str, params: dict | None = None, *, started_at: str | None = None) -> Ingested:
    """Read ``raw/*/ds=<ds>/`` and write ``runs/ds=<ds>/ingest/``; return the output URIs.

    Each raw file is downloaded to a temp folder, streamed into one local Parquet file batch by
    batch, and deleted; the result is uploaded once complete.
    """
    import pyarrow.parquet as pq

    p = settings.step_params(PARAMS, params)
    prefix = layout.raw_prefix(ds)
    uris = storage.list_uris(prefix)
    names = {_object_name(u, prefix): u for u in uris}
    if not names:
        raise IngestError(f"{prefix}: no raw interactions for ds {ds}")
    ignored = sorted(n for n in names if is_ignored(n))
    if ignored:
        log.warning("ignoring marker files %s", ignored)
    out = {
        "interactions": layout.run_uri(ds, "ingest", "interactions.parquet"),
        "files": layout.run_uri(ds, "ingest", "files.json"),
    }
    infos: list[FileInfo] = []
    with tempfile.TemporaryDirectory(prefix="nightrec-ingest-") as tmp:
        local = Path(tmp) / "interactions.parquet"
        with pq.ParquetWriter(local, _RAW_SCHEMA, compression="zstd") as writer:
            for i, name in enumerate(sorted(n for n in names if not is_ignored(n))):
                src = storage.download_to(names[name], Path(tmp) / f"raw-{i:05d}")
                info = FileInfo(name)
                infos.append(info)
                for batch in iter_file(name, src, delimiter=p["ingest.delimiter"],
                                       block_bytes=int(p["ingest.block_bytes"]),
                                       batch_rows=int(p["ingest.batch_rows"]), info=info,
                                       workdir=Path(tmp)):
                    writer.write_batch(batch)
                src.unlink()
                log.info("ingested %s: %s", name, asdict(info))
        _check_not_empty(infos, prefix)
        storage.upload_from(local, out["interactions"])
    storage.write_json(out["files"], {"ds": ds, "files": [asdict(i) for i in infos],
                                      "ignored": ignored,
                                      "rows": sum(i.rows for i in infos),
                                      "blank_lines": sum(i.blank_lines for i in infos)})
    for table in ("items", "users"):
        side_uris = [u for u in storage.list_uris(layout.raw_prefix(ds, table))
                     if not is_ignored(_object_name(u, layout.raw_prefix(ds, table)))]
        if side_uris:
            side = pd.concat([read_side_table(storage.read_bytes(u)) for u in side_uris])
            out[table] = layout.run_uri(ds, "ingest", f"{table}.parquet")
            storage.write_parquet(side, out[table])
    return Ingested(ds=ds, started_at=started_at, **out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="ingest local raw files into one parquet")
    parser.add_argument("inputs", nargs="+", type=Path)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    import pyarrow.parquet as pq

    p = settings.step_params(PARAMS)
    infos: list[FileInfo] = []
    with tempfile.TemporaryDirectory(prefix="nightrec-ingest-") as tmp:
        local = Path(tmp) / "interactions.parquet"
        with pq.ParquetWriter(local, _RAW_SCHEMA, compression="zstd") as writer:
            for batch in iter_snapshot({i.name: i for i in args.inputs}, infos,
                                       delimiter=p["ingest.delimiter"],
                                       block_bytes=int(p["ingest.block_bytes"]),
                                       batch_rows=int(p["ingest.batch_rows"]), workdir=Path(tmp)):
                writer.write_batch(batch)
        _check_not_empty(infos, "the inputs")
        storage.upload_from(local, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
