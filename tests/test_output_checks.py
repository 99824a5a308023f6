"""Publish's output checks (tasks/output_checks.py): today's staged table against the latest one,
on the real SeaweedFS, through ``publish.run``; and the comparison's sampling, by construction.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from nightrec.core import schema, settings
from nightrec.store import layout, storage
from nightrec.table.reader import RecommendationReader
from nightrec.tasks import output_checks, publish
from tests.test_publish import stage

DS0, DS1, DS2 = "2026-05-01", "2026-05-02", "2026-05-03"


def params(**monitor_output):
    p = settings.load_params()
    p["monitor"]["output"].update(monitor_output)
    return p


def latest_ds() -> str:
    return RecommendationReader(storage.split_uri(layout.recs_root())[0]).latest()["ds"]


def record(ds: str) -> dict:
    return storage.read_json(layout.run_uri(ds, "publish", "output_checks.json"))


def by_name(rec: dict) -> dict:
    return {c["name"]: c for c in rec["checks"]}


def test_a_table_whose_lists_moved_to_other_users_is_refused_unless_forced(bucket):
    publish.run(stage(DS1, run_key="r1", model_version="mf-20260502-aaaaaaaa", n_users=80),
                params=params())
    assert record(DS1)["note"].startswith("nothing published yet")
    shuffled = stage(DS2, run_key="r2", model_version="mf-20260503-bbbbbbbb", n_users=80,
                     seed=5, shuffle_lists=True)
    with pytest.raises(output_checks.OutputCheckError, match="overlap_lift"):
        publish.run(shuffled, params=params())
    assert latest_ds() == DS1  # readers see yesterday's table, untouched
    assert not storage.exists(layout.manifest_uri(DS2))
    rec = record(DS2)
    assert rec["refused"] and rec["against"]["ds"] == DS1
    checks = by_name(rec)
    assert checks["overlap_lift"]["judged"] and checks["overlap_lift"]["value"] < 1.5
    assert checks["overlap_at_10"]["value"] < 0.3
    assert checks["users_dropped"]["ok"] and checks["users_dropped"]["value"] == 0
    # the same table, forced: published, and the record says so
    forced = stage(DS2, run_key="r3", model_version="mf-20260503-bbbbbbbb", n_users=80,
                   seed=5, shuffle_lists=True)
    publish.run(forced, params=params(), force=True)
    assert latest_ds() == DS2
    rec = record(DS2)
    assert not rec["refused"] and rec["forced"] and "overlap_lift" in rec["breaches"]


def test_the_next_night_of_the_same_model_passes_and_is_compared_from_the_stored_summary(
        bucket, monkeypatch):
    publish.run(stage(DS1, run_key="r1", model_version="mf-20260502-aaaaaaaa", n_users=80),
                params=params())
    assert storage.exists(layout.run_uri(DS1, "publish", "output_summary.parquet"))
    streamed = []
    monkeypatch.setattr(RecommendationReader, "iter_batches",
                        lambda self, ds=None: streamed.append(ds) or iter(()))
    # 90 users today (10 new), the same users' lists as yesterday, new scores
    publish.run(stage(DS2, run_key="r2", model_version="mf-20260503-bbbbbbbb", n_users=90,
                      seed=7), params=params())
    assert latest_ds() == DS2 and streamed == []  # yesterday's table was not read again
    rec = record(DS2)
    assert not rec["refused"] and rec["breaches"] == []
    checks = by_name(rec)
    assert checks["overlap_at_10"]["value"] == 1.0 and checks["users_dropped"]["value"] == 0
    assert checks["overlap_lift"]["value"] > 5 and checks["overlap_lift"]["judged"]
    assert rec["figures"]["common_users"] == 80


def test_without_a_stored_summary_the_latest_table_is_streamed(bucket):
    publish.run(stage(DS1, run_key="r1", model_version="mf-20260502-aaaaaaaa", n_users=80),
                params=params())
    storage.delete([layout.run_uri(DS1, "publish", "output_summary.json")])  # an older publish
    with pytest.raises(output_checks.OutputCheckError, match="users_dropped"):
        publish.run(stage(DS2, run_key="r2", model_version="mf-20260503-bbbbbbbb", n_users=30,
                          seed=3), params=params())
    checks = by_name(record(DS2))
    assert checks["users_dropped"]["value"] == pytest.approx(50 / 80)
    assert checks["overlap_at_10"]["value"] == 1.0  # the 30 left kept their lists
    assert latest_ds() == DS1


def test_score_scale_is_judged_within_a_model_family_and_a_backfill_is_never_refused(bucket):
    publish.run(stage(DS1, run_key="r1", model_version="mf-20260502-aaaaaaaa", n_users=80),
                params=params())
    with pytest.raises(output_checks.OutputCheckError, match="score_scale_change"):
        publish.run(stage(DS2, run_key="r2", model_version="mf-20260503-bbbbbbbb", n_users=80,
                          seed=2, score_scale=100.0), params=params())
    assert by_name(record(DS2))["score_scale_change"]["value"] == pytest.approx(100, rel=0.3)
    # another family (EASE's scores live on another scale): not judged, published
    publish.run(stage(DS2, run_key="r3", model_version="ease-20260503-cccccccc", n_users=80,
                      seed=2, score_scale=100.0), params=params())
    check = by_name(record(DS2))["score_scale_change"]
    assert not check["judged"] and check["why"] == "the model family changed"
    assert latest_ds() == DS2
    # a backfill with shuffled lists: checked and recorded, published, latest stays
    publish.run(stage(DS0, run_key="r4", model_version="ease-20260501-dddddddd", n_users=80,
                      seed=4, shuffle_lists=True), params=params())
    rec = record(DS0)
    assert rec["breaches"] and not rec["refused"] and rec["note"].startswith("a backfill")
    assert latest_ds() == DS2 and storage.exists(layout.manifest_uri(DS0))


def _summary(users: list[str], lists: dict[str, list[str]], limit: int) -> output_checks.Summary:
    import pyarrow as pa

    rows = [(u, item, r + 1, 1.0 / (r + 1)) for u in users for r, item in enumerate(lists[u])]
    frame = pd.DataFrame(rows, columns=[schema.USER_ID, schema.ITEM_ID, schema.RANK,
                                        schema.SCORE])
    s = output_checks.Summary(limit)
    for lo in range(0, len(frame), 997):  # in batches, as publish's pass gives them
        s.add(pa.Table.from_pandas(frame.iloc[lo:lo + 997], preserve_index=False))
    return s


def test_samples_taken_at_different_rates_compare_the_same_users_exactly():
    rng = np.random.default_rng(0)
    users = [f"user-{i}" for i in range(3000)]
    lists = {u: [f"i{j}" for j in rng.choice(500, 12, replace=False)] for u in users}
    p = params()["monitor"]["output"]
    flat = {f"monitor.output.{k}": v for k, v in p.items()}
    full = output_checks.compare(_summary(users, lists, output_checks.HASH_SPACE), 500,
                                 _summary(users, lists, output_checks.HASH_SPACE), 500,
                                 same_family=True, p=flat)
    today = _summary(users[:2000], lists, output_checks.threshold(2000, 300))
    latest = _summary(users, lists, output_checks.threshold(3000, 900))
    sampled = output_checks.compare(today, 500, latest, 500, same_family=True, p=flat)
    # latest's sample at the lower rate: ~300 of 2000 -> ~450 of its 3000 users, a third gone
    assert 250 < sampled["figures"]["sampled_users_latest"] < 650
    assert sampled["figures"]["common_users"] == sampled["figures"]["sampled_users_today"]
    dropped = by_name(sampled)["users_dropped"]["value"]
    assert abs(dropped - 1 / 3) < 0.08 and by_name(full)["users_dropped"]["value"] == 0
    assert by_name(sampled)["overlap_at_10"]["value"] == 1.0  # the same users' lists
    assert by_name(full)["overlap_lift"]["value"] > 20
    # the hash is the same in every process and version (a summary written last night is
    # compared tonight): pandas' SipHash with its fixed key gives this value
    assert int(output_checks.user_hash(["user-1"])[0]) == 10727632427313137042


def test_coverage_compares_the_depth_both_tables_have():
    """A top-5 table against a top-12 one: the items of the first 5 ranks against the latest
    table's first 5, not against every item its 12 ranks hold (issue 16's run found a manual
    top_k 5 run refused for "coverage" that way)."""
    users = [f"user-{i}" for i in range(200)]
    rng = np.random.default_rng(1)
    # the first five ranks from 30 popular items, the next seven from the long tail
    lists = {u: [f"i{j}" for j in rng.choice(30, 5, replace=False)]
             + [f"i{j}" for j in 30 + rng.choice(370, 7, replace=False)] for u in users}
    latest = _summary(users, lists, output_checks.HASH_SPACE)
    today = _summary(users, {u: lists[u][:5] for u in users}, output_checks.HASH_SPACE)
    flat = {f"monitor.output.{k}": v for k, v in params()["monitor"]["output"].items()}
    out = output_checks.compare(today, len(today.items), latest, len(latest.items),
                                same_family=True, p=flat)
    cov = next(c for c in out["checks"] if c["name"] == "coverage_ratio")
    assert out["figures"]["coverage_depth"] == 5
    assert cov["value"] == 1.0 and cov["ok"]  # the same first five ranks: the same items
    assert len(today.items) / len(latest.items) < 0.25  # the whole-table ratio: a breach
    # a table that recommends a fifth of the items at the same depth is still caught
    narrow = {u: [f"i{j}" for j in rng.choice(20, 12, replace=False)] for u in users}
    out = output_checks.compare(_summary(users, narrow, output_checks.HASH_SPACE), 20, latest,
                                len(latest.items), same_family=True, p=flat)
    assert "coverage_ratio" in out["breaches"] and out["figures"]["coverage_depth"] == 10
