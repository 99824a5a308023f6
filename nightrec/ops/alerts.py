"""Alert records: one JSON per failed task try, and one per night the latest table is stale.

Failures are written by the DAG's ``on_failure_callback`` to ``alerts/ds=<ds>/<run>.<task>.json``
in the bucket (best effort: S3 may be the thing that failed) and to
``$NIGHTREC_STATE/alerts/<run>.json`` on the machine that ran the task. Credentials never appear:
only ids and the error's text.

Staleness: :func:`latest_table_age` says how old the table readers get is (hours since its
latest pointer moved); the nightly report task calls :func:`check_latest_age`, which writes
``alerts/ds=<ds>/<run>.stale_table.json`` when that is above ``publish.max_age_hours`` (a run of
unblessed nights with the fallback off, or failed nights, leaves readers an old table).
"""

from __future__ import annotations

import datetime as dt
import json
import logging

from nightrec.core import settings
from nightrec.store import layout, storage

log = logging.getLogger(__name__)


def local_alert_path(run_id: str):
    return settings.state_dir() / "alerts" / f"{layout.sanitize_token(run_id)}.json"


def record_failure(*, dag_id: str, run_id: str, task_id: str, ds: str | None, error: str) -> dict:
    record = {
        "dag_id": dag_id,
        "run_id": run_id,
        "task_id": task_id,
        "ds": ds,
        "error": error,
        "at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    log.error("task failed: %s.%s (run %s, ds %s): %s", dag_id, task_id, run_id, ds, error)
    path = local_alert_path(run_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2))
    try:
        if ds:
            storage.write_json(layout.alert_uri(ds, run_id, task_id), record)
    except Exception as e:  # noqa: BLE001 - the alert must not mask the original failure
        log.warning("could not upload the alert record: %s", type(e).__name__)
    return record


def read_failure(run_id: str) -> dict | None:
    path = local_alert_path(run_id)
    return json.loads(path.read_text()) if path.exists() else None




def latest_table_age(now: dt.datetime | None = None) -> dict | None:
    """The latest pointer's ds, manifest, source and age: ``{"ds", "manifest",
    "model_version", "source", "source_reason", "updated_at", "age_hours"}`` (hours >= 0 since
    the pointer moved), or None before any table was published."""
    found = storage.read_versioned(layout.latest_uri())
    if found is None:
        return None
    latest = json.loads(found[0])
    now = now or dt.datetime.now(dt.UTC)
    moved = dt.datetime.fromisoformat(latest["updated_at"])
    got = storage.read_versioned(latest["manifest"])
    manifest = json.loads(got[0]) if got else {}
    return {"ds": latest["ds"], "manifest": latest["manifest"],
            "model_version": latest.get("model_version"),
            "source": manifest.get("source", "model"),
            "source_reason": manifest.get("source_reason"), "updated_at": latest["updated_at"],
            "age_hours": max(0.0, (now - moved).total_seconds() / 3600.0)}


def check_latest_age(*, ds: str, run_id: str, max_age_hours: float,
                     now: dt.datetime | None = None) -> dict | None:
    """:func:`latest_table_age` plus ``stale`` (age above ``max_age_hours``, or no table at
    all); a stale table gets an alert record under this run's ds (and a warning in the log)."""
    age = latest_table_age(now)
    stale = age is None or age["age_hours"] > float(max_age_hours)
    out = {**(age or {"ds": None, "age_hours": None}), "stale": stale,
           "max_age_hours": float(max_age_hours)}
    if stale:
        what = ("no table has been published yet" if age is None else
                f"the latest table (ds={age['ds']}, {age['source']}) is {age['age_hours']:.1f} h "
                f"old, above publish.max_age_hours {float(max_age_hours):g}")
        record = {"kind": "stale_table", "ds": ds, "run_id": run_id, "error": what, **out,
                  "at": (now or dt.datetime.now(dt.UTC)).isoformat(timespec="seconds")}
        log.warning("stale table: %s", what)
        out["alert"] = layout.alert_uri(ds, run_id, "stale_table")
        storage.write_json(out["alert"], record)
    return out
