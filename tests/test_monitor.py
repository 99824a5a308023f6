"""Realized quality (tasks/realized.py): yesterday's published table against today's new events.

The pure figures on a small case with a known answer; then a replay of three generated days
through ``nightrec run`` (one ds after another, each snapshot the log up to that day's end),
whose realized figures are checked against figures computed here, independently, from the
run's own clean table and the previous table as readers get it.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from nightrec.core import schema
from nightrec.store import layout, storage
from nightrec.table.reader import RecommendationReader
from nightrec.tasks import realized

NIGHTREC = str(Path(sys.executable).parent / "nightrec")


def test_realized_figures_on_a_case_with_a_known_answer():
    events = pd.DataFrame({schema.USER_ID: ["a", "a", "b", "c", "n"],
                           schema.ITEM_ID: ["x", "y", "q", "z", "p1"]})
    lists = pd.DataFrame({schema.USER_ID: ["a", "a", "a", "b", "b", "b"],
                          schema.ITEM_ID: ["y", "w", "x", "q", "r", "s"],
                          schema.RANK: [1, 2, 3, 3, 1, 2]})
    history = pd.Series({"a": 5, "b": 1, "c": 9})  # n is new; c has no list in the table
    out = realized.realized(events, lists, history, ["p0", "p1", "p2"], table_k=3,
                            table_items=6, catalogue_items=12)
    assert out["ks"] == [3] and out["users"] == 4 and out["events"] == 5
    m = out["metrics"]
    # hits: a -> ranks 1 and 3 of 2 relevant; b -> rank 3; c -> none; n (popular) -> rank 2
    assert m["hit_rate_at_3"] == pytest.approx(3 / 4)
    assert m["recall_at_3"] == pytest.approx((1 + 1 + 0 + 1) / 4)
    assert m["mrr_at_3"] == pytest.approx((1 + 1 / 3 + 0 + 1 / 2) / 4)
    ideal2 = 1 + 1 / math.log2(3)
    ndcg_a = (1 + 1 / math.log2(4)) / ideal2
    assert m["ndcg_at_3"] == pytest.approx((ndcg_a + 1 / math.log2(4) + 0 + 1 / math.log2(3)) / 4)
    assert out["event_share_on_recommended"] == pytest.approx(4 / 5)
    assert out["coverage"] == 0.5
    seg = out["segments"]
    assert (seg["new"]["users"], seg["returning"]["users"]) == (1, 3)
    assert seg["new"]["metrics"]["hit_rate_at_3"] == 1.0
    assert seg["returning"]["metrics"]["hit_rate_at_3"] == pytest.approx(2 / 3)
    assert sum(seg[f"activity_t{i}"]["users"] for i in (1, 2, 3)) == 3


def _independent(ds: str, table_ds: str, k: int) -> dict:
    """The realized figures of ``table_ds``'s table on ``ds``'s new events, computed here with
    plain Python from the run's clean table and the table as a reader reads it."""
    clean = storage.read_parquet(layout.bucketed_prefix(ds, "clean", "interactions"))
    cut = realized.end_of_day(table_ds)
    end = realized.end_of_day(ds)
    ts = clean[schema.TIMESTAMP].astype("int64")
    new = clean[(ts >= cut) & (ts < end)][[schema.USER_ID, schema.ITEM_ID]].drop_duplicates()
    before = clean[ts < cut].groupby(schema.USER_ID).size()
    table = RecommendationReader(storage.split_uri(layout.recs_root())[0]).table(
        table_ds).to_pandas().sort_values([schema.USER_ID, schema.RANK])
    lists = table.groupby(schema.USER_ID)[schema.ITEM_ID].apply(list).to_dict()
    popular = [p["item_id"] for p in storage.read_json(layout.manifest_uri(table_ds))["popular"]]
    per_user = {"hit_rate": [], "recall": [], "ndcg": [], "mrr": []}
    on_list = 0
    for user, group in new.groupby(schema.USER_ID):
        rel = set(group[schema.ITEM_ID])
        shown = lists.get(user, []) if before.get(user, 0) > 0 else popular
        on_list += sum(i in set(shown[:k]) for i in group[schema.ITEM_ID])
        top = shown[:10]
        ranks = [r for r, item in enumerate(top) if item in rel]
        per_user["hit_rate"].append(float(bool(ranks)))
        per_user["recall"].append(len(ranks) / len(rel))
        ideal = sum(1 / math.log2(j + 2) for j in range(min(len(rel), 10)))
        per_user["ndcg"].append(sum(1 / math.log2(r + 2) for r in ranks) / ideal)
        per_user["mrr"].append(1 / (ranks[0] + 1) if ranks else 0.0)
    return {"users": new[schema.USER_ID].nunique(), "events": len(new),
            "share": on_list / len(new),
            **{f"{n}_at_10": float(np.mean(v)) for n, v in per_user.items()}}


def test_a_replay_of_generated_days_measures_each_table_on_the_next_days_events(
        s3, sample, bucket, ease_only, tmp_path):
    log = pd.read_csv(sample["interactions"])
    days = ["2026-11-14", "2026-11-15", "2026-11-16"]
    for ds in days:
        snap = tmp_path / f"interactions-{ds}.csv"
        log[log["timestamp"] < realized.end_of_day(ds)].to_csv(snap, index=False)
        run = subprocess.run([NIGHTREC, "run", "--interactions", str(snap), "--items",
                              str(sample["items"]), "--users", str(sample["users"]),
                              "--ds", ds], capture_output=True, text=True, check=False)
        assert run.returncode == 0, run.stderr[-3000:]
    first = storage.read_json(layout.run_uri(days[0], "monitor", "realized.json"))
    assert first["table"] is None and "no table was published before" in first["note"]
    for table_ds, ds in zip(days, days[1:]):
        got = storage.read_json(layout.run_uri(ds, "monitor", "realized.json"))
        assert got["table"]["ds"] == table_ds, got
        k = int(got["table"]["top_k"])
        want = _independent(ds, table_ds, k)
        assert want["events"] > 50 and got["events"] == want["events"]
        assert got["users"] == want["users"]
        for name in ("hit_rate", "recall", "ndcg", "mrr"):
            assert got["metrics"][f"{name}_at_10"] == pytest.approx(want[f"{name}_at_10"]), name
        assert got["event_share_on_recommended"] == pytest.approx(want["share"])
        assert got["metrics"]["hit_rate_at_10"] > 0  # the model's lists do meet the next day
        seg = got["segments"]
        assert seg["new"]["users"] + seg["returning"]["users"] == got["users"]
        assert got["trailing"]["runs"] == (0 if ds == days[1] else 1)
        # the output checks ran against the previous night's table and passed
        checks = storage.read_json(layout.run_uri(ds, "publish", "output_checks.json"))
        assert checks["against"]["ds"] == table_ds and not checks["breaches"], checks
    status = subprocess.run([NIGHTREC, "status"], capture_output=True, text=True, check=True,
                            env={**os.environ, "COLUMNS": "400"})
    last = storage.read_json(layout.run_uri(days[2], "monitor", "realized.json"))
    assert f"ndcg_at_10 {last['metrics']['ndcg_at_10']:.4f} (table {days[1]})" in status.stdout
