"""
### tune_hyperparameters

A small hyperparameter search (optuna, seeded TPE) over the ranges in `params.yaml`'s `tune`
group, on the train/valid split of a ds that `nightly_recommendations` has already split.
**Manual trigger only**; it trains nothing that is published and edits no params.

| param | default | meaning |
|---|---|---|
| `ds` | the run's logical date | whose split to search on |
| `n_trials` | `tune.n_trials` | trials, 1..200 |

Writes `reports/ds=<ds>/tune/trials.csv` and `best_params.json` (params.yaml keys, the best
valid metric, the current params' value and the searched data's fingerprint). A nightly run of
this ds or up to `tune.max_age_days` later adopts them when they come from the same data family
(README, "Tuning in the loop"), and records why it did or did not.
"""

from __future__ import annotations

from airflow.sdk import Param, dag, get_current_context, task

from nightrec.orchestration.common import dag_kwargs, ds_param, run_ds


@dag(
    dag_id="tune_hyperparameters",
    schedule=None,
    doc_md=__doc__,
    **dag_kwargs(),
    params={
        "ds": ds_param(),
        "n_trials": Param(None, type=["null", "integer"], minimum=1, maximum=200,
                          description="Trials to run; default tune.n_trials."),
    },
)
def tune_hyperparameters():
    @task(doc_md="Search tune.space for tune.model on the ds's train/valid split.")
    def tune() -> dict:
        from nightrec.tasks import tune as step

        ctx = get_current_context()
        return step.run(run_ds(), n_trials=ctx["params"].get("n_trials"))

    tune()


tune_hyperparameters()
