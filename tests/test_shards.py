"""Sharded scoring through Airflow: dynamic task mapping, and a failed shard that retries alone.

The re-score DAG (no training, so it is quick) scores a small registered model with 4 mapped
shards under ``dag.test()`` against the real SeaweedFS. Shard 2's first try leaves a stray
object in its own staging folder and fails; Airflow retries only that mapped task, the retry
replaces only that folder, and the published table is complete. The fault is injected by
wrapping ``nightrec.tasks.score.run_shard`` in this test (``dag.test()`` runs tasks in this process), so
the production code has no fault hook at all.
"""

from __future__ import annotations

import datetime as dt
import io
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from nightrec.store import layout, storage
from nightrec.table.reader import RecommendationReader
from nightrec.tasks import score

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.e2e
DS, VERSION = "2026-10-01", "mf-20261001-5ba4d5e0"
N_USERS, N_ITEMS, K = 42, 30, 5


@pytest.fixture(scope="module")
def own_bucket(s3):
    """A bucket of this module's own: the latest pointer and retention are per bucket."""
    bucket = "nightrec-shards"
    storage.s3_client().create_bucket(Bucket=bucket)
    previous = os.environ.get("NIGHTREC_BUCKET")
    os.environ["NIGHTREC_BUCKET"] = bucket
    yield bucket
    os.environ["NIGHTREC_BUCKET"] = previous or "nightrec"


def register_model() -> list[str]:
    """A small factor model in the registry, and ds's clean outputs (its seen set)."""
    rng = np.random.default_rng(7)
    users = np.array([f"user{i:03d}" for i in rng.permutation(N_USERS)])  # index != id order
    items = np.array([f"item{i:03d}" for i in range(N_ITEMS)])
    prefix = storage.s3_uri(f"models/{VERSION}/")
    buf = io.BytesIO()
    np.savez(buf, user=rng.normal(size=(N_USERS, 4)).astype(np.float32),
             item=rng.normal(size=(N_ITEMS, 4)).astype(np.float32),
             item_bias=np.zeros(N_ITEMS, np.float32))
    storage.write_bytes(prefix + "embeddings.npz", buf.getvalue())
    storage.write_parquet(pd.DataFrame({"user_idx": np.arange(N_USERS), "user_id": users}),
                          prefix + "users.parquet")
    storage.write_parquet(pd.DataFrame({"item_idx": np.arange(N_ITEMS), "item_id": items}),
                          prefix + "items.parquet")
    storage.write_json(prefix + "meta.json", {"model_version": VERSION, "data_version": "d" * 32,
                                              "ds": DS})
    seen = pd.DataFrame({"user_id": np.repeat(users, 3),
                         "item_id": items[rng.integers(0, N_ITEMS, 3 * N_USERS)]})
    storage.write_parquet(seen, layout.bucket_uri(DS, "clean", "interactions", 0))
    # an empty quarantine: re-score builds ds's seen set from clean's two outputs (tasks/seen.py)
    storage.write_parquet(pd.DataFrame({"user_id": [], "item_id": [], "reason": []}, dtype=str),
                          layout.run_uri(DS, "clean", "quarantine.parquet"))
    return sorted(users)


def test_four_mapped_shards_one_fails_once_and_only_it_reruns(own_bucket, airflow_db,
                                                             monkeypatch):
    from airflow.dag_processing.dagbag import DagBag

    all_users = register_model()
    real_run_shard, calls, staged = score.run_shard, [], {}

    def flaky_run_shard(spec, params=None):
        calls.append(spec["shard"])
        if spec["shard"] == 2 and calls.count(2) == 1:
            stray = layout.shard_prefix(spec["ds"], spec["run_key"], 2) + "part-00009.parquet"
            storage.write_bytes(stray, b"half-written by the first try")
            raise RuntimeError("injected fault: shard 2, first try")
        out = real_run_shard(spec, params)
        # every staged object of the run and its version, as this shard finishes
        run = storage.list_uris(layout.staging_prefix(spec["ds"], spec["run_key"]))
        staged[spec["shard"]] = {u: storage.head(u)["etag"] for u in run}
        return out

    monkeypatch.setattr(score, "run_shard", flaky_run_shard)
    dag = DagBag(dag_folder=str(ROOT / "dags")).get_dag("rescore_recommendations")
    logical = dt.datetime.fromisoformat(DS).replace(hour=3, tzinfo=dt.UTC)
    dr = dag.test(logical_date=logical,
                  run_conf={"ds": DS, "model_version": VERSION, "shards": 4, "top_k": K})
    tis = dr.get_task_instances()
    states = {(ti.task_id, ti.map_index): str(ti.state) for ti in tis}
    assert str(dr.state) == "success", states
    tries = {ti.map_index: ti.try_number for ti in tis if ti.task_id == "score"}
    assert tries == {0: 1, 1: 1, 2: 2, 3: 1}
    assert sorted(calls) == [0, 1, 2, 2, 3]
    # The retry replaced its own folder (the stray object is gone) and touched no other shard's
    # parts: each is the very version that shard wrote.
    after_retry = staged[2]
    assert not any(u.endswith("shard-00002/part-00009.parquet") for u in after_retry)
    for shard in (0, 1, 3):
        own = {u: e for u, e in staged[shard].items() if f"/shard-{shard:05d}/" in u}
        assert own and all(after_retry.get(u) == e for u, e in own.items()), shard
    assert {t: ti.try_number for ti in tis if (t := ti.task_id) != "score"} == {
        "plan": 1, "plan_shards": 1, "publish": 1, "release": 1}

    manifest = storage.read_json(layout.manifest_uri(DS))
    assert len(manifest["parts"]) == 4  # one per shard, in user_id order
    assert [p["users"] for p in manifest["parts"]] == [10, 11, 10, 11]
    table = RecommendationReader().table(DS).to_pandas()
    assert sorted(table["user_id"].unique()) == all_users
    assert len(table) == manifest["rows"] == N_USERS * K
    assert table["user_id"].is_monotonic_increasing
    assert storage.list_uris(layout.staging_ds_prefix(DS)) == []  # stray object included
