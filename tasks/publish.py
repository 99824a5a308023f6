"""Step 9, publish: make the scored table visible to readers, all at once or not at all.

Order of writes (each S3 PUT is atomic; the table becomes visible only at step 4):

1. validate the staged table with ``expectations/recommendations.json`` and check that ranks are
   1..n per user with scores non-increasing;
2. copy the staged parts to ``recommendations/ds=<ds>/part-<publish_id>-NNNNN.parquet``, where
   ``publish_id`` is a hash of the parts' contents;
3. write ``recommendations/ds=<ds>/_manifest.json``: parts with bytes, rows and sha256, totals,
   model and data versions, schema, creation time. The manifest *is* the table: readers read the
   parts it lists and nothing else;
4. point ``recommendations/_latest.json`` at that manifest, unless the latest already names a
   later ds (a backfill never moves readers back in time);
5. delete the partition's parts that the new manifest does not list (a previous publish of the
   same ds), and the staging prefix.

A failure before 3 leaves the previous table of that ds (if any) and the latest pointer as they
were; extra staged or copied objects are never listed by any manifest.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import logging

import numpy as np
import pandas as pd

from tasks import layout, schema, settings, storage
from tasks.validate import ContractError, run_suite

PARAMS = ["publish.row_group_size"]
SUITE = "expectations/recommendations.json"
SCHEMA = {
    schema.USER_ID: "string",
    schema.RANK: "int32",
    schema.ITEM_ID: "string",
    schema.SCORE: "float32",
    schema.MODEL_VERSION: "string",
    schema.DS: "string",
}
log = logging.getLogger(__name__)


def check_rankings(df: pd.DataFrame) -> list[str]:
    """Problems with ranks and scores: ranks 1..n per user in order, scores non-increasing."""
    problems = []
    g = df.groupby(schema.USER_ID, sort=False)
    expected = g.cumcount() + 1
    if not np.array_equal(df[schema.RANK].to_numpy(), expected.to_numpy()):
        problems.append("ranks are not 1..n in order within each user")
    diffs = g[schema.SCORE].diff()
    if (diffs > 0).any():
        problems.append(f"scores increase with rank for {int((diffs > 0).sum())} rows")
    if not df[schema.USER_ID].is_monotonic_increasing:
        problems.append("rows are not sorted by user_id")
    return problems


def validate_table(df: pd.DataFrame, *, ds: str, model_version: str, top_k: int) -> dict:
    report = run_suite(
        df, settings.project_root() / SUITE,
        {"top_k": top_k, "ds_set": [ds], "model_version_set": [model_version]},
    )
    report["ranking_problems"] = check_rankings(df)
    report["success"] = report["success"] and not report["ranking_problems"]
    return report


def publish_id(checksums: list[str]) -> str:
    return hashlib.sha256("".join(checksums).encode()).hexdigest()[:12]


def build_manifest(*, ds: str, parts: list[dict], scored: dict, created_at: str) -> dict:
    return {
        "format_version": 1,
        "ds": ds,
        "table": layout.recs_prefix(ds),
        "created_at": created_at,
        "model_version": scored["model_version"],
        "data_version": scored["data_version"],
        "top_k": scored["top_k"],
        "rows": sum(p["rows"] for p in parts),
        "users": scored["users"],
        "parts": parts,
        "schema": SCHEMA,
        "metrics": scored.get("metrics"),
    }


def _later_latest(ds: str) -> str | None:
    """The ds of the current latest pointer if it is later than ``ds``."""
    uri = layout.latest_uri()
    if not storage.exists(uri):
        return None
    current = storage.read_json(uri).get("ds", "")
    return current if current > ds else None


def run(ds: str, scored: dict, params: dict | None = None, dry_run: bool = False) -> dict:
    """Validate and publish the staged parts of ``scored``; return the manifest's URI and ids.

    ``dry_run``: validate only, then remove the staged parts; readers see no change.
    """
    settings.check_ds(ds)
    staged = [storage.read_bytes(u) for u in scored["parts"]]  # each part downloaded once
    frames = [pd.read_parquet(io.BytesIO(data)) for data in staged]
    table = pd.concat(frames, ignore_index=True)
    report = validate_table(
        table, ds=ds, model_version=scored["model_version"], top_k=scored["top_k"]
    )
    storage.write_json(layout.run_uri(ds, "publish", "validation.json"), report)
    if not report["success"]:
        failed = [f["expectation"] for f in report["failures"]] + report["ranking_problems"]
        raise ContractError(f"recommendation table broke its contract: {failed}")

    if dry_run:
        storage.delete(storage.list_uris(scored["staging"]))
        log.info("dry run: %d rows validated, nothing published for ds=%s", len(table), ds)
        return {"dry_run": True, "rows": len(table), "manifest": None}
    pid = publish_id([storage.sha256(b) for b in staged])
    prefix = layout.recs_prefix(ds)
    parts = []
    for n, (data, frame) in enumerate(zip(staged, frames, strict=True)):
        uri = storage.join(prefix, f"part-{pid}-{n:05d}.parquet")
        storage.write_bytes(uri, data)
        parts.append(
            {"key": storage.split_uri(uri)[1], "bytes": len(data), "rows": len(frame),
             "sha256": storage.sha256(data)}
        )
    created = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    manifest = build_manifest(
        ds=ds, parts=parts, scored={**scored, "users": int(table[schema.USER_ID].nunique())},
        created_at=created,
    )
    manifest["publish_id"] = pid
    storage.write_json(layout.manifest_uri(ds), manifest)

    later = _later_latest(ds)
    if later:
        log.warning("latest stays at ds=%s: this run publishes the earlier ds=%s", later, ds)
    else:
        storage.write_json(
            layout.latest_uri(),
            {"ds": ds, "manifest": layout.manifest_uri(ds), "publish_id": pid,
             "model_version": manifest["model_version"], "updated_at": created},
        )
    listed = {f"s3://{storage.split_uri(prefix)[0]}/{p['key']}" for p in parts}
    stale = [u for u in storage.list_uris(prefix) if u.endswith(".parquet") and u not in listed]
    storage.delete(stale + storage.list_uris(scored["staging"]))
    log.info("published %d rows for %d users at %s", manifest["rows"], manifest["users"], prefix)
    return {"manifest": layout.manifest_uri(ds), "rows": manifest["rows"], "publish_id": pid,
            "latest_moved": later is None}
