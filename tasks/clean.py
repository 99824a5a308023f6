"""Step 2, clean: judge every raw row, quarantine the bad ones with a reason, dedupe, k-core, index.

Each raw row that ingest passed on ends in exactly one of two tables, unless its user was
erased on request (``stats.json`` has the sum: ``raw_rows = clean_rows + quarantined_rows +
forgotten_rows``):

- ``interactions``: ``user_id, item_id`` (str, stripped), ``rating`` (float64 in
  clean.min_rating..max_rating, NaN when the file has no rating column: implicit feedback),
  ``timestamp`` (int64 unix seconds), ``user_idx, item_idx`` (int32 dense 0..n-1 in sorted order
  of the external id; this run's index, which training and scoring use);
- ``quarantine``: the raw strings plus ``source_file, raw_row, raw_text, reason``.

Forgotten users (``nightrec forget``, nightrec/ops/retention.py): a row whose stripped user id hashes
(sha256 of its UTF-8 bytes) into ``state/forgotten/users.parquet`` is dropped before any rule
judges it, so it reaches neither table; ``forgotten_rows`` counts them.

Reasons, in precedence order (a row failing several rules gets the first; ``schema.REASONS``):

1. ``wrong_field_count``, ``invalid_encoding``: ingest could not split the line into fields, or a
   field is not UTF-8;
2. ``repeated_header``: the row is a header line again (user and item fields are column names);
3. ``missing_field``: user, item or timestamp empty; or rating empty in a file with ratings;
4. ``unparseable_id``: an id that does not match clean.id_pattern (RE2, after stripping blanks) or
   is longer than clean.max_id_length, or a Parquet float id that is not an exact integer;
5. ``not_finite``: rating or timestamp NaN or +-inf (as text, or overflowing a double);
6. ``unparseable_value``: rating not a number, timestamp neither a number nor ISO 8601 text;
7. ``rating_out_of_range``: outside clean.min_rating..clean.max_rating;
8. ``timestamp_out_of_range``: before clean.min_timestamp, or after the end of the run's day;
9. ``item_not_in_catalogue``: an items table was given for ds and does not list the item;
10. ``duplicate_event``: the dedupe policy. Per (user, item) the latest event wins; on equal
    timestamps the one later in the snapshot (files in name order, rows in file order);
11. ``below_k_core``: user with fewer than clean.min_user_interactions events, or item with fewer
    than clean.min_item_interactions, removed repeatedly until none is left.

Reasons 1-9 are *invalid* (they count towards validate.max_invalid_fraction); 10-11 are policy.

Timestamps: numbers are unix time, in the unit clean.timestamp_unit (``s``, ``ms``, ``us``,
``ns``) or, with ``auto``, decided per source file from the median of its numeric timestamps:
above 1e17 ns, above 1e14 us, above 1e11 ms, else seconds (1e11 s is the year 5138, 1e11 ms is
1973). Fractions of a second are dropped. ISO 8601 text is read as UTC unless it has an offset.

Memory: ``run`` reads ingest's Parquet in batches of clean.batch_rows; it keeps one byte per row
plus the parsed valid rows (needed whole for dedupe and k-core), then writes the quarantine in a
second pass over the same batches.
"""

from __future__ import annotations

import logging
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from nightrec.core import schema, settings
from nightrec.core.records import Cleaned, Ingested
from nightrec.store import layout, storage
from nightrec.table import contract

PARAMS = [
    "clean.min_rating",
    "clean.max_rating",
    "clean.min_timestamp",
    "clean.timestamp_unit",
    "clean.id_pattern",
    "clean.max_id_length",
    "clean.min_user_interactions",
    "clean.min_item_interactions",
    "clean.batch_rows",
]
# The id rule is the table contract's: the ids clean keeps are the ids a table holds and the ids
# serve accepts, all checked by contract.ids_ok.
DEFAULT_ID_PATTERN = contract.DEFAULT_ID_PATTERN
DEFAULT_MAX_ID_LENGTH = contract.DEFAULT_MAX_ID_LENGTH
DEDUPE_POLICY = (
    "latest event per (user_id, item_id) wins; on equal timestamps the one later in the snapshot"
)
_UNIT_SCALE = {"s": 1.0, "ms": 1e3, "us": 1e6, "ns": 1e9}
_AUTO_THRESHOLDS = [(1e17, "ns"), (1e14, "us"), (1e11, "ms")]
_CODE = {r: np.int8(i + 1) for i, r in enumerate(schema.REASONS)}  # 0: the row is kept
_REASON_BY_CODE = np.array([None, *schema.REASONS], dtype=object)
_NAN_TEXT = ["nan", "+nan", "-nan"]
QUARANTINE_SCHEMA = pa.schema(
    [(c, pa.string()) for c in schema.INTERACTION_COLUMNS]
    + [(schema.SOURCE_FILE, pa.string()), (schema.RAW_ROW, pa.int64()),
       (schema.RAW_TEXT, pa.string()), (schema.REASON, pa.string())]
)
log = logging.getLogger(__name__)


# --- row-local rules --------------------------------------------------------------------------


def _column(batch: pa.RecordBatch | pa.Table, name: str) -> pa.Array:
    if name not in batch.schema.names:
        return pa.nulls(batch.num_rows, pa.string())
    col = batch.column(name)
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    return col if col.type == pa.string() else col.cast(pa.string())


def _np(mask: pa.Array) -> np.ndarray:
    return np.asarray(pc.fill_null(mask, False).to_numpy(zero_copy_only=False), dtype=bool)


def _empty(text: pa.Array) -> np.ndarray:
    return _np(pc.fill_null(pc.equal(text, ""), True))


def _id_ok(ids: pa.Array, pattern: str, max_len: int) -> np.ndarray:
    """Per value: matches ``pattern`` (RE2) and is at most ``max_len`` characters
    (``contract.ids_ok``, the check serve makes too), as a numpy mask."""
    return _np(contract.ids_ok(ids, pattern, max_len))


def _numbers(text: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(values as float64, parsed mask). NaN/inf text parses (to NaN/inf); other junk does not."""
    text = pc.if_else(pc.equal(text, ""), pa.scalar(None, pa.string()), text)
    try:
        values = pc.cast(text, pa.float64()).to_numpy(zero_copy_only=False)
        return np.asarray(values, dtype="float64"), _np(pc.is_valid(text))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        values = pd.to_numeric(pd.Series(text.to_pandas()), errors="coerce").to_numpy("float64")
        nan_text = _np(pc.is_in(pc.utf8_lower(text), pa.array(_NAN_TEXT)))
        return values, ~np.isnan(values) | nan_text


def _iso_seconds(text: pa.Array, todo: np.ndarray) -> np.ndarray:
    """ISO 8601 text -> unix seconds (float, NaN where not a date), only where ``todo``."""
    out = np.full(len(text), np.nan)
    if todo.any():
        idx = np.flatnonzero(todo)
        parsed = pd.to_datetime(pd.Series(pc.take(text, pa.array(idx)).to_pandas()),
                                format="ISO8601", utc=True, errors="coerce")
        secs = (parsed - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(seconds=1)
        out[idx] = secs.to_numpy(dtype="float64", na_value=np.nan)
    return out


def check_rows(
    batch: pa.RecordBatch | pa.Table, *, id_pattern: str, max_id_length: int,
    min_rating: float, max_rating: float,
) -> tuple[np.ndarray, pd.DataFrame]:
    """Rules 1-7 (those that need only the row itself) on one batch of ingest's output.

    Returns ``codes`` (int8 per row, 0 = passes, else ``schema.REASONS[code - 1]``) and the parsed
    values of every row: ``user_id, item_id`` (stripped), ``rating`` (NaN = none),
    ``ts`` (float, in the file's unit), ``ts_iso`` (bool: ``ts`` came from ISO text, in seconds).
    """
    n = batch.num_rows
    codes = np.zeros(n, dtype=np.int8)

    def mark(mask: np.ndarray, reason: str) -> None:
        codes[(codes == 0) & mask] = _CODE[reason]

    user = pc.utf8_trim_whitespace(_column(batch, schema.USER_ID))
    item = pc.utf8_trim_whitespace(_column(batch, schema.ITEM_ID))
    ts_text = pc.utf8_trim_whitespace(_column(batch, schema.TIMESTAMP))
    rating_text = pc.utf8_trim_whitespace(_column(batch, schema.RATING))
    parse_error = _column(batch, schema.PARSE_ERROR)

    for reason in (schema.REASON_FIELD_COUNT, schema.REASON_ENCODING):
        mark(_np(pc.equal(parse_error, reason)), reason)
    aliases = schema.COLUMN_ALIASES
    mark(_np(pc.is_in(pc.utf8_lower(user), pa.array(aliases[schema.USER_ID])))
         & _np(pc.is_in(pc.utf8_lower(item), pa.array(aliases[schema.ITEM_ID]))),
         schema.REASON_REPEATED_HEADER)
    has_rating = _np(pc.is_valid(rating_text))  # null: the file has no rating column
    mark(_empty(user) | _empty(item) | _empty(ts_text) | (has_rating & _empty(rating_text)),
         schema.REASON_MISSING_FIELD)
    mark(_np(pc.equal(parse_error, schema.REASON_UNPARSEABLE_ID))
         | ~_id_ok(user, id_pattern, max_id_length) | ~_id_ok(item, id_pattern, max_id_length),
         schema.REASON_UNPARSEABLE_ID)

    ts, ts_parsed = _numbers(ts_text)
    rating, rating_parsed = _numbers(rating_text)
    rating_parsed &= has_rating
    iso = _iso_seconds(ts_text, ~ts_parsed & (codes == 0))
    ts_iso = ~np.isnan(iso)
    ts = np.where(ts_iso, iso, ts)
    mark((ts_parsed & ~np.isfinite(ts)) | (rating_parsed & ~np.isfinite(rating)),
         schema.REASON_NOT_FINITE)
    mark(~(ts_parsed | ts_iso) | (has_rating & ~rating_parsed), schema.REASON_UNPARSEABLE)
    rating = np.where(has_rating, rating, np.nan)
    with np.errstate(invalid="ignore"):
        mark(has_rating & ((rating < min_rating) | (rating > max_rating)),
             schema.REASON_RATING_RANGE)
    parsed = pd.DataFrame({
        schema.USER_ID: user.to_pandas(), schema.ITEM_ID: item.to_pandas(),
        schema.RATING: rating, "ts": ts, "ts_iso": ts_iso,
    })
    return codes, parsed


# --- rules over the whole table -------------------------------------------------------------


def timestamp_unit(ts: np.ndarray, unit: str = "auto") -> str:
    """``unit``, or for ``auto`` the unit that the median of the finite ``ts`` suggests."""
    if unit != "auto":
        if unit not in _UNIT_SCALE:
            raise ValueError(f"clean.timestamp_unit must be auto, s, ms, us or ns, got {unit!r}")
        return unit
    finite = ts[np.isfinite(ts)]
    median = float(np.median(finite)) if len(finite) else 0.0
    return next((u for bound, u in _AUTO_THRESHOLDS if median > bound), "s")


def _kcore_codes(u: np.ndarray, i: np.ndarray, *, min_user: int, min_item: int) -> np.ndarray:
    keep = np.ones(len(u), dtype=bool)
    nu, ni = (int(u.max()) + 1, int(i.max()) + 1) if len(u) else (0, 0)
    while True:
        ucount = np.bincount(u[keep], minlength=nu)
        icount = np.bincount(i[keep], minlength=ni)
        bad = keep & ((ucount[u] < min_user) | (icount[i] < min_item))
        if not bad.any():
            return keep
        keep &= ~bad


def kcore(df: pd.DataFrame, *, min_user: int, min_item: int) -> pd.Series:
    """Boolean mask of rows that survive the iterated (min_user, min_item) k-core."""
    u = pd.factorize(df[schema.USER_ID])[0]
    i = pd.factorize(df[schema.ITEM_ID])[0]
    return pd.Series(_kcore_codes(u, i, min_user=min_user, min_item=min_item), index=df.index)


def judge_table(
    parsed: pd.DataFrame, *, ds: str, min_timestamp: str, timestamp_unit_param: str,
    catalogue: set[str] | None, min_user_interactions: int, min_item_interactions: int,
) -> tuple[np.ndarray, pd.DataFrame, dict]:
    """Rules 8-11 on the rows that passed ``check_rows`` (in snapshot order, with ``source_file``).

    Returns (codes per row of ``parsed``, the clean table, ``{"timestamp_units": {file: unit}}``).
    """
    settings.check_ds(ds)
    n = len(parsed)
    codes = np.zeros(n, dtype=np.int8)

    def mark(mask: np.ndarray, reason: str) -> None:
        codes[(codes == 0) & mask] = _CODE[reason]

    ts = parsed["ts"].to_numpy(dtype="float64", copy=True)
    iso = parsed["ts_iso"].to_numpy(dtype=bool)
    units = {}
    files = pd.Categorical(parsed[schema.SOURCE_FILE])
    order = np.argsort(files.codes, kind="stable")
    bounds = np.searchsorted(files.codes[order], np.arange(len(files.categories) + 1))
    for k, name in enumerate(files.categories):
        idx = order[bounds[k]: bounds[k + 1]]
        numeric = idx[~iso[idx]]
        unit = timestamp_unit(ts[numeric], timestamp_unit_param)
        units[str(name)] = unit
        ts[numeric] = ts[numeric] / _UNIT_SCALE[unit]
    seconds = np.floor(ts)
    lo = pd.Timestamp(min_timestamp, tz="UTC").timestamp()
    hi = (pd.Timestamp(ds, tz="UTC") + pd.Timedelta(days=1)).timestamp()
    mark((seconds < lo) | (seconds >= hi), schema.REASON_TIMESTAMP_RANGE)
    if catalogue is not None:
        known = pa.array(sorted(catalogue), pa.string())
        mark(~_np(pc.is_in(pa.array(parsed[schema.ITEM_ID], pa.string()), known)),
             schema.REASON_NOT_IN_CATALOGUE)

    u_codes, users = pd.factorize(parsed[schema.USER_ID])
    i_codes, items = pd.factorize(parsed[schema.ITEM_ID])
    u_codes, i_codes = u_codes.astype(np.int32), i_codes.astype(np.int32)
    ok = np.flatnonzero(codes == 0)
    order = ok[np.lexsort((ok, seconds[ok], i_codes[ok], u_codes[ok]))]
    same_as_next = (u_codes[order][:-1] == u_codes[order][1:]) & (
        i_codes[order][:-1] == i_codes[order][1:])
    codes[order[:-1][same_as_next]] = _CODE[schema.REASON_DUPLICATE]

    ok = np.flatnonzero(codes == 0)
    keep = _kcore_codes(u_codes[ok], i_codes[ok], min_user=min_user_interactions,
                        min_item=min_item_interactions)
    codes[ok[~keep]] = _CODE[schema.REASON_KCORE]
    ok = ok[keep]

    # Dense indices in sorted order of the external id (score relies on user order = id order);
    # rows by user index, then time, then item index.
    user_rank = _sorted_rank(users, u_codes[ok])
    item_rank = _sorted_rank(items, i_codes[ok])
    final = np.lexsort((item_rank, seconds[ok], user_rank))
    ok, user_rank, item_rank = ok[final], user_rank[final], item_rank[final]
    clean = pd.DataFrame({
        schema.USER_ID: users.take(u_codes[ok]).astype("str").array,
        schema.ITEM_ID: items.take(i_codes[ok]).astype("str").array,
        schema.RATING: parsed[schema.RATING].to_numpy(dtype="float64")[ok],
        schema.TIMESTAMP: seconds[ok].astype("int64"),
        schema.USER_IDX: user_rank,
        schema.ITEM_IDX: item_rank,
    })
    return codes, clean, {"timestamp_units": units}


def _sorted_rank(uniques: pd.Index, codes: np.ndarray) -> np.ndarray:
    """Dense 0..m-1 rank, in sorted order of the external id, of the uniques that ``codes`` use."""
    used = np.unique(codes)
    names = uniques.take(used).astype(str)
    rank_of_used = np.empty(len(used), dtype=np.int32)
    rank_of_used[names.argsort()] = np.arange(len(used), dtype=np.int32)
    return rank_of_used[np.searchsorted(used, codes)]


# --- the whole step -----------------------------------------------------------------------------


def _quarantine_rows(batch: pa.RecordBatch | pa.Table, codes: np.ndarray) -> pa.Table:
    sel = pa.array(np.flatnonzero(codes))
    raw_row = batch.column(schema.RAW_ROW)
    if isinstance(raw_row, pa.ChunkedArray):
        raw_row = raw_row.combine_chunks()
    cols = [pc.take(_column(batch, c), sel) for c in schema.INTERACTION_COLUMNS]
    cols += [pc.take(_column(batch, schema.SOURCE_FILE), sel),
             pc.take(raw_row.cast(pa.int64()), sel),
             pc.take(_column(batch, schema.RAW_TEXT), sel),
             pa.array(_REASON_BY_CODE[codes[codes != 0]], pa.string())]
    return pa.Table.from_arrays(cols, schema=QUARANTINE_SCHEMA)


def _file_codes(names: pa.Array, file_ids: dict[str, int]) -> np.ndarray:
    """Small int codes for file names (a python string per row would cost ~60 bytes each)."""
    enc = pc.dictionary_encode(names)
    local = np.array([file_ids.setdefault(str(f), len(file_ids))
                      for f in enc.dictionary.to_pylist()], dtype=np.int32)
    return local[np.asarray(enc.indices.to_numpy(zero_copy_only=False), dtype=np.int64)]


def user_hash(user_id: str) -> str:
    """sha256 (hex) of a stripped external user id: how ``nightrec forget`` names a user."""
    return storage.sha256(str(user_id).strip().encode("utf-8"))


def forgotten_users(uri: str | None = None) -> frozenset[str]:
    """The hashes of the users erased on request (``layout.forgotten_users_uri()``); empty when
    nobody was. ``uri``: another list (a local run)."""
    uri = uri or layout.forgotten_users_uri()
    if not storage.exists(uri):
        return frozenset()
    return frozenset(storage.read_parquet(uri, columns=["user_sha256"])["user_sha256"].astype(str))


def _forgotten_mask(batch: pa.RecordBatch | pa.Table, forgotten: frozenset[str]) -> np.ndarray:
    """Per row: its stripped user id hashes into ``forgotten``. Each distinct id is hashed once."""
    if not forgotten or batch.num_rows == 0:
        return np.zeros(batch.num_rows, dtype=bool)
    enc = pc.dictionary_encode(pc.utf8_trim_whitespace(_column(batch, schema.USER_ID)))
    hit = pa.array([v is not None and user_hash(v) in forgotten
                    for v in enc.dictionary.to_pylist()], pa.bool_())
    return _np(pc.take(hit, enc.indices))


def _drop_forgotten(batches: Callable[[], Iterable[pa.RecordBatch | pa.Table]],
                    forgotten: frozenset[str], dropped: Counter):
    """``batches`` without the forgotten users' rows; ``dropped[file]`` counts what went."""
    def gen():
        dropped.clear()
        for batch in batches():
            mask = _forgotten_mask(batch, forgotten)
            if mask.any():
                files = pc.filter(_column(batch, schema.SOURCE_FILE), pa.array(mask))
                for entry in pc.value_counts(files).to_pylist():
                    dropped[entry["values"]] += entry["counts"]
                batch = batch.filter(pa.array(~mask))
            yield batch
    return gen


def clean_batches(
    batches: Callable[[], Iterable[pa.RecordBatch | pa.Table]], *, ds: str, min_rating: float,
    max_rating: float, min_timestamp: str, min_user_interactions: int,
    min_item_interactions: int, timestamp_unit: str = "auto",
    id_pattern: str = DEFAULT_ID_PATTERN, max_id_length: int = DEFAULT_MAX_ID_LENGTH,
    catalogue: Iterable[str] | None = None,
    write_quarantine: Callable[[pa.Table], None] | None = None,
    forgotten: frozenset[str] = frozenset(),
) -> tuple[pd.DataFrame, dict]:
    """The step over ingest's output given as a re-iterable of batches (read twice: to judge,
    then to copy the rejected rows' raw text to ``write_quarantine``). Returns (clean, stats).

    ``forgotten``: sha256 hashes (:func:`user_hash`) of users whose rows are dropped before
    judging (counted as ``forgotten_rows``, in neither output).
    """
    settings.check_ds(ds)
    dropped: Counter = Counter()
    batches = _drop_forgotten(batches, forgotten, dropped)
    code_parts, parsed_parts, file_parts, offset = [], [], [], 0
    file_ids: dict[str, int] = {}
    for batch in batches():
        codes, parsed = check_rows(batch, id_pattern=id_pattern, max_id_length=max_id_length,
                                   min_rating=min_rating, max_rating=max_rating)
        keep = np.flatnonzero(codes == 0)
        parsed = parsed.iloc[keep].copy()
        parsed["pos"] = keep + offset
        file_parts.append(_file_codes(pc.take(_column(batch, schema.SOURCE_FILE),
                                              pa.array(keep)), file_ids))
        code_parts.append(codes)
        parsed_parts.append(parsed)
        offset += batch.num_rows
    codes = np.concatenate(code_parts) if code_parts else np.zeros(0, np.int8)
    parsed = (pd.concat(parsed_parts, ignore_index=True) if parsed_parts else
              pd.DataFrame(columns=[schema.USER_ID, schema.ITEM_ID, schema.RATING, "ts",
                                    "ts_iso", "pos"]))
    parsed[schema.SOURCE_FILE] = pd.Categorical.from_codes(
        np.concatenate(file_parts) if file_parts else np.zeros(0, np.int32),
        categories=pd.Index(list(file_ids), dtype=object))
    del parsed_parts, file_parts
    pa.default_memory_pool().release_unused()  # the batches' buffers
    late, clean, info = judge_table(
        parsed, ds=ds, min_timestamp=min_timestamp, timestamp_unit_param=timestamp_unit,
        catalogue=None if catalogue is None else {str(c).strip() for c in catalogue},
        min_user_interactions=min_user_interactions, min_item_interactions=min_item_interactions,
    )
    codes[parsed["pos"].to_numpy(dtype=np.int64)] = late
    del parsed, late

    by_file: dict[str, Counter] = {}
    rows_by_file: Counter = Counter()
    offset = 0
    for batch in batches():
        part = codes[offset: offset + batch.num_rows]
        offset += batch.num_rows
        files = _column(batch, schema.SOURCE_FILE)
        for entry in pc.value_counts(files).to_pylist():
            rows_by_file[entry["values"]] += entry["counts"]
        if not part.any():
            continue
        q = _quarantine_rows(batch, part)
        pairs = Counter(zip(q.column(schema.SOURCE_FILE).to_pylist(),
                            q.column(schema.REASON).to_pylist()))
        for (f, r), k in pairs.items():
            by_file.setdefault(f, Counter())[r] += k
        if write_quarantine is not None:
            write_quarantine(q)
    counts = Counter(dict(zip(*np.unique(codes[codes != 0], return_counts=True))))
    by_reason = {_REASON_BY_CODE[c]: int(k) for c, k in sorted(counts.items())}
    invalid = sum(k for r, k in by_reason.items() if r in schema.INVALID_REASONS)
    n_forgotten = int(sum(dropped.values()))
    raw_rows = len(codes) + n_forgotten  # = clean + quarantined + forgotten
    rows_by_file.update(dropped)  # a file's rows count its forgotten ones too
    stats = {
        "raw_rows": raw_rows,
        "clean_rows": len(clean),
        "quarantined_rows": int((codes != 0).sum()),
        "forgotten_rows": n_forgotten,
        "by_reason": dict(sorted(by_reason.items())),
        "invalid_rows": int(invalid),
        "invalid_fraction": float(invalid / raw_rows) if raw_rows else 0.0,
        "n_users": int(clean[schema.USER_ID].nunique()),
        "n_items": int(clean[schema.ITEM_ID].nunique()),
        "by_file": {f: {"rows": int(n), "quarantined": dict(sorted(by_file.get(f, {}).items())),
                        **({"forgotten": int(dropped[f])} if dropped.get(f) else {})}
                    for f, n in sorted(rows_by_file.items())},
        "timestamp_units": info["timestamp_units"],
        "dedupe_policy": DEDUPE_POLICY,
        "k_core": {"min_user_interactions": min_user_interactions,
                   "min_item_interactions": min_item_interactions,
                   "removed_rows": by_reason.get(schema.REASON_KCORE, 0)},
        "catalogue_items": None if catalogue is None else len(set(catalogue)),
    }
    return clean, stats


def _as_raw_table(raw: pd.DataFrame) -> pa.Table:
    cols = {}
    for c in schema.RAW_COLUMNS:
        if c == schema.RAW_ROW:
            values = raw[c] if c in raw else pd.Series(np.arange(1, len(raw) + 1))
            cols[c] = pa.array(np.asarray(values, dtype=np.int64))
        elif c in raw:
            try:
                arr = pa.array(raw[c], from_pandas=True)
            except (pa.ArrowInvalid, pa.ArrowTypeError):  # mixed python types
                arr = pa.array([None if pd.isna(v) else str(v) for v in raw[c]], pa.string())
            cols[c] = arr if arr.type == pa.string() else arr.cast(pa.string())
        else:
            cols[c] = pa.nulls(len(raw), pa.string())
    return pa.table(cols)


def clean_interactions(
    raw: pd.DataFrame, *, ds: str, min_rating: float, max_rating: float, min_timestamp: str,
    min_user_interactions: int, min_item_interactions: int, timestamp_unit: str = "auto",
    id_pattern: str = DEFAULT_ID_PATTERN, max_id_length: int = DEFAULT_MAX_ID_LENGTH,
    catalogue: Iterable[str] | None = None, forgotten: frozenset[str] = frozenset(),
) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """Pure core on a frame of ingest's output. Returns ``(interactions, quarantine, stats)``."""
    table = _as_raw_table(raw.reset_index(drop=True))
    parts: list[pa.Table] = []
    clean, stats = clean_batches(
        lambda: [table], ds=ds, min_rating=min_rating, max_rating=max_rating,
        min_timestamp=min_timestamp, min_user_interactions=min_user_interactions,
        min_item_interactions=min_item_interactions, timestamp_unit=timestamp_unit,
        id_pattern=id_pattern, max_id_length=max_id_length, catalogue=catalogue,
        write_quarantine=parts.append, forgotten=forgotten,
    )
    quarantine = pa.concat_tables([QUARANTINE_SCHEMA.empty_table(), *parts]).to_pandas()
    return clean, quarantine, stats


def _catalogue(uri: str | None) -> set[str] | None:
    if not uri:
        return None
    items = storage.read_parquet(uri)
    if schema.ITEM_ID not in items.columns:
        log.warning("the items table %s has no item id column; no catalogue check", uri)
        return None
    return set(items[schema.ITEM_ID].dropna().astype(str).str.strip())


def _core_kwargs(p: settings.StepParams) -> dict:
    kwargs = settings.core_kwargs(p)
    kwargs.pop("batch_rows")
    return kwargs


def clean_file(
    local: Path, *, ds: str, p: settings.StepParams, quarantine_path: Path,
    catalogue: set[str] | None, forgotten: frozenset[str] = frozenset(),
) -> tuple[pd.DataFrame, dict]:
    """``clean_batches`` over a local Parquet file of ingest's output, batch by batch."""
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(local)
    columns = [c for c in schema.RAW_COLUMNS if c in pf.schema_arrow.names]
    with pq.ParquetWriter(quarantine_path, QUARANTINE_SCHEMA, compression="zstd") as writer:
        clean, stats = clean_batches(
            lambda: pf.iter_batches(batch_size=int(p["clean.batch_rows"]), columns=columns),
            ds=ds, catalogue=catalogue, write_quarantine=writer.write_table,
            forgotten=forgotten, **_core_kwargs(p),
        )
    return clean, stats


def run(ingested: Ingested, params: dict | None = None) -> Cleaned:
    ds = ingested.ds
    p = settings.step_params(PARAMS, params)
    out = {
        "interactions": layout.run_uri(ds, "clean", "interactions.parquet"),
        "quarantine": layout.run_uri(ds, "clean", "quarantine.parquet"),
        "stats": layout.run_uri(ds, "clean", "stats.json"),
    }
    with tempfile.TemporaryDirectory(prefix="nightrec-clean-") as tmp:
        local = storage.download_to(ingested.interactions, Path(tmp) / "raw.parquet")
        qpath = Path(tmp) / "quarantine.parquet"
        clean, stats = clean_file(local, ds=ds, p=p, quarantine_path=qpath,
                                  catalogue=_catalogue(ingested.items),
                                  forgotten=forgotten_users())
        storage.upload_from(qpath, out["quarantine"])
    if ingested.files:
        files = storage.read_json(ingested.files)
        stats["blank_lines"] = files.get("blank_lines", 0)
        stats["ignored_files"] = files.get("ignored", [])
    storage.write_parquet(clean, out["interactions"])
    storage.write_json(out["stats"], stats)
    log.info("clean: %d of %d rows kept; quarantined by reason %s; %d of forgotten users",
             stats["clean_rows"], stats["raw_rows"], stats["by_reason"], stats["forgotten_rows"])
    return Cleaned(ds=ds, raw=ingested.interactions, items=ingested.items, users=ingested.users,
                   **out)
