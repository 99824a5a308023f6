"""
### nightly_recommendations

Turns one day's interaction snapshot (`raw/interactions/ds=<ds>/` in the bucket) into a published
top-K table (`recommendations/ds=<ds>/` + `_manifest.json`, then `recommendations/_latest.json`).

**Schedule**: daily at 02:00 UTC for that day's date; catchup off; one run at a time.

**Manual trigger** (UI, `airflow dags trigger`, REST). Every param is checked against its schema
before anything runs:

| param | default | meaning |
|---|---|---|
| `ds` | the logical date | partition `YYYY-MM-DD`; manual runs in Airflow 3 have no logical date, so give it |
| `retrain` | `true` | `false`: skip split/train/evaluate and score with the current champion |
| `model_version` | none | score with this registered model (implies no retraining) |
| `top_k` | `score.top_k` | recommendations per user, 1..1000 |
| `shards` | `score.shards` | score shards (mapped tasks over user_id ranges), 1..256 |
| `force_publish` | `false` | publish even if the gate does not bless the model (logged, not promoted) |
| `fallback` | `publish.fallback` | the gate refuses: publish the champion re-scored on today's seen items (or popularity, with no champion) |
| `dry_run` | `false` | run and validate everything; publish and promote nothing |

**Stages**: ingest -> clean (quarantine with reasons) -> validate (Great Expectations; a broken
contract stops the run, without retries) -> realized (beside the rest: the table latest before
ds scored on ds's new events, with an alert on a drop; never fails the run) -> augment -> seen (every interaction up to ds with
valid ids: what is never recommended back) -> choose -> plan_split -> split_bucket (one mapped
task per user-hash bucket) -> split (DVC commit + push; its hash is the `data_version`) -> train -> evaluate (full ranking vs popularity and the champion) -> gate
(branch) -> register (a blessed model, immutable; not yet champion) **or** fallback (the gate
refused: the champion re-scored on today's seen items, else popularity) -> plan_shards -> score
(one mapped task per user shard; a failed shard retries alone) -> publish (GE suite, output checks
against the latest table, refused on a breach unless `force_publish`, a per-ds claim, parts,
manifest, then the latest pointer by conditional write; retention) -> promote (the
published blessed model becomes champion, ds-ordered; emits the `nightrec_champion` asset).
`report` always runs last, uploads `reports/ds=<ds>/report.html`, writes an alert when the latest
table is older than `publish.max_age_hours`, and releases the run's lease on the ds.

**One run per ds, across deployments**: every task first takes or renews the run's lease
`runs/ds=<ds>/_run_lock.json` (renewed while it runs). A second run of the same ds (another
deployment, a re-score) waits up to `run.lock_wait_s`, then fails at once, naming the holder.

**If it fails**: nothing new is visible to readers; the previous table stays latest. An alert
record lands in `alerts/ds=<ds>/`. Each task's outputs live under `runs/ds=<ds>/<task>/`, so
clearing and rerunning a task replaces only those. **Backfill**: see the README.
"""

from __future__ import annotations

import datetime as dt

from airflow.sdk import Param, dag, get_current_context, task
from airflow.sdk.exceptions import AirflowSkipException

from nightrec.orchestration.common import (
    CHAMPION,
    LEASE_HELD_KEY,
    dag_kwargs,
    dry_run_param,
    ds_param,
    model_version_param,
    permanent,
    publish_shards,
    release_lease,
    run_ds,
    run_key,
    run_owner,
    score_shard,
    shards_param,
    top_k_param,
)


@dag(
    dag_id="nightly_recommendations",
    schedule="0 2 * * *",
    doc_md=__doc__,
    **dag_kwargs(lease_every_task=True),
    params={
        "ds": ds_param(),
        "retrain": Param(True, type="boolean",
                         description="false: score with the champion, no training."),
        "model_version": model_version_param("Score with this registered model (no training)."),
        "top_k": top_k_param(),
        "shards": shards_param(),
        "force_publish": Param(False, type="boolean",
                               description="Publish even when the gate does not bless the model."),
        "fallback": Param(None, type=["null", "boolean"],
                          description="When the gate refuses: publish the champion re-scored "
                                      "(or popularity). Default publish.fallback."),
        "dry_run": dry_run_param(),
    },
)
def nightly_recommendations():
    @task(doc_md="Read the raw snapshot (any supported format) into raw-string columns.")
    def ingest() -> dict:
        from nightrec.tasks import ingest as step

        started = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        return permanent(step.run, run_ds(), started_at=started).to_xcom()

    @task(doc_md="Parse, quarantine bad rows with a reason, dedupe, k-core, index.")
    def clean(prev: dict) -> dict:
        from nightrec.core.records import Ingested
        from nightrec.tasks import clean as step

        return step.run(Ingested.from_xcom(prev)).to_xcom()

    @task(doc_md="Great Expectations contract on the cleaned data; fails the run when broken. "
                 "Then input drift against the previous ds (warn or stop, per monitor.drift).")
    def validate(prev: dict) -> dict:
        from nightrec.core.records import Cleaned
        from nightrec.tasks import validate as step

        return permanent(step.run, Cleaned.from_xcom(prev),
                         run_id=get_current_context()["run_id"]).to_xcom()

    @task(doc_md="Realized quality: the table latest before ds against ds's new events "
                 "(runs/ds=<ds>/monitor/realized.json); never fails the run.")
    def realized(prev: dict) -> dict:
        from nightrec.core.records import Validated
        from nightrec.tasks import realized as step

        return step.run(Validated.from_xcom(prev), run_id=get_current_context()["run_id"])

    @task(doc_md="Labels, weights and side-feature tables.")
    def augment(prev: dict) -> dict:
        from nightrec.core.records import Validated
        from nightrec.tasks import augment as step

        return step.run(Validated.from_xcom(prev)).to_xcom()

    @task.branch(doc_md="Train a new model (default), or score with a registered one.")
    def choose() -> str:
        params = get_current_context()["params"]
        if params.get("retrain", True) and not params.get("model_version"):
            return "plan_split"
        return "load_model"

    @task(doc_md="One split task per user-hash bucket; global_time's cutoffs over every bucket.")
    def plan_split(prev: dict) -> list[dict]:
        from nightrec.core.records import Augmented
        from nightrec.tasks import versioning

        return versioning.plan(Augmented.from_xcom(prev))

    @task(doc_md="Split one user-hash bucket into train/valid/test (a mapped task).",
          map_index_template="{{ task.op_kwargs['spec']['bucket'] }}")
    def split_bucket(spec: dict) -> dict:
        from nightrec.tasks import versioning

        return versioning.run_bucket(spec)

    @task(doc_md="DVC stage: every bucket's split committed and pushed to the DVC remote; "
                 "the split suite and leakage checks; data_version.")
    def split(prev: dict, done: list[dict]) -> dict:
        from nightrec.core.records import Augmented
        from nightrec.tasks import versioning

        return versioning.finish(Augmented.from_xcom(prev), list(done)).to_xcom()

    @task(doc_md="Fit the candidates, choose on valid, refit the choice: shipped on "
                 "train.ship_fit's parts, gated on train.gate_fit's (never the test split).")
    def train(prev: dict) -> dict:
        from nightrec.core.records import Split
        from nightrec.tasks import train as step

        return step.run(Split.from_xcom(prev)).to_xcom()

    @task(doc_md="Full-ranking metrics vs popularity; writes metrics.json and the verdict.")
    def evaluate(prev: dict) -> dict:
        from nightrec.core.records import Trained
        from nightrec.tasks import evaluate as step

        return step.run(Trained.from_xcom(prev)).to_xcom()

    @task(doc_md="Every interaction up to ds with valid ids (clean + value/policy quarantine).")
    def seen(prev: dict) -> dict:
        from nightrec.core.records import Validated
        from nightrec.tasks import seen as step

        return step.run(Validated.from_xcom(prev)).to_xcom()

    @task.branch(doc_md="register a blessed (or forced) model; else the fallback, or nothing.")
    def gate(prev: dict) -> list[str]:
        from nightrec.core.records import Evaluated
        from nightrec.tasks import evaluate

        params = get_current_context()["params"]
        return evaluate.route(Evaluated.from_xcom(prev), forced=bool(params.get("force_publish")),
                              fallback=params.get("fallback"))

    @task(doc_md="Register a blessed model (immutable; it becomes champion only once published).")
    def register(prev: dict) -> dict:
        from nightrec.core.records import Evaluated
        from nightrec.tasks import registry

        dry = bool(get_current_context()["params"].get("dry_run"))
        return registry.run(Evaluated.from_xcom(prev), dry_run=dry).to_xcom()

    @task(doc_md="The gate refused: the champion re-scored on today's seen items, or popularity.")
    def fallback(prev: dict, seen_out: dict) -> dict:
        from nightrec.core.records import Evaluated, Seen
        from nightrec.tasks import score as step

        return step.fallback(Evaluated.from_xcom(prev), Seen.from_xcom(seen_out)).to_xcom()

    @task(outlets=[CHAMPION],
          doc_md="The published blessed model becomes champion (ds-ordered); emits the asset.")
    def promote(prev: dict, published: dict, *, outlet_events=None) -> dict:
        from nightrec.core.records import ModelChoice, Published
        from nightrec.tasks import registry

        chosen, done = ModelChoice.from_xcom(prev), Published.from_xcom(published)
        if not chosen.registered or done.dry_run:
            raise AirflowSkipException("no new blessed model was published by this run")
        record = registry.set_champion(chosen.model["model_version"])
        if not record["moved"]:
            raise AirflowSkipException(
                f"champion stays {record['model_version']} (ds={record.get('ds')}): this run's "
                f"ds={chosen.ds} is not later")
        outlet_events[CHAMPION].extra = {"model_version": record["model_version"],
                                         "ds": chosen.ds}
        return record

    @task(doc_md="Resolve the pinned model_version, or the champion, from the registry.")
    def load_model() -> dict:
        from nightrec.tasks import registry

        version = get_current_context()["params"].get("model_version")
        return permanent(registry.load, run_ds(), version).to_xcom()

    @task(trigger_rule="none_failed_min_one_success",
          doc_md="Split the chosen model's users into user_id ranges, one score task each.")
    def plan_shards(prev: dict) -> list[dict]:
        from nightrec.core.records import ModelChoice, Seen
        from nightrec.tasks import score as step

        ctx = get_current_context()
        chosen = [x for x in ctx["ti"].xcom_pull(task_ids=["register", "fallback", "load_model"])
                  if x]
        if not chosen:  # the gate refused and the fallback is off: nothing to score
            raise AirflowSkipException("no model to score: the gate did not pass")
        seen_out = Seen.from_xcom(prev)
        return step.plan(seen_out.ds, ModelChoice.from_xcom(chosen[0]).model, seen_out.seen,
                         run_key=run_key(), top_k=ctx["params"].get("top_k"),
                         shards=ctx["params"].get("shards"))

    @task(doc_md="Build the run report (HTML with plots) and upload it; runs whatever happened.")
    def report() -> str:
        from nightrec.ops import report as step
        from nightrec.store import locks

        ctx = get_current_context()
        found = ctx["ti"].get_task_states(dag_id=ctx["dag"].dag_id, run_ids=[ctx["run_id"]])
        states = {t: str(s) for t, s in found.get(ctx["run_id"], {}).items() if t != "report"}
        # dag_run.start_date is the logical date under dag.test(); ingest stamps the real start.
        started = (ctx["ti"].xcom_pull(task_ids="ingest") or {}).get("started_at")
        ds = run_ds()
        other = locks.held_by_another(ds, run_owner())
        if other:  # this run was refused: the ds's report is the other run's to write
            raise AirflowSkipException(f"ds={ds} belongs to run {other['owner']}")
        if not ctx["ti"].xcom_pull(task_ids="ingest", key=LEASE_HELD_KEY):
            # refused at its first task, and the run that refused it has finished since
            raise AirflowSkipException(f"this run never held ds={ds}'s lease: it writes nothing "
                                       "of the ds")
        try:
            return step.run(ds, run_id=ctx["run_id"], task_states=states,
                            started_at=dt.datetime.fromisoformat(started) if started else None)
        finally:
            release_lease(ds)  # the run is over, however it ended: the ds is free

    validated = validate(clean(ingest()))
    prepared = augment(validated)
    seen_out = seen(validated)
    planned_split = plan_split(prepared)
    split_out = split(prepared, split_bucket.expand(spec=planned_split))
    loaded = load_model()
    seen_out >> choose() >> [planned_split, loaded]
    evaluated = evaluate(train(split_out))
    registered = register(evaluated)
    fell_back = fallback(evaluated, seen_out)
    gate(evaluated) >> [registered, fell_back]
    planned = plan_shards(seen_out)
    [registered, fell_back, loaded] >> planned
    published = publish_shards(score_shard.expand(spec=planned))
    promoted = promote(registered, published)
    # report is the teardown of the whole run: after promote too, whose lease renewal would
    # otherwise take the ds again after report released it.
    [published, promoted, realized(validated)] >> report().as_teardown()

nightly_recommendations()
