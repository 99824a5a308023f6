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
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

from tasks import layout, registry, storage
from tasks.reader import RecommendationReader

from .conftest import ROOT, free_port

pytestmark = pytest.mark.e2e
DS = "2026-11-20"
BIN = Path(sys.executable).parent


def _postgres_url() -> str | None:
    try:
        import psycopg2

        name = f"nightrec_it_{secrets.token_hex(4)}"
        conn = psycopg2.connect(host="127.0.0.1", port=5432, user="postgres", dbname="postgres",
                                connect_timeout=3)
        conn.autocommit = True
        conn.cursor().execute(f"CREATE DATABASE {name}")
        conn.close()
        return f"postgresql+psycopg2://postgres@127.0.0.1:5432/{name}"
    except Exception:  # noqa: BLE001 - no Postgres here: fall back to SQLite
        return None


def _drop_postgres(url: str) -> None:
    import psycopg2

    conn = psycopg2.connect(host="127.0.0.1", port=5432, user="postgres", dbname="postgres")
    conn.autocommit = True
    conn.cursor().execute(f"DROP DATABASE IF EXISTS {url.rsplit('/', 1)[1]} WITH (FORCE)")
    conn.close()


class Api:
    def __init__(self, base: str):
        self.base = base
        self.token = None

    def call(self, method: str, path: str, body=None, expect=(200,)):
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base + path, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                status, payload = resp.status, resp.read()
        except urllib.error.HTTPError as e:
            status, payload = e.code, e.read()
        parsed = json.loads(payload) if payload else None
        assert status in expect, (method, path, status, parsed)
        return status, parsed


def _wait(predicate, timeout: float, what: str, interval: float = 2.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out waiting for {what}")


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
    pg = _postgres_url()
    port = free_port()
    (home / "passwords.json").write_text(json.dumps({"admin": "nightrec-test-pw"}))
    env = {
        **os.environ,
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__CORE__PARALLELISM": "2",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": pg or f"sqlite:///{home}/airflow.db",
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__PORT": str(port),
        "AIRFLOW__API__WORKERS": "1",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
        "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_hex(16),
        "AIRFLOW__API__SECRET_KEY": secrets.token_hex(16),
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(home / "passwords.json"),
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
        "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "2",
        "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
        "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(free_port()),
        "NIGHTREC_RETRY_DELAY_S": "2",
    }
    subprocess.run([str(BIN / "airflow"), "db", "migrate"], env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    commands = {
        "api-server": ["api-server", "--host", "127.0.0.1", "--port", str(port)],
        "scheduler": ["scheduler", "--skip-serve-logs"],
        "dag-processor": ["dag-processor"],
        "triggerer": ["triggerer", "--skip-serve-logs"],
    }
    procs = {}
    for name, args in commands.items():
        log = open(home / f"{name}.log", "wb")  # noqa: SIM115 - closed at teardown
        procs[name] = (subprocess.Popen([str(BIN / "airflow"), *args], env=env, stdout=log,
                                        stderr=subprocess.STDOUT, start_new_session=True), log)
    api = Api(f"http://127.0.0.1:{port}")
    try:
        _wait(lambda: _healthy(api), 120, "the api-server")
        _, tok = api.call("POST", "/auth/token",
                          {"username": "admin", "password": "nightrec-test-pw"}, expect=(200, 201))
        api.token = tok["access_token"]
        for dag_id in ("nightly_recommendations", "rescore_recommendations"):
            _wait(lambda d=dag_id: api.call("GET", f"/api/v2/dags/{d}", expect=(200, 404))[0] == 200,
                  180, f"{dag_id} to be parsed")
        yield api, home
    finally:
        for proc, log in procs.values():
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for proc, log in procs.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            log.close()
        time.sleep(1)
        left = _left_behind(home)
        for p in left:
            p.kill()
        if pg:
            _drop_postgres(pg)
        # A teardown error fails the run: stopping the components must stop every process.
        assert not left, f"processes left behind: {[(p.pid, p.name()) for p in left]}"


def _healthy(api: Api) -> bool:
    try:
        return api.call("GET", "/api/v2/monitor/health", expect=(200,))[0] == 200
    except (OSError, AssertionError):
        return False


def _left_behind(home: Path) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["pid"]):
        try:
            if p.pid != os.getpid() and p.environ().get("AIRFLOW_HOME") == str(home):
                found.append(p)
        except (psutil.Error, OSError):
            continue
    return found


def _run_state(api: Api, dag_id: str, run_id: str) -> str | None:
    _, run = api.call("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}")
    return run["state"] if run["state"] in ("success", "failed") else None


def _runs(api: Api, dag_id: str) -> list[dict]:
    return api.call("GET", f"/api/v2/dags/{dag_id}/dagRuns?order_by=-run_after")[1]["dag_runs"]


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
    assert [r for r in _runs(api, "nightly_recommendations") if r["run_type"] == "manual"] == []

    _, run = api.call("POST", "/api/v2/dags/nightly_recommendations/dagRuns",
                      {"logical_date": None, "conf": {"ds": DS}})
    state = _wait(lambda: _run_state(api, "nightly_recommendations", run["dag_run_id"]), 600,
                  "the nightly run", interval=5)
    assert state == "success", (home / "scheduler.log").read_text()[-3000:]
    manifest = storage.read_json(layout.manifest_uri(DS))
    assert len(RecommendationReader().table(DS)) == manifest["rows"] > 0
    champion = registry.champion()
    assert champion == manifest["model_version"]

    # The blessed model's asset event started the re-score DAG; the table was already current.
    first = _wait(lambda: [r for r in _runs(api, "rescore_recommendations")
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
    _wait(lambda: len([r for r in _runs(api, "rescore_recommendations")
                       if r["state"] == "success"]) >= 2, 300, "the second rescore run")
    after = storage.read_json(layout.manifest_uri(DS))
    assert after["model_version"] == new_version and after["rows"] == manifest["rows"]
    latest = storage.read_json(layout.latest_uri())
    assert latest["ds"] > DS or latest["model_version"] == new_version


def test_components_listen_on_localhost_only(airflow_stack):
    """While up, every listening socket of our processes is on 127.0.0.1 (the fixture's
    teardown then asserts that stopping the components leaves no process behind)."""
    _api, home = airflow_stack
    ours = _left_behind(home)
    assert ours, "the components should be running now"
    for p in ours:
        for c in p.net_connections(kind="inet"):
            if c.status == psutil.CONN_LISTEN:
                assert c.laddr.ip in ("127.0.0.1", "::1"), (p.name(), c.laddr)
