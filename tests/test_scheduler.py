"""A real Airflow: api-server, scheduler, dag-processor and triggerer with LocalExecutor.

Metadata DB: a fresh database on the PostgreSQL at 127.0.0.1:5432 (trust auth) when one answers,
else SQLite. Everything listens on 127.0.0.1 only, parallelism is 2. The test triggers runs
through the REST API v2 with a token, polls them, reads the published table, and stops every
process it started (each component leads its own process group; the test checks that no process
with its AIRFLOW_HOME is left).
"""

from __future__ import annotations

import json
import os

import psutil
import pytest

from nightrec.store import layout, storage
from nightrec.table.reader import RecommendationReader
from nightrec.tasks import registry

from .airflow_stack import (
    core_commands,
    core_env,
    create_postgres_db,
    drop_postgres_db,
    left_behind,
    migrate,
    run_state,
    running,
    runs,
    wait,
)
from .conftest import free_port, params_with, require_service

pytestmark = pytest.mark.e2e
DS = "2026-11-20"


@pytest.fixture(scope="module")
def own_bucket(s3):
    """A bucket of this module's own: unpausing the nightly DAG makes the scheduler start a run
    for the latest cron date, which must find nothing left behind by other test modules."""
    bucket = "nightrec-it"
    storage.s3_client().create_bucket(Bucket=bucket)
    previous = os.environ.get("NIGHTREC_BUCKET")
    os.environ["NIGHTREC_BUCKET"] = bucket
    yield bucket
    os.environ["NIGHTREC_BUCKET"] = previous or "nightrec"


@pytest.fixture(scope="module")
def airflow_stack(s3, own_bucket, sample, tmp_path_factory):
    home = tmp_path_factory.mktemp("airflow_real")
    pg = create_postgres_db("nightrec_it")
    # Without Postgres the real scheduler still runs, on SQLite; CI (NIGHTREC_REQUIRE_SERVICES=1)
    # has Postgres and must test on it.
    if pg is None and os.environ.get("NIGHTREC_REQUIRE_SERVICES") == "1":
        require_service("postgres", available=False,
                        reason="cannot create a database on the PostgreSQL at 127.0.0.1:5432")
    port = free_port()
    env = core_env(home, port=port, executor="LocalExecutor",
                   db_url=pg or f"sqlite:///{home}/airflow.db")
    # EASE the only candidate (closed form, seconds), as in tests/test_celery.py: the scheduler,
    # the executor and the asset-triggered re-score are under test here, not model choice
    # (tests/test_e2e.py's first run). Each LocalExecutor task is a process of its own.
    env["NIGHTREC_PARAMS"] = str(params_with(home / "ease-only.yaml",
                                             lambda p: p["train"].update(candidates=["ease"])))
    migrate(env)
    components = {name: (args, env) for name, args in core_commands(port).items()}
    with running(home, components, port=port,
                 dag_ids=("nightly_recommendations", "rescore_recommendations"),
                 cleanup=(lambda: drop_postgres_db(pg)) if pg else None) as api:
        yield api, home


BAD_CONFS = [
    ({"ds": "../2026-11-20"}, "ds"),
    ({"ds": "2026-11-20/../../x"}, "ds"),
    ({"ds": "2026-11-20", "top_k": 0}, "top_k"),
    ({"ds": "2026-11-20", "top_k": 10**9}, "top_k"),
    ({"ds": "2026-11-20", "model_version": "../../models/x"}, "model_version"),
    ({"ds": "2026-11-20", "model_version": "MF-2026-nothex"}, "model_version"),
    ({"ds": "2026-11-20", "dry_run": "yes"}, "dry_run"),
]


def test_real_scheduler_runs_the_nightly_dag_and_rescore_follows_the_asset(airflow_stack, sample):
    api, home = airflow_stack
    for table in ("interactions", "items", "users"):
        storage.delete(storage.list_uris(layout.raw_prefix(DS, table)))
        storage.upload_from(sample[table], layout.raw_prefix(DS, table) + f"{table}.csv")
    for dag_id in ("nightly_recommendations", "rescore_recommendations"):
        api.call("PATCH", f"/api/v2/dags/{dag_id}", {"is_paused": False})

    # Bad params are refused at trigger time, with a message, and start nothing.
    for conf, field in BAD_CONFS:
        _status, body = api.call("POST", "/api/v2/dags/nightly_recommendations/dagRuns",
                                {"logical_date": None, "conf": conf}, expect=(400, 422))
        assert field in json.dumps(body), (conf, body)
    assert [r for r in runs(api, "nightly_recommendations") if r["run_type"] == "manual"] == []

    _, run = api.call("POST", "/api/v2/dags/nightly_recommendations/dagRuns",
                      {"logical_date": None, "conf": {"ds": DS}})
    state = wait(lambda: run_state(api, "nightly_recommendations", run["dag_run_id"]), 600,
                 "the nightly run", interval=5)
    assert state == "success", (home / "scheduler.log").read_text()[-3000:]
    manifest = storage.read_json(layout.manifest_uri(DS))
    assert len(RecommendationReader().table(DS)) == manifest["rows"] > 0
    champion = registry.champion()
    assert champion == manifest["model_version"]

    # The blessed model's asset event started the re-score DAG; the table was already current.
    first = wait(lambda: [r for r in runs(api, "rescore_recommendations")
                          if r["state"] in ("success", "failed")], 240, "rescore after asset")
    assert first[0]["state"] == "success" and first[0]["run_type"] == "asset_triggered"

    # A new champion (registered from the same files under a new version) and its asset event:
    # the re-score DAG publishes the table with it, without training.
    new_version = champion[:-8] + ("0" * 8 if champion[-8:] != "0" * 8 else "1" * 8)
    model = registry.model_uris(champion)
    registry.register({**model, "model_version": new_version}, ds=DS, metrics_uri=None)
    registry.set_champion(new_version)
    _, assets = api.call("GET", "/api/v2/assets?name_pattern=nightrec_champion")
    asset_id = assets["assets"][0]["id"]
    api.call("POST", "/api/v2/assets/events", {"asset_id": asset_id,
                                                "extra": {"model_version": new_version, "ds": DS}})
    wait(lambda: len([r for r in runs(api, "rescore_recommendations")
                      if r["state"] == "success"]) >= 2, 300, "the second rescore run")
    after = storage.read_json(layout.manifest_uri(DS))
    assert after["model_version"] == new_version and after["rows"] == manifest["rows"]
    latest = storage.read_json(layout.latest_uri())
    assert latest["ds"] > DS or latest["model_version"] == new_version


def test_components_listen_on_localhost_only(airflow_stack):
    """While up, every listening socket of our processes is on 127.0.0.1 (the fixture's
    teardown then asserts that stopping the components leaves no process behind)."""
    _api, home = airflow_stack
    ours = left_behind([home])
    assert ours, "the components should be running now"
    for p in ours:
        for c in p.net_connections(kind="inet"):
            if c.status == psutil.CONN_LISTEN:
                assert c.laddr.ip in ("127.0.0.1", "::1"), (p.name(), c.laddr)
