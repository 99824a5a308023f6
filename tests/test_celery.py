"""The nightly DAG on Airflow's CeleryExecutor with two Celery workers (issue 7, acceptance 4).

Redis (127.0.0.1:6379, the broker) and PostgreSQL (127.0.0.1:5432, trust auth: the metadata DB
and Celery's result backend, in a database of this test's own, dropped at the end) are the
services the development and CI machines run; the test skips without them (fails in CI:
NIGHTREC_REQUIRE_SERVICES=1).

- The stack: api-server, scheduler, dag-processor (no triggerer: the DAG defers nothing) and two
  ``airflow celery worker`` processes, ``worker-a@<host>`` and ``worker-b@<host>``, each with
  ``--concurrency 1``, its own AIRFLOW_HOME (so its own task log folder and pid file),
  NIGHTREC_STATE (DVC workspace) and TMPDIR. The workers share nothing but S3 (endpoint and
  credentials reach them as environment variables, as an instance role would in production),
  the metadata DB and the broker. The queue and every Redis key are this run's own (a random
  queue name and Redis key prefix), so a concurrent test run on the same Redis cannot steal
  tasks; the keys are deleted at the end.
- Both workers run on one machine, where Airflow would record the same hostname on every task
  instance; each worker's ``[core] hostname_callable`` returns its Celery node name, so the
  task instances' ``hostname`` says which worker ran them, as separate machines' would.
- The run: ``{"ds": DS, "shards": 4}`` through REST v2, with ``train.candidates: [ease]``
  (closed form, seconds) in a NIGHTREC_PARAMS file. While the Celery run goes on, the same DAG
  with the same params and input runs through ``scripts/run_dag.py`` (``dag.test()``, the path
  of ``nightrec run``: every task in one process) into a second bucket: the reference table.
- The checks: the split's bucket tasks and the score shards each ran on both workers (each
  mapped task instance's hostname, and its task log in that worker's own log folder); the two published tables are identical (same
  rows, same float32 scores bit for bit: the pipeline is seeded and deterministic on CPU); every
  process the test started is gone afterwards.
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
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
import yaml

from nightrec.store import layout, storage
from nightrec.table.reader import RecommendationReader

from .airflow_stack import (
    ROOT,
    answers,
    core_commands,
    core_env,
    create_postgres_db,
    drop_postgres_db,
    migrate,
    run_state,
    running,
    wait,
)
from .conftest import TEST_PARAMS, free_port, require_service


def _redis_up() -> bool:
    if not answers(6379):
        return False
    import redis

    try:
        return bool(redis.Redis(host="127.0.0.1", port=6379, socket_timeout=2).ping())
    except redis.RedisError:
        return False


# Probed at collection, so that nothing (S3 server, sample) starts where the test cannot run.
pytestmark = [
    pytest.mark.e2e,
    pytest.mark.service("redis", available=_redis_up(),
                        reason="nothing answers a PING on 127.0.0.1:6379 (the Celery broker)"),
    pytest.mark.service("postgres", available=answers(5432),
                        reason="nothing answers on 127.0.0.1:5432 (the metadata DB)"),
]
DAG_ID = "nightly_recommendations"
DS = "2026-12-09"  # after the sample's last event; no other test module uses this partition
SHARDS = 4
BUCKETS = 4  # clean.buckets: the split's mapped tasks, one per user-hash bucket
CONF = {"ds": DS, "shards": SHARDS}
WORKERS = ("worker-a", "worker-b")
BUCKET, REF_BUCKET = "nightrec-celery", "nightrec-celery-ref"


@contextlib.contextmanager
def _environ(**values: str) -> Iterator[None]:
    previous = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in previous.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _log(msg: str, t0: float) -> None:
    print(f"[celery-test +{time.monotonic() - t0:5.1f}s] {msg}", flush=True)


@pytest.fixture(scope="module")
def celery_params(tmp_path_factory) -> Path:
    """The session's test params with EASE as the only candidate (closed form: fast), and the
    data in BUCKETS user-hash buckets (auto would make one of the sample's 60k events)."""
    params = yaml.safe_load(TEST_PARAMS.read_text())
    params["train"]["candidates"] = ["ease"]
    params["clean"]["buckets"] = BUCKETS
    path = tmp_path_factory.mktemp("celery_params") / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


@pytest.fixture(scope="module")
def buckets(s3, sample):
    """The stack's bucket and the reference's, each with DS's raw snapshot."""
    for bucket in (BUCKET, REF_BUCKET):
        storage.s3_client().create_bucket(Bucket=bucket)
        with _environ(NIGHTREC_BUCKET=bucket):
            for table in ("interactions", "items", "users"):
                storage.upload_from(sample[table], layout.raw_prefix(DS, table) + f"{table}.csv")
    return BUCKET, REF_BUCKET


def _prepare(home: Path, pg: str, tag: str, celery_params: Path, t0: float):
    """Migrate the metadata DB; return the api-server's port, and each component's ``airflow``
    arguments and environment (the workers': their own home, state and temp dir)."""
    port = free_port()
    # Parallelism 8: the executor's slots never hold a task back (it frees a slot only when it
    # has read the Celery result); the workers' --concurrency 1 is what bounds the run.
    env = core_env(home, port=port, executor="CeleryExecutor", db_url=pg, parallelism=8)
    env.update({
        "AIRFLOW__CELERY__BROKER_URL": "redis://127.0.0.1:6379/0",
        "AIRFLOW__CELERY__RESULT_BACKEND": "db+" + pg,
        "AIRFLOW__CELERY_BROKER_TRANSPORT_OPTIONS__GLOBAL_KEYPREFIX": f"{tag}:",
        "AIRFLOW__CELERY_BROKER_TRANSPORT_OPTIONS__VISIBILITY_TIMEOUT": "3600",
        "AIRFLOW__CELERY__SYNC_PARALLELISM": "1",
        "AIRFLOW__OPERATORS__DEFAULT_QUEUE": tag,
        # A task's supervisor notices its process has exited within this (default 5 s); until
        # then the worker's one slot stays taken.
        "AIRFLOW__WORKERS__MIN_HEARTBEAT_INTERVAL": "1",
        # Manual runs only: no cron run for "today" competing for the two worker slots.
        "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False",
        "NIGHTREC_BUCKET": BUCKET,
        "NIGHTREC_PARAMS": str(celery_params),
        "NIGHTREC_STATE": str(home / "state"),
    })
    for var in ("S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert env.get(var), f"{var}: the workers reach S3 through the environment"
    components = {name: (args, env) for name, args in core_commands(port, triggerer=False).items()}
    host = socket.gethostname()
    worker_homes = {}
    for name in WORKERS:
        whome = home / name
        (whome / "tmp").mkdir(parents=True)
        worker_homes[name] = whome
        node = f"{name}@{host}"
        components[name] = (
            ["celery", "worker", "--celery-hostname", node, "--concurrency", "1", "--queues", tag,
             "--skip-serve-logs", "--without-mingle", "--without-gossip"],
            {**env, "AIRFLOW_HOME": str(whome), "NIGHTREC_STATE": str(whome / "state"),
             "TMPDIR": str(whome / "tmp"), "NIGHTREC_WORKER_HOSTNAME": node,
             "AIRFLOW__CORE__HOSTNAME_CALLABLE": "tests.airflow_stack.worker_hostname",
             "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))},
        )
    migrate(env)
    _log("metadata DB migrated", t0)
    return port, components, worker_homes


@pytest.fixture(scope="module")
def celery_stack(s3, buckets, celery_params, tmp_path_factory):
    pg = create_postgres_db("nightrec_celery")
    require_service("postgres", available=pg is not None,
                    reason="cannot create a database on the PostgreSQL at 127.0.0.1:5432")
    t0 = time.monotonic()
    tag = f"nightrec_celery_{secrets.token_hex(4)}"  # this run's queue and Redis key prefix

    def cleanup():
        drop_postgres_db(pg)
        import redis

        r = redis.Redis(host="127.0.0.1", port=6379)
        keys = list(r.scan_iter(match=f"{tag}:*"))
        if keys:
            r.delete(*keys)

    try:
        home = tmp_path_factory.mktemp("airflow_celery")
        port, components, worker_homes = _prepare(home, pg, tag, celery_params, t0)
    except BaseException:
        cleanup()
        raise

    with running(home, components, port=port, dag_ids=(DAG_ID,), homes=worker_homes.values(),
                 cleanup=cleanup) as api:
        _log("api-server, scheduler, dag-processor and two Celery workers up; DAG parsed", t0)
        yield api, home, worker_homes, t0
    _log("every process stopped, database and Redis keys dropped", t0)


def _start_reference(celery_params: Path, state: Path) -> tuple[subprocess.Popen, Path, Path]:
    """The same DAG, params and input through ``scripts/run_dag.py`` (``dag.test()``, the path
    of ``nightrec run``) in a subprocess with its own SQLite metadata DB and state, into
    REF_BUCKET."""
    state.mkdir(parents=True)
    env = {k: v for k, v in os.environ.items()
           if k not in ("AIRFLOW_HOME", "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN")}
    env.update(NIGHTREC_BUCKET=REF_BUCKET, NIGHTREC_PARAMS=str(celery_params),
               NIGHTREC_STATE=str(state))
    result, log = state / "result.json", state / "run_dag.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "scripts" / "run_dag.py"), "--ds", DS,
             "--conf", json.dumps(CONF), "--state", str(state), "--result-file", str(result)],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, result, log


def _sorted(table: pd.DataFrame) -> pd.DataFrame:
    return table.sort_values(["user_id", "rank"]).reset_index(drop=True)


def test_celery_workers_share_the_shards_and_publish_the_reference_table(
        celery_stack, celery_params, tmp_path, capsys):
    api, home, worker_homes, t0 = celery_stack

    def say(msg: str) -> None:  # the evidence, on the terminal even when pytest captures output
        with capsys.disabled():
            _log(msg, t0)

    api.call("PATCH", f"/api/v2/dags/{DAG_ID}", {"is_paused": False})
    _, run = api.call("POST", f"/api/v2/dags/{DAG_ID}/dagRuns", {"logical_date": None,
                                                                 "conf": CONF})
    run_id = run["dag_run_id"]
    say(f"triggered {run_id} with conf {CONF}")
    # The reference runs while the Celery run goes on (they share no bucket, state or DB).
    ref, ref_result, ref_log = _start_reference(celery_params, tmp_path / "reference")
    ref_done: list[float] = []

    def celery_run_done():
        if not ref_done and ref.poll() is not None:
            ref_done.append(time.monotonic() - t0)
        return run_state(api, DAG_ID, run_id)

    try:
        for name in WORKERS:
            wait(lambda n=name: b" ready." in (home / f"{n}.log").read_bytes(), 120,
                 f"{name} to be ready")
        state = wait(celery_run_done, 600, "the Celery run", interval=2)
        rc = ref.wait(timeout=600)
    finally:
        if ref.poll() is None:
            os.killpg(ref.pid, signal.SIGKILL)
            ref.wait()
    tis = api.call("GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances?limit=100")[1]
    tis = tis["task_instances"]
    say(f"Celery run finished: {state}; the reference run had finished at "
        f"+{ref_done[0] if ref_done else time.monotonic() - t0:.1f}s (exit code {rc})")
    assert state == "success", (
        [(t["task_id"], t["map_index"], t["state"]) for t in tis],
        (home / "scheduler.log").read_text()[-3000:])
    assert rc == 0, (json.loads(ref_result.read_text()) if ref_result.exists() else None,
                     ref_log.read_text()[-3000:])

    # Which worker ran what: the hostname Airflow recorded on each task instance, and the task
    # log, which only the worker that ran the task has (each worker has its own log folder).
    nodes = {f"{name}@{socket.gethostname()}": name for name in WORKERS}
    ran = [t for t in tis if t["hostname"]]
    assert ran and all(t["hostname"] in nodes for t in ran), [t["hostname"] for t in ran]
    for node, name in nodes.items():
        mine = sorted((t for t in ran if t["hostname"] == node), key=lambda t: t["start_date"])
        say(f"tasks on {node}: " + ", ".join(
            t["task_id"] + (f"[{t['map_index']}]" if t["map_index"] >= 0 else "") for t in mine))
    for task_id, count in (("split_bucket", BUCKETS), ("score", SHARDS)):
        mapped = sorted((t for t in tis if t["task_id"] == task_id), key=lambda t: t["map_index"])
        assert [t["map_index"] for t in mapped] == list(range(count)), (task_id, mapped)
        assert all(t["state"] == "success" for t in mapped), mapped
        by_worker: dict[str, list[int]] = {name: [] for name in WORKERS}
        for t in mapped:
            worker = nodes[t["hostname"]]
            logs = {name: sorted(h.glob(f"logs/dag_id={DAG_ID}/run_id={run_id}/task_id={task_id}/"
                                        f"map_index={t['map_index']}/attempt=*.log"))
                    for name, h in worker_homes.items()}
            assert logs[worker], (t, logs)
            assert not any(logs[other] for other in WORKERS if other != worker), logs
            by_worker[worker].append(t["map_index"])
            say(f"{task_id} {t['map_index']}: task instance hostname {t['hostname']}, task log "
                f"{logs[worker][-1].relative_to(home)}")
        say(f"{task_id} per worker: {by_worker}")
        assert all(by_worker.values()), f"both workers must run {task_id} tasks: {by_worker}"

    # The published table equals the reference, row for row, score for score.
    got = _sorted(RecommendationReader(BUCKET).table(DS).to_pandas())
    want = _sorted(RecommendationReader(REF_BUCKET).table(DS).to_pandas())
    assert len(got) == len(want) > 0
    pd.testing.assert_frame_equal(got, want, check_exact=True)
    say(f"Celery table == reference table: {len(got)} rows, {got['user_id'].nunique()} users, "
        f"model {got['model_version'].iloc[0]}, scores bit-identical")
