"""
### rescore_recommendations

Scores and publishes with a registered model, **without retraining**.

**Triggered** by the `nightrec_champion` asset, which `nightly_recommendations` emits when a
blessed model becomes champion, or **by hand** with params:

| param | default | meaning |
|---|---|---|
| `ds` | the asset event's `ds`, else the latest published ds | whose cleaned interactions to use as the seen set, and which partition to publish |
| `model_version` | the champion | a registered model to score with |
| `top_k` | `score.top_k` | recommendations per user, 1..1000 |
| `dry_run` | `false` | score and validate; publish nothing |

When that ds's table was already published by that model (the usual case right after a nightly
run), `plan` says so and the run ends without work. After a nightly run whose model was promoted
but whose publish failed, this is what puts the champion's table in front of readers.
"""

from __future__ import annotations

from airflow.sdk import dag, get_current_context, task

from orchestration.common import (
    CHAMPION,
    dag_kwargs,
    dry_run_param,
    ds_param,
    model_version_param,
    permanent,
    run_key,
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
        "dry_run": dry_run_param(),
    },
)
def rescore_recommendations():
    @task.short_circuit(doc_md="Pick the ds and the model; stop if that table is already current.")
    def plan() -> dict | None:
        import logging

        from tasks import layout, registry, settings, storage
        from tasks.reader import RecommendationReader

        ctx = get_current_context()
        params = ctx["params"]
        event_ds = [e.extra.get("ds") for events in (ctx.get("triggering_asset_events") or {}).values()
                    for e in events if e.extra.get("ds")]
        ds = params.get("ds") or (event_ds[-1] if event_ds else RecommendationReader().latest_ds())
        ds = settings.check_ds(ds)
        logging.getLogger("nightrec.rescore").info(
            "rescore plan: ds=%s (param %s, asset events %s)", ds, params.get("ds"), event_ds)
        model = permanent(registry.resolve, params.get("model_version"))
        version = model["model_version"]
        current = storage.read_json(layout.manifest_uri(ds)) if storage.exists(
            layout.manifest_uri(ds)) else {}
        if current.get("model_version") == version and not params.get("model_version"):
            logging.getLogger("nightrec.rescore").info(
                "ds=%s is already published by %s: nothing to do", ds, version)
            return None
        seen = layout.run_uri(ds, "clean", "interactions.parquet")
        return {"ds": ds, "model": model, "seen": seen}

    @task(doc_md="Top-K unseen items for every user of the model, into staging parts.")
    def score(prev: dict) -> dict:
        from tasks import score as step

        top_k = get_current_context()["params"].get("top_k")
        out = step.run(prev["ds"], prev["model"], prev["seen"], run_key=run_key(), top_k=top_k)
        return {"ds": prev["ds"], **out}

    @task(doc_md="Validate the table, write parts and manifest, then flip the latest pointer.")
    def publish(prev: dict) -> dict:
        from tasks import publish as step

        dry = bool(get_current_context()["params"].get("dry_run"))
        return {"ds": prev["ds"], **permanent(step.run, prev["ds"], prev, dry_run=dry)}

    publish(score(plan()))


rescore_recommendations()
