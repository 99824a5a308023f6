"""Step 7, evaluate and gate: full-ranking metrics on the test split, against popularity.

For each test user, every item is ranked (the user's train and valid items excluded) and the
top ``max(evaluate.k)`` is compared with the user's held-out positives (see tasks/metrics.py).
The popularity baseline ranks items by their count of train positives, with the same exclusions.

The current champion (tasks/registry.py), when there is one, is scored on the same split, its
embeddings re-indexed onto this run's users and items by external id; its metrics are recorded
(and plotted by the report) but do not gate yet: regression gating is the models issue's. The
champion was refit on everything up to its own ds, so test events it has already seen make its
figure optimistic; a fair comparison needs a global time cutoff after the champion's ds.

The gate blesses the model when ``model[gate_metric] >= popularity[gate_metric] * (1 + lift)``
(``evaluate.gate_metric``, ``evaluate.min_lift_over_popularity``). ``metrics.json`` records every
side and the verdict.
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
    emb: dict[str, np.ndarray], parts: dict[str, pd.DataFrame], *, ks: list[int],
    champion: dict[str, np.ndarray] | None = None,
) -> dict[str, dict[str, float]]:
    """Metrics on ``parts['test']`` of the model, of popularity and, when given, of the champion
    (its embeddings already aligned to this run's indices: :func:`align_embeddings`)."""
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
    recs = {
        "model": rank(emb["user"], emb["item"], emb["item_bias"]),
        "popularity": rank(np.zeros((n_users, 1), np.float32), np.zeros((n_items, 1), np.float32),
                           counts),
    }
    if champion is not None:
        recs["champion"] = rank(champion["user"], champion["item"], champion["item_bias"])
    out = {name: metrics.all_metrics(r, rel, ks) for name, r in recs.items()}
    for name, r in recs.items():
        shown = r[:, : min(ks)]
        out[name]["catalogue_coverage"] = float(len(np.unique(shown[shown >= 0])) / n_items)
    out["n_test_users"] = len(users)
    return out


def align_embeddings(
    emb: dict[str, np.ndarray], *, model_users: np.ndarray, model_items: np.ndarray,
    user_ids: np.ndarray, item_ids: np.ndarray,
) -> dict[str, np.ndarray]:
    """Re-index another model's embeddings onto this run's users and items (by external id).

    Users it never saw get a zero vector (their ranking is by item bias alone); items it never
    saw get a bias of -1e30, so they rank below every item it knows.
    """
    u = pd.Index(model_users).get_indexer(user_ids)
    i = pd.Index(model_items).get_indexer(item_ids)
    d = emb["user"].shape[1]
    user = np.zeros((len(user_ids), d), np.float32)
    user[u >= 0] = emb["user"][u[u >= 0]]
    item = np.zeros((len(item_ids), d), np.float32)
    item[i >= 0] = emb["item"][i[i >= 0]]
    bias = np.full(len(item_ids), -1e30, np.float32)
    bias[i >= 0] = emb["item_bias"][i[i >= 0]]
    return {"user": user, "item": item, "item_bias": bias}


def _champion_for(trained: dict) -> tuple[str | None, dict | None]:
    """The current champion's embeddings aligned to this run, or (None, None) if none."""
    from tasks import registry, score

    version = registry.champion()
    if version is None:
        return None, None
    model = registry.model_uris(version)
    emb = dict(np.load(io.BytesIO(storage.read_bytes(model["embeddings"]))))
    aligned = align_embeddings(
        emb,
        model_users=score.ids_by_index(model["users"], schema.USER_IDX, schema.USER_ID),
        model_items=score.ids_by_index(model["items"], schema.ITEM_IDX, schema.ITEM_ID),
        user_ids=score.ids_by_index(trained["user_features"], schema.USER_IDX, schema.USER_ID),
        item_ids=score.ids_by_index(trained["item_features"], schema.ITEM_IDX, schema.ITEM_ID),
    )
    return version, aligned


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


def _evaluate(emb, parts, p: settings.StepParams, champion=None) -> dict:
    result = evaluate_embeddings(emb, parts, ks=list(p["evaluate.k"]), champion=champion)
    result["gate"] = gate(
        result, gate_metric=p["evaluate.gate_metric"], min_lift=p["evaluate.min_lift_over_popularity"]
    )
    return result


def run(ds: str, trained: dict[str, str], params: dict | None = None) -> dict:
    p = settings.step_params(PARAMS, params)
    emb = dict(np.load(io.BytesIO(storage.read_bytes(trained["holdout_embeddings"]))))
    parts = {n: storage.read_parquet(trained[n]) for n in ("train", "valid", "test")}
    champion_version, champion = _champion_for(trained)
    result = _evaluate(emb, parts, p, champion=champion)
    result.update(
        ds=ds, model_version=trained["model_version"], data_version=trained["data_version"],
        champion_version=champion_version,
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
