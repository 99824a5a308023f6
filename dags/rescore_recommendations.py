"""
### rescore_recommendations

Scores and publishes with a registered model, **without retraining**.

**Triggered** by the `nightrec_champion` asset, which `nightly_recommendations` emits when a
blessed model becomes champion, or **by hand** with params:

| param | default | meaning |
|---|---|---|
| `ds` | the asset event's `ds`, else the latest published ds | whose seen interactions (clean + value/policy quarantine, tasks/seen.py) are excluded, and which partition to publish |
| `model_version` | the champion | a registered model to score with |
| `top_k` | `score.top_k` | recommendations per user, 1..1000 |
| `shards` | `score.shards` | score shards (mapped tasks over user_id ranges), 1..256 |
| `dry_run` | `false` | score and validate; publish nothing |

When that ds's table was already published by that model (the usual case right after a nightly
run), `plan` says so and the run ends without work. After a nightly run whose model was promoted
but whose publish failed, this is what puts the champion's table in front of readers.

`plan` takes the run's lease on the ds (`runs/ds=<ds>/_run_lock.json`, nightrec/store/locks.py) before it
looks: a nightly run of that ds still scoring or publishing makes it wait (`run.lock_wait_s`), so
the two never write the same ds at once. The `release` teardown gives the lease back.
"""

from __future__ import annotations

from airflow.sdk import dag, get_current_context, task

from nightrec.orchestration.common import (
    CHAMPION,
    dag_kwargs,
    dry_run_param,
    ds_param,
    hold_lease,
    model_version_param,
    permanent,
    publish_shards,
    release_lease,
    run_key,
    score_shard,
    shards_param,
    top_k_param,
)


@dag(
    dag_id="rescore_recommendations",
    schedule=[CHAMPION],
    doc_md=__doc__,
    **dag_kwargs(),
    params={
        "ds": ds_param(),
        "model_version": model_version_param("Registered model to score with; default champion."),
        "top_k": top_k_param(),
        "shards": shards_param(),
        "dry_run": dry_run_param(),
    },
)
def rescore_recommendations():
    @task.short_circuit(doc_md="Pick the ds and the model; stop if that table is already current.")
    def plan() -> dict | None:
        import contextlib
        import logging

        from nightrec.tasks import score as step

        ctx = get_current_context()
        params = ctx["params"]
        event_ds = [e.extra.get("ds") for events in (ctx.get("triggering_asset_events") or {}).values()
                    for e in events if e.extra.get("ds")]
        ds = step.rescore_ds(params.get("ds"), event_ds)
        logging.getLogger("nightrec.rescore").info(
            "rescore plan: ds=%s (param %s, asset events %s)", ds, params.get("ds"), event_ds)
        hold_lease(ds)  # a nightly run of this ds still scoring or publishing: wait for it
        try:
            planned = permanent(step.rescore_plan, ds, params.get("model_version"))
        except BaseException:
            with contextlib.suppress(Exception):  # the store may be what failed
                release_lease(ds)  # the teardown cannot know the ds of a plan that failed
            raise
        if planned is None:
            release_lease(ds)
            return None
        return planned.to_xcom()

    @task(doc_md="Split the model's users into user_id ranges, one score task each.")
    def plan_shards(prev: dict) -> list[dict]:
        from nightrec.core.records import RescorePlan
        from nightrec.tasks import score as step

        params = get_current_context()["params"]
        planned = RescorePlan.from_xcom(prev)
        return step.plan(planned.ds, planned.model, planned.seen, run_key=run_key(),
                         top_k=params.get("top_k"), shards=params.get("shards"))

    @task(doc_md="Release this run's lease on its ds, however the run ended.")
    def release() -> None:
        planned = get_current_context()["ti"].xcom_pull(task_ids="plan")
        if planned:
            release_lease(planned["ds"])

    publish_shards(score_shard.expand(spec=plan_shards(plan()))) >> release().as_teardown()


rescore_recommendations()
