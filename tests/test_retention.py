"""Retention and erasure (nightrec/ops/retention.py) against the real SeaweedFS.

- ``nightrec gc``: a hand-built bucket (old and new runs, a live lease, the latest pointer on an
  old ds, registered models with a champion history and a published manifest, id-map
  generations, local DVC workspaces with old mtimes): the plan lists exactly what should go,
  apply deletes exactly that and nothing kept, and re-checks the pointer and the leases; with
  real DVC, two pushed versions, gc keeps the kept one's objects and removes the other's own;
- ``nightrec forget``: a table published by publish.run no longer holds the user after
  ``--apply`` (other rows unchanged, the manifest describes its parts, the reader reads it), per-
  run tables, a model and the id map are scrubbed with indices intact, and the next clean drops
  the user's raw rows, counting them as ``forgotten_rows``.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import os
import shutil
import time

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml

from nightrec.core import settings
from nightrec.ops import retention
from nightrec.store import layout, storage
from nightrec.table.reader import RecommendationReader
from nightrec.tasks import clean, ingest, publish, registry
from tests.test_publish import stage

NEWEST = "2026-03-31"


def _params(**retention_keys) -> dict:
    base = settings.load_params()
    return {**base, "retention": {**base["retention"], **retention_keys}}


def _put(key: str, data: bytes = b"x") -> str:
    uri = storage.s3_uri(key)
    storage.write_bytes(uri, data)
    return uri


def _lease(ds: str, *, live: bool) -> None:
    now = dt.datetime.now(dt.UTC)
    until = now + dt.timedelta(seconds=600 if live else -600)
    storage.write_json(layout.run_lock_uri(ds), {
        "owner": f"run-{ds}", "token": "t", "claimed_at": now.isoformat(timespec="seconds"),
        "expires_at": until.isoformat(timespec="seconds")})


def _model(version: str, data_version: str = "0" * 32) -> list[str]:
    prefix = f"models/{version}/"
    return [_put(prefix + "embeddings.npz"), _put(prefix + "users.parquet"),
            _put(prefix + "meta.json", json.dumps({"model_version": version,
                                                   "data_version": data_version}).encode())]


def _all() -> set[str]:
    """Every object in the test's bucket."""
    b = settings.bucket()
    pages = storage.s3_client().get_paginator("list_objects_v2").paginate(Bucket=b)
    return {f"s3://{b}/{o['Key']}" for page in pages for o in page.get("Contents", [])}


@pytest.fixture
def state(tmp_path, monkeypatch):
    monkeypatch.setenv("NIGHTREC_STATE", str(tmp_path / "state"))
    return tmp_path / "state"


@pytest.fixture
def estate(bucket, state):
    """The hand-built bucket; returns what the plan must list, by kind."""
    doomed: dict[str, set] = {"runs": set(), "models": set(), "id_maps": set(),
                              "objects": set(), "workspaces": set()}
    for ds in ("2026-03-01", "2026-03-05", "2026-03-10", "2026-03-15", "2026-03-25", NEWEST):
        objs = [_put(f"runs/ds={ds}/clean/stats.json"), _put(f"reports/ds={ds}/report.html")]
        if ds in ("2026-03-01", "2026-03-15"):
            objs.append(_put(f"alerts/ds={ds}/run.task.json"))
            doomed["runs"].add(ds)
            doomed["objects"].update(objs)
    _lease("2026-03-01", live=False)  # an expired lease goes with its ds
    doomed["objects"].add(layout.run_lock_uri("2026-03-01"))
    _lease("2026-03-10", live=True)
    storage.write_json(layout.latest_uri(), {"ds": "2026-03-05"})  # an old ds, still latest

    versions = {c: f"ease-20260301-0000000{c}" for c in "abcd"}
    versions["e"] = "ease-20260310-0000000e"  # registered by the run in flight
    versions["f"] = "ease-20260315-0000000f"  # an unblessed model of an old run
    made = {c: _model(v) for c, v in versions.items()}
    storage.write_json(registry.champion_uri(), {
        "model_version": versions["d"], "history": [versions[c] for c in "abcd"]})
    storage.write_json(layout.manifest_uri("2026-03-05"), {
        "ds": "2026-03-05", "model_version": versions["a"], "data_version": "1" * 32,
        "parts": []})
    for c in "bf":
        doomed["models"].add(versions[c])
        doomed["objects"].update(made[c])

    for kind, n in (("users", 5), ("items", 2)):
        for g in range(1, n + 1):
            # the legacy cross-run id map: nothing reads it, gc removes all of it
            uri = _put(f"state/id_map/{kind}/map-{g:06d}.parquet")
            doomed["id_maps"].add(uri)
            doomed["objects"].add(uri)

    old = time.time() - 30 * 86400
    for ds in ("2026-03-01", "2026-03-10", NEWEST):
        ws = state / "dvc" / f"ds={ds}"
        (ws / ".dvc").mkdir(parents=True)
        (ws / "dvc.lock").write_text("x")
        if ds != NEWEST:  # 2026-03-10 is old too, but its run holds the lease
            for path in (ws / ".dvc", ws / "dvc.lock", ws):
                os.utime(path, (old, old))
    doomed["workspaces"].add(str((state / "dvc" / "ds=2026-03-01").resolve()))
    return doomed


def test_gc_plan_lists_exactly_the_expired_and_apply_deletes_exactly_that(estate):
    params = _params(runs_days=10, keep_models=2, dvc_workspaces_days=7,
                     dvc_remote=False)
    before = _all()
    pl = retention.plan(params)
    assert (pl["newest_ds"], pl["cutoff_ds"], pl["latest_ds"]) == (NEWEST, "2026-03-21",
                                                                   "2026-03-05")
    assert {e["ds"] for e in pl["runs"]} == estate["runs"]
    assert {e["model_version"] for e in pl["models"]} == estate["models"]
    assert {e["uri"] for e in pl["id_maps"]} == estate["id_maps"]
    assert {e["path"] for e in pl["dvc_workspaces"]} == estate["workspaces"]
    listed = {u for kind in ("runs", "models") for e in pl[kind] for u in e["objects"]}
    listed |= {e["uri"] for e in pl["id_maps"]}
    assert listed == estate["objects"]
    kept = pl["kept"]
    assert "latest pointer" in kept["ds"]["2026-03-05"]
    assert "lease" in kept["ds"]["2026-03-10"]
    assert kept["models"]["ease-20260301-0000000d"] == "the champion"
    assert "history" in kept["models"]["ease-20260301-0000000c"]
    assert "published table of ds=2026-03-05" in kept["models"]["ease-20260301-0000000a"]
    assert "in flight" in kept["models"]["ease-20260310-0000000e"]
    assert _all() == before  # the plan deletes nothing
    json.dumps(pl)  # and is JSON (the CLI prints it, the audit keeps a summary)

    out = retention.apply(pl, operator="tester")
    assert out["skipped"] == []
    after = _all()
    audit = [u for u in after - before]
    assert len(audit) == 1 and "/audit/gc/" in audit[0]
    assert after - set(audit) == before - estate["objects"]  # exactly those, nothing kept
    record = storage.read_json(audit[0])
    assert record["operator"] == "tester" and record["counts"]["models"] == 2
    assert not (settings.state_dir() / "dvc" / "ds=2026-03-01").exists()
    assert (settings.state_dir() / "dvc" / "ds=2026-03-10").exists()
    assert (settings.state_dir() / "dvc" / f"ds={NEWEST}").exists()
    assert retention.plan(params)["runs"] == []  # nothing left to do


def test_gc_apply_rechecks_the_pointer_and_leases_before_each_ds(estate):
    params = _params(runs_days=10, dvc_remote=False)
    pl = retention.plan(params)
    assert {e["ds"] for e in pl["runs"]} == {"2026-03-01", "2026-03-15"}
    _lease("2026-03-01", live=True)  # a rerun of that ds started after the plan
    storage.write_json(layout.latest_uri(), {"ds": "2026-03-15"})  # and the pointer moved
    out = retention.apply(pl)
    assert {(s["kind"], s["item"]) for s in out["skipped"]} >= {("runs", "2026-03-01"),
                                                                ("runs", "2026-03-15")}
    assert out["deleted"]["runs"] == []
    assert storage.exists(storage.s3_uri("runs/ds=2026-03-01/clean/stats.json"))
    assert storage.exists(storage.s3_uri("alerts/ds=2026-03-15/run.task.json"))


def test_gc_refuses_nonsense_params(bucket, state):
    with pytest.raises(ValueError, match="retention.keep_models"):
        retention.plan(_params(keep_models=0))


def test_cli_gc_is_a_dry_run_unless_applied(estate, capsys, monkeypatch, tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(_params(runs_days=10, keep_models=2,
                                           dvc_workspaces_days=7, dvc_remote=False)))
    monkeypatch.setenv("NIGHTREC_PARAMS", str(path))
    before = _all()
    assert retention.cli_main(["gc"]) == 0
    text = capsys.readouterr().out
    assert "ds=2026-03-15" in text and "ease-20260301-0000000b" in text and "dry run" in text
    assert _all() == before
    assert retention.cli_main(["gc", "--apply"]) == 0
    assert "deleted {'runs': 2, 'models': 2" in capsys.readouterr().out
    assert not (before - estate["objects"]) - _all()


# --- the DVC remote ---------------------------------------------------------------------------


def _push_versions(ws, versions: list[dict[str, pd.DataFrame]]) -> list[str]:
    """Push each version's files as ``split/`` from one no-SCM workspace; their data_versions."""
    from nightrec.tasks import versioning

    retention.dvc_project(ws)
    out = []
    for frames in versions:
        shutil.rmtree(ws / "split", ignore_errors=True)
        (ws / "split").mkdir(parents=True)
        for name, frame in frames.items():
            frame.to_parquet(ws / "split" / f"{name}.parquet")
        versioning._dvc(ws, "add", "split")
        versioning._dvc(ws, "push", "split.dvc")
        out.append(yaml.safe_load((ws / "split.dvc").read_text())["outs"][0]["md5"]
                   .removesuffix(".dir"))
    return out


def test_gc_prunes_dvc_remote_objects_only_the_pruned_version_used(bucket, state, tmp_path):
    shared = pd.DataFrame({"user_idx": [0, 1], "item_idx": [3, 4]})
    keep, drop = _push_versions(tmp_path / "ws", [
        {"train": pd.DataFrame({"x": range(5)}), "test": shared},
        {"train": pd.DataFrame({"x": range(7)}), "test": shared}])
    remote = set(storage.list_uris(layout.dvc_remote_uri()))
    assert len(remote) == 5  # two .dir listings, two train files, one shared test file
    storage.write_json(layout.run_uri(NEWEST, "split", "meta.json"), {"data_version": keep})
    storage.write_json(layout.run_uri("2026-01-01", "split", "meta.json"), {"data_version": drop})

    pl = retention.plan(_params(runs_days=30))
    assert [e["ds"] for e in pl["runs"]] == ["2026-01-01"]
    rem = pl["dvc_remote"]
    assert sorted(rem["kept_data_versions"]) == [keep] and rem["missing"] == []
    drop_dir = retention._dir_uri(drop)
    listing = json.loads(storage.read_bytes(drop_dir))
    own = {e["relpath"]: e["md5"] for e in listing}["train.parquet"]
    expected = {drop_dir, storage.join(layout.dvc_remote_uri(), "files", "md5", own[:2],
                                       own[2:])}
    assert set(rem["objects"]) == expected

    out = retention.apply(pl)  # DVC's own gc, after its dry run listed exactly these
    assert out["skipped"] == [] and set(out["deleted"]["dvc_remote"]) == expected
    assert set(storage.list_uris(layout.dvc_remote_uri())) == remote - expected


# --- forget -----------------------------------------------------------------------------------

DS = "2026-03-10"
MODEL = "mf-20260310-aaaaaaaa"
USER = "u00007"


def _index_tables() -> None:
    ids = [f"u{i:05d}" for i in range(60)]
    storage.write_parquet(pd.DataFrame({"user_idx": np.arange(60, dtype=np.int32),
                                        "user_id": ids, "age": np.full(60, 30.0),
                                        "gender": np.ones(60, np.int32)}),
                          layout.run_uri(DS, "augment", "user_features.parquet"))
    storage.write_parquet(pd.DataFrame({"user_id": [f" {USER} ", "u00001"],
                                        "item_id": ["i1", "i2"], "reason": ["x", "y"]}),
                          layout.run_uri(DS, "clean", "quarantine.parquet"))
    prefix = registry.model_prefix(MODEL)
    storage.write_parquet(pd.DataFrame({"user_idx": np.arange(60), "user_id": ids[::-1],
                                        "age": np.full(60, 30.0)}), prefix + "users.parquet")
    buf = io.BytesIO()
    np.savez(buf, user=np.ones((60, 4), np.float32), item=np.ones((9, 4), np.float32),
             item_bias=np.zeros(9, np.float32))
    storage.write_bytes(prefix + "embeddings.npz", buf.getvalue())
    storage.write_bytes(prefix + "gated_embeddings.npz", buf.getvalue())  # the gated refit
    storage.write_bytes(layout.run_uri(DS, "train", "full") + "/embeddings.npz", buf.getvalue())
    storage.write_json(prefix + "meta.json", {"model_version": MODEL, "data_version": "d" * 32})
    storage.write_parquet(pd.DataFrame({"user_id": ids, "user_stable_idx": np.arange(100, 160),
                                        "first_ds": DS}),
                          layout.legacy_id_map_prefix("users") + "map-000001.parquet")


def test_forget_erases_the_user_from_retained_data_and_keeps_indices(bucket, state):
    scored = stage(DS, run_key="run-a", model_version=MODEL)
    publish.run(scored, params=settings.load_params())
    _index_tables()
    reader = RecommendationReader()
    table_before = reader.table().to_pandas()
    manifest_before = storage.read_json(layout.manifest_uri(DS))
    assert USER in set(table_before["user_id"])
    objects_before = {u: storage.head(u)["etag"] for u in _all()}

    dry = retention.forget_user(f" {USER}\t", apply=False)
    assert dry["applied"] is False and dry["user_sha256"] == clean.user_hash(USER)
    assert [e["ds"] for e in dry["found"]["published"]] == [DS]
    assert len(dry["found"]["published"][0]["parts"]) == 1
    actions = {e["uri"].rsplit("/", 2)[-2] + "/" + e["uri"].rsplit("/", 1)[-1]: e["action"]
               for e in dry["found"]["run_tables"]}
    assert actions == {"bucket=000/part-0.parquet": "drop_rows",  # clean bucket: the seen table
                       "augment/user_features.parquet": "tombstone",
                       "clean/quarantine.parquet": "drop_rows",
                       # the output checks' sample of top-10 lists (tasks/output_checks.py)
                       "publish/output_summary.parquet": "drop_rows"}
    assert dry["found"]["models"] == [{"model_version": MODEL,
                                       "uri": registry.model_prefix(MODEL) + "users.parquet",
                                       "user_idx": [52]}]
    assert len(dry["found"]["id_maps"]) == 1
    assert dry["found"]["run_embeddings"] == [
        {"uri": layout.run_uri(DS, "train", "full") + "/embeddings.npz", "user_idx": [7]}]
    assert {u: storage.head(u)["etag"] for u in _all()} == objects_before  # changed nothing

    out = retention.forget_user(USER, apply=True, operator="dpo")
    assert out["applied"] and out["added_to_suppression_list"]
    # the published table: the user is gone, every other row is as it was
    table = RecommendationReader().table().to_pandas()
    assert USER not in set(table["user_id"])
    pd.testing.assert_frame_equal(
        table, table_before[table_before["user_id"] != USER].reset_index(drop=True))
    assert RecommendationReader().for_user(USER).num_rows == 0
    m = storage.read_json(layout.manifest_uri(DS))
    assert (m["rows"], m["users"]) == (manifest_before["rows"] - 5, manifest_before["users"] - 1)
    assert m["publish_id"] != manifest_before["publish_id"]
    assert m["rewritten"]["previous_publish_id"] == manifest_before["publish_id"]
    old_keys = [p["key"] for p in manifest_before["parts"]]
    new_keys = [p["key"] for p in m["parts"]]
    assert sum(k in old_keys for k in new_keys) == 2  # the two other parts did not move
    for part in m["parts"]:  # the manifest still describes its parts exactly
        data = storage.read_bytes(storage.s3_uri(part["key"]))
        assert (storage.sha256(data), len(data)) == (part["sha256"], part["bytes"])
        described = publish.describe_part(data, pq.read_table(io.BytesIO(data)))
        assert {k: part[k] for k in described} == described
    assert publish.check_parts(m["parts"]) == []
    parquet = {u for u in storage.list_uris(layout.recs_prefix(DS)) if u.endswith(".parquet")}
    assert parquet == {storage.s3_uri(k) for k in new_keys}  # the old part is gone
    assert storage.read_json(layout.latest_uri())["publish_id"] == m["publish_id"]
    assert not storage.exists(layout.claim_uri(DS))

    # per-run tables: events lose the rows, index tables keep the index with a tombstone
    seen = storage.read_parquet(layout.bucketed_prefix(DS, "clean", "interactions"))
    assert USER not in set(seen["user_id"]) and len(seen) == 118
    feats = storage.read_parquet(layout.run_uri(DS, "augment", "user_features.parquet"))
    assert np.isnan(feats.loc[7, "age"]) and feats.loc[7, "gender"] == 0
    assert (feats.drop(7)["age"] == 30.0).all() and len(feats) == 60
    q = storage.read_parquet(layout.run_uri(DS, "clean", "quarantine.parquet"))
    assert q["user_id"].tolist() == ["u00001"]
    sampled = storage.read_parquet(layout.run_uri(DS, "publish", "output_summary.parquet"))
    assert USER not in set(sampled["user_id"]) and len(sampled)
    # the model: a tombstone at the user's index, zeros in its embedding row only
    users = storage.read_parquet(registry.model_prefix(MODEL) + "users.parquet")
    assert users.loc[52, "user_id"] == retention.tombstone(USER) and len(users) == 60
    assert np.isnan(users.loc[52, "age"]) and (users.drop(52)["age"] == 30.0).all()
    for uri, row in ((registry.model_prefix(MODEL) + "embeddings.npz", 52),
                     (registry.model_prefix(MODEL) + "gated_embeddings.npz", 52),
                     (layout.run_uri(DS, "train", "full") + "/embeddings.npz", 7)):
        emb = np.load(io.BytesIO(storage.read_bytes(uri)))
        assert not emb["user"][row].any() and emb["user"][np.arange(60) != row].all()
    # an earlier version's id map (gc deletes it; until then forget scrubs it)
    idmap = storage.read_parquet(layout.legacy_id_map_prefix("users") + "map-000001.parquet")
    assert idmap.loc[7, "user_id"] == retention.tombstone(USER) == out["tombstone"]
    assert USER not in set(idmap["user_id"]) and len(idmap) == 60
    # the list and the audit hold the hash, never the id
    assert clean.forgotten_users() == {clean.user_hash(USER)}
    record_bytes = storage.read_bytes(out["audit"])
    assert USER.encode() not in record_bytes and clean.user_hash(USER).encode() in record_bytes
    assert json.loads(record_bytes)["operator"] == "dpo"
    # a second forget finds nothing more and does not add the hash twice
    again = retention.forget_user(USER, apply=True)
    assert again["added_to_suppression_list"] is False
    assert all(not v for v in again["found"].values())


def test_forget_refuses_while_a_run_is_in_flight_but_lists_the_user_first(bucket, state,
                                                                          capsys):
    assert retention.cli_main(["forget", "--user", "alice"]) == 0  # a dry run changes nothing
    assert "dry run" in capsys.readouterr().out and clean.forgotten_users() == frozenset()
    _lease(DS, live=True)
    with pytest.raises(RuntimeError, match="in flight"):
        retention.forget_user("alice", apply=True)
    assert clean.user_hash("alice") in clean.forgotten_users()
    assert retention.cli_main(["forget", "--user", "bob", "--apply"]) == 1
    assert "forget refused: a run is in flight (ds=2026-03-10" in capsys.readouterr().out
    assert clean.forgotten_users() == {clean.user_hash("alice"), clean.user_hash("bob")}


def test_clean_drops_a_forgotten_users_rows_on_the_next_run(bucket, state):
    ds = "2026-03-12"
    t0 = 1_770_000_000
    lines = ["user_id,item_id,rating,timestamp"]
    for u in ("alice", "bob", "carol"):
        lines += [f"{u},i{j},4,{t0 + j}" for j in range(6)]
    lines += ["alice,i1,9,5", " alice ,i2,x,5"]  # alice's rows that would be quarantined
    storage.write_bytes(layout.raw_prefix(ds) + "a.csv", ("\n".join(lines) + "\n").encode())
    params = settings.load_params()
    first = storage.read_json(clean.run(ingest.run(ds, params), params).stats)
    assert first["forgotten_rows"] == 0 and first["clean_rows"] == 18

    retention.forget_user("alice", apply=True)
    stats = storage.read_json(clean.run(ingest.run(ds, params), params).stats)
    assert stats["forgotten_rows"] == 8 and stats["raw_rows"] == 20
    assert stats["raw_rows"] == stats["clean_rows"] + stats["quarantined_rows"] \
        + stats["forgotten_rows"]
    assert stats["by_file"]["a.csv"] == {"rows": 20, "quarantined": {}, "forgotten": 8}
    interactions = storage.read_parquet(layout.bucketed_prefix(ds, "clean", "interactions"))
    assert set(interactions["user_id"]) == {"bob", "carol"}
    assert storage.read_parquet(layout.run_uri(ds, "clean", "quarantine.parquet")).empty

