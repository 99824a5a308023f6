"""Fault injection with real processes: ``kill -9`` of the run in the middle of each writing stage.

Each run is ``scripts/run_dag.py`` (the DAG through ``dag.test()`` in its own process, as
``nightrec run`` does) against the session's real SeaweedFS, in a bucket of its own. A
``sitecustomize`` put on that process's ``PYTHONPATH`` (test code, never shipped) sends
``SIGKILL`` to the process at one point of one stage, after that stage has written part of its
output:

| stage | killed when |
|---|---|
| ingest | after its first object under ``runs/ds=D/ingest/``, before the next |
| clean | after its first object under ``runs/ds=D/clean/``, before the next |
| dvc_push | 1 s into ``dvc push`` (a child process), or as it returns if sooner |
| checkpoint | right after mf_softmax's first training checkpoint is saved |
| score_shard | at the first part write of shard 1 (shard 0 may be done) |
| publish | after the first published part, before the second part and the manifest |

The runs are chained: the run after a kill at stage N is killed at stage N+1, so it proves that
stage N, rerun, completes; the last run is not killed but meets a 25 s S3 outage (the real
server stopped and started again) and must publish through its task retries. After every kill: the
previously published latest table is unchanged and fully readable, nothing of the new ds is
published, and after the last run the new table is complete and equal to its manifest, with no
object in its partition that the manifest does not list.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path

import pytest
import yaml

from tasks import layout, s3server, settings, storage
from tasks.reader import RecommendationReader

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.e2e, pytest.mark.slow]
DS_PREV, DS = "2026-12-01", "2026-12-02"  # after the sample's last event
STAGES = ["ingest", "clean", "dvc_push", "checkpoint", "score_shard", "publish"]

SITECUSTOMIZE = textwrap.dedent('''
    import os, signal, threading
    STAGE = os.environ.get("NIGHTREC_FAULT")
    DS = os.environ.get("NIGHTREC_FAULT_DS", "")

    def _die(what):
        with open(os.environ["NIGHTREC_FAULT_LOG"], "a") as f:
            f.write(f"{STAGE}: SIGKILL {what}\\n")
        os.kill(os.getpid(), signal.SIGKILL)

    if STAGE in ("ingest", "clean", "score_shard", "publish"):
        from tasks import storage
        marker = {"ingest": f"runs/ds={DS}/ingest/", "clean": f"runs/ds={DS}/clean/",
                  "score_shard": "/shard-00001/", "publish": f"recommendations/ds={DS}/part-"}[STAGE]
        allowed = 0 if STAGE == "score_shard" else 1  # writes let through before the kill
        seen = []
        real_write, real_upload = storage.write_bytes, storage.upload_from

        def _check(uri):
            if marker in uri:
                seen.append(uri)
                if len(seen) > allowed:
                    _die(f"before writing {uri} (after {seen[:-1]})")

        def write_bytes(uri, *a, **k):
            _check(uri)
            return real_write(uri, *a, **k)

        def upload_from(path, uri, *a, **k):
            _check(uri)
            return real_upload(path, uri, *a, **k)

        storage.write_bytes, storage.upload_from = write_bytes, upload_from

    elif STAGE == "dvc_push":
        from tasks import versioning
        real_dvc = versioning._dvc

        def _dvc(ws, *args):
            if args and args[0] == "push":
                push = threading.Thread(target=real_dvc, args=(ws, *args), daemon=True)
                push.start()
                push.join(1.0)
                _die("during dvc push" if push.is_alive() else "right after dvc push returned")
            return real_dvc(ws, *args)

        versioning._dvc = _dvc

    elif STAGE == "checkpoint":
        import keras
        real_epoch_end = keras.callbacks.ModelCheckpoint.on_epoch_end

        def on_epoch_end(self, epoch, logs=None):
            real_epoch_end(self, epoch, logs)
            if os.path.exists(self.filepath):
                _die(f"after checkpoint {self.filepath} at epoch {epoch + 1}")

        keras.callbacks.ModelCheckpoint.on_epoch_end = on_epoch_end
''')


@pytest.fixture(scope="module")
def fault_env(s3, airflow_db, sample, tmp_path_factory):
    """A bucket, a state folder and params of their own; the sample uploaded for both dates."""
    work = tmp_path_factory.mktemp("faults")
    bucket = f"faults-{uuid.uuid4().hex[:8]}"
    storage.s3_client().create_bucket(Bucket=bucket)
    params = json.loads(json.dumps(settings.load_params()))
    params["train"]["candidates"] = ["ease", "mf_softmax"]  # mf writes checkpoints
    params["train"]["mf_softmax"].update(epochs=2, embedding_dim=8)
    params["publish"].update(rows_per_part=5000, claim_ttl_s=3)  # several parts; short claims
    params["score"]["shards"] = 2
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    hook = work / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = {**os.environ, "NIGHTREC_BUCKET": bucket, "NIGHTREC_PARAMS": str(work / "params.yaml"),
           "NIGHTREC_STATE": str(work / "state"), "NIGHTREC_FAULT_LOG": str(work / "faults.log"),
           "NIGHTREC_FAULT_DS": DS}
    env.pop("AIRFLOW_HOME", None)  # run_dag.py gives the run its own Airflow home under state
    env.pop("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", None)
    old = os.environ.get("NIGHTREC_BUCKET")
    os.environ["NIGHTREC_BUCKET"] = bucket
    for ds in (DS_PREV, DS):
        for table in ("interactions", "items", "users"):
            storage.write_bytes(layout.raw_prefix(ds, table) + f"{table}.csv",
                                sample[table].read_bytes())
    yield {"env": env, "work": work, "hook": hook, "s3": s3}
    if old is None:
        os.environ.pop("NIGHTREC_BUCKET", None)
    else:
        os.environ["NIGHTREC_BUCKET"] = old


def run_dag(fault_env, ds: str, fault: str | None = None,
            retry_delay_s: int | None = None) -> subprocess.CompletedProcess:
    env = dict(fault_env["env"])
    if retry_delay_s is not None:
        env["NIGHTREC_RETRY_DELAY_S"] = str(retry_delay_s)
    if fault:
        env["NIGHTREC_FAULT"] = fault
        env["PYTHONPATH"] = os.pathsep.join([str(fault_env["hook"]), str(ROOT),
                                             env.get("PYTHONPATH", "")])
    result = fault_env["work"] / f"result-{ds}-{fault}.json"
    cmd = [sys.executable, str(ROOT / "scripts" / "run_dag.py"), "--ds", ds,
           "--state", str(fault_env["work"] / "state"), "--result-file", str(result)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)


def published(ds: str) -> tuple[dict, int]:
    manifest = storage.read_json(layout.manifest_uri(ds))
    return manifest, len(RecommendationReader().table(ds))


def test_kill_9_in_each_writing_stage_leaves_the_latest_table_intact(fault_env):
    # The table readers have before the faults: a real publish of a staged table (no DAG run
    # needed for it; tests/test_publish.py covers that path).
    from tasks import publish

    from .test_publish import stage as stage_table

    publish.run(DS_PREV, stage_table(DS_PREV, run_key="before-faults", model_version=
                                     "mf-20261201-0000aaaa", n_users=40, k=5),
                params=yaml.safe_load(Path(fault_env["env"]["NIGHTREC_PARAMS"]).read_text()))
    latest_before = storage.read_bytes(layout.latest_uri())
    prev_manifest, prev_rows = published(DS_PREV)
    assert prev_rows == prev_manifest["rows"] > 0

    log = fault_env["work"] / "faults.log"
    for stage in STAGES:
        started = time.monotonic()
        run = run_dag(fault_env, DS, stage)
        assert run.returncode == -signal.SIGKILL, (stage, run.returncode, run.stdout[-2000:])
        assert log.read_text().splitlines()[-1].startswith(f"{stage}: SIGKILL"), stage
        # the latest table is the previous one, whole and readable; nothing of DS is published
        assert storage.read_bytes(layout.latest_uri()) == latest_before, stage
        manifest, rows = published(DS_PREV)
        assert manifest == prev_manifest and rows == prev_rows, stage
        assert not storage.exists(layout.manifest_uri(DS)), stage
        assert len(RecommendationReader().table()) == prev_rows, stage
        print(f"{stage}: killed after {time.monotonic() - started:.0f} s")
        if stage == "publish":
            time.sleep(4)  # the killed publisher's claim (claim_ttl_s 3 here) expires

    # The last run, with no kill, also meets an S3 outage: the real server is stopped (SIGINT)
    # as soon as this run's ingest has rewritten its output, and started again 25 s later
    # (boto3's own retries ride out shorter outages). The task that meets the dead endpoint
    # fails that try; its retry (after NIGHTREC_RETRY_DELAY_S) finds the server back.
    marker = layout.run_uri(DS, "ingest", "files.json")
    storage.delete([marker])  # its reappearance marks this run's ingest as done
    outage = {}

    def cut_power():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not storage.exists(marker):
            time.sleep(0.2)
        outage["down_at"] = time.monotonic()
        s3server.down(fault_env["s3"])
        time.sleep(25)
        s3server.up(fault_env["s3"])
        outage["up_after_s"] = time.monotonic() - outage["down_at"]

    cutter = threading.Thread(target=cut_power)
    cutter.start()
    final = run_dag(fault_env, DS, retry_delay_s=20)
    cutter.join(120)
    assert "down_at" in outage and outage["up_after_s"] < 60, outage
    assert final.returncode == 0, final.stdout[-3000:]
    assert "try_number=2" in final.stdout  # a task failed on the dead endpoint and was retried
    manifest, rows = published(DS)
    assert rows == manifest["rows"] == manifest["users"] * manifest["top_k"]
    listed = {p["key"] for p in manifest["parts"]}
    bucket = fault_env["env"]["NIGHTREC_BUCKET"]
    in_prefix = {storage.split_uri(u)[1] for u in storage.list_uris(layout.recs_prefix(DS))
                 if u.endswith(".parquet")}
    assert in_prefix == listed, (bucket, in_prefix ^ listed)
    latest = json.loads(storage.read_bytes(layout.latest_uri()))
    assert latest["ds"] == DS and latest["manifest"] == layout.manifest_uri(DS)
    assert not storage.list_uris(layout.recs_prefix(DS) + "_publishing")  # no claim left

