"""Helpers shared by nightrec's DAG files.

Only wiring lives here: the partition date, default task arguments, the failure callback and
the "bad input is not retried" wrapper. Step logic is in ``tasks/``.
"""

from __future__ import annotations

import datetime as dt
import errno
import hashlib
import os
import socket

from airflow.sdk import Asset, Param, get_current_context, task
from airflow.sdk.exceptions import AirflowFailException

START_DATE = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)

# Emitted when a blessed model becomes champion; the re-score DAG is scheduled on it.
CHAMPION = Asset(name="nightrec_champion", uri="nightrec://models/champion")

# "(?![\s\S])" is end-of-string in both Python (which jsonschema uses, where "$" would also
# match before a trailing newline) and ECMA regexes (the UI's).
DS_PATTERN = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}(?![\s\S])"
MODEL_VERSION_PATTERN = r"^[a-z][a-z0-9]{0,15}-[0-9]{8}-[0-9a-f]{8}(?![\s\S])"  # = nightrec.tasks.registry


def ds_param() -> Param:
    return Param(None, type=["null", "string"], pattern=DS_PATTERN, format="date",
                 description="Partition date YYYY-MM-DD; defaults to the run's logical date.")


def top_k_param() -> Param:
    return Param(None, type=["null", "integer"], minimum=1, maximum=1000,
                 description="Recommendations per user (1..1000); default score.top_k.")


def shards_param() -> Param:
    return Param(None, type=["null", "integer"], minimum=1, maximum=256,
                 description="Score shards, one mapped task each (1..256); default score.shards.")


def model_version_param(description: str) -> Param:
    return Param(None, type=["null", "string"], pattern=MODEL_VERSION_PATTERN,
                 description=description)


def dry_run_param() -> Param:
    return Param(False, type="boolean",
                 description="Run and validate everything, publish and promote nothing.")


def run_ds() -> str:
    """The run's partition: the ``ds`` param when given, else the run's logical date."""
    from nightrec.core.settings import check_ds

    ctx = get_current_context()
    logical = ctx.get("logical_date")
    ds = ctx["params"].get("ds") or (logical.strftime("%Y-%m-%d") if logical else None)
    if not ds:
        raise AirflowFailException("a manual run needs the `ds` param (YYYY-MM-DD)")
    return check_ds(ds)


def run_key() -> str:
    """The run id as one safe key segment (staging prefixes are per run)."""
    from nightrec.store.layout import sanitize_token

    return sanitize_token(get_current_context()["run_id"])


def deployment_id() -> str:
    """Which Airflow deployment this is: ``NIGHTREC_DEPLOYMENT`` when set, else a hash of the
    execution API URL and metadata DB URL every worker of one deployment shares (never logged
    in clear: the DB URL may hold a password). Two deployments can give the same run id (the
    same ds's scheduled run); this tells their runs apart in the per-ds lease."""
    from nightrec.store.layout import sanitize_token

    if os.environ.get("NIGHTREC_DEPLOYMENT"):
        return sanitize_token(os.environ["NIGHTREC_DEPLOYMENT"], max_len=40)
    from airflow.configuration import conf

    basis = "|".join(conf.get(section, key, fallback="") or "" for section, key in (
        ("core", "execution_api_server_url"), ("database", "sql_alchemy_conn")))
    return hashlib.sha256(basis.encode()).hexdigest()[:12]


def run_owner() -> str:
    """This run as the owner of a per-ds lease: ``<dag_id>.<run key>@<deployment>``."""
    return f"{get_current_context()['dag'].dag_id}.{run_key()}@{deployment_id()}"


def hold_lease(ds: str) -> None:
    """Take or renew this run's lease on ``ds`` (nightrec/store/locks.py); another live run's lease
    makes the task wait up to ``run.lock_wait_s``, then fail at once (no retries)."""
    from nightrec.store import locks

    permanent(locks.hold_run, ds, run_owner())


def release_lease(ds: str) -> None:
    from nightrec.store import locks

    locks.release_run(ds, run_owner())


# Tasks that take no lease: the teardown runs after a refusal too, and must not wait for the
# lease of the run that refused this one.
LEASE_FREE_TASKS = frozenset({"report"})


# The XCom key a task pushes once its run holds the ds's lease: the report of a run that never
# held it (refused at its first task) must not write the ds's report, even when the run that
# refused it has finished and released the lease by the time the report runs.
LEASE_HELD_KEY = "lease_held"


def hold_lease_before(context) -> None:
    """``pre_execute`` of every task of a DAG whose ds is known up front (the nightly one)."""
    if context["ti"].task_id not in LEASE_FREE_TASKS:
        hold_lease(run_ds())
        context["ti"].xcom_push(key=LEASE_HELD_KEY, value=True)


def disk_full(err: BaseException | None) -> bool:
    """Whether ``err`` or an exception it came from is ENOSPC (h5py and TF only say it in text)."""
    seen = set()
    while err is not None and id(err) not in seen:
        if getattr(err, "errno", None) == errno.ENOSPC or "No space left on device" in str(err):
            return True
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return False


def on_failure(context) -> None:
    """Write an alert record naming the run, the task and the error (nightrec/ops/alerts.py)."""
    from nightrec.ops.alerts import record_failure

    ti = context["task_instance"]
    params = context.get("params") or {}
    logical = context.get("logical_date")
    ds = params.get("ds") or (logical.strftime("%Y-%m-%d") if logical else None)
    err = context.get("exception")
    if isinstance(err, AirflowFailException):  # raised by permanent() with the cause's name
        error = str(err)
    else:
        error = f"{type(err).__name__}: {err}" if err else "unknown error"
    if disk_full(err):
        error = (f"disk full on the worker {socket.gethostname()} (its TMPDIR, NIGHTREC_SPILL or NIGHTREC_STATE); "
                 f"nothing was published; free space, then clear the task: {error}")
    record_failure(dag_id=ti.dag_id, run_id=ti.run_id, task_id=ti.task_id, ds=ds, error=error)


def release_after(context, result=None) -> None:
    """After every task: collect garbage and hand freed memory back to the OS
    (``engine.release_memory``). ``nightrec run`` runs every task in one process (``dag.test()``),
    where what a step freed but glibc or Arrow kept would otherwise sit under every later step
    (measured in the 10M DAG benchmark: RESULTS.md); on a Celery or Kubernetes worker the task's
    process ends anyway, and this costs milliseconds."""
    import gc

    from nightrec.core import engine

    gc.collect()
    engine.release_memory()


def permanent(fn, *args, **kwargs):
    """Call a step; a PermanentError (bad input) fails the task at once, without retries."""
    from nightrec.core.errors import PermanentError

    try:
        return fn(*args, **kwargs)
    except PermanentError as e:
        raise AirflowFailException(f"{type(e).__name__}: {e}") from e


def dag_kwargs(*, lease_every_task: bool = False) -> dict:
    """What every nightrec DAG shares: start date, no catchup, one run at a time, task defaults.

    ``lease_every_task``: every task first takes or renews the run's per-ds lease
    (:func:`hold_lease_before`), for a DAG whose ds is a param or the logical date.
    """
    args = default_args()
    if lease_every_task:
        args["pre_execute"] = hold_lease_before
    return {
        # Any valid ds must run every task: a DagRun before start_date schedules none and ends
        # "success" (a backfill of last year, a replay of a historical log at its own dates).
        # catchup is off, so an early start date queues nothing.
        "start_date": START_DATE,
        "catchup": False,
        "max_active_runs": 1,
        "default_args": args,
        "tags": ["nightrec"],
    }


def default_args() -> dict:
    """Retries with exponential backoff, a timeout, the alert callback and the memory release
    (:func:`release_after`), for every task.

    ``NIGHTREC_RETRY_DELAY_S`` (default 30) sets the first retry delay; tests shorten it.
    """
    return {
        "owner": "nightrec",
        "retries": 2,
        "retry_delay": dt.timedelta(seconds=float(os.environ.get("NIGHTREC_RETRY_DELAY_S", "30"))),
        "retry_exponential_backoff": True,
        "max_retry_delay": dt.timedelta(minutes=10),
        "execution_timeout": dt.timedelta(hours=2),
        "on_failure_callback": on_failure,
        "post_execute": release_after,
    }


# The score and publish steps both DAGs share: one mapped task per user shard, then one publish
# of all shards' parts. Defined once here; each DAG calls them inside its own context.
@task(task_id="score",
      doc_md="Top-K unseen items for one shard's users, into that shard's staging parts.")
def score_shard(spec: dict) -> dict:
    from nightrec.tasks import score as step

    hold_lease(spec["ds"])  # the nightly DAG's pre_execute did it already; re-score's did not
    return step.run_shard(spec)


@task(task_id="publish",
      doc_md="Validate all shards' table, claim the ds, write parts and manifest, then move the "
             "latest pointer (conditional write); retention.")
def publish_shards(shards: list[dict]) -> dict:
    from nightrec.tasks import publish as step
    from nightrec.tasks.score import collect

    scored = collect(list(shards))
    hold_lease(scored.ds)
    params = get_current_context()["params"]
    return permanent(step.run, scored, dry_run=bool(params.get("dry_run")),
                     force=bool(params.get("force_publish"))).to_xcom()
