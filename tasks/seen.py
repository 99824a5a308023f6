"""Step 2b, seen: every (user, item) pair a user interacted with up to ds, for seen-item exclusion.

Scoring must never recommend an item a user already interacted with, and "interacted" is wider
than the clean table: clean drops real interactions for their *value* (a rating out of range, a
bad timestamp) or by *policy* (an older duplicate of a pair, a user below the k-core). Those rows
still say the user met the item. So the seen table is the union of

- the clean table (``runs/ds=<ds>/clean/interactions/``, every bucket), and
- the quarantine rows (``runs/ds=<ds>/clean/quarantine.parquet``, raw strings) whose reason is in
  :data:`INCLUDED_REASONS` and whose ids, stripped of blanks as clean strips them, pass clean's id
  rules (``clean.id_pattern`` through the same RE2 engine, at most ``clean.max_id_length``).

Excluded, because they do not name a valid (user, item): rows that could not be split into
fields (``wrong_field_count``, ``invalid_encoding``), ``repeated_header``, ``missing_field``,
``unparseable_id``; and ``item_not_in_catalogue``: the catalogue says the item does not exist, and
no model ever learns it (training reads the clean table), so it can never be recommended and
needs no exclusion. ``timestamp_out_of_range`` rows are included: a clock before
``clean.min_timestamp`` or after ds's end is bad data about *when*, not about *whether*.

Output: ``runs/ds=<ds>/seen/interactions.parquet`` with ``user_id, item_id`` (strings) and
``timestamp`` (int64 unix seconds: the pair's latest clean event; null for a pair only the
quarantine knows) and ``recency_rank`` (int32: 1 for the user's latest pair, 2 for the one
before, ties to the greater item_id, untimed pairs last), one row per distinct pair, sorted by ``(user_id, item_id)`` (row groups of :data:`ROW_GROUP_ROWS`, so a
score shard reading one ``user_id`` range skips the others); ``item_counts.parquet`` beside it,
``item_id, count`` (int64: the item's rows, i.e. the users who met it), one row per item, sorted
by item_id, aggregated from the same pairs in the same engine session; and ``stats.json``.
Popularity (score's cold users and fallback model, publish's ``popular`` list) reads the counts
through :func:`item_counts`: an object of ``n_items`` rows instead of a pass over every pair.

Memory: the quarantine is read in batches of ``clean.batch_rows`` rows, three columns at a time;
the union and distinct run in the engine one user-hash bucket of the clean table at a time, and
the sort over every bucket's pairs, under ``resources`` (nightrec/core/engine.py), spilling to
local disk beyond it.
"""

from __future__ import annotations

import glob as globmod
import io
import logging
import tempfile
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from nightrec.core import engine, schema, settings
from nightrec.core.records import Seen, Validated
from nightrec.store import layout, storage
from nightrec.tasks import clean, split

PARAMS = ["clean.id_pattern", "clean.max_id_length", "clean.batch_rows"]
INCLUDED_REASONS = (
    schema.REASON_NOT_FINITE,
    schema.REASON_UNPARSEABLE,
    schema.REASON_RATING_RANGE,
    schema.REASON_TIMESTAMP_RANGE,
    schema.REASON_DUPLICATE,
    schema.REASON_KCORE,
)
ROW_GROUP_ROWS = 1 << 17  # a layout choice (pushdown granularity), not a tunable
SEEN_SCHEMA = pa.schema([(schema.USER_ID, pa.string()), (schema.ITEM_ID, pa.string())])
COUNT = "count"  # item_counts.parquet: an item's rows in the seen table
RECENCY = "recency_rank"  # interactions.parquet: 1 for a user's latest pair, 2 the one before
COUNTS_NAME = "item_counts.parquet"
COUNTS_SCHEMA = pa.schema([(schema.ITEM_ID, pa.string()), (COUNT, pa.int64())])
log = logging.getLogger(__name__)


def quarantine_pairs(batch: pa.RecordBatch | pa.Table, *, id_pattern: str,
                     max_id_length: int) -> tuple[pa.Table, Counter]:
    """The (user_id, item_id) pairs of one quarantine batch that count as seen, ids stripped;
    and how many rows were taken per reason."""
    reason = clean._column(batch, schema.REASON)
    user = pc.utf8_trim_whitespace(clean._column(batch, schema.USER_ID))
    item = pc.utf8_trim_whitespace(clean._column(batch, schema.ITEM_ID))
    keep = (clean._np(pc.is_in(reason, pa.array(INCLUDED_REASONS, pa.string())))
            & clean._id_ok(user, id_pattern, max_id_length)
            & clean._id_ok(item, id_pattern, max_id_length))
    sel = pa.array(keep)
    taken = Counter({c["values"]: c["counts"]
                     for c in pc.value_counts(pc.filter(reason, sel)).to_pylist()})
    return pa.Table.from_arrays([pc.filter(user, sel), pc.filter(item, sel)],
                                schema=SEEN_SCHEMA), taken


def write_seen(con, clean_glob: str, quarantine: Iterable[pa.RecordBatch | pa.Table],
               out_path: Path, *, id_pattern: str, max_id_length: int,
               counts_path: Path | None = None) -> dict:
    """Core, in the engine: the distinct pairs of the clean table (local Parquet files matching
    ``clean_glob``) and of the qualifying quarantine rows, sorted by (user_id, item_id), written
    to ``out_path`` in row groups of :data:`ROW_GROUP_ROWS`; with ``counts_path``, the pairs per
    item there too (:data:`COUNTS_SCHEMA`, sorted by item_id). Returns the stats. Memory: one
    quarantine batch, plus what the engine is allowed (it spills; the counts are a hash
    aggregate of ``n_items`` groups)."""
    taken: Counter = Counter()
    quarantined = 0
    spill = out_path.parent / f"{out_path.stem}.quarantine-pairs.parquet"
    with pq.ParquetWriter(spill, SEEN_SCHEMA, compression="lz4") as writer:
        for batch in quarantine:
            pairs, counts = quarantine_pairs(batch, id_pattern=id_pattern,
                                             max_id_length=max_id_length)
            writer.write_table(pairs)
            taken += counts
            quarantined += batch.num_rows
    groups, n = _bucket_groups(clean_glob)
    clean_rows = con.execute(
        f"SELECT count(*) FROM read_parquet({_file_list(sum(groups.values(), []))})").fetchone()[0]
    # Distinct per user-hash bucket (a user's pairs are all in one bucket, so the buckets'
    # distinct pairs are the whole table's), then one sort: a DISTINCT over every pair at once
    # is a hash table of every pair, which at 90M pairs outgrew the step's 0.75 GB.
    con.execute(f"""
        CREATE OR REPLACE TEMP TABLE seen_quarantine AS
        SELECT {engine.bucket_sql("user_id", n)} AS bucket, user_id, item_id
        FROM read_parquet({engine.quote(spill)}) ORDER BY bucket""")
    con.execute("CREATE OR REPLACE TEMP TABLE seen_pairs "
                "(user_id VARCHAR, item_id VARCHAR, ts BIGINT, recency INTEGER)")
    # a clean table has timestamps; an interactions table without them (a rescore's input
    # may be pairs only) gives untimed pairs: 0/1 rows for a recency model
    files = sum(groups.values(), [])
    timed = bool(files) and schema.TIMESTAMP in pq.read_schema(files[0]).names
    ts_sql = f"{schema.TIMESTAMP}::BIGINT" if timed else "NULL::BIGINT"
    for b in range(n):
        own = (f"SELECT {schema.USER_ID} AS user_id, {schema.ITEM_ID} AS item_id, "
               f"{ts_sql} AS ts "
               f"FROM read_parquet({_file_list(groups[b])}) UNION ALL " if groups.get(b) else "")
        # one row per pair, with its latest clean timestamp (NULL for a pair only the
        # quarantine knows: its time is what was wrong with it) and its recency rank among the
        # user's pairs (1 = latest; ties: the greater item_id first, NULLs last), what a
        # recency-weighted model's scoring reads (models.pair_ranks computes the same from
        # frames): a user's pairs are all in one bucket
        con.execute(f"""
            INSERT INTO seen_pairs
            SELECT user_id, item_id, ts, row_number() OVER (
                PARTITION BY user_id ORDER BY ts DESC NULLS LAST, item_id DESC)::INTEGER
            FROM (SELECT user_id, item_id, max(ts) AS ts FROM (
                {own}SELECT user_id, item_id, NULL::BIGINT AS ts FROM seen_quarantine
                WHERE bucket = {b}) GROUP BY user_id, item_id)""")
    con.execute("DROP TABLE seen_quarantine")
    con.execute(f"""
        COPY (SELECT user_id, item_id, ts AS {schema.TIMESTAMP}, recency AS {RECENCY}
              FROM seen_pairs ORDER BY user_id, item_id)
        TO {engine.quote(out_path)} (FORMAT parquet, COMPRESSION zstd,
                                     ROW_GROUP_SIZE {ROW_GROUP_ROWS})
    """)
    if counts_path is not None:
        con.execute(f"""
            COPY (SELECT item_id AS {schema.ITEM_ID}, count(*)::BIGINT AS "{COUNT}"
                  FROM seen_pairs GROUP BY item_id ORDER BY item_id)
            TO {engine.quote(counts_path)} (FORMAT parquet, COMPRESSION zstd)
        """)
    con.execute("DROP TABLE seen_pairs")
    spill.unlink()
    pairs, users, items = con.execute(
        f"SELECT count(*), count(DISTINCT user_id), count(DISTINCT item_id) "
        f"FROM read_parquet({engine.quote(out_path)})").fetchone()
    return {
        "clean_rows": int(clean_rows),
        "quarantine_rows": quarantined,
        "quarantine_rows_taken": dict(sorted(taken.items())),
        "pairs": int(pairs),
        "pairs_only_in_quarantine": int(pairs) - int(clean_rows),
        "users": int(users),
        "items": int(items),
        "included_reasons": list(INCLUDED_REASONS),
    }


def _bucket_groups(clean_glob: str) -> tuple[dict[int, list[str]], int]:
    """The clean files matching ``clean_glob`` by user-hash bucket (``.../bucket=NNN/...``) and
    the bucket count; files outside bucket folders (a single-file table) form bucket 0 of 1."""
    files = sorted(globmod.glob(clean_glob))
    if not files:
        raise FileNotFoundError(f"seen: no clean table file matches {clean_glob}")
    if not all(Path(f).parent.name.startswith("bucket=") for f in files):
        return {0: files}, 1
    groups: dict[int, list[str]] = {}
    for f in files:
        groups.setdefault(split.bucket_of_path(Path(f)), []).append(f)
    return groups, max(groups) + 1


def _file_list(files: list[str]) -> str:
    return "[" + ", ".join(engine.quote(f) for f in files) + "]"


def table_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    # the pairs, and their timestamps when the table has them (the written table always does)
    extra = [pa.field(schema.TIMESTAMP, pa.int64()), pa.field(RECENCY, pa.int32())]
    target = pa.schema([*SEEN_SCHEMA, *(f for f in extra if f.name in table.column_names)])
    pq.write_table(table.cast(target), buf, compression="zstd",
                   row_group_size=ROW_GROUP_ROWS, write_statistics=True,
                   sorting_columns=[pq.SortingColumn(0), pq.SortingColumn(1)])
    return buf.getvalue()


def build(ds: str, params: dict | None = None, *, interactions: str | None = None) -> str:
    """Write ds's seen table from its clean outputs; returns its URI. ``interactions``: the
    clean table's URI (a bucketed prefix), default clean's for ds."""
    params = params if params is not None else settings.load_params()
    p = settings.step_params(PARAMS, params)
    out = layout.run_uri(ds, "seen", "interactions.parquet")
    with tempfile.TemporaryDirectory(prefix="nightrec-seen-", dir=engine.spill_root()) as tmp, \
            engine.connect("seen", params) as con:
        glob = storage.download_table(
            interactions or layout.bucketed_prefix(ds, "clean", "interactions"),
            Path(tmp) / "clean")
        local = storage.download_to(layout.run_uri(ds, "clean", "quarantine.parquet"),
                                    Path(tmp) / "quarantine.parquet")
        pf = pq.ParquetFile(local)
        batches = storage.parquet_batches(
            pf, columns=[schema.USER_ID, schema.ITEM_ID, schema.REASON],
            batch_rows=int(p["clean.batch_rows"]))
        table, counts = Path(tmp) / "seen.parquet", Path(tmp) / COUNTS_NAME
        stats = write_seen(con, glob, batches, table, id_pattern=p["clean.id_pattern"],
                           max_id_length=int(p["clean.max_id_length"]), counts_path=counts)
        storage.upload_from(table, out)
        storage.upload_from(counts, item_counts_uri(out))  # after the table it describes
    storage.write_json(layout.run_uri(ds, "seen", "stats.json"), stats)
    log.info("seen: %d pairs (%d only in the quarantine: %s), %d users, %d items", stats["pairs"],
             stats["pairs_only_in_quarantine"], stats["quarantine_rows_taken"], stats["users"],
             stats["items"])
    return out


def item_counts_uri(seen_uri: str) -> str:
    """Where :func:`build` writes the item counts of the seen table ``seen_uri``: beside it."""
    return seen_uri.rsplit("/", 1)[0] + "/" + COUNTS_NAME


def item_counts(seen_uri: str) -> pd.DataFrame:
    """``item_id`` (str), ``count`` (int64, >= 1): each item's rows in the seen table
    ``seen_uri`` (one per user who interacted with it), one row per item, sorted by item_id.

    Reads the counts :func:`build` wrote beside the table (``n_items`` rows) when they match it:
    they sum to the table's row count, read from its footer (a HEAD and one ranged read). Else
    (a table written before the counts were, one written by other means, or a mismatch) counts
    the table's ``item_id`` column, one row group at a time (``storage.ParquetScan``: the object
    is fetched once, front to back): memory is one row group plus the counts, never the table.
    """
    with storage.ParquetScan(seen_uri) as scan:
        rows = scan.metadata.num_rows
        uri = item_counts_uri(seen_uri)
        if storage.exists(uri):
            counts = storage.read_parquet(uri, columns=[schema.ITEM_ID, COUNT])
            if int(counts[COUNT].sum()) == rows:
                return _sorted_counts(counts)
            log.warning("%s: counts sum to %d, the table has %d rows: counting the table", uri,
                        int(counts[COUNT].sum()), rows)
        total = pa.table({schema.ITEM_ID: pa.array([], pa.string()),
                          COUNT: pa.array([], pa.int64())})
        for group in scan.row_groups(columns=[schema.ITEM_ID]):
            vc = pc.value_counts(group.column(schema.ITEM_ID).cast(pa.string()))
            part = pa.table({schema.ITEM_ID: vc.field("values"), COUNT: vc.field("counts")})
            merged = pa.concat_tables([total, part]).group_by(schema.ITEM_ID).aggregate(
                [(COUNT, "sum")])
            total = pa.table({schema.ITEM_ID: merged[schema.ITEM_ID],
                              COUNT: merged[f"{COUNT}_sum"]})
    return _sorted_counts(total.to_pandas())


def _sorted_counts(counts: pd.DataFrame) -> pd.DataFrame:
    out = pd.DataFrame({schema.ITEM_ID: counts[schema.ITEM_ID].astype(str).astype(object),
                        COUNT: counts[COUNT].astype(np.int64)})
    return out.sort_values(schema.ITEM_ID, kind="stable", ignore_index=True)


def run(validated: Validated, params: dict | None = None) -> Seen:
    """The DAG's ``seen`` task: the seen table of a ds whose clean outputs passed validate."""
    return Seen(ds=validated.ds, seen=build(validated.ds, params,
                                            interactions=validated.interactions))
