"""A real Airflow for tests: components as subprocesses on 127.0.0.1, REST v2 with a token.

Shared by tests/test_scheduler.py (LocalExecutor) and tests/test_celery.py (CeleryExecutor).
Every component leads its own process group and is stopped with SIGTERM (then SIGKILL) by PID;
afterwards no process whose AIRFLOW_HOME is one of the stack's homes may be left.

This module imports nothing from conftest at import time (conftest rewrites the environment when
imported): Celery task processes import :func:`worker_hostname` from here.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PASSWORD = "nightrec-test-pw"


def answers(port: int, host: str = "127.0.0.1") -> bool:
    """Something accepts TCP connections on host:port."""
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex((host, port)) == 0


def create_postgres_db(prefix: str) -> str | None:
    """A fresh database ``<prefix>_<hex>`` on 127.0.0.1:5432 (trust auth, user postgres); its
    SQLAlchemy URL, or None when no PostgreSQL answers."""
    try:
        import psycopg2

        name = f"{prefix}_{secrets.token_hex(4)}"
        conn = psycopg2.connect(host="127.0.0.1", port=5432, user="postgres", dbname="postgres",
                                connect_timeout=3)
        conn.autocommit = True
        conn.cursor().execute(f"CREATE DATABASE {name}")
        conn.close()
        return f"postgresql+psycopg2://postgres@127.0.0.1:5432/{name}"
    except Exception:  # noqa: BLE001 - no Postgres here
        return None


def drop_postgres_db(url: str) -> None:
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


def wait(predicate, timeout: float, what: str, interval: float = 2.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out waiting for {what}")


def healthy(api: Api) -> bool:
    try:
        return api.call("GET", "/api/v2/monitor/health", expect=(200,))[0] == 200
    except (OSError, AssertionError):
        return False


def left_behind(homes) -> list[psutil.Process]:
    """Live processes (other than this one) whose AIRFLOW_HOME is one of ``homes``."""
    wanted = {str(h) for h in homes}
    found = []
    for p in psutil.process_iter(["pid"]):
        try:
            if p.pid != os.getpid() and p.environ().get("AIRFLOW_HOME") in wanted:
                found.append(p)
        except (psutil.Error, OSError):
            continue
    return found


def run_state(api: Api, dag_id: str, run_id: str) -> str | None:
    _, run = api.call("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}")
    return run["state"] if run["state"] in ("success", "failed") else None


def runs(api: Api, dag_id: str) -> list[dict]:
    return api.call("GET", f"/api/v2/dags/{dag_id}/dagRuns?order_by=-run_after")[1]["dag_runs"]


def core_env(home: Path, *, port: int, executor: str, db_url: str, parallelism: int = 2
             ) -> dict[str, str]:
    """The environment of every component: this process's (S3 endpoint and credentials
    included), plus Airflow's settings for a stack on 127.0.0.1 with its home in ``home``."""
    from .conftest import free_port  # lazily: importing conftest rewrites the environment

    (home / "passwords.json").write_text(json.dumps({"admin": PASSWORD}))
    return {
        **os.environ,
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__EXECUTOR": executor,
        "AIRFLOW__CORE__PARALLELISM": str(parallelism),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": db_url,
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


def core_commands(port: int, *, triggerer: bool = True) -> dict[str, list[str]]:
    """``airflow`` arguments of the central components."""
    commands = {
        "api-server": ["api-server", "--host", "127.0.0.1", "--port", str(port)],
        "scheduler": ["scheduler", "--skip-serve-logs"],
        "dag-processor": ["dag-processor"],
    }
    if triggerer:
        commands["triggerer"] = ["triggerer", "--skip-serve-logs"]
    return commands


def migrate(env: dict[str, str]) -> None:
    subprocess.run([str(BIN / "airflow"), "db", "migrate"], env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@contextlib.contextmanager
def running(home: Path, components: dict[str, tuple[list[str], dict[str, str]]], *, port: int,
            dag_ids: tuple[str, ...], homes=(), cleanup=None) -> Iterator[Api]:
    """Start ``components`` (name: (airflow arguments, environment)), each logging to
    ``home/<name>.log``; wait for the api-server, a token and ``dag_ids`` to be parsed; yield
    the authenticated :class:`Api`. On exit stop them all, kill anything left with an
    AIRFLOW_HOME in ``home`` or ``homes``, call ``cleanup()`` (drop the database...), then
    fail if anything had been left behind."""
    procs = {}
    try:
        for name, (args, env) in components.items():
            log = open(home / f"{name}.log", "wb")  # noqa: SIM115 - closed at teardown
            procs[name] = (subprocess.Popen([str(BIN / "airflow"), *args], env=env, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True), log)
        api = Api(f"http://127.0.0.1:{port}")
        wait(lambda: healthy(api), 120, "the api-server")
        _, tok = api.call("POST", "/auth/token", {"username": "admin", "password": PASSWORD},
                          expect=(200, 201))
        api.token = tok["access_token"]
        for dag_id in dag_ids:
            wait(lambda d=dag_id: api.call("GET", f"/api/v2/dags/{d}", expect=(200, 404))[0] == 200,
                 180, f"{dag_id} to be parsed")
        yield api
    finally:
        for proc, _log in procs.values():
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
        left = left_behind([home, *homes])
        for p in left:
            p.kill()
        if cleanup is not None:
            cleanup()
        # A teardown error fails the run: stopping the components must stop every process.
        assert not left, f"processes left behind: {[(p.pid, p.name()) for p in left]}"


def worker_hostname() -> str:
    """``[core] hostname_callable`` for test Celery workers that share one machine: the
    hostname Airflow records on their task instances (``NIGHTREC_WORKER_HOSTNAME``)."""
    return os.environ.get("NIGHTREC_WORKER_HOSTNAME") or socket.getfqdn()
