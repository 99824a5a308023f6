"""
### nightly_recommendations

Turns one day's interaction snapshot (`raw/interactions/ds=<ds>/` in the bucket) into a published
top-K table (`recommendations/ds=<ds>/` + `_manifest.json`, then `recommendations/_latest.json`).

**Runs** daily at 02:00 UTC for that day's date (catchup off, one run at a time). **By hand**:
trigger with `{"ds": "YYYY-MM-DD"}`; Airflow 3 manual runs have no logical date, so the param is
how you name the partition. Optional: `top_k` (1..1000), `force_publish` (publish even if the gate
refuses; logged).

**Stages**: ingest -> clean (quarantine with reasons) -> validate (Great Expectations; a broken
contract stops the run) -> augment -> split (DVC, pushed; its hash is the `data_version`) ->
train -> evaluate (full ranking vs popularity) -> gate -> score -> publish.

**If it fails**: nothing new is visible to readers; the previous table stays latest. Each task's
outputs live under `runs/ds=<ds>/<task>/`, so clearing and rerunning a task replaces only those.
Code: `tasks/` in the repo; every step runs without Airflow too.
"""

from __future__ import annotations

import datetime as dt

from airflow.sdk import Param, dag, get_current_context, task
from airflow.sdk.exceptions import AirflowFailException


def _on_failure(context) -> None:
    from tasks.alerts import record_failure

    ti = context["task_instance"]
    params = context.get("params") or {}
    logical = context.get("logical_date")
    ds = params.get("ds") or (logical.strftime("%Y-%m-%d") if logical else None)
    err = context.get("exception")
    if isinstance(err, AirflowFailException):  # raised by _permanent with the cause's name
        error = str(err)
    else:
        error = f"{type(err).__name__}: {err}" if err else "unknown error"
    record_failure(dag_id=ti.dag_id, run_id=ti.run_id, task_id=ti.task_id, ds=ds, error=error)


def _permanent(fn, *args, **kwargs):
    """Call a step; a PermanentError (bad input) fails the task at once, without retries."""
    from tasks.errors import PermanentError

    try:
        return fn(*args, **kwargs)
    except PermanentError as e:
        raise AirflowFailException(f"{type(e).__name__}: {e}") from e


DEFAULT_ARGS = {
    "on_failure_callback": _on_failure,
    "owner": "nightrec",
    "retries": 2,
    "retry_delay": dt.timedelta(seconds=30),
    "retry_exponential_backoff": True,
    "execution_timeout": dt.timedelta(hours=2),
}


def _ds() -> str:
    """The run's partition: the `ds` param when given, else the run's logical date."""
    from tasks.settings import check_ds

    ctx = get_current_context()
    ds = ctx["params"].get("ds") or (ctx.get("logical_date") and ctx["logical_date"].strftime("%Y-%m-%d"))
    if not ds:
        raise ValueError("a manual run needs the `ds` param (YYYY-MM-DD): it has no logical date")
    return check_ds(ds)


@dag(
    dag_id="nightly_recommendations",
    schedule="0 2 * * *",
    start_date=dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    doc_md=__doc__,
    tags=["nightrec"],
    params={
        "ds": Param(None, type=["null", "string"], pattern=r"^\d{4}-\d{2}-\d{2}$",
                    description="Partition date YYYY-MM-DD; defaults to the run's logical date."),
        "top_k": Param(None, type=["null", "integer"], minimum=1, maximum=1000,
                       description="Recommendations per user; default score.top_k in params.yaml."),
        "force_publish": Param(False, type="boolean",
                               description="Publish even when the gate does not bless the model."),
    },
)
def nightly_recommendations():
    @task(doc_md="Read the raw snapshot (any supported format) into raw-string columns.")
    def ingest() -> dict:
        from tasks import ingest as step

        ds = _ds()
        return {"ds": ds, **_permanent(step.run, ds)}

    @task(doc_md="Parse, quarantine bad rows with a reason, dedupe, k-core, index.")
    def clean(prev: dict) -> dict:
        from tasks import clean as step

        return {"ds": prev["ds"], **step.run(prev["ds"], prev)}

    @task(doc_md="Great Expectations contract on the cleaned data; fails the run when broken.")
    def validate(prev: dict) -> dict:
        from tasks import validate as step

        return {"ds": prev["ds"], **_permanent(step.run, prev["ds"], prev)}

    @task(doc_md="Labels, weights and side-feature tables.")
    def augment(prev: dict) -> dict:
        from tasks import augment as step

        return {"ds": prev["ds"], **step.run(prev["ds"], prev)}

    @task(doc_md="DVC stage: per-user temporal split, pushed to the DVC remote; data_version.")
    def split(prev: dict) -> dict:
        from tasks import versioning

        return {"ds": prev["ds"], **versioning.run(prev["ds"], prev)}

    @task(doc_md="Fit the holdout model (gated) and the full refit (scored).")
    def train(prev: dict) -> dict:
        from tasks import train as step

        return {"ds": prev["ds"], **step.run(prev["ds"], prev)}

    @task(doc_md="Full-ranking metrics vs popularity; writes metrics.json and the verdict.")
    def evaluate(prev: dict) -> dict:
        from tasks import evaluate as step

        return {"ds": prev["ds"], **step.run(prev["ds"], prev)}

    @task.short_circuit(doc_md="Go on to score and publish only for a blessed model or a forced run.")
    def gate(prev: dict) -> bool:
        import logging

        forced = bool(get_current_context()["params"].get("force_publish"))
        log = logging.getLogger("nightrec.gate")
        if prev["blessed"]:
            log.info("blessed: %s", prev["gate"])
        elif forced:
            log.warning("NOT blessed but force_publish=true; publishing anyway: %s", prev["gate"])
        else:
            log.warning("NOT blessed; nothing is published and the previous table stays latest: %s",
                        prev["gate"])
        return bool(prev["blessed"] or forced)

    @task(doc_md="Top-K unseen items for every user, into staging parts.")
    def score(prev: dict) -> dict:
        from tasks import score as step

        ctx = get_current_context()
        run_key = "".join(c if c.isalnum() or c in "._-" else "_" for c in ctx["run_id"])[:100]
        out = step.run(prev["ds"], prev, run_key=run_key, top_k=ctx["params"].get("top_k"))
        return {"ds": prev["ds"], **out}

    @task(doc_md="Validate the table, write parts and manifest, then flip the latest pointer.")
    def publish(prev: dict) -> dict:
        from tasks import publish as step

        return {"ds": prev["ds"], **_permanent(step.run, prev["ds"], prev)}

    evaluated = evaluate(train(split(augment(validate(clean(ingest()))))))
    scored = score(evaluated)
    gate(evaluated) >> scored
    publish(scored)


nightly_recommendations()
