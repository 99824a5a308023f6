"""Step 9, publish: make the scored table visible to readers, all at once or not at all.

The protocol. Every write is one S3 request (a PUT, or a server-side copy of a staged part),
atomic on its own. Who may write is decided by conditional PUTs: ``If-None-Match: *`` (create
only if absent) for locks and first writes, and ``If-Match: <etag>`` (replace only the version
read) as a guard on every replace. Mutual exclusion rests on create-if-absent alone, because
SeaweedFS 4.48, the embedded store, lets two racing ``If-Match`` PUTs both succeed now and then
(measured; its ``If-None-Match`` holds, as both do on AWS S3).

1. **Validate** the staged table (all shards' parts) with ``expectations/recommendations.json``,
   plus checks that ranks are 1..n per user with non-increasing scores, rows sorted by
   ``user_id``, no user split over two parts, and each part's schema is the contract's. One
   streaming pass (:func:`validate_parts`): each staged part is read once by ranged GETs and
   decoded a row group at a time, and its rows are validated a batch of
   ``VALIDATE_BATCH_ROWS`` rows at a time, so publish's memory does not grow with the table.
   The same pass computes what the manifest says of each part (sha256, rows, users, user
   range, footer size).
2. **Claim the ds**: create ``recommendations/ds=<ds>/_publishing.json`` if absent. A second
   publisher of the same ds finds it and stops with ``PublishConflict`` before writing
   anything. A claim names its owner (the run) and expires after ``publish.claim_ttl_s``; the
   same run's retry renews it in place, and anyone after expiry deletes it and creates its own
   (nightrec/store/locks.py), so a crashed
   publisher blocks nobody for long.
3. **Copy the parts** to content-addressed keys ``part-<publish_id>-NNNNN.parquet``
   (``publish_id`` hashes the parts' checksums): a key never changes content, so a reader that
   holds a manifest can range-read its parts safely. The copies are server-side
   (:func:`copy_parts`: no part's bytes pass through publish) and conditional on the staged
   part being the version validated.
4. **Commit the manifest** ``recommendations/ds=<ds>/_manifest.json``, conditional on it being
   the version seen just after claiming (or absent). This fences a publisher whose claim expired
   and was taken over: its commit fails instead of overwriting the newer one. The manifest *is*
   the table of that ds: readers read exactly the parts it lists. Just before, the parts of the
   manifest it replaces are recorded as retired in ``recommendations/ds=<ds>/_retired.json``
   (time: grace + ``PUBLISH_SLACK_S``), so that no crash after the commit leaves them
   unrecorded.
5. **Move the latest pointer** ``recommendations/_latest.json`` last: under the short
   ``recommendations/_latest.lock`` (publishers of different ds may race here), read it, leave
   it if it names a later ds (a backfill never moves readers back in time), else replace it
   conditionally on the ETag read (or create it if absent).
6. **Settle and sweep**, every delete only while the claim is verified live
   (:func:`claim_live`: the claim object, re-read right before each delete request, is still
   ours, same owner, token and ETag, and not about to expire; otherwise nothing is deleted and
   a warning is logged). The replaced parts are not deleted: their ``delete_after`` becomes now
   + ``publish.reader_grace_s``, so a reader holding the old manifest keeps reading them that
   long. Parts no committed manifest ever listed (a killed or fenced publish's) are deleted at
   once. Retired parts whose time has passed are deleted: this ds's now (so with a grace of 0,
   the replaced parts at once), every other ds's under a claim on that ds
   (:func:`sweep_all_retired`), so a sweep never races a publisher of it. Then the run's
   staging, the claim, and retention (``publish.retention_days``), never touching the ds the
   latest pointer names.

A failure before 4 leaves that ds's previous table (if any) and the pointer as they were.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import io
import itertools
import json
import logging
import uuid
from pathlib import Path

import numpy as np
import pandas as pd

from nightrec.core import schema, settings
from nightrec.core.records import Published, Scored
from nightrec.store import layout, locks, storage
from nightrec.table import contract
from nightrec.tasks import output_checks
from nightrec.tasks.validate import ContractError, run_suite

PARAMS = ["publish.retention_days", "publish.claim_ttl_s", "publish.reader_grace_s",
          *output_checks.PARAMS]
SUITE = "expectations/recommendations.json"
# The table's schema, keys, manifest and pointer formats are the contract's
# (nightrec/table/contract.py), which the readers import too; named here for the pipeline.
SCHEMA = contract.SCHEMA
arrow_schema = contract.arrow_schema

POINTER_ATTEMPTS = 5
# rows validated at a time (cut at a user boundary): bounds publish's memory, whatever the table.
# Each batch is one Great Expectations run over DuckDB (~1.3 s per million rows plus ~0.5 s;
# through pandas it was ~10 s a 2M-row batch), held as Arrow (~25 bytes a row)
VALIDATE_BATCH_ROWS = 5_000_000
# Server-side copies in flight at once: each is one request whose work the store does (its
# time grows with the part's size), so a table of many parts copies a few at a time.
COPY_THREADS = 8
POINTER_LOCK_TTL_S = 60.0  # the pointer lock is held for two requests; a crash frees it then
# A claim that expires within this many seconds (or a tenth of its TTL, if less) is not trusted
# for a delete: one delete request (up to 1000 keys) takes milliseconds, so a claim live this
# much longer outlives it.
CLAIM_MARGIN_S = 2.0
# The claim a publish takes on another ds to sweep its retired parts, or retention to delete it:
# held for a few requests, so a crash in between blocks that ds's publishers this long at most.
HOUSEKEEPING_CLAIM_TTL_S = 300.0
# The replaced parts are recorded as retired just before the manifest commit (one PUT), with
# grace + this as their time: should publish die between the commit and setting their exact time
# (commit + grace), a commit up to this late still leaves readers the whole grace period.
PUBLISH_SLACK_S = 60.0
log = logging.getLogger(__name__)


def _store_errors() -> tuple[type[BaseException], ...]:
    from botocore.exceptions import BotoCoreError, ClientError

    return (OSError, BotoCoreError, ClientError)


_STORE_ERRORS = _store_errors()


class PublishConflict(RuntimeError):
    """Another publisher holds this ds, or committed first; nothing of this publish is visible.

    Transient: a retry after the other publish ends succeeds.
    """


def check_rankings(table) -> list[str]:
    """Problems with ranks and scores: ranks 1..n per user in order, scores non-increasing,
    rows sorted by user. ``table``: an Arrow table (or a frame) with the contract's columns;
    vectorised over Arrow arrays, so a batch of millions of rows costs no Python objects."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if isinstance(table, pd.DataFrame):
        table = pa.Table.from_pandas(table[[schema.USER_ID, schema.RANK, schema.SCORE]],
                                     preserve_index=False)
    n = table.num_rows
    if n == 0:
        return []
    problems = []
    users = table.column(schema.USER_ID).combine_chunks()
    new = np.ones(n, bool)  # the first row of each run of one user
    if n > 1:
        new[1:] = pc.fill_null(pc.not_equal(users.slice(1), users.slice(0, n - 1)),
                               True).to_numpy(zero_copy_only=False)
    starts = np.flatnonzero(new)
    expected = np.arange(n) - np.repeat(starts, np.diff(np.append(starts, n))) + 1
    ranks = table.column(schema.RANK).to_numpy()
    if not np.array_equal(ranks, expected):
        problems.append("ranks are not 1..n in order within each user")
    scores = table.column(schema.SCORE).to_numpy().astype(np.float64, copy=False)
    rising = int(((np.diff(scores) > 0) & ~new[1:]).sum())
    if rising:
        problems.append(f"scores increase with rank for {rising} rows")
    if n > 1 and pc.any(pc.fill_null(pc.less(users.slice(1), users.slice(0, n - 1)),
                                     False)).as_py():
        problems.append("rows are not sorted by user_id")
    return problems


def check_parts(parts: list[dict]) -> list[str]:
    """Problems with the parts' user ranges: each part's users come after the previous part's.
    A part without rows or without a user range (one of another schema) is not compared."""
    return [
        f"user {b['min_user_id']!r} is split over parts {i} and {i + 1}"
        for i, (a, b) in enumerate(itertools.pairwise(parts))
        if b["rows"] and a["rows"] and None not in (a["max_user_id"], b["min_user_id"])
        and b["min_user_id"] <= a["max_user_id"]
    ]


def validate_table(table, *, ds: str, model_version: str, top_k: int) -> dict:
    """The recommendations suite (Great Expectations over DuckDB) and :func:`check_rankings` on
    one table: an Arrow table is written to a local Parquet file for the suite (no pandas:
    a frame of 10M rows with string ids is ~1 GB, the Parquet file tens of MB), a frame as is."""
    import tempfile

    import pyarrow.parquet as pq

    parameters = {"top_k": top_k, "ds_set": [ds], "model_version_set": [model_version]}
    if isinstance(table, pd.DataFrame):
        report = run_suite(table, settings.project_root() / SUITE, parameters)
    else:
        with tempfile.TemporaryDirectory(prefix="nightrec-publish-") as tmp:
            path = Path(tmp) / "batch.parquet"
            pq.write_table(table, path)
            report = run_suite(path, settings.project_root() / SUITE, parameters)
    report["ranking_problems"] = check_rankings(table)
    report["success"] = report["success"] and not report["ranking_problems"]
    return report


def validate_parts(uris: list[str], *, ds: str, model_version: str, top_k: int,
                   batch_rows: int | None = None,
                   visit=None) -> tuple[dict, list[dict], list[str | None]]:
    """Validate the staged parts (URIs, in table order) in one streaming pass; returns
    ``(report, described, versions)``: the report, what the manifest says about each part
    (:func:`describe_part`'s fields) and the ETag of the version of each part that was read
    (None for a local file), so that publish copies exactly what was validated.

    Memory is flat in the table's size. Each part is read once, front to back, and decoded
    one row group at a time (``storage.ParquetScan``: its footer, then its row groups in ranged
    GETs of at most ``storage.SCAN_READ_BYTES`` or one row group), which also gives its sha256,
    rows, users and user range: nothing is downloaded whole, nor read twice. The rows are validated a batch of about ``batch_rows`` rows at a time
    (``VALIDATE_BATCH_ROWS`` by default; Great Expectations runs once per batch). A batch ends
    at a user boundary (the last user's rows wait for the next batch), so every check about one
    user's rows sees all of them, whatever the row groups: the suite's unique ``(user_id,
    rank)`` and ``(user_id, item_id)``, and ranks 1..n in order with non-increasing scores.
    The other expectations hold for the table when they hold for each batch (columns,
    non-null, ranks within 1..top_k, the ``ds`` and ``model_version`` sets). Sort order by
    ``user_id``: within a batch, :func:`check_rankings`; from one batch to the next, the first
    user must come after the last; from one part to the next, :func:`check_parts` (no user
    split over two parts). A part's schema is checked from its footer, before its rows. The
    row count expectation (at least one row) is checked on the whole table.

    ``visit``: called with each row group as it is read (output_checks.Summary.add), so that
    what else publish needs of the rows costs no second read.
    """
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    limit = max(1, int(batch_rows or VALIDATE_BATCH_ROWS))
    expected = arrow_schema()
    described: list[dict] = []
    versions: list[str | None] = []
    reports: list[dict] = []
    problems: list[str] = []  # order between batches, schemas
    pending: list = []  # row groups (Arrow tables) not validated yet
    pending_rows = 0
    last_user: list = [None]  # the last user_id validated so far
    read = {"bytes": 0, "requests": 0}

    def check(table) -> None:
        users = table.column(schema.USER_ID)
        first = users[0].as_py()
        if None not in (first, last_user[0]) and first <= last_user[0]:
            problems.append("rows are not sorted by user_id")
        last_user[0] = users[-1].as_py()
        reports.append(validate_table(table, ds=ds, model_version=model_version, top_k=top_k))

    def flush(*, final: bool) -> None:
        nonlocal pending, pending_rows
        if not pending:
            return
        table = pa.concat_tables(pending) if len(pending) > 1 else pending[0]
        pending, pending_rows = [], 0
        if not final:  # hold the last user's rows back: a user is never split over two batches
            users = table.column(schema.USER_ID)
            same = pc.fill_null(pc.equal(users, users[-1]), False).to_numpy()
            others = np.flatnonzero(~same)
            cut = int(others[-1]) + 1 if len(others) else 0  # 0: the batch is one user
            if 0 < cut < table.num_rows:
                pending, pending_rows = [table.slice(cut)], table.num_rows - cut
                table = table.slice(0, cut)
        check(table)

    for i, uri in enumerate(uris):
        with storage.ParquetScan(uri) as scan:
            meta = scan.metadata
            desc = {"bytes": scan.size, "rows": meta.num_rows, "users": 0, "min_user_id": None,
                    "max_user_id": None, "row_groups": meta.num_row_groups,
                    "footer_bytes": scan.footer_bytes, "sha256": None}
            found = meta.schema.to_arrow_schema()
            if not found.equals(expected, check_metadata=False):
                problems.append(f"part {i} has schema {found}")  # its rows are not read
            else:
                previous = None  # the part's last user so far
                for group in scan.row_groups():
                    if not group.num_rows:
                        continue
                    users = group.column(schema.USER_ID)
                    bounds = pc.min_max(users)
                    lo, hi = bounds["min"].as_py(), bounds["max"].as_py()
                    if lo is not None:
                        desc["min_user_id"] = lo if desc["min_user_id"] is None else min(
                            lo, desc["min_user_id"])
                        desc["max_user_id"] = hi if desc["max_user_id"] is None else max(
                            hi, desc["max_user_id"])
                    # a user who goes on from the previous row group is counted once
                    desc["users"] += pc.count_distinct(users).as_py() - (
                        previous is not None and users[0].as_py() == previous)
                    previous = users[-1].as_py()
                    if visit is not None:
                        visit(group)
                    pending.append(group)
                    pending_rows += group.num_rows
                    if pending_rows >= limit:
                        flush(final=False)
                desc["sha256"] = scan.finish()
            read["bytes"] += scan.bytes_read
            read["requests"] += scan.requests
        described.append(desc)
        versions.append(scan.etag)
    flush(final=True)
    if not reports:  # no rows at all: the suite reports it (row count >= 1) on an empty table
        reports.append(validate_table(expected.empty_table(), ds=ds,
                                      model_version=model_version, top_k=top_k))
    first_bad = next((r for r in reports if not r["success"]), reports[-1])
    failures, seen = [], set()
    for r in reports:
        for f in r["failures"]:
            key = json.dumps([f["expectation"], f["kwargs"]], sort_keys=True, default=str)
            if key not in seen:  # one entry per broken expectation (its first batch's figures)
                seen.add(key)
                failures.append(f)
    ranking = [x for r in reports for x in r["ranking_problems"]]
    report = {
        **first_bad,
        "success": all(r["success"] for r in reports) and not problems,
        "failures": failures,
        "ranking_problems": list(dict.fromkeys(ranking + problems)) + check_parts(described),
        "batches": len(reports),
        "batch_rows": limit,
        "rows_checked": sum(r["rows_checked"] for r in reports),
        "read": read,  # what the pass fetched from the store: each part's bytes once
    }
    return report, described, versions


def publish_id(checksums: list[str]) -> str:
    return hashlib.sha256("".join(checksums).encode()).hexdigest()[:12]


def copy_parts(staged: list[str], *, ds: str, publish_id: str, versions: list[str | None],
               described: list[dict], written: list[str]) -> list[dict]:
    """Copy the staged parts to their published keys; returns the manifest's part entries.

    Server-side copies (``storage.copy``: no byte passes through publish), up to
    ``COPY_THREADS`` at a time, each conditional on the staged part still being the version
    :func:`validate_parts` read (``versions``), so that what is published is what was
    validated and checksummed: a part rewritten since raises PublishConflict. Every target
    goes into ``written`` before its copy starts, so that a failed publish removes what it made;
    when one copy fails, the others still queued are cancelled and those running finish first.
    """
    from concurrent.futures import ThreadPoolExecutor

    targets = [layout.part_uri(ds, publish_id, n) for n in range(len(staged))]
    written.extend(targets)

    def one(n: int) -> str | None:
        try:
            return storage.copy(staged[n], targets[n], if_match=versions[n],
                                size=described[n]["bytes"])
        except storage.PreconditionFailed as e:
            raise PublishConflict(f"{staged[n]} changed after publish validated it (a shard "
                                  "rewrote it?); nothing of this publish is visible; retry "
                                  "to validate it again") from e

    with ThreadPoolExecutor(max_workers=max(1, min(COPY_THREADS, len(targets)))) as pool:
        futures = [pool.submit(one, n) for n in range(len(targets))]
        try:
            etags = [f.result() for f in futures]
        except BaseException:
            for f in futures:
                f.cancel()
            raise
    return [{"key": storage.split_uri(uri)[1], "etag": etag, **desc}
            for uri, etag, desc in zip(targets, etags, described, strict=True)]


def describe_part(data: bytes, table) -> dict:
    """What the manifest says about one part, from its bytes and its decoded Arrow table."""
    import pyarrow.compute as pc

    users = table.column(schema.USER_ID)
    meta = _parquet_metadata(data)
    return {
        "bytes": len(data),
        "rows": table.num_rows,
        "users": len(pc.unique(users)) if table.num_rows else 0,
        "min_user_id": pc.min(users).as_py() if table.num_rows else None,
        "max_user_id": pc.max(users).as_py() if table.num_rows else None,
        "row_groups": meta.num_row_groups,
        "footer_bytes": int.from_bytes(data[-8:-4], "little") + 8,
        "sha256": storage.sha256(data),
    }


def _parquet_metadata(data: bytes):
    import pyarrow.parquet as pq

    return pq.ParquetFile(io.BytesIO(data)).metadata


def popular_items(seen_uri: str | None, k: int) -> list[dict]:
    """The ``k`` items with the most interactions up to ds (ties: lower item_id first), for
    readers that serve unknown users. Empty when no seen set is given.

    From the seen step's item counts (``seen.item_counts``: the small table it writes beside
    the seen table, one row per item), so publish never reads the seen table's rows."""
    if not seen_uri:
        return []
    from nightrec.tasks import seen  # imported here: publish's importers need none of it

    counts = seen.item_counts(seen_uri)
    top = pd.DataFrame({schema.ITEM_ID: counts[schema.ITEM_ID].astype(str),
                        "interactions": counts[seen.COUNT].astype("int64")})
    top = top.sort_values(["interactions", schema.ITEM_ID], ascending=[False, True]).head(k)
    return [{schema.ITEM_ID: str(i), "interactions": int(n)}
            for i, n in zip(top[schema.ITEM_ID], top["interactions"], strict=True)]


def build_manifest(*, ds: str, parts: list[dict], scored: Scored, created_at: str) -> dict:
    return {
        "format_version": contract.MANIFEST_FORMAT_VERSION,
        "ds": ds,
        "table": layout.recs_prefix(ds),
        "created_at": created_at,
        "model_version": scored.model_version,
        "data_version": scored.data_version,
        "top_k": scored.top_k,
        "rows": sum(p["rows"] for p in parts),
        "users": scored.users,
        "parts": parts,
        "schema": contract.SCHEMA,
        "sorted_by": contract.SORTED_BY,
        "metrics": scored.metrics,
        # what produced the table: "model" (a new blessed or forced model), "champion_fallback",
        # "popularity_fallback" or "champion_rescore"; source_reason says why (None for a model)
        "source": scored.source,
        "source_reason": scored.source_reason,
    }


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _iso(t: dt.datetime) -> str:
    return t.isoformat(timespec="seconds")


def _acquire(uri: str, *, owner: str, ttl_s: float, busy) -> dict:
    """``locks.acquire``, with a lease that kept changing hands reported as PublishConflict."""
    try:
        return locks.acquire(uri, owner=owner, ttl_s=ttl_s, busy=busy)
    except locks.LeaseConflict as e:
        raise PublishConflict(str(e)) from e


def claim_ds(ds: str, *, owner: str, ttl_s: float) -> dict:
    """Take the per-ds publish claim ``recommendations/ds=<ds>/_publishing.json``.

    Raises PublishConflict while another owner's claim is live; the same owner (a retry of the
    same run) or anyone after expiry takes it over.
    """
    uri = layout.claim_uri(ds)

    def busy(held: dict) -> PublishConflict:
        return PublishConflict(
            f"ds={ds} is being published by {held.get('owner')} (claimed "
            f"{held.get('claimed_at')}, claim expires {held.get('expires_at')}); this publisher "
            f"({owner}) stopped before writing anything. Retry after that publish ends; {uri} "
            "is its claim."
        )

    return {**_acquire(uri, owner=owner, ttl_s=ttl_s, busy=busy), "ds": ds}


def release_claim(claim: dict) -> None:
    locks.release(claim)


def claim_live(claim: dict, *, margin_s: float = CLAIM_MARGIN_S) -> bool:
    """Whether ``claim`` (a :func:`claim_ds` record) still holds: its object, read again now, is
    this very claim (same owner, token and ETag: not renewed by a retry, not taken over) and
    expires more than ``margin_s`` seconds from now (at most a tenth of the claim's TTL). A store
    error counts as not live."""
    try:
        held = locks.holder(claim["uri"])
    except _STORE_ERRORS as e:
        log.warning("could not re-read the claim %s: %s", claim["uri"], e)
        return False
    if held is None:
        return False
    mine = (held.get("owner"), held.get("token"), held.get("etag")) == (
        claim.get("owner"), claim.get("token"), claim.get("etag"))
    expires = dt.datetime.fromisoformat(held["expires_at"])
    ttl_s = (expires - dt.datetime.fromisoformat(held["claimed_at"])).total_seconds()
    margin = dt.timedelta(seconds=min(margin_s, max(ttl_s, 0.0) / 10))
    return mine and expires > _now() + margin


def delete_under_claim(claim: dict, uris: list[str], *, what: str) -> bool:
    """Delete ``uris`` (up to 1000 per request), each request only after :func:`claim_live`
    has verified ``claim``; otherwise stop, log a warning and return False (what is left is
    swept by a later publish under its own claim). True when everything was deleted."""
    uris = list(uris)
    for i in range(0, len(uris), 1000):
        if not claim_live(claim):
            log.warning(
                "not deleting %d %s of ds=%s: the publish claim %s is no longer %s's (expired "
                "or taken over by another publisher); left for a later publish to sweep",
                len(uris) - i, what, claim.get("ds"), claim["uri"], claim.get("owner"))
            return False
        storage.delete(uris[i : i + 1000])
    return True


def _retired(ds: str) -> tuple[dict, str | None]:
    """``(record, etag)`` of ds's ``_retired.json`` (an empty record and None when absent)."""
    found = storage.read_versioned(layout.retired_parts_uri(ds))
    if found is None:
        return {"ds": ds, "entries": []}, None
    return json.loads(found[0]), found[1]


def _listed_keys(ds: str) -> set[str]:
    """The object keys of the parts ds's committed manifest lists (empty when none)."""
    found = storage.read_versioned(layout.manifest_uri(ds))
    return {pt["key"] for pt in json.loads(found[0])["parts"]} if found else set()


def _save_retired(ds: str, record: dict, etag: str | None) -> None:
    """Replace (If-Match), create (If-None-Match) or, with no entries left, delete the record.
    Raises PreconditionFailed when it changed since it was read."""
    uri = layout.retired_parts_uri(ds)
    if record["entries"]:
        if etag:
            storage.write_json(uri, record, if_match=etag)
        else:
            storage.write_json(uri, record, if_none_match=True)
    elif etag and not storage.delete_if_match(uri, etag):
        raise storage.PreconditionFailed(f"{uri} is no longer version {etag}")


def _deadline(grace_s: float, *, after: dt.datetime | None = None) -> dt.datetime:
    """``after`` (default now) + ``grace_s`` seconds, rounded up to a whole second (the records
    hold whole seconds: never less grace than asked for); a grace of 0 is due at once."""
    t = (after or _now()) + dt.timedelta(seconds=float(grace_s))
    if grace_s > 0 and t.microsecond:
        t = t.replace(microsecond=0) + dt.timedelta(seconds=1)
    return t


def retire(ds: str, *, keys: set[str], delete_after: dt.datetime, publish_id: str,
           listed: set[str] = frozenset(), exact: bool = False) -> list[str]:
    """Record ``keys`` (parts of ds) in ``_retired.json``, deletable from ``delete_after`` on (a
    key retired before keeps the later of its two times, unless ``exact``), and take ``listed``
    (the keys the committed manifest lists) off every entry. Returns the keys retired.

    Written conditionally on the version read (or created if absent); raises
    ``storage.PreconditionFailed`` when it changed meanwhile. A sweep never deletes a key that
    ds's committed manifest lists, so recording keys too early is harmless.
    """
    record, etag = _retired(ds)
    keys = set(keys) - set(listed)
    old = [{**e, "keys": [k for k in e["keys"] if k not in listed]} for e in record["entries"]]
    moved = [e for e in old if keys & set(e["keys"])]
    after = delete_after if exact else max(
        [delete_after, *(dt.datetime.fromisoformat(e["delete_after"]) for e in moved)])
    entries = [e for e in ({**e, "keys": [k for k in e["keys"] if k not in keys]} for e in old)
               if e["keys"]]
    if keys:
        entries.append({"keys": sorted(keys), "retired_at": _iso(_now()),
                        "replaced_by": publish_id, "delete_after": _iso(after)})
    if entries != record["entries"]:
        bucket = storage.split_uri(layout.recs_prefix(ds))[0]
        _save_retired(ds, {**record, "ds": ds, "bucket": bucket, "entries": entries}, etag)
    return sorted(keys)


def settle_partition(ds: str, claim: dict, *, listed: set[str], replaced: set[str],
                     grace_s: float, publish_id: str) -> None:
    """After the commit, under the live claim: the parts the commit ``replaced`` become
    deletable ``grace_s`` seconds from now (their time recorded before the commit had some
    slack); the keys the new manifest ``listed`` come off ``_retired.json``; the parts no
    committed manifest ever listed (those of a killed or fenced publish: no reader can hold
    them) are deleted at once."""
    if not claim_live(claim):
        log.warning("not settling the parts of ds=%s: the publish claim %s is no longer %s's "
                    "(expired or taken over by another publisher)", ds, claim["uri"],
                    claim.get("owner"))
        return
    try:
        retire(ds, keys=replaced, delete_after=_deadline(grace_s), publish_id=publish_id,
               listed=listed, exact=True)
    except storage.PreconditionFailed:
        log.warning("%s changed under this publish's claim; left for the next publish",
                    layout.retired_parts_uri(ds))
        return
    record, _ = _retired(ds)
    kept = listed | {k for e in record["entries"] for k in e["keys"]}
    orphans = [u for u in storage.list_uris(layout.recs_prefix(ds))
               if u.endswith(".parquet") and storage.split_uri(u)[1] not in kept]
    delete_under_claim(claim, orphans, what="parts no manifest lists")


def sweep_retired(ds: str, claim: dict) -> list[str]:
    """Delete ds's retired parts whose ``delete_after`` has passed, under ``claim`` (ds's, live),
    never one that ds's committed manifest lists; returns the keys deleted."""
    record, etag = _retired(ds)
    now = _now()
    due = [e for e in record["entries"] if dt.datetime.fromisoformat(e["delete_after"]) <= now]
    if not due:
        return []
    listed = _listed_keys(ds)
    bucket = storage.split_uri(layout.recs_prefix(ds))[0]
    doomed = sorted({k for e in due for k in e["keys"] if k not in listed})
    if not delete_under_claim(claim, [f"s3://{bucket}/{k}" for k in doomed],
                              what="retired parts"):
        return []
    keep = [e for e in record["entries"] if e not in due]
    try:
        _save_retired(ds, {**record, "entries": keep}, etag)
    except storage.PreconditionFailed:  # the parts are gone; a later sweep drops the entries
        log.warning("%s changed during the sweep", layout.retired_parts_uri(ds))
    log.info("deleted %d retired part(s) of ds=%s", len(doomed), ds)
    return doomed


def sweep_all_retired(*, owner: str, skip: tuple[str, ...] = ()) -> dict:
    """Sweep every ds's ``_retired.json`` that has an entry past its ``delete_after``, each under
    a claim on that ds (taken as ``<owner>:sweep`` for ``HOUSEKEEPING_CLAIM_TTL_S`` and released
    after), so it never races a publisher of that ds; a ds being published is left for a later
    sweep. Reads one ``_retired.json`` per published ds. Returns ``{ds: keys deleted}``."""
    out: dict[str, list[str]] = {}
    now = _now()
    for prefix in storage.list_prefixes(layout.recs_root()):
        ds = layout.ds_of_prefix(prefix)
        if ds is None or ds in skip:
            continue
        record, _ = _retired(ds)
        if not any(dt.datetime.fromisoformat(e["delete_after"]) <= now
                   for e in record["entries"]):
            continue
        try:
            claim = claim_ds(ds, owner=f"{owner}:sweep", ttl_s=HOUSEKEEPING_CLAIM_TTL_S)
        except PublishConflict as e:
            log.info("retired parts of ds=%s left for a later sweep: %s", ds, e)
            continue
        try:
            out[ds] = sweep_retired(ds, claim)
        finally:
            release_claim(claim)
    return out


def pointer_lock(owner: str):
    """Hold ``recommendations/_latest.lock`` for a read-then-write of the latest pointer.

    Publishers of different ds may move the pointer at the same time; this short lock (held for
    two requests) serialises them (``locks.short_lock``: a crashed holder's lock expires after
    ``POINTER_LOCK_TTL_S`` and is taken over).
    """
    uri = layout.latest_lock_uri()

    def busy(held: dict) -> PublishConflict:
        return PublishConflict(f"the latest pointer is locked by {held.get('owner')} until "
                               f"{held.get('expires_at')} ({uri})")

    return locks.short_lock(uri, owner=owner, ttl_s=POINTER_LOCK_TTL_S, busy=busy)


def commit_manifest(ds: str, manifest: dict, *, expected: dict | None) -> str:
    """Write the manifest only if it is still the version seen after claiming; returns its ETag."""
    try:
        if expected is None:
            return storage.write_json(layout.manifest_uri(ds), manifest, if_none_match=True)
        return storage.write_json(layout.manifest_uri(ds), manifest, if_match=expected["etag"])
    except storage.PreconditionFailed as e:
        raise PublishConflict(
            f"ds={ds}: another publisher committed a manifest while this one "
            f"({manifest.get('publisher')}) was writing (its claim had expired and was taken "
            "over); this publish is not visible"
        ) from e


def move_latest(ds: str, record: dict, *, manifest_etag: str, owner: str) -> bool:
    """Compare-and-swap the latest pointer to ``record``; False when it names a later ds.

    Under ``pointer_lock``; the write is still conditional on the ETag read (or on there being
    no pointer), so a writer that skips the lock cannot be overwritten unseen. Raises
    PublishConflict when our manifest was replaced meanwhile (a newer publish of the same ds
    moves the pointer itself) or the pointer keeps changing under us.
    """
    with pointer_lock(owner):
        return _swap_latest(ds, record, manifest_etag=manifest_etag)


def _swap_latest(ds: str, record: dict, *, manifest_etag: str) -> bool:
    uri = layout.latest_uri()
    for _ in range(POINTER_ATTEMPTS):
        found = storage.read_versioned(uri)
        current, etag = (json.loads(found[0]), found[1]) if found else (None, None)
        if current and current.get("ds", "") > ds:
            log.warning("latest stays at ds=%s: this run publishes the earlier ds=%s",
                        current["ds"], ds)
            return False
        head = storage.head(layout.manifest_uri(ds))
        if head is None or head["etag"] != manifest_etag:
            raise PublishConflict(f"ds={ds}: the manifest was replaced by a newer publish before "
                                  "the latest pointer moved; that publish moves it")
        try:
            if etag is None:
                storage.write_json(uri, record, if_none_match=True)
            else:
                storage.write_json(uri, record, if_match=etag)
            return True
        except storage.PreconditionFailed:
            log.info("latest pointer changed while moving it to ds=%s; reading it again", ds)
    raise PublishConflict(f"the latest pointer changed {POINTER_ATTEMPTS} times in a row while "
                          f"moving it to ds={ds}")


def expired_partitions(published: list[str], *, latest: str, keep_days: int,
                       protect: tuple[str, ...] = ()) -> list[str]:
    """The ds values retention deletes: older than ``keep_days`` days before ``latest``.

    ``keep_days``: int >= 1 (1 keeps only the latest ds). ``latest`` and ``protect`` are never
    returned, whatever their age.
    """
    if not isinstance(keep_days, int) or keep_days < 1:
        raise ValueError(f"publish.retention_days must be an int >= 1, got {keep_days!r}")
    cutoff = (dt.date.fromisoformat(latest) - dt.timedelta(days=keep_days - 1)).isoformat()
    return sorted(d for d in set(published)
                  if d < cutoff and d != latest and d not in protect)


def apply_retention(*, keep_days: int, protect: tuple[str, ...] = (),
                    owner: str = "retention") -> list[str]:
    """Delete published partitions (and their staging) older than the retention window.

    The window ends at the ds the latest pointer names, so the latest table is never deleted.
    Each partition is deleted under a claim on it (taken as ``<owner>:retention`` for
    ``HOUSEKEEPING_CLAIM_TTL_S``, verified before each delete): a partition a live publisher claims
    (a backfill being written) is skipped. Its manifest goes first, so a partition is
    unpublished before any of its parts disappears; everything else of it follows (parts,
    ``_retired.json``, staging), the claim last.
    """
    found = storage.read_versioned(layout.latest_uri())
    if found is None:
        return []
    latest = json.loads(found[0])["ds"]
    published = {d: u for u in storage.list_prefixes(layout.recs_root())
                 if (d := layout.ds_of_prefix(u))}
    staging = {d: u for u in storage.list_prefixes(layout.staging_root())
               if (d := layout.ds_of_prefix(u))}
    doomed = expired_partitions([*published, *staging], latest=latest, keep_days=keep_days,
                                protect=protect)
    deleted = []
    for ds in doomed:
        where = [w[ds] for w in (published, staging) if ds in w]
        if not any(storage.list_uris(u) for u in where):
            continue  # an empty "folder" (some stores, SeaweedFS among them, list them)
        try:
            claim = claim_ds(ds, owner=f"{owner}:retention", ttl_s=HOUSEKEEPING_CLAIM_TTL_S)
        except PublishConflict:
            log.warning("retention skips ds=%s: a publisher holds it", ds)
            continue
        try:
            objects = [u for w in where for u in storage.list_uris(w) if u != claim["uri"]]
            # unpublished first, then its objects
            if (delete_under_claim(claim, [layout.manifest_uri(ds)], what="manifest")
                    and delete_under_claim(claim, objects, what="objects")):
                deleted.append(ds)
        finally:
            release_claim(claim)
    if deleted:
        log.info("retention (%d days up to ds=%s) deleted ds=%s", keep_days, latest, deleted)
    return deleted


def run(scored: Scored, params: dict | None = None, dry_run: bool = False,
        publisher: str | None = None, force: bool = False) -> Published:
    """Validate and publish the staged parts of ``scored`` (``nightrec.tasks.score.collect``'s
    record) as ds's table.

    ``publisher``: who is publishing, for the claim (default: the run key in ``scored``; a retry
    of the same run takes its own stale claim over). ``dry_run``: validate only, then remove the
    staged parts; readers see no change. ``force`` (the run's ``force_publish``): publish even
    when the output checks against the latest table break (output_checks.py). Returns the
    manifest's URI, counts and ids.
    """
    ds = settings.check_ds(scored.ds)
    p = settings.step_params(PARAMS, params)
    keep_days = int(p["publish.retention_days"])
    expired_partitions([], latest=ds, keep_days=keep_days)  # a bad setting fails before writing
    if float(p["publish.reader_grace_s"]) < 0:
        raise ValueError("publish.reader_grace_s must be >= 0 (seconds), got "
                         f"{p['publish.reader_grace_s']!r}")
    # SeaweedFS creates a missing bucket on the first PUT, so publishing to a mistyped
    # NIGHTREC_BUCKET would "succeed" where no reader looks; AWS would refuse the PUT. Check.
    storage.require_bucket(storage.split_uri(layout.recs_root())[0])
    summary = output_checks.Summary(output_checks.threshold(
        int(scored.users or 0), int(p["monitor.output.sample_users"])))
    report, described, versions = validate_parts(
        scored.parts, ds=ds, model_version=scored.model_version, top_k=scored.top_k,
        visit=summary.add,
    )
    n_rows = sum(d["rows"] for d in described)
    if scored.rows != n_rows:
        report["ranking_problems"].append(f"shards reported {scored.rows} rows, "
                                          f"parts hold {n_rows}")
    report["success"] = report["success"] and not report["ranking_problems"]
    storage.write_json(layout.run_uri(ds, "publish", "validation.json"), report)
    if not report["success"]:
        failed = [f["expectation"] for f in report["failures"]] + report["ranking_problems"]
        raise ContractError(f"recommendation table broke its contract: {failed}")
    checked = output_checks.check(ds, summary, model_version=scored.model_version,
                                  forced=force, p=p)
    storage.write_json(layout.run_uri(ds, "publish", "output_checks.json"), checked)
    if checked["refused"]:
        raise output_checks.OutputCheckError(
            f"today's table differs from the latest (ds={checked['against']['ds']}) beyond "
            f"monitor.output: {checked['breaches']} (see runs/ds={ds}/publish/"
            "output_checks.json); nothing was published. Rerun with force_publish to publish it")

    if dry_run:
        storage.delete(storage.list_uris(scored.staging))
        log.info("dry run: %d rows validated, nothing published for ds=%s", n_rows, ds)
        return Published(ds=ds, dry_run=True, rows=n_rows, manifest=None)

    pid = publish_id([d["sha256"] for d in described])
    summary.to_store(ds, publish_id=pid, model_version=scored.model_version)
    owner = publisher or scored.run_key or f"anonymous-{uuid.uuid4().hex[:8]}"
    popular = popular_items(scored.seen, int(scored.top_k))
    claim_ttl_s, grace_s = float(p["publish.claim_ttl_s"]), float(p["publish.reader_grace_s"])
    claim = claim_ds(ds, owner=owner, ttl_s=claim_ttl_s)
    prefix = layout.recs_prefix(ds)
    written: list[str] = []
    try:
        found = storage.read_versioned(layout.manifest_uri(ds))
        before = None if found is None else {"etag": found[1]}
        replaced = set() if found is None else {pt["key"] for pt in json.loads(found[0])["parts"]}
        parts = copy_parts(scored.parts, ds=ds, publish_id=pid, versions=versions,
                           described=described, written=written)
        created = _iso(_now())
        manifest = build_manifest(
            # parts never share a user (validated above), so their user counts add up
            ds=ds, parts=parts, scored=dataclasses.replace(scored, users=sum(d["users"] for d in described)),
            created_at=created,
        )
        manifest.update(publish_id=pid, publisher=owner, popular=popular)
        # The parts this commit replaces are recorded as retired first, so that no crash after
        # the commit can leave them unrecorded (and taken for parts no reader holds); with
        # PUBLISH_SLACK_S for the commit to happen in. settle_partition sets their exact time.
        listed = {pt["key"] for pt in parts}
        try:
            retire(ds, keys=replaced - listed, delete_after=_deadline(grace_s + PUBLISH_SLACK_S),
                   publish_id=pid)
        except storage.PreconditionFailed as e:
            raise PublishConflict(f"ds={ds}: {layout.retired_parts_uri(ds)} changed while this "
                                  f"publisher ({owner}) held the claim; nothing is visible") from e
        manifest_etag = commit_manifest(ds, manifest, expected=before)
        written = []  # committed: these parts are the table now
        moved = move_latest(
            ds, contract.pointer_record(ds=ds, manifest_uri=layout.manifest_uri(ds),
                                        publish_id=pid, model_version=manifest["model_version"],
                                        updated_at=created),
            manifest_etag=manifest_etag, owner=owner,
        )
        # Replaced parts are retired, not deleted: readers holding the previous manifest keep
        # reading them for publish.reader_grace_s. Every delete re-checks the claim first.
        settle_partition(ds, claim, listed=listed, replaced=replaced, grace_s=grace_s,
                         publish_id=pid)
        sweep_retired(ds, claim)
        delete_under_claim(claim, storage.list_uris(scored.staging), what="staged parts")
    except BaseException:
        _forget_unlisted(claim, written)
        raise
    finally:
        release_claim(claim)
    try:
        sweep_all_retired(owner=owner, skip=(ds,))
    except (*_STORE_ERRORS, PublishConflict) as e:  # published; the next publish sweeps again
        log.warning("sweeping retired parts failed (the table is published; next run retries): "
                    "%s", e)
    try:
        expired = apply_retention(keep_days=keep_days, protect=(ds,), owner=owner)
    except (*_STORE_ERRORS, PublishConflict) as e:  # published; the next publish retries
        log.warning("retention failed (the table is published; next run retries): %s", e)
        expired = []
    log.info("published %d rows for %d users at %s", manifest["rows"], manifest["users"], prefix)
    return Published(ds=ds, manifest=layout.manifest_uri(ds), rows=manifest["rows"],
                     publish_id=pid, users=manifest["users"], latest_moved=moved,
                     expired=expired)


def _forget_unlisted(claim: dict, written: list[str]) -> None:
    """After a failed publish, delete the parts it wrote that no committed manifest lists, only
    while its claim is verified live (a publisher whose claim lapsed leaves them: a rival may
    hold the ds now, and its next publish retires what nothing lists)."""
    if not written:
        return
    ds = claim["ds"]
    try:
        listed = _listed_keys(ds)
        delete_under_claim(claim, [u for u in written if storage.split_uri(u)[1] not in listed],
                           what="parts of a failed publish")
    except _STORE_ERRORS as e:  # best effort: unlisted parts are not part of any table anyway
        log.warning("could not remove the parts of a failed publish of ds=%s: %s", ds, e)
