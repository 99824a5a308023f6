"""Hyperparameter search: optuna (TPE, seeded) over the ranges in ``params.yaml``'s ``tune``.

Run by the manually triggered ``tune_hyperparameters`` DAG on a ds whose nightly run has split
its data. Each trial fits ``tune.model`` on that ds's train split with one point of
``tune.space`` and scores it on the valid split with ``train.select_metric``, as train's own
candidate selection does, so the test split stays untouched for the gate.

Writes ``reports/ds=<ds>/tune/trials.csv`` (one row per trial: number, params, value, seconds,
state) and ``best_params.json`` (the best point as ``params.yaml`` keys, ready to paste, with
its value, the baseline value of the current params and ``data``, what the nightly train checks
before adopting it: the split method, the sizes and the latest valid timestamp). params.yaml is
never edited: the nightly train of a later ds (up to ``tune.max_age_days``) adopts the result
when it came from the same data family (``train.tune_adoption``), and records its verdict.

``tune.space`` entries are ``<key under train>: [low, high, scale]`` with scale ``log``,
``linear`` or ``int``; only the keys of ``tune.model`` are searched.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import pandas as pd

from nightrec.core import schema, settings
from nightrec.store import layout, storage
from nightrec.tasks import evaluate, split, train

PARAMS = ["seed", "tune.model", "tune.n_trials", "tune.timeout_s", "tune.space", "split.method"]
SCALES = ("log", "linear", "int")
log = logging.getLogger(__name__)


def space_for(model: str, space: dict) -> dict[str, tuple[float, float, str]]:
    """The searched dimensions of ``model``: ``{"ease.l2": (low, high, scale), ...}``."""
    if model not in train.models.KINDS:
        raise ValueError(f"tune.model must be one of {train.models.KINDS}, got {model!r}")
    out = {}
    for key, spec in space.items():
        if not key.startswith(model + "."):
            continue
        if not (isinstance(spec, list) and len(spec) == 3 and spec[2] in SCALES):
            raise ValueError(f"tune.space.{key} must be [low, high, scale in {SCALES}], got {spec}")
        low, high, scale = float(spec[0]), float(spec[1]), spec[2]
        if not low < high or (scale == "log" and low <= 0):
            raise ValueError(f"tune.space.{key}: need 0 < low < high for log, low < high else")
        out[key] = (low, high, scale)
    if not out:
        raise ValueError(f"tune.space has no dimension for {model}")
    return out


def _with(params: dict, point: dict) -> dict:
    """A copy of params with ``train.<key>`` set for every key of ``point``."""
    return settings.with_overrides(params, {f"train.{k}": v for k, v in point.items()})


def objective_value(parts: dict, params: dict, *, model: str, n_users: int, n_items: int,
                    workdir) -> float:
    """Valid ``train.select_metric`` of ``model`` fitted on train with ``params``."""
    p = settings.step_params(train.PARAMS, params)
    metric = p["train.select_metric"]
    if model == "ease":
        emb, _ = train.fit_ease(parts["train"], n_users=n_users, n_items=n_items, p=p)
        return evaluate.ranking_metric(emb, parts["train"], parts["valid"], metric=metric,
                                       n_users=n_users)
    _, hist, _ = train.fit_mf(parts["train"], parts["valid"], n_users=n_users, n_items=n_items,
                              p=p, workdir=workdir)
    return float(hist[f"best_val_{metric}"])


def search(parts: dict, params: dict, *, n_users: int, n_items: int, workdir,
           n_trials: int | None = None) -> tuple[dict, pd.DataFrame]:
    """Run the study; returns ``(best, trials)``. ``best`` has ``params`` (params.yaml keys),
    ``value``, ``baseline_value`` (the current params) and ``metric``."""
    import optuna

    p = settings.step_params(PARAMS, params)
    model = p["tune.model"]
    dims = space_for(model, p["tune.space"])
    n_trials = int(n_trials or p["tune.n_trials"])
    metric = params["train"]["select_metric"]
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize",
                                sampler=optuna.samplers.TPESampler(seed=int(p["seed"])))

    def objective(trial) -> float:
        point = {}
        for key, (low, high, scale) in dims.items():
            if scale == "int":
                point[key] = trial.suggest_int(key, int(low), int(high))
            else:
                point[key] = trial.suggest_float(key, low, high, log=scale == "log")
        started = time.perf_counter()
        value = objective_value(parts, _with(params, point), model=model, n_users=n_users,
                                n_items=n_items, workdir=workdir)
        trial.set_user_attr("seconds", round(time.perf_counter() - started, 2))
        log.info("trial %d: %s -> %s %.4f", trial.number, point, metric, value)
        return value

    baseline = objective_value(parts, params, model=model, n_users=n_users, n_items=n_items,
                               workdir=workdir)
    study.optimize(objective, n_trials=n_trials, timeout=float(p["tune.timeout_s"]))
    trials = study.trials_dataframe(attrs=("number", "value", "params", "user_attrs", "state"))
    trials["state"] = trials["state"].astype(str)
    best = {
        "model": model,
        "metric": f"valid_{metric}",
        "value": float(study.best_value),
        "baseline_value": float(baseline),
        "params": {f"train.{k}": v for k, v in study.best_params.items()},
        "n_trials": len(study.trials),
        "data": fingerprint(parts, split_method=p["split.method"], n_users=n_users,
                            n_items=n_items),
    }
    return best, trials


def fingerprint(parts: dict, *, split_method: str, n_users: int, n_items: int) -> dict:
    """What a later nightly train compares before adopting a result (``train.tune_adoption``):
    how the searched data was split, its sizes, and the latest timestamp of the train and
    valid parts the study read (the test part is not read)."""
    stamps = [int(parts[n][schema.TIMESTAMP].max()) for n in ("train", "valid")
              if schema.TIMESTAMP in parts[n] and len(parts[n])]
    until = max(stamps) if stamps else None  # None: never adopted (nothing to compare)
    return {"split_method": split_method, "n_users": int(n_users), "n_items": int(n_items),
            "train_events": len(parts["train"]), "valid_until": until}


def load_split(ds: str) -> tuple[dict, int, int]:
    """The train/valid/test parts a nightly run of ``ds`` split, and its user and item counts."""
    uri = layout.bucketed_prefix(ds, "split", "train")
    if not storage.list_uris(uri):
        from nightrec.core.errors import PermanentError

        raise PermanentError(f"no split for ds={ds} ({uri}): run nightly_recommendations first")
    parts = {n: split.read_part(layout.bucketed_prefix(ds, "split", n)) for n in split.PARTS}
    n_users = len(storage.read_parquet(layout.run_uri(ds, "augment", "user_features.parquet"),
                                       columns=["user_idx"]))
    n_items = len(storage.read_parquet(layout.run_uri(ds, "augment", "item_features.parquet"),
                                       columns=["item_idx"]))
    return parts, n_users, n_items


def run(ds: str, params: dict | None = None, n_trials: int | None = None) -> dict:
    import tempfile
    from pathlib import Path

    params = params if params is not None else settings.load_params()
    parts, n_users, n_items = load_split(settings.check_ds(ds))
    with tempfile.TemporaryDirectory() as tmp:
        best, trials = search(parts, params, n_users=n_users, n_items=n_items, workdir=Path(tmp),
                              n_trials=n_trials)
    out = {"best": layout.report_uri(ds, "tune", "best_params.json"),
           "trials": layout.report_uri(ds, "tune", "trials.csv")}
    storage.write_bytes(out["trials"], trials.to_csv(index=False).encode())
    best["ds"] = ds
    storage.write_json(out["best"], best)
    log.info("best %s = %.4f (current params: %.4f) with %s", best["metric"], best["value"],
             best["baseline_value"], best["params"])
    return {**out, "value": best["value"], "baseline_value": best["baseline_value"],
            "improvement": float(np.round(best["value"] - best["baseline_value"], 6))}
