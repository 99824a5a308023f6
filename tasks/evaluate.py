"""Step 7, evaluate and gate: full-ranking metrics on the test split, against popularity.

For each test user, every item is ranked (the user's train and valid items excluded) and the
top ``max(evaluate.k)`` is compared with the user's held-out positives (see tasks/metrics.py).
The popularity baseline ranks items by their count of train positives, with the same exclusions.

The gate blesses the model when ``model[gate_metric] >= popularity[gate_metric] * (1 + lift)``
(``evaluate.gate_metric``, ``evaluate.min_lift_over_popularity``). Champion comparison and the
registry are the models issue's. ``metrics.json`` records both sides and the verdict.
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np
import pandas as pd

from tasks import layout, metrics, ranking, schema, settings, storage

PARAMS = ["evaluate.k", "evaluate.gate_metric", "evaluate.min_lift_over_popularity"]


def evaluate_embeddings(
    emb: dict[str, np.ndarray], parts: dict[str, pd.DataFrame], *, ks: list[int]
) -> dict[str, dict[str, float]]:
    """Metrics of the model and of popularity on ``parts['test']``: ``{"model", "popularity"}``."""
    n_users, n_items = emb["user"].shape[0], emb["item"].shape[0]
    known = pd.concat([parts["train"], parts["valid"]])
    seen = ranking.seen_matrix(
        known, n_users=n_users, n_items=n_items, user_col=schema.USER_IDX, item_col=schema.ITEM_IDX
    )
    test = parts["test"][parts["test"][schema.LABEL] == 1]
    relevant = test.groupby(schema.USER_IDX)[schema.ITEM_IDX].apply(set)
    users = relevant.index.to_numpy()
    rel = list(relevant.values)
    k = max(ks)

    def rank(user_vecs, item_vecs, bias):
        chunks = ranking.iter_top_k(user_vecs, item_vecs, bias, seen, users, k=k)
        return np.concatenate([items for _, items, _ in chunks])

    pos = parts["train"][parts["train"][schema.LABEL] == 1]
    counts = np.bincount(pos[schema.ITEM_IDX], minlength=n_items).astype(np.float32)
    model_recs = rank(emb["user"], emb["item"], emb["item_bias"])
    pop_recs = rank(np.zeros((n_users, 1), np.float32), np.zeros((n_items, 1), np.float32), counts)
    out = {
        "model": metrics.all_metrics(model_recs, rel, ks),
        "popularity": metrics.all_metrics(pop_recs, rel, ks),
    }
    for name, recs in (("model", model_recs), ("popularity", pop_recs)):
        shown = recs[:, : min(ks)]
        out[name]["catalogue_coverage"] = float(len(np.unique(shown[shown >= 0])) / n_items)
    out["n_test_users"] = len(users)
    return out


def gate(result: dict, *, gate_metric: str, min_lift: float) -> dict:
    model, pop = result["model"][gate_metric], result["popularity"][gate_metric]
    threshold = pop * (1.0 + min_lift)
    return {
        "metric": gate_metric,
        "model": model,
        "popularity": pop,
        "threshold": threshold,
        "blessed": bool(model >= threshold),
    }


def _evaluate(emb, parts, p: settings.StepParams) -> dict:
    result = evaluate_embeddings(emb, parts, ks=list(p["evaluate.k"]))
    result["gate"] = gate(
        result, gate_metric=p["evaluate.gate_metric"], min_lift=p["evaluate.min_lift_over_popularity"]
    )
    return result


def run(ds: str, trained: dict[str, str], params: dict | None = None) -> dict:
    p = settings.step_params(PARAMS, params)
    emb = dict(np.load(io.BytesIO(storage.read_bytes(trained["holdout_embeddings"]))))
    parts = {n: storage.read_parquet(trained[n]) for n in ("train", "valid", "test")}
    result = _evaluate(emb, parts, p)
    result.update(
        ds=ds, model_version=trained["model_version"], data_version=trained["data_version"]
    )
    uri = layout.run_uri(ds, "evaluate", "metrics.json")
    storage.write_json(uri, result)
    model = {
        "embeddings": trained["full_embeddings"],
        "users": trained["user_features"],
        "items": trained["item_features"],
        "model_version": trained["model_version"],
        "data_version": trained["data_version"],
        "metrics": uri,
    }
    return {"model": model, "metrics": uri, "blessed": result["gate"]["blessed"],
            "gate": result["gate"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="evaluate a local model folder (dvc stage)")
    parser.add_argument("--split-dir", required=True, type=Path)
    parser.add_argument("--model-dir", required=True, type=Path)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    p = settings.step_params(PARAMS)
    emb = dict(np.load(args.model_dir / "holdout" / "embeddings.npz"))
    parts = {n: pd.read_parquet(args.split_dir / f"{n}.parquet") for n in ("train", "valid", "test")}
    storage.write_json(args.out, _evaluate(emb, parts, p))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
