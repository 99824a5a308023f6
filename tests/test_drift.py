"""Input drift against the previous ds (tasks/drift.py), checked by validate with the real Great
Expectations suite expectations/drift.json on the real SeaweedFS: a first ds has nothing to
compare with; the same log again passes; half the users stops the run (the default action for
counts); set to ``warn`` it goes on with a warning and an alert record; a popularity shift is
measured as the Jensen-Shannon distance of item shares."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from nightrec.core import schema, settings
from nightrec.store import layout, storage
from nightrec.tasks import clean, drift, ingest, validate


def test_js_distance_is_zero_for_equal_shares_and_one_for_disjoint_items():
    a = pd.DataFrame({schema.ITEM_ID: ["x", "y"], "n": [3, 1]})
    assert drift.js_distance(a, a.assign(n=[6, 2])) == 0.0
    b = pd.DataFrame({schema.ITEM_ID: ["z"], "n": [5]})
    assert drift.js_distance(a, b) == pytest.approx(1.0)
    assert 0 < drift.js_distance(a, a.assign(n=[1, 3])) < 1


def _validate(ds: str, log: pd.DataFrame, sample: dict, tmp_path, params: dict):
    for table in ("interactions", "items", "users"):
        storage.delete(storage.list_uris(layout.raw_prefix(ds, table)))
    path = tmp_path / f"{ds}.csv"
    log.to_csv(path, index=False)
    storage.write_bytes(layout.raw_prefix(ds, "interactions") + "interactions.csv",
                        path.read_bytes())
    for table in ("items", "users"):
        storage.write_bytes(layout.raw_prefix(ds, table) + f"{table}.csv",
                            sample[table].read_bytes())
    cleaned = clean.run(ingest.run(ds, params), params)
    return validate.run(cleaned, params, run_id="drift-test-run")


def _report(ds: str) -> dict:
    return storage.read_json(layout.run_uri(ds, "validate", "report.json"))["drift"]


def test_drift_checks_stop_or_warn_per_params_against_the_previous_ds(bucket, sample, tmp_path):
    params = settings.load_params()
    log = pd.read_csv(sample["interactions"])
    _validate("2026-11-01", log, sample, tmp_path, params)
    first = _report("2026-11-01")
    assert first["previous"] is None and "nothing to compare" in first["note"]
    assert storage.exists(layout.run_uri("2026-11-01", "drift", "stats.json"))

    # the same log a day later: one more day of its events (clean quarantines events after
    # the ds's end), so the figures barely move
    _validate("2026-11-02", log, sample, tmp_path, params)
    same = _report("2026-11-02")
    assert same["previous"] == "2026-11-01" and same["stop"] == same["warn"] == []
    checks = {c["check"]: c for c in same["checks"]}
    assert checks["users"]["min"] / 0.7 <= checks["users"]["value"] < 1.01 * (
        checks["users"]["min"] / 0.7)
    assert 0 <= checks["popularity_js"]["value"] < 0.05
    assert 0 <= checks["new_user_share"]["value"] < 0.01
    assert set(checks) == set(drift.CHECKS)

    half = log[log[schema.USER_ID] % 2 == 0]  # half the users (and about half the rows)
    with pytest.raises(drift.DriftError, match=r"users=.*\(stop\)"):
        _validate("2026-11-03", half, sample, tmp_path, params)
    stopped = _report("2026-11-03")
    assert {"users", "rows"} <= set(stopped["stop"]) and stopped["previous"] == "2026-11-02"
    # the suite that judged it is GE's, recorded with the ds's other validations
    assert storage.exists(validate.results_prefix("2026-11-03") + "drift.json")

    lenient = settings.with_overrides(params, {"monitor.drift.users.action": "warn",
                                               "monitor.drift.rows.action": "warn"})
    _validate("2026-11-04", half, sample, tmp_path, lenient)  # goes on
    warned = _report("2026-11-04")
    assert {"users", "rows"} <= set(warned["warn"]) and warned["stop"] == []
    alert = storage.read_json(layout.alert_uri("2026-11-04", "drift-test-run", "drift"))
    assert alert["kind"] == "drift" and "users" in alert["warn"]
    # 2026-11-03 was refused: 11-04 compares with the last accepted ds, and 11-03's figures
    # are there for the record, marked so
    assert warned["previous"] == "2026-11-02"
    assert storage.read_json(layout.run_uri("2026-11-03", "drift", "stats.json"))[
        "accepted"] is False

    # a popularity shift: every item's events move to another item
    rng = np.random.default_rng(0)
    items = log[schema.ITEM_ID].unique()
    moved = half.assign(**{schema.ITEM_ID: half[schema.ITEM_ID].map(
        dict(zip(items, rng.permutation(items), strict=True)))})
    _validate("2026-11-05", moved, sample, tmp_path, lenient)  # against 11-04 (half, accepted)
    shifted = {c["check"]: c for c in _report("2026-11-05")["checks"]}
    assert shifted["popularity_js"]["value"] > 0.3 and not shifted["popularity_js"]["ok"]
    assert "popularity_js" in _report("2026-11-05")["warn"]
    assert math.isclose(shifted["rows"]["value"], len(moved), rel_tol=0.05)
