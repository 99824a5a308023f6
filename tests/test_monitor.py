"""Realized quality (tasks/realized.py): yesterday's published table against today's new events.

The pure figures on a small case with a known answer; then a replay of three generated days
through ``nightrec run`` (one ds after another, each snapshot the log up to that day's end),
whose realized figures are checked against figures computed here, independently, from the
run's own clean table and the previous table as readers get it.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from nightrec.core import schema
from nightrec.ops import cli
from nightrec.store import layout, storage
from nightrec.table.reader import RecommendationReader
from nightrec.tasks import realized
from tests.test_e2e import CHROMIUM, chromium_flags

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


def test_a_drop_below_the_trailing_median_is_judged_on_enough_users(bucket):
    for ds, value in (("2026-06-01", 0.30), ("2026-06-02", 0.20), ("2026-06-03", 0.25)):
        storage.write_json(layout.run_uri(ds, "monitor", "realized.json"),
                           {"ds": ds, "metrics": {"ndcg_at_10": value}})
    storage.write_json(layout.run_uri("2026-06-04", "monitor", "realized.json"),
                       {"ds": "2026-06-04", "error": "not measured"})  # no figure: skipped
    kw = dict(metric="ndcg_at_10", runs=2, max_drop=0.2, min_users=200)
    t = realized.trailing("2026-06-05", 0.17, users=500, **kw)
    assert t["runs"] == 2 and t["median"] == pytest.approx(0.225)  # the last two with figures
    assert t["drop"] == pytest.approx(1 - 0.17 / 0.225) and t["alert"] is True
    assert realized.trailing("2026-06-05", 0.19, users=500, **kw)["alert"] is False
    few = realized.trailing("2026-06-05", 0.05, users=50, **kw)
    assert few["judged"] is False and few["alert"] is False
    assert realized.trailing("2026-06-01", 0.1, users=500, **kw)["runs"] == 0


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


# the sample's users are active over windows starting in the first 70% of its 200 days
# (2026-05-01 on): from day 120 on events are densest
DAYS = ["2026-08-29", "2026-08-30", "2026-08-31"]


@pytest.fixture(scope="module")
def replay(s3, sample, tmp_path_factory):
    """Three generated days through ``nightrec run`` (EASE alone at one point: the
    lifecycle, not model choice), in a bucket of their own; yields the bucket."""
    import uuid

    from tests.conftest import params_with, pin_ease

    tmp = tmp_path_factory.mktemp("replay")
    name = f"t-{uuid.uuid4().hex[:12]}"
    storage.s3_client().create_bucket(Bucket=name)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NIGHTREC_BUCKET", name)
        mp.setenv("NIGHTREC_PARAMS", str(params_with(tmp / "ease-only.yaml", pin_ease)))
        log = pd.read_csv(sample["interactions"])
        for ds in DAYS:
            snap = tmp / f"interactions-{ds}.csv"
            log[log["timestamp"] < realized.end_of_day(ds)].to_csv(snap, index=False)
            run = subprocess.run([NIGHTREC, "run", "--interactions", str(snap), "--items",
                                  str(sample["items"]), "--users", str(sample["users"]),
                                  "--ds", ds], capture_output=True, text=True, check=False)
            assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
        yield mp
    client = storage.s3_client()  # a bucket is a SeaweedFS collection: give it back
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=name):
        keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
        for i in range(0, len(keys), 1000):
            client.delete_objects(Bucket=name, Delete={"Objects": keys[i:i + 1000]})
    client.delete_bucket(Bucket=name)


def test_a_replay_of_generated_days_measures_each_table_on_the_next_days_events(replay):
    first = storage.read_json(layout.run_uri(DAYS[0], "monitor", "realized.json"))
    assert first["table"] is None and "no table was published before" in first["note"]
    for table_ds, ds in zip(DAYS, DAYS[1:]):
        got = storage.read_json(layout.run_uri(ds, "monitor", "realized.json"))
        assert got["table"]["ds"] == table_ds, got
        k = int(got["table"]["top_k"])
        want = _independent(ds, table_ds, k)
        assert want["events"] > 20 and got["events"] == want["events"]
        assert got["users"] == want["users"]
        for name in ("hit_rate", "recall", "ndcg", "mrr"):
            assert got["metrics"][f"{name}_at_10"] == pytest.approx(want[f"{name}_at_10"]), name
        assert got["event_share_on_recommended"] == pytest.approx(want["share"])
        assert got["metrics"][f"hit_rate_at_{k}"] > 0  # the lists do meet the next day
        seg = got["segments"]
        assert seg["new"]["users"] + seg["returning"]["users"] == got["users"]
        assert got["trailing"]["runs"] == (0 if ds == DAYS[1] else 1)
        # the output checks ran against the previous night's table and passed; drift too
        checks = storage.read_json(layout.run_uri(ds, "publish", "output_checks.json"))
        assert checks["against"]["ds"] == table_ds and not checks["breaches"], checks
        drift = storage.read_json(layout.run_uri(ds, "validate", "report.json"))["drift"]
        assert drift["previous"] == table_ds and drift["stop"] == [], drift
    status = subprocess.run([NIGHTREC, "status"], capture_output=True, text=True, check=True,
                            env={**os.environ, "COLUMNS": "400"})
    last = storage.read_json(layout.run_uri(DAYS[2], "monitor", "realized.json"))
    (summary,) = [x for x in cli.run_summaries(5) if x["ds"] == DAYS[2]]
    assert summary["realized"] == {"table_ds": DAYS[1], "metric": "ndcg_at_10", "alert": False,
                                   "value": last["metrics"]["ndcg_at_10"]}
    # tens of users a day here: below monitor.realized.min_users, a drop is not judged
    assert last["trailing"]["judged"] is False and last["users"] < 200
    assert summary["output_checks"] == {"breaches": [], "refused": False}
    cell = cli.realized_cell(summary["realized"])
    assert cell == f"ndcg_at_10 {last['metrics']['ndcg_at_10']:.4f} (table {DAYS[1]})"
    flat = " ".join(status.stdout.split())  # rich may wrap a cell over lines
    assert "ndcg_at_10" in flat and f"{last['metrics']['ndcg_at_10']:.4f}" in flat


@pytest.mark.service("chromium", available=CHROMIUM is not None,
                     reason="no chromium or chromium-browser on PATH (Debian's chromium)")
def test_the_report_renders_the_monitoring_sections_in_headless_chromium(replay, tmp_path):
    page = tmp_path / "report.html"
    page.write_bytes(storage.read_bytes(layout.report_uri(DAYS[2], "report.html")))
    flags = chromium_flags(tmp_path)
    dom = subprocess.run([*flags, "--dump-dom", page.as_uri()], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    for title in ("Realized quality of the previous table", "Input drift",
                  "Output checks against the latest table"):
        assert f"<h2>{title}</h2>" in dom, title
    assert f"The table of ds={DAYS[1]}" in dom and f"Against ds={DAYS[1]}" in dom
    plots = int(re.search(r'data-plots-rendered="(\d+)"', dom)[1])
    assert plots == dom.count('class="plot"') >= 6  # the realized history plot among them
    if os.environ.get("NIGHTREC_SAVE_SCREENSHOT"):
        subprocess.run([*flags, f"--screenshot={os.environ['NIGHTREC_SAVE_SCREENSHOT']}",
                        "--window-size=1000,4200", page.as_uri()], capture_output=True,
                       timeout=120, check=True)
