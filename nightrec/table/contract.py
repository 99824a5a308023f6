"""The published-table contract: what the publisher writes and every reader may rely on.

One module, imported by both sides (``nightrec.tasks.publish`` writes by it, ``reader.py`` and
``serve.py`` read by it; neither imports the other), so the two cannot drift apart:

- the **table schema**: column names, their Arrow types and the sort order (:data:`SCHEMA`,
  :func:`arrow_schema`);
- the **keys**, relative to the bucket (:data:`TABLE_ROOT`, :func:`ds_prefix_key`,
  :func:`manifest_key`, :func:`part_key`, :func:`latest_key`, ...), each built from a ds checked
  by :func:`check_ds`, so a key can never carry a path of someone else's choosing;
- the **manifest** (``_manifest.json``) and the **latest pointer** (``_latest.json``): their
  fields, the format versions a reader understands, and the checks a reader makes before it
  trusts one (:func:`parse_manifest`, :func:`parse_pointer`);
- the **user id rule** (:func:`ids_ok`): the ids clean accepts, hence the only ids a table can
  hold, hence the ids an endpoint accepts. Clean and serve call this one function.

Standard library and pyarrow only: a reader-only install (``pip install ./reader``) has it.
pyarrow is imported by the functions that need it, so the settings and the column names, which
import this module, stay cheap to import (a CLI start, a DAG parse).
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pyarrow as pa

# --- the table -------------------------------------------------------------------------------

USER_ID = "user_id"
RANK = "rank"
ITEM_ID = "item_id"
SCORE = "score"
MODEL_VERSION = "model_version"
DS = "ds"

# column -> Arrow type alias, in the table's column order (the manifest's ``schema`` field)
SCHEMA = {
    USER_ID: "string",
    RANK: "int32",
    ITEM_ID: "string",
    SCORE: "float32",
    MODEL_VERSION: "string",
    DS: "string",
}
COLUMNS = list(SCHEMA)
SORTED_BY = [USER_ID, RANK]  # rows sorted by user, then rank; parts cover increasing user ranges


def arrow_schema() -> pa.Schema:
    """The published table's Arrow schema: ``SCHEMA``, in the contract's column order."""
    import pyarrow as pa

    return pa.schema([(name, pa.type_for_alias(kind)) for name, kind in SCHEMA.items()])


# --- keys, relative to the bucket ------------------------------------------------------------

TABLE_ROOT = "recommendations/"
MANIFEST_NAME = "_manifest.json"
CLAIM_NAME = "_publishing.json"  # a publisher's claim on a ds while it writes (not for readers)
RETIRED_NAME = "_retired.json"  # parts a republish replaced, deleted after the grace period
LATEST_NAME = "_latest.json"
LATEST_LOCK_NAME = "_latest.lock"  # held while a publisher moves the pointer (not for readers)
PUBLISH_ID_RE = re.compile(r"^[0-9a-f]{12}$")  # sha256 of the parts' checksums, 12 hex digits
MAX_PARTS = 100_000  # part numbers are 5 digits
_DS_RE = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$")


def check_ds(ds: str) -> str:
    """Return ``ds`` if it is a real ``YYYY-MM-DD`` date, else raise ValueError.

    Every key built from a ds goes through here (nightrec.core.settings.check_ds is this), so a
    ds can never carry a path.
    """
    if not isinstance(ds, str) or not _DS_RE.fullmatch(ds):
        raise ValueError(f"ds must be a date as YYYY-MM-DD, got {ds!r}")
    dt.date.fromisoformat(ds)  # rejects 2026-02-30
    return ds


def ds_prefix_key(ds: str) -> str:
    """``recommendations/ds=<ds>/``: one day's table (its parts, manifest, claim, retired list)."""
    return f"{TABLE_ROOT}ds={check_ds(ds)}/"


def manifest_key(ds: str) -> str:
    return ds_prefix_key(ds) + MANIFEST_NAME


def claim_key(ds: str) -> str:
    return ds_prefix_key(ds) + CLAIM_NAME


def retired_key(ds: str) -> str:
    return ds_prefix_key(ds) + RETIRED_NAME


def latest_key() -> str:
    return TABLE_ROOT + LATEST_NAME


def latest_lock_key() -> str:
    return TABLE_ROOT + LATEST_LOCK_NAME


def part_key(ds: str, publish_id: str, n: int) -> str:
    """``recommendations/ds=<ds>/part-<publish_id>-NNNNN.parquet``: content-addressed, so a key
    never changes content and a reader holding a manifest can range-read its parts safely."""
    if not isinstance(publish_id, str) or not PUBLISH_ID_RE.fullmatch(publish_id):
        raise ValueError(f"publish_id must be 12 lower-case hex digits, got {publish_id!r}")
    if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n < MAX_PARTS:
        raise ValueError(f"part number must be an int in 0..{MAX_PARTS - 1}, got {n!r}")
    return f"{ds_prefix_key(ds)}part-{publish_id}-{n:05d}.parquet"


def ds_of_key(key: str) -> str | None:
    """``recommendations/ds=2026-11-28/`` (or a URI ending so) -> ``2026-11-28``; None for
    anything that is not a ds folder."""
    name = key.rstrip("/").rsplit("/", 1)[-1]
    if not name.startswith("ds="):
        return None
    try:
        return check_ds(name[3:])
    except ValueError:
        return None


# --- the manifest and the pointer -------------------------------------------------------------

MANIFEST_FORMAT_VERSION = 2  # what the publisher writes
# What a reader understands. Format 1 (the first publisher) has no per-part user range, etag or
# footer size: a reader then looks in every part for a user.
READABLE_FORMAT_VERSIONS = (1, 2)
MANIFEST_FIELDS = (
    "format_version", "ds", "table", "created_at", "model_version", "data_version", "top_k",
    "rows", "users", "parts", "schema", "sorted_by", "metrics", "source", "source_reason",
    "publish_id", "publisher", "popular",
)
PART_FIELDS = ("key", "etag", "bytes", "rows", "users", "min_user_id", "max_user_id",
               "row_groups", "footer_bytes", "sha256")
# what a reader needs of a manifest and of each part, by format (the rest is information)
_MANIFEST_REQUIRED = {1: ("format_version", "ds", "model_version", "rows", "parts"),
                      2: ("format_version", "ds", "model_version", "rows", "parts", "publish_id")}
_PART_REQUIRED = {1: ("key", "bytes", "rows", "sha256"),
                  2: ("key", "etag", "bytes", "rows", "min_user_id", "max_user_id", "sha256")}
POINTER_FIELDS = ("ds", "manifest", "publish_id", "model_version", "updated_at")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


class ContractViolation(ValueError):
    """A manifest or pointer that does not follow this contract: a reader must not use it."""


def pointer_record(*, ds: str, manifest_uri: str, publish_id: str, model_version: str,
                   updated_at: str) -> dict:
    """The latest pointer's content: which manifest readers go to (``manifest_uri``: the full
    ``s3://bucket/recommendations/ds=<ds>/_manifest.json``; readers use ``ds`` with their own
    bucket), and when it moved (ISO 8601, UTC)."""
    return {"ds": check_ds(ds), "manifest": manifest_uri, "publish_id": publish_id,
            "model_version": model_version, "updated_at": updated_at}


def parse_pointer(data: bytes) -> dict:
    """The latest pointer from its bytes, checked: ContractViolation unless it names a real ds."""
    try:
        pointer = json.loads(data)
    except ValueError as e:
        raise ContractViolation(f"{latest_key()} is not JSON: {e}") from None
    if not isinstance(pointer, dict):
        raise ContractViolation(f"{latest_key()} is not a JSON object")
    try:
        check_ds(pointer.get("ds"))
    except ValueError as e:
        raise ContractViolation(f"{latest_key()}: {e}") from None
    return pointer


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def parse_manifest(data: bytes, *, ds: str | None = None) -> dict:
    """A manifest from its bytes, checked as a reader relies on it: a format this reader knows,
    the ``ds`` asked for (when given), and parts that are each a key under that ds's folder with
    a size, a row count and a sha256 (and, from format 2, an ETag and a user range). The part
    keys are checked so that a manifest can never send a reader outside its table.
    ContractViolation otherwise."""
    try:
        m = json.loads(data)
    except ValueError as e:
        raise ContractViolation(f"manifest is not JSON: {e}") from None
    if not isinstance(m, dict):
        raise ContractViolation("manifest is not a JSON object")
    version = m.get("format_version")
    if version not in READABLE_FORMAT_VERSIONS:
        raise ContractViolation(f"manifest format_version {version!r} is not one this reader "
                                f"knows {READABLE_FORMAT_VERSIONS}: upgrade the reader")
    missing = [f for f in _MANIFEST_REQUIRED[version] if f not in m]
    if missing:
        raise ContractViolation(f"manifest lacks {missing}")
    try:
        prefix = ds_prefix_key(m["ds"])
    except ValueError as e:
        raise ContractViolation(f"manifest: {e}") from None
    if ds is not None and m["ds"] != ds:
        raise ContractViolation(f"manifest is for ds={m['ds']}, not {ds}")
    parts = m["parts"]
    if not isinstance(parts, list) or not _is_count(m["rows"]):
        raise ContractViolation("manifest parts must be a list and rows a count")
    for i, part in enumerate(parts):
        if not isinstance(part, dict) or any(f not in part for f in _PART_REQUIRED[version]):
            raise ContractViolation(f"manifest part {i} lacks one of {_PART_REQUIRED[version]}")
        key = part["key"]
        if (not isinstance(key, str) or not key.startswith(prefix) or "/" in key[len(prefix):]
                or ".." in key or not key.endswith(".parquet")):
            raise ContractViolation(f"manifest part {i} key {key!r} is not a part of {prefix}")
        if not (_is_count(part["bytes"]) and _is_count(part["rows"])
                and isinstance(part["sha256"], str) and _SHA256_RE.fullmatch(part["sha256"])):
            raise ContractViolation(f"manifest part {i}: bytes, rows or sha256 malformed")
    if sum(p["rows"] for p in parts) != m["rows"]:
        raise ContractViolation("manifest rows differ from the sum of its parts' rows")
    return m


# --- user ids --------------------------------------------------------------------------------

# clean.id_pattern's and clean.max_id_length's defaults (params.yaml sets both): letters and
# digits of any script, then also _ . : @ / = -
DEFAULT_ID_PATTERN = r"^[\pL\pN_][\pL\pN_.:@/=-]*$"
DEFAULT_MAX_ID_LENGTH = 256
ID_CHECK_CACHE = 65_536  # single ids whose verdict id_ok keeps (each at most max_length chars)


def ids_ok(ids: pa.Array | pa.ChunkedArray, pattern: str, max_length: int) -> pa.BooleanArray:
    """Per value: matches ``pattern`` (RE2, ``pyarrow.compute.match_substring_regex``) and is at
    most ``max_length`` characters; a null is not ok. Each distinct id is checked once.

    The one id rule: clean refuses ids it fails (``unparseable_id``), so a published table holds
    only ids it passes, and an endpoint accepts exactly those.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    if isinstance(ids, pa.ChunkedArray):
        ids = ids.combine_chunks()
    if ids.type != pa.string():
        ids = ids.cast(pa.string())
    enc = pc.dictionary_encode(ids)
    ok = pc.and_(pc.match_substring_regex(enc.dictionary, pattern),
                 pc.less_equal(pc.utf8_length(enc.dictionary), max_length))
    return pc.fill_null(pc.take(ok, enc.indices), False)


def id_ok(user_id: str, *, pattern: str = DEFAULT_ID_PATTERN,
          max_length: int = DEFAULT_MAX_ID_LENGTH) -> bool:
    """:func:`ids_ok` for one id. An id over the length bound is refused without the regex."""
    return len(user_id) <= max_length and _id_ok_cached(user_id, pattern, max_length)


@functools.lru_cache(maxsize=ID_CHECK_CACHE)
def _id_ok_cached(user_id: str, pattern: str, max_length: int) -> bool:
    # Arrow compiles the pattern on every call: about 1 ms for the default's \pL/\pN classes
    # (measured), so each verdict is kept; the cache is bounded and thread-safe.
    import pyarrow as pa

    return bool(ids_ok(pa.array([user_id], pa.string()), pattern, max_length)[0].as_py())
