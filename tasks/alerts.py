"""Failure records: one JSON per failed task try, for people and for ``nightrec run``'s summary.

Written by the DAG's ``on_failure_callback`` to ``alerts/ds=<ds>/<run>.<task>.json`` in the bucket
(best effort: S3 may be the thing that failed) and to ``$NIGHTREC_STATE/alerts/<run>.json`` on
the machine that ran the task. Credentials never appear: only ids and the error's text.
"""

from __future__ import annotations

import datetime as dt
import json
import logging

from tasks import layout, settings, storage

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
        if ds and settings.check_ds(ds):
            key = f"alerts/ds={ds}/{layout.sanitize_token(run_id)}.{layout.sanitize_token(task_id)}.json"
            storage.write_json(storage.s3_uri(key), record)
    except Exception as e:  # noqa: BLE001 - the alert must not mask the original failure
        log.warning("could not upload the alert record: %s", type(e).__name__)
    return record


def read_failure(run_id: str) -> dict | None:
    path = local_alert_path(run_id)
    return json.loads(path.read_text()) if path.exists() else None
